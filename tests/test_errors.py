"""Bad input raises a ValueError that names the problem, before any forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel

from .conftest import make_draft, make_target


@pytest.fixture()
def counted():
    """A target and a draft that count their forward calls."""
    target = make_target()
    draft = make_draft(target)
    calls = []
    for module in (target, draft):
        module.register_forward_pre_hook(lambda *args: calls.append(1))
    return target, draft, calls


def ids(length: int = 8) -> torch.Tensor:
    return torch.randint(3, 96, (1, length))


def draft_for(**target_overrides) -> LongSpecDraftModel:
    return make_draft(make_target(**target_overrides))


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(vocab_size=128), "vocab size 128"),
        (dict(hidden_size=48, num_attention_heads=4), "hidden size 48"),
        (dict(num_key_value_heads=4), "number of key/value heads 4"),
        (dict(head_dim=16), "head dim 16"),
    ],
)
def test_draft_made_for_another_target(counted, other, message):
    target, _, calls = counted
    with pytest.raises(ValueError, match=message):
        target.generate(ids(), assistant_model=draft_for(**other), max_new_tokens=4)
    assert not calls


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96)).eval()
    draft = make_draft(make_target())
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        gpt2.generate(ids(), assistant_model=draft, max_new_tokens=4)
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        LongSpecDraftConfig.from_target_config(gpt2.config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(num_return_sequences=2, do_sample=False), "num_return_sequences"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(tree_widths=[0, 2]), "tree_widths"),
        (dict(tree_widths=3), "tree_widths"),
        (dict(compile_draft="yes"), "compile_draft"),
        (dict(compile_target=1), "compile_target"),
        (dict(compile_target=True, cuda_graphs=False), "compile_target"),
        (dict(compile_draft=True, cuda_graphs=False), "compile_draft"),
        (dict(adaptive=None), "adaptive"),
    ],
)
def test_unsupported_generation_arguments(counted, kwargs, message):
    target, draft, calls = counted
    with pytest.raises(ValueError, match=message):
        target.generate(ids(), assistant_model=draft, max_new_tokens=4, **kwargs)
    assert not calls


def test_beam_search_from_the_generation_config(counted):
    target, draft, calls = counted
    target.generation_config.num_beams = 3
    try:
        with pytest.raises(ValueError, match="num_beams"):
            target.generate(ids(), assistant_model=draft, max_new_tokens=4)
    finally:
        target.generation_config.num_beams = 1
    assert not calls


def test_prompt_past_the_positions(counted):
    target, draft, calls = counted
    limit = target.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        target.generate(ids(limit - 10), assistant_model=draft, max_new_tokens=20)
    assert not calls


def test_autocast_is_refused(counted):
    target, draft, calls = counted
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="torch.autocast"):
        target.generate(ids(), assistant_model=draft, max_new_tokens=4)
    assert not calls


def test_right_padding_is_refused(counted):
    target, draft, calls = counted
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        target.generate(torch.randint(3, 96, (2, 8)), attention_mask=mask, assistant_model=draft, max_new_tokens=4)
    assert not calls


def test_longspec_keywords_without_a_longspec_draft_get_transformers_own_error():
    """Calls without a LongSpec draft are transformers' alone: its own check of unused keywords answers."""
    target = make_target()
    with pytest.raises(ValueError, match="model_kwargs.*not used.*tree_widths"):
        target.generate(ids(), max_new_tokens=4, tree_widths=[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_lookup_branches=10**6), "1024"),
        (dict(tree_widths=[64] * 20), "tree nodes"),
        (dict(tree_widths=[2, None]), "None is not a positive integer"),
        (dict(tree_widths=[2, 2.5]), "2.5 is not a positive integer"),
        (dict(tree_widths="4,16"), "tree_widths must be a list"),
        (dict(prompt_lookup_branches=None), "prompt_lookup_branches"),
        (dict(longspec_stats={}), "LongSpecStats"),
        (dict(sampling_rule="greedy"), "sampling_rule"),
    ],
)
def test_sizes_and_types_of_the_longspec_keywords(counted, kwargs, message):
    target, draft, calls = counted
    with pytest.raises(ValueError, match=message):
        target.generate(ids(), assistant_model=draft, max_new_tokens=40, **kwargs)
    assert not calls


def test_a_chain_longer_than_the_output_is_cut_to_it():
    """prompt_lookup_length past max_new_tokens cannot gain more than the call generates: it is cut, and
    the call allocates for and returns what plain generate returns."""
    target = make_target(seed=5)
    draft = make_draft(target, seed=6)
    prompt = torch.randint(3, 96, (1, 10)).repeat(1, 3)
    reference = target.generate(prompt, max_new_tokens=6, do_sample=False)
    output = target.generate(
        prompt, assistant_model=draft, max_new_tokens=6, do_sample=False, prompt_lookup_branches=2, prompt_lookup_length=10**6
    )
    assert torch.equal(output, reference)


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda: dict(input_ids=ids(), attention_mask=torch.ones(2, 8, dtype=torch.long)), "attention_mask has shape"),
        (lambda: dict(input_ids=ids(), attention_mask=torch.ones(1, 7, dtype=torch.long)), "attention_mask has shape"),
        (lambda: dict(input_ids=torch.tensor([[5, 96, 7]])), "token id 96, outside"),
        (lambda: dict(input_ids=torch.tensor([[5, -1, 7]])), "token id -1, outside"),
        (lambda: dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "at least one prompt token"),
        (lambda: dict(inputs_embeds=torch.randn(1, 8, 32)), "needs input_ids"),
        (lambda: dict(input_ids=ids(), past_key_values=__import__("transformers").DynamicCache()), "past_key_values"),
    ],
)
def test_bad_prompts_are_named(counted, make_inputs, message):
    target, draft, calls = counted
    with pytest.raises(ValueError, match=message):
        target.generate(**make_inputs(), assistant_model=draft, max_new_tokens=4)
    assert not calls


def test_use_cache_false_is_said_to_have_no_effect(counted, monkeypatch):
    from longspec_hf.generation import entry

    target, draft, _ = counted
    prompt = ids()
    reference = target.generate(prompt, max_new_tokens=5, do_sample=False)
    said = []
    monkeypatch.setattr(entry.logger, "warning_once", said.append)
    output = target.generate(prompt, assistant_model=draft, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(output, reference)
    assert any("use_cache=False has no effect" in message for message in said)


def test_mismatch_message_without_a_recorded_target():
    target = make_target()
    draft = draft_for(vocab_size=128)
    draft.config.target_name_or_path = None
    with pytest.raises(ValueError) as error:
        target.generate(ids(), assistant_model=draft, max_new_tokens=4)
    assert "None" not in str(error.value) and "vocab size 128" in str(error.value)


@pytest.mark.parametrize("compiled", [dict(compile_target=True), dict(compile_draft=True)])
def test_a_bad_projection_setting_is_refused_before_any_forward(counted, monkeypatch, compiled):
    target, draft, calls = counted
    monkeypatch.setenv("LONGSPEC_HF_FUSED_PROJECTIONS", "on")
    with pytest.raises(ValueError, match="LONGSPEC_HF_FUSED_PROJECTIONS='on' is not a setting: use 0 \\(off\\), 1"):
        target.generate(ids(), assistant_model=draft, max_new_tokens=4, tree_widths=[2, 2], **compiled)
    assert not calls
