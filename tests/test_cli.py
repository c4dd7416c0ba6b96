"""The `longspec` command: convert, push (dry run and mocked upload), train delegation, help and version."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from longspec_hf import LongSpecDraftModel, cli

from .conftest import make_draft, make_target
from .test_conversion import write_old_layout
from .test_hub import PUBLISHED_FILES

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    """The usual umask, under which files are written 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_convert_command(tmp_path, capsys):
    target = make_target("llama")
    write_old_layout(tmp_path / "old", target)
    assert cli.main(["convert", str(tmp_path / "old"), str(tmp_path / "new"), "--sliding-window", "32"]) == 0
    assert "Wrote a LongSpec draft" in capsys.readouterr().out
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["model_type"] == "longspec_draft" and config["sliding_window"] == 32
    draft = LongSpecDraftModel.from_pretrained(tmp_path / "new")
    assert draft.config.attention_bias and draft.config.hidden_size == target.config.hidden_size


def test_convert_command_dtype(tmp_path):
    target = make_target("llama")
    write_old_layout(tmp_path / "old", target)
    cli.main(["convert", str(tmp_path / "old"), str(tmp_path / "new"), "--dtype", "bfloat16"])
    draft = LongSpecDraftModel.from_pretrained(tmp_path / "new", dtype="auto")
    assert draft.dtype == torch.bfloat16


def test_push_command_dry_run(tmp_path, capsys, umask_022):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mean_accepted_length": 3.1, "speedup": "1.9x"}))
    code = cli.main([
        "push", str(tmp_path / "draft"), "me/longspec-smollm2-135m-instruct", "--metrics", str(metrics),
        "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--dry-run", str(tmp_path / "out"),
    ])
    assert code == 0 and "nothing was uploaded" in capsys.readouterr().out
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| 3.1 |" in card.text and "| 1.9x |" in card.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == PUBLISHED_FILES


def test_push_command_uploads(tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploaded.setdefault("repo", repo_id))
    monkeypatch.setattr(
        HfApi, "upload_folder",
        lambda self, *, repo_id, folder_path, **kw: uploaded.setdefault("files", sorted(p.name for p in Path(folder_path).iterdir())),
    )
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    assert cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--metrics", '{"speedup": "2x"}', "--base-model", "org/target"]) == 0
    assert uploaded["repo"] == "me/tiny"
    assert uploaded["files"] == PUBLISHED_FILES


def test_push_rejects_bad_metrics(tmp_path):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    with pytest.raises(SystemExit, match="--metrics"):
        cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--metrics", "not json", "--dry-run", str(tmp_path / "o")])


def test_push_asks_for_a_hub_id_when_the_draft_names_a_local_target(tmp_path):
    """A draft trained from a local folder or GGUF file records that path as its target: the card's base_model
    would be a broken Hub link, so `push` asks for --base-model instead of writing it."""
    target = make_target("llama")
    target.save_pretrained(tmp_path / "target")
    draft = make_draft(target)
    draft.config.target_name_or_path = str(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    with pytest.raises(SystemExit, match="local path.*--base-model org/name"):
        cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--dry-run", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    draft.config.target_name_or_path = None
    draft.save_pretrained(tmp_path / "unnamed")
    with pytest.raises(SystemExit, match="names no target model.*--base-model"):
        cli.main(["push", str(tmp_path / "unnamed"), "me/tiny", "--dry-run", str(tmp_path / "out")])
    assert cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--base-model", "org/target", "--license", "mit",
                     "--dry-run", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "org/target" and card.data.license == "mit"


def test_push_warns_about_a_card_without_license(tmp_path, caplog):
    from transformers.utils import logging

    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--base-model", "org/target", "--dry-run", str(tmp_path / "out")])
    finally:
        logging.disable_propagation()
    assert "has no license" in caplog.text and "--license" in caplog.text


def test_train_delegates_to_training_cli(monkeypatch):
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--target", required=True)

    def main(args):
        seen["target"] = args.target
        return 0

    fake = types.ModuleType("longspec_hf.training.cli")
    fake.add_arguments, fake.main = add_arguments, main
    monkeypatch.setitem(sys.modules, "longspec_hf.training.cli", fake)
    import longspec_hf.training as training

    monkeypatch.setattr(training, "cli", fake, raising=False)
    assert cli.main(["train", "--target", "tiny"]) == 0
    assert seen == {"target": "tiny"}


def test_other_commands_work_without_training_module(monkeypatch, tmp_path):
    # Building the parser for convert/push never imports the training module.
    monkeypatch.setitem(sys.modules, "longspec_hf.training.cli", None)
    import longspec_hf.training as training

    monkeypatch.delattr(training, "cli", raising=False)  # as if no earlier test had imported it
    parser = cli.build_parser("convert")
    args = parser.parse_args(["convert", "a", "b"])
    assert args.command == "convert"
    with pytest.raises(SystemExit, match="longspec train"):
        cli.main(["train", "--help"])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "convert" in out and "push" in out and "train" in out
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)


def test_version(capsys):
    import longspec_hf

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"longspec {longspec_hf.__version__}"


def test_console_script_help_and_version_load_neither_torch_nor_transformers():
    """The `longspec` script (longspec_launcher.main) runs cli.py without the package's import, which loads
    torch and transformers: `--help`, `--version` and a subcommand's `--help` answer at once."""
    script = (
        "import contextlib, io, json, sys\n"
        "import longspec_launcher\n"
        "seen = []\n"
        "for argv in (['--help'], ['--version'], ['demo', '--help'], ['convert', '--help'], ['push', '--help']):\n"
        "    sys.argv = ['longspec', *argv]\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        longspec_launcher.main()\n"
        "    seen.append(out.getvalue())\n"
        "loaded = [m for m in ('torch', 'transformers', 'longspec_hf') if m in sys.modules]\n"
        "print(json.dumps({'loaded': loaded, 'seen': seen}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    help_text, version, demo_help, convert_help, push_help = report["seen"]
    assert "draft-vocab" in help_text and version.startswith("longspec ")
    assert "--context" in demo_help and "--sliding-window" in convert_help and "--base-model" in push_help


def test_bench_help_lists_the_method_names(capsys):
    from longspec_hf.benchmarking import ALL_METHODS

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help
    assert all(name in out for name in ALL_METHODS)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "no_such_method"])


def test_bench_prompt_files_are_cut_to_each_context(tmp_path):
    def tokenizer(text, return_tensors):
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))

    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("a" * 50)
    long.write_text("".join(chr(97 + i % 26) for i in range(300)))
    prompts = cli.file_prompts(tokenizer, [short, long], [40, 200], count=2)
    assert [p.shape for p in prompts[40]] == [(1, 40), (1, 40)]
    assert len(prompts[200]) == 1 and torch.equal(prompts[200][0][0], torch.tensor([ord(c) for c in long.read_text()[:200]]))
    with pytest.raises(SystemExit, match="no prompt file of 400 tokens"):
        cli.file_prompts(tokenizer, [short, long], [400], count=1)


def test_draft_vocab_command_keeps_the_most_frequent_tokens(tmp_path, capsys, umask_022):
    from .test_training import _char_tokenizer

    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    tokenizer = _char_tokenizer(target.config.vocab_size)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("abracadabra " * 30)
    (tmp_path / "text" / "b.md").write_text("zzz")
    common = ["--data", str(tmp_path / "text"), "--tokenizer", str(tmp_path / "tokenizer")]
    cli.main(["draft-vocab", str(tmp_path / "draft"), "--size", "4", "--output", str(tmp_path / "out"), *common])
    # a (150), b and r (60 each), then the first by id of c, d and " " (30 each): " ".
    expected = sorted(tokenizer.convert_tokens_to_ids(list("abr ")))
    assert LongSpecDraftModel.from_pretrained(tmp_path / "out").draft_vocab_ids.tolist() == expected
    assert "scores 4 of 96 tokens" in capsys.readouterr().out
    assert LongSpecDraftModel.from_pretrained(tmp_path / "draft").draft_vocab_ids is None  # --output left it alone
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644
    with pytest.raises(SystemExit, match="--size must be between 1 and"):
        cli.main(["draft-vocab", str(tmp_path / "draft"), "--size", "97", "--output", str(tmp_path / "o"), *common])


def test_draft_vocab_command_rewrites_a_draft_only_when_told(tmp_path, capsys):
    from .test_training import _char_tokenizer

    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    _char_tokenizer(target.config.vocab_size).save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "a.txt").write_text("abracadabra " * 30)
    common = ["--size", "4", "--data", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tokenizer")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["draft-vocab", str(tmp_path / "draft"), *common])
    assert exit_info.value.code == 2 and "one of the arguments --output --in-place is required" in capsys.readouterr().err
    assert LongSpecDraftModel.from_pretrained(tmp_path / "draft").draft_vocab_ids is None
    cli.main(["draft-vocab", str(tmp_path / "draft"), "--in-place", *common])
    assert LongSpecDraftModel.from_pretrained(tmp_path / "draft").config.draft_vocab_size == 4


def test_train_takes_the_smollm2_shorthand_and_records_its_hub_id(tmp_path, monkeypatch, umask_022):
    """`longspec train --target smollm2` trains on the packaged SmolLM2 (here a tiny stand-in folder), as
    `generate` and `bench` take it; the exported draft names the Hub model, so `push` needs no --base-model,
    and the upload carries the training log the card mentions."""
    from longspec_hf import assets

    from .test_training import _char_tokenizer

    target = make_target("llama")
    target.save_pretrained(tmp_path / "smollm2")
    _char_tokenizer(target.config.vocab_size).save_pretrained(tmp_path / "smollm2")
    monkeypatch.setattr(assets, "smollm2_dir", lambda: tmp_path / "smollm2")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 80)
    out = tmp_path / "draft"
    assert cli.main([
        "train", "--target", "smollm2", "--data", str(tmp_path / "corpus"), "--output-dir", str(out),
        "--sequence-length", "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--log-every", "1",
        "--save-every", "1", "--no-progress", "--max-positions", "512",
    ]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["target_name_or_path"] == assets.SMOLLM2_HUB_ID
    # config.json records the dtype of the exported weights (bf16), so reloading keeps their size.
    assert config["dtype"] == "bfloat16"
    assert LongSpecDraftModel.from_pretrained(out).dtype == torch.bfloat16
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "checkpoint-1" / "draft" / "model.safetensors") == 0o644
    assert cli.main(["push", str(out), "me/my-draft", "--dry-run", str(tmp_path / "upload")]) == 0
    upload = tmp_path / "upload"
    assert (upload / "train_log.jsonl").read_text() == (out / "train_log.jsonl").read_text()
    card = ModelCard.load(upload / "README.md")
    assert card.data.base_model == assets.SMOLLM2_HUB_ID and card.data.license == "apache-2.0"
    with pytest.raises(SystemExit, match="leave out --gguf-file"):
        cli.main(["train", "--target", "smollm2", "--gguf-file", "x.gguf", "--data", str(tmp_path / "corpus")])
