"""Draft training on CPU: Anchor-Offset ids, data packing, learning, resume, LoRA, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from longspec_hf import LongSpecDraftModel
from longspec_hf.training.anchor_offset import anchor_offset_position_ids, sample_cross_lag
from longspec_hf.training.data import (
    iter_texts,
    most_frequent_tokens,
    pack_token_sequences,
    split_held_out,
    token_counts,
)
from longspec_hf.training.distill import greedy_acceptance, run_target
from longspec_hf.training.trainer import TrainingConfig, train

from .conftest import make_draft, make_target


def toy_corpus(num_rows: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`(num_rows, length)` rows that each repeat a short random pattern: structure a draft can learn."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        period = int(torch.randint(2, 6, (1,), generator=generator))
        pattern = torch.randint(3, vocab_size, (period,), generator=generator)
        rows.append(pattern.repeat(length // period + 1)[:length])
    return torch.stack(rows)


def tiny_config(output_dir, **overrides) -> TrainingConfig:
    fields = dict(
        output_dir=str(output_dir), sequence_length=48, batch_size=8, max_steps=100, learning_rate=1e-2,
        warmup_steps=5, eval_every=100, eval_batches=8, log_every=10, save_every=0, sliding_window=16,
        progress=False,
    )
    fields.update(overrides)
    return TrainingConfig(**fields)


def read_log(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


# ----- Anchor-Offset ids and lags ---------------------------------------------------------------------
def test_anchor_offset_ids_have_the_documented_form():
    generator = torch.Generator().manual_seed(0)
    ids = anchor_offset_position_ids(64, 20, max_positions=100, generator=generator)
    assert ids.shape == (64, 20) and ids.dtype == torch.long
    assert torch.equal(ids[:, :4], torch.arange(4).expand(64, 4))  # the four sinks keep 0..3
    offsets = ids[:, 4] - 4
    assert torch.equal(ids[:, 4:], offsets[:, None] + torch.arange(4, 20))  # o+4, o+5, ... contiguous
    assert offsets.min() >= 0 and ids.max() <= 99  # o in [0, max_positions - len]
    assert len(offsets.unique()) > 10  # drawn per row
    big = anchor_offset_position_ids(4000, 20, max_positions=100, generator=generator)
    assert big[:, 4].min() == 4 and big[:, -1].max() == 99  # both ends of the range are reachable


def test_anchor_offset_can_be_switched_off():
    ids = anchor_offset_position_ids(3, 10, max_positions=100, enabled=False)
    assert torch.equal(ids, torch.arange(10).expand(3, 10))
    with pytest.raises(ValueError):
        anchor_offset_position_ids(1, 200, max_positions=100)


def test_cross_lag_is_uniform_in_one_to_four():
    lags = sample_cross_lag(4000, torch.Generator().manual_seed(0))
    assert set(lags.tolist()) == {1, 2, 3, 4}
    assert (torch.bincount(lags)[1:].float() / 4000 - 0.25).abs().max() < 0.03


# ----- data ---------------------------------------------------------------------------------------------
def test_data_reads_text_jsonl_and_directories_and_packs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("abcdefghij")
    (tmp_path / "docs" / "b.jsonl").write_text(json.dumps({"text": "klmno"}) + "\n" + json.dumps({"text": "pq"}) + "\n")
    (tmp_path / "docs" / "skip.bin").write_text("zzz")
    texts = list(iter_texts([str(tmp_path / "docs")]))
    assert texts == ["abcdefghij", "klmno", "pq"]
    tokenize = lambda text: [ord(c) for c in text]  # noqa: E731
    rows = pack_token_sequences(texts, tokenize, sequence_length=4, separator_id=0)
    stream = [ord(c) for c in "abcdefghij"] + [0] + [ord(c) for c in "klmno"] + [0] + [ord(c) for c in "pq"] + [0]
    assert torch.equal(rows, torch.tensor(stream[: len(stream) // 4 * 4]).view(-1, 4))
    train_rows, held_out = split_held_out(torch.arange(40).view(20, 2), 0.1, seed=0)
    assert len(train_rows) == 18 and len(held_out) == 2
    assert sorted(torch.cat([train_rows, held_out])[:, 0].tolist()) == list(range(0, 40, 2))


# ----- the loop -----------------------------------------------------------------------------------------
def test_training_lowers_loss_and_raises_held_out_acceptance(tmp_path):
    target = make_target("llama")
    rows = toy_corpus(192, 48, target.config.vocab_size)
    result = train(tiny_config(tmp_path), target=target, train_sequences=rows[64:], eval_sequences=rows[:64])
    log = read_log(result.log_path)
    evals = [r for r in log if "eval_acceptance" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 100
    assert losses[-1] < 0.7 * losses[0]
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"]
    assert evals[-1]["eval_acceptance"] > evals[0]["eval_acceptance"] + 0.08
    # The exported draft (bf16 by default) loads as a draft and agrees with the trained one.
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    saved = LongSpecDraftModel.from_pretrained(str(tmp_path))
    for name, tensor in result.draft.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name].float(), tensor.to(torch.bfloat16).float())


def test_most_frequent_tokens_ranks_by_count_then_id():
    sequences = torch.tensor([[5, 3, 5, 9], [3, 5, 1, 9]])
    assert most_frequent_tokens(sequences, 3).tolist() == [5, 3, 9]
    assert most_frequent_tokens(sequences, 12).tolist() == [5, 3, 9, 1, 0, 2, 4, 6, 7, 8, 10, 11]


def test_token_counts_stop_after_the_document_that_crosses_max_chars():
    tokenize = lambda text: [ord(c) - 96 for c in text]  # noqa: E731  ("a" -> 1)
    counts = token_counts(["ab", "bc", "cd"], tokenize, vocab_size=4, max_chars=3)
    assert counts.tolist() == [0, 1, 2, 1]  # "cd" unread; "d" (4) would be past the vocabulary anyway
    assert token_counts(["abcd"], tokenize, vocab_size=4).tolist() == [0, 1, 1, 1]


def test_export_with_a_draft_vocabulary_of_the_training_datas_tokens(tmp_path):
    """`draft_vocab=N`: the exported draft scores the N most frequent training tokens; its integer ids
    survive the bf16 export and greedy decoding with it still gives the target's own tokens."""
    target = make_target("llama")
    rows = toy_corpus(64, 32, target.config.vocab_size)
    config = tiny_config(tmp_path, sequence_length=32, batch_size=4, max_steps=3, eval_every=0, warmup_steps=1, draft_vocab=20)
    result = train(config, target=target, train_sequences=rows)
    expected = sorted(most_frequent_tokens(rows, 20).tolist())
    assert result.draft.draft_vocab_ids.tolist() == expected
    saved = LongSpecDraftModel.from_pretrained(str(tmp_path))
    assert saved.config.draft_vocab_size == 20
    assert saved.draft_vocab_ids.dtype == torch.long and saved.draft_vocab_ids.tolist() == expected
    prompt = rows[:1, :20]
    reference = target.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(target.generate(prompt, assistant_model=saved, max_new_tokens=12, do_sample=False), reference)


def test_resume_gives_the_same_state_as_uninterrupted_training(tmp_path):
    target = make_target("llama")
    rows = toy_corpus(64, 32, target.config.vocab_size)
    common = dict(sequence_length=32, batch_size=4, max_steps=6, gradient_accumulation_steps=2, eval_every=0, warmup_steps=2)
    straight = train(tiny_config(tmp_path / "a", save_every=3, **common), target=target, train_sequences=rows)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "draft" / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = train(
        tiny_config(tmp_path / "b", resume_from=str(checkpoint), **common), target=target, train_sequences=rows
    )
    assert resumed.step == straight.step == 6
    halfway = LongSpecDraftModel.from_pretrained(str(checkpoint / "draft"))
    moved = any(not torch.equal(halfway.state_dict()[k], v) for k, v in straight.draft.state_dict().items())
    assert moved  # the second half did train
    for name, tensor in straight.draft.state_dict().items():
        assert torch.equal(resumed.draft.state_dict()[name], tensor), name


def test_time_limit_stops_with_a_checkpoint_that_resumes_to_the_same_draft(tmp_path):
    target = make_target("llama")
    rows = toy_corpus(64, 32, target.config.vocab_size)
    common = dict(sequence_length=32, batch_size=4, max_steps=5, eval_every=0, warmup_steps=2)
    straight = train(tiny_config(tmp_path / "a", **common), target=target, train_sequences=rows)
    # No time at all: the run stops after its first step, leaving checkpoint-1 and an exported draft.
    stopped = train(tiny_config(tmp_path / "b", max_seconds=0.0, **common), target=target, train_sequences=rows)
    assert stopped.step == 1 and (tmp_path / "b" / "checkpoint-1" / "optimizer.pt").exists()
    assert (tmp_path / "b" / "model.safetensors").exists()
    assert "max_seconds" in read_log(stopped.log_path)[-1]["stopped"]
    resumed = train(tiny_config(tmp_path / "b", resume_from="latest", **common), target=target, train_sequences=rows)
    assert resumed.step == 5
    for name, tensor in straight.draft.state_dict().items():
        assert torch.equal(resumed.draft.state_dict()[name], tensor), name


def test_data_cache_is_reused_and_refused_for_other_settings(tmp_path):
    from longspec_hf.training.trainer import load_or_build_sequences

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 30)
    config = TrainingConfig(
        data=[str(tmp_path / "corpus")], sequence_length=16, max_eval_sequences=4, data_cache=str(tmp_path / "rows.pt")
    )
    tokenizer = _char_tokenizer(96)
    train_rows, held_out = load_or_build_sequences(config, lambda: tokenizer)
    assert (tmp_path / "rows.pt").exists() and len(train_rows) > 0 and len(held_out) > 0

    def no_tokenizer():
        raise AssertionError("the cached rows need no tokenizer")

    cached_train, cached_held_out = load_or_build_sequences(config, no_tokenizer)
    assert torch.equal(cached_train, train_rows) and torch.equal(cached_held_out, held_out)
    longer = TrainingConfig(**{**config.__dict__, "sequence_length": 32})
    with pytest.raises(ValueError, match="sequence_length"):
        load_or_build_sequences(longer, no_tokenizer)


def test_lora_adapts_an_existing_draft_and_exports_it_merged(tmp_path):
    target = make_target("llama")
    start = make_draft(target)
    start.save_pretrained(str(tmp_path / "start"))
    rows = toy_corpus(64, 32, target.config.vocab_size)
    config = tiny_config(
        tmp_path / "out", init_from=str(tmp_path / "start"), lora=True, lora_rank=4, max_steps=8, sequence_length=32,
        eval_every=0, save_every=4, save_dtype="float32",
    )
    result = train(config, target=target, train_sequences=rows)
    assert (tmp_path / "out" / "checkpoint-4" / "draft" / "adapter_model.safetensors").exists()
    merged = LongSpecDraftModel.from_pretrained(str(tmp_path / "out"))
    assert set(merged.state_dict()) == set(start.state_dict())  # a plain draft, no adapter weights
    changed = [k for k, v in start.state_dict().items() if not torch.allclose(merged.state_dict()[k], v)]
    assert changed and all("proj" in k for k in changed)  # only the projections moved
    # The exported draft predicts as the trained one does.
    merged.attach_target(target)
    ids = rows[:2]
    positions = torch.arange(32).expand(2, 32)
    batch = run_target(target, ids, positions)
    metrics = greedy_acceptance(merged, ids, positions, batch)
    assert 0.0 <= metrics["acceptance"] <= 1.0
    torch.testing.assert_close(
        merged(ids, positions, batch.key, batch.value), result.draft(ids, positions, batch.key, batch.value)
    )


def _char_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 32 + vocab_size - 3):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_cli_trains_from_text_files(tmp_path):
    from longspec_hf.training.cli import add_arguments, main

    target = make_target("llama")
    target.save_pretrained(str(tmp_path / "target"))
    _char_tokenizer(target.config.vocab_size).save_pretrained(str(tmp_path / "target"))
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--target", str(tmp_path / "target"), "--data", str(tmp_path / "corpus"), "--output-dir", str(tmp_path / "out"),
        "--sequence-length", "32", "--batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--log-every", "2",
        "--held-out-fraction", "0.2", "--no-progress", "--max-positions", "512",
    ])
    main(args)
    assert (tmp_path / "out" / "model.safetensors").exists()
    log = read_log(str(tmp_path / "out" / "train_log.jsonl"))
    assert any("eval_chain_accepted" in r for r in log) and any("loss" in r for r in log)


def test_inference_code_never_imports_training():
    code = (
        "import sys, longspec_hf, longspec_hf.generation, longspec_hf.modeling, longspec_hf.kernels;"
        "assert not [m for m in sys.modules if m.startswith('longspec_hf.training')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
