"""Tiny random targets and drafts for CPU tests (fp32, no network)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import longspec_hf  # noqa: F401  (routes generate() with a LongSpec draft)
from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_target(
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 96,
    max_position_embeddings: int = 1024,
    num_hidden_layers: int = 2,
    **overrides,
):
    config_class, model_class = ARCHITECTURES[arch]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mistral":
        fields["sliding_window"] = None
    if arch == "qwen3":
        fields["head_dim"] = 8
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    # Random weights give flat distributions; sharpen them so greedy choices are far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_draft(target, seed: int = 1, sliding_window: int = 16, **overrides) -> LongSpecDraftModel:
    torch.manual_seed(seed)
    config = LongSpecDraftConfig.from_target_config(target.config, sliding_window=sliding_window, **overrides)
    return LongSpecDraftModel(config).eval()


@pytest.fixture(scope="session")
def llama_pair():
    target = make_target("llama")
    return target, make_draft(target)


@pytest.fixture(scope="module")
def interpreter_results(request):
    """The results of the test module's `interpreter_cases()`, run once in a child process whose Triton
    runs in the interpreter (kernel tests on CPU)."""
    pytest.importorskip("triton")
    from longspec_hf.kernels import testing

    return testing.run_in_triton_interpreter(request.module.__file__, "interpreter_cases")
