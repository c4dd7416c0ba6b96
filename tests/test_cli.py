"""The `longspec` command: convert, push (dry run and mocked upload), train delegation."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from longspec_hf import LongSpecDraftModel, cli

from .conftest import make_draft, make_target
from .test_conversion import write_old_layout


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


def test_push_command_dry_run(tmp_path, capsys):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mean_accepted_length": 3.1, "speedup": "1.9x"}))
    code = cli.main([
        "push", str(tmp_path / "draft"), "me/longspec-smollm2-135m-instruct", "--metrics", str(metrics),
        "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--dry-run", str(tmp_path / "out"),
    ])
    assert code == 0 and "nothing was uploaded" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| 3.1 |" in card.text and "| 1.9x |" in card.text
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"README.md", "config.json", "generation_config.json", "model.safetensors"}


def test_push_command_uploads(tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploaded.setdefault("repo", repo_id))
    monkeypatch.setattr(
        HfApi, "upload_folder",
        lambda self, *, repo_id, folder_path, **kw: uploaded.setdefault("files", sorted(p.name for p in Path(folder_path).iterdir())),
    )
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    assert cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--metrics", '{"speedup": "2x"}']) == 0
    assert uploaded["repo"] == "me/tiny"
    assert uploaded["files"] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_push_rejects_bad_metrics(tmp_path):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "draft")
    with pytest.raises(ValueError, match="--metrics"):
        cli.main(["push", str(tmp_path / "draft"), "me/tiny", "--metrics", "not json", "--dry-run", str(tmp_path / "o")])


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
    parser = cli.build_parser()
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


def test_draft_vocab_command_keeps_the_most_frequent_tokens(tmp_path, capsys):
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
    with pytest.raises(SystemExit, match="--size must be between 1 and"):
        cli.main(["draft-vocab", str(tmp_path / "draft"), "--size", "97", *common])
