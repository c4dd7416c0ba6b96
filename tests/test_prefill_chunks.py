"""Chunked prefill: a prompt longer than `prefill_chunk_size` (transformers' GenerationConfig field) is
encoded chunk by chunk through LongSpec's cache, each later chunk attending to the committed chunks
before it and causally to itself. The tokens and the logits of every generated token equal plain
`generate()` (fp32), for full attention, sliding windows, left padding longer than a chunk, and chunk
sizes that do and do not divide the prompt.

Logits are compared besides tokens: a key seen in error (a padding slot, a slot of the chunk's future)
moves a random target's logits by tenths while its argmax often survives."""

from __future__ import annotations

import pytest
import torch

from longspec_hf import LongSpecStats
from longspec_hf.generation import attention

from .conftest import make_draft, make_target

LOGIT_TOLERANCE = 1e-4
EOS = 2


def compare_with_plain(target, draft, prompt, attention_mask=None, chunk=8, max_new_tokens=12, **longspec):
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    plain = target.generate(prompt, **kwargs)
    stats = LongSpecStats()
    ours = target.generate(
        prompt, assistant_model=draft, prefill_chunk_size=chunk, longspec_stats=stats, **kwargs, **longspec
    )
    assert torch.equal(ours.sequences, plain.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, plain.logits)):
        rows = (ours.sequences[:, prompt.shape[1] : prompt.shape[1] + step] != EOS).all(dim=1)  # rows still going
        assert torch.allclose(a[rows], b[rows], atol=LOGIT_TOLERANCE, rtol=0), f"logits of token {step}"
    return stats


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_a_chunked_prompt_decodes_exactly(chunk):
    target = make_target("llama", seed=21)
    draft = make_draft(target)
    prompt = torch.randint(3, 96, (1, 45), generator=torch.Generator().manual_seed(chunk))
    compare_with_plain(target, draft, prompt, chunk=chunk, tree_widths=[2, 2])


def test_left_padding_longer_than_a_chunk():
    target = make_target("llama", seed=22)
    draft = make_draft(target)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 96, (3, 40), generator=generator)
    mask = torch.ones_like(prompt)
    mask[1, :21] = 0  # padding over two chunks and a part of the third
    mask[2, :8] = 0  # exactly the first chunk
    prompt[mask == 0] = 0
    compare_with_plain(target, draft, prompt, mask, chunk=8, tree_widths=[2, 2, 2])


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("mistral", dict(sliding_window=6)),
        ("qwen3", dict(use_sliding_window=True, sliding_window=11, num_hidden_layers=3, head_dim=8,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    ],
)
def test_sliding_windows_across_chunks(arch, overrides):
    target = make_target(arch, seed=23, **overrides)
    draft = make_draft(target)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 96, (2, 33), generator=generator)
    mask = torch.ones_like(prompt)
    mask[0, :9] = 0
    prompt[mask == 0] = 0
    compare_with_plain(target, draft, prompt, mask, chunk=5, tree_widths=[2, 2])


def test_chunking_keeps_the_drafts_acceptance():
    """The cache a chunked prefill leaves behind is the one the draft reads: the same rounds."""
    target = make_target("llama", seed=24)
    draft = make_draft(target)
    segment = torch.randint(3, 96, (12,), generator=torch.Generator().manual_seed(3))
    prompt = segment.repeat(5)[None]
    one = compare_with_plain(target, draft, prompt, chunk=prompt.shape[1], tree_widths=[2, 2], prompt_lookup_branches=1)
    many = compare_with_plain(target, draft, prompt, chunk=7, tree_widths=[2, 2], prompt_lookup_branches=1)
    assert many.accepted_lengths == one.accepted_lengths and many.rounds == one.rounds


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_a_bad_chunk_size_is_refused_before_any_forward(chunk):
    target = make_target("llama", seed=25)
    draft = make_draft(target)
    forwards = []
    handle = target.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            target.generate(torch.tensor([[5, 6, 7]]), assistant_model=draft, max_new_tokens=4, prefill_chunk_size=chunk)
    finally:
        handle.remove()
    assert forwards == []


@pytest.mark.parametrize("chunk", [7, 16])
def test_unpadded_later_chunks_through_sdpa_decode_exactly(monkeypatch, chunk):
    """Where FlashAttention takes a later chunk (CUDA, 16-bit), it runs as one SDPA call over the cache's
    slots with the causal mask aligned to the last key. Here SDPA is told it may (on CPU it then runs the
    same mask materialized): the chunk sees exactly the committed slots and its own past, in every
    layer; a padded batch still takes the tree kernel."""
    calls = []
    later_chunk_attention = attention._later_chunk_attention

    def recording(query, key, value, scale):
        calls.append((query.shape[2], key.shape[2]))
        return later_chunk_attention(query, key, value, scale)

    monkeypatch.setattr(attention, "_flash_takes", lambda *tensors: True)
    monkeypatch.setattr(attention, "_later_chunk_attention", recording)
    target = make_target("llama", seed=26)
    draft = make_draft(target)
    prompt = torch.randint(3, 96, (2, 45), generator=torch.Generator().manual_seed(chunk))
    compare_with_plain(target, draft, prompt, chunk=chunk, tree_widths=[2, 2])
    layers = target.config.num_hidden_layers
    expected = [(min(chunk, 45 - start), min(start + chunk, 45)) for start in range(chunk, 45, chunk)]
    assert calls == [shapes for shapes in expected for _ in range(layers)]

    calls.clear()
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    compare_with_plain(target, draft, prompt, mask, chunk=chunk, tree_widths=[2, 2])
    assert calls == []
