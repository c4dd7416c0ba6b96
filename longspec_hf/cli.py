"""The `longspec` command.

    longspec convert SRC DST [--sliding-window N] [--dtype bfloat16]
    longspec push SRC REPO_ID [--metrics JSON|FILE] [--card-template README.md] [--dry-run DIR]
    longspec train ...        (arguments from longspec_hf.training.cli)

Each subcommand registers itself in `SUBCOMMANDS` with a function that adds its arguments and one
that runs it; more (demo, generate, bench) plug in the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# ----- convert --------------------------------------------------------------------------------------------
def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder or Hub repo id of a draft in the published LongSpec layout (or native)")
    parser.add_argument("dst", help="folder to write the LongSpecDraftModel to")
    parser.add_argument("--sliding-window", type=int, default=None, help="the draft's self-attention window (default 512)")
    parser.add_argument("--dtype", default=None, help="save in this dtype (e.g. bfloat16); default: the checkpoint's")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")


def _run_convert(args: argparse.Namespace) -> int:
    from .modeling.conversion import convert_checkpoint

    hub_kwargs = {"revision": args.revision} if args.revision else {}
    model = convert_checkpoint(args.src, args.dst, sliding_window=args.sliding_window, dtype=args.dtype, **hub_kwargs)
    config = model.config
    print(
        f"Wrote a LongSpec draft to {args.dst}: hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"window {config.sliding_window}, target {config.target_model_type} ({config.target_name_or_path or 'unnamed'})."
    )
    return 0


# ----- push -----------------------------------------------------------------------------------------------
def _add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder (or repo id) of the draft to publish; the published layout is converted")
    parser.add_argument("repo_id", help="Hub repository to create or update, e.g. org/longspec-smollm2-135m-instruct")
    parser.add_argument("--metrics", default=None, help="measured numbers: a JSON object or a path to a JSON file")
    parser.add_argument("--card-template", default=None, help="model-card template (default: hub_configs/<repo name>/README.md)")
    parser.add_argument("--base-model", default=None, help="target model id for the card (default: from the draft config)")
    parser.add_argument("--license", default=None, help="license of the card metadata (default: the template's)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default="Upload LongSpec draft")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--dry-run", metavar="DIR", default=None, help="write the files that would be uploaded to DIR; upload nothing")


def _run_push(args: argparse.Namespace) -> int:
    from .modeling import LongSpecDraftModel
    from .modeling.conversion import load_metrics

    metrics = load_metrics(args.metrics)
    draft = LongSpecDraftModel.from_pretrained(args.src)
    result = draft.push_to_hub(
        args.repo_id,
        metrics=metrics,
        card_template=args.card_template,
        base_model=args.base_model,
        license=args.license,
        private=args.private or None,
        token=args.token,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        save_to=args.dry_run,
    )
    if args.dry_run:
        print(f"Dry run: wrote the files for {args.repo_id} to {result}; nothing was uploaded.")
    else:
        print(f"Pushed {args.src} to https://huggingface.co/{args.repo_id} ({result})")
    return 0


# ----- train (delegates to longspec_hf.training.cli, imported only when used) ------------------------------
def _training_cli():
    try:
        from .training import cli as training_cli
    except ImportError as error:
        raise SystemExit(
            f"`longspec train` needs longspec_hf.training.cli, which could not be imported ({error}). "
            "Install the training extras: pip install 'longspec-hf[train]'."
        ) from error
    return training_cli


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing here: `build_parser` adds the training module's own arguments when `train` is chosen."""


def _run_train(args: argparse.Namespace) -> int | None:
    return _training_cli().main(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "convert": Subcommand("convert a published LongSpec checkpoint to a LongSpecDraftModel folder", _add_convert_arguments, _run_convert),
    "push": Subcommand("upload a draft and its model card to the Hugging Face Hub", _add_push_arguments, _run_push),
    "train": Subcommand("train a draft for a target model (see `longspec train --help`)", _add_train_arguments, _run_train),
}


def build_parser(with_train_arguments: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longspec", description="LongSpec speculative decoding for Hugging Face Transformers")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        if name == "train" and with_train_arguments:
            _training_cli().add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The training arguments come from another module, imported only for `longspec train`.
    with_train = bool(argv) and argv[0] == "train"
    args = build_parser(with_train_arguments=with_train).parse_args(argv)
    status = args._run(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
