"""`return_dict_in_generate=True` returns the target's cache as plain `generate` does, and it continues
plain decoding exactly."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from longspec_hf import LongSpecStats
from longspec_hf.generation import _compat
from longspec_hf.generation.workspace import ATTRIBUTE

from .conftest import make_draft, make_target
from .test_sliding_window import SEEDS, WINDOWED_TARGETS

# `past_key_values` in older transformers, `cache` in newer ones (the output field and generate's keyword).
CACHE = _compat.cache_output_field()


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama", seed=41)
    return target, make_draft(target, seed=42)


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def continued(target, output, attention_mask=None, max_new_tokens: int = 12) -> torch.Tensor:
    """Plain `generate` (no draft) continuing `output`'s sequences from its cache."""
    mask = None
    if attention_mask is not None:
        grown = output.sequences.shape[1] - attention_mask.shape[1]
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], grown)], dim=1)
    return target.generate(
        output.sequences, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **{CACHE: output[CACHE]}
    )


@pytest.mark.parametrize(
    "outputs",
    [dict(), dict(output_scores=True), dict(output_scores=True, output_logits=True), dict(use_cache=False)],
)
def test_the_output_has_plain_generates_keys(pair, outputs):
    target, draft = pair
    ids = prompt(1, 20, seed=1)
    kwargs = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, **outputs)
    reference = target.generate(ids, **kwargs)
    output = target.generate(ids, assistant_model=draft, **kwargs)
    assert list(output.keys()) == list(reference.keys())
    assert (CACHE in output) == outputs.get("use_cache", True)


def test_continuing_from_the_returned_cache_gives_plain_decodings_tokens(pair):
    target, draft = pair
    ids = prompt(1, 40, seed=2)
    kwargs = dict(max_new_tokens=25, do_sample=False, return_dict_in_generate=True)
    reference = target.generate(ids, **kwargs)
    output = target.generate(ids, assistant_model=draft, tree_widths=[2, 2, 2], **kwargs)
    assert torch.equal(output.sequences, reference.sequences)
    cache, plain_cache = output[CACHE], reference[CACHE]
    assert type(cache) is type(plain_cache) is DynamicCache
    assert cache.get_seq_length() == plain_cache.get_seq_length() == output.sequences.shape[1] - 1
    for ours, theirs in zip(cache.layers, plain_cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(continued(target, output), continued(target, reference))


def test_a_padded_batch_whose_rows_end_apart_continues_like_plain_decoding(pair):
    """Row 0 meets its EOS early: plain decoding then feeds it padding, whose K/V LongSpec never computes.
    The returned cache stops where row 0's tokens end; the continuation computes the rest."""
    target, draft = pair
    ids = prompt(2, 30, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    free_run = target.generate(ids, eos_token_id=None, **kwargs).sequences[:, ids.shape[1] :]
    # An EOS id that row 0 produces at its 6th token (and not before) and row 1 never does.
    eos = int(free_run[0, 5])
    assert eos not in free_run[0, :5].tolist() and eos not in free_run[1].tolist()

    reference = target.generate(ids, eos_token_id=eos, **kwargs)
    stats = LongSpecStats()
    output = target.generate(
        ids, assistant_model=draft, eos_token_id=eos, prompt_lookup_branches=2, longspec_stats=stats, **kwargs
    )
    assert torch.equal(output.sequences, reference.sequences)
    assert max(stats.accepted_lengths) > 2  # rows committed several tokens per round, and different numbers
    assert output[CACHE].get_seq_length() == ids.shape[1] + 6 - 1
    assert reference[CACHE].get_seq_length() == output.sequences.shape[1] - 1
    assert torch.equal(continued(target, output, mask), continued(target, reference, mask))


def test_sliding_window_layers_hold_the_window_as_plain_decoding_does():
    target = make_target("mistral", seed=SEEDS["mistral"], **WINDOWED_TARGETS["mistral"])
    draft = make_draft(target, seed=SEEDS["mistral"] + 1)
    ids = prompt(1, 30, seed=4)
    kwargs = dict(max_new_tokens=15, do_sample=False, return_dict_in_generate=True)
    reference = target.generate(ids, **kwargs)
    output = target.generate(ids, assistant_model=draft, **kwargs)
    assert torch.equal(output.sequences, reference.sequences)
    for ours, theirs in zip(output[CACHE].layers, reference[CACHE].layers):
        assert type(ours) is type(theirs) is DynamicSlidingWindowLayer
        assert ours.get_seq_length() == theirs.get_seq_length() and ours.keys.shape == theirs.keys.shape
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(continued(target, output), continued(target, reference))


def test_the_returned_cache_owns_its_memory(pair):
    """The cache views the call's buffer without a copy; no later call writes into it (the draft stops
    keeping that workspace), and dropping the output frees it."""
    target, draft = pair
    ids = prompt(1, 30, seed=5)
    kwargs = dict(max_new_tokens=12, do_sample=False)
    target.generate(ids, assistant_model=draft, **kwargs)
    workspace = draft.__dict__[ATTRIBUTE]
    buffer = weakref.ref(workspace.cache.kv)
    output = target.generate(ids, assistant_model=draft, return_dict_in_generate=True, **kwargs)
    assert draft.__dict__.get(ATTRIBUTE) is None  # the call reused the kept workspace and handed it over
    keys = output[CACHE].layers[0].keys
    assert keys.untyped_storage().data_ptr() == workspace.cache.kv.untyped_storage().data_ptr()
    del workspace
    snapshot = keys.clone()
    target.generate(prompt(1, 30, seed=6), assistant_model=draft, **kwargs)
    assert torch.equal(keys, snapshot)
    del keys, snapshot
    assert buffer() is not None
    del output
    assert buffer() is None
