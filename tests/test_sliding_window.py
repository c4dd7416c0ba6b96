"""Sliding-window targets decode exactly: `generate(assistant_model=draft)` equals plain `generate()`
(greedy, fp32) for Mistral, Qwen2 and Qwen3 targets whose window is shorter than prompt + output, layer
by layer (full layers stay full), with left-padded batches, both decoding loops and prompt-lookup chains
that reach deeper than the window.

Besides the tokens, the logits of every generated token are compared: a random target's argmax often
survives a wrong mask (an ancestor left visible outside the window moves its logits by tenths, not its
choice), its logits do not."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from longspec_hf import LongSpecStats

from .conftest import make_draft, make_target

# Windows shorter than the prompts (20-40 tokens) and much shorter than prompt + output.
WINDOWED_TARGETS = {
    # Mistral hands its one `sliding_window` to every layer.
    "mistral": dict(sliding_window=8),
    # Qwen2 slides from layer `max_window_layers` on: full, sliding, sliding.
    "qwen2": dict(use_sliding_window=True, sliding_window=10, max_window_layers=1, num_hidden_layers=3),
    # Qwen3 with explicit layer kinds: sliding, full, sliding; a window of 24 also exceeds the shortest
    # prompts, whose prefill then needs no window while the later rounds do.
    "qwen3": dict(
        use_sliding_window=True,
        sliding_window=24,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}
EOS = 2  # conftest's targets
# fp32 logits of the same attention in another summation order differ by ~1e-6; a key seen in error moves
# them by ~1e-1.
LOGIT_TOLERANCE = 1e-4
# The window each layer's attention applies (None: full attention).
LAYER_WINDOWS = {"mistral": [8, 8], "qwen2": [None, 10, 10], "qwen3": [24, None, 24]}
SEEDS = {"mistral": 11, "qwen2": 12, "qwen3": 13}


@functools.cache
def windowed_pair(arch: str):
    target = make_target(arch, seed=SEEDS[arch], **WINDOWED_TARGETS[arch])
    return target, make_draft(target)


def full_attention_twin(arch: str):
    """The same weights with the window switched off."""
    overrides = {k: v for k, v in WINDOWED_TARGETS[arch].items() if k not in ("use_sliding_window", "sliding_window")}
    overrides.pop("layer_types", None)
    return make_target(arch, seed=SEEDS[arch], **overrides)


def repetitive_batch(rng: random.Random, vocab_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 20-40 tokens (row 0 the longest) that repeat a segment, so that prompt
    lookup finds chains; the other rows are shorter by random amounts of padding."""
    prompt_len = rng.randrange(30, 41)
    rows, mask = [], []
    for row in range(batch_size):
        length = prompt_len if row == 0 else rng.randrange(20, prompt_len + 1)
        segment = [rng.randrange(3, vocab_size) for _ in range(rng.randrange(5, 9))]
        head = [rng.randrange(3, vocab_size) for _ in range(4)]
        tokens = (head + segment * 8)[:length]
        rows.append([0] * (prompt_len - length) + tokens)
        mask.append([0] * (prompt_len - length) + [1] * length)
    return torch.tensor(rows), torch.tensor(mask)


def generate_kwargs(mask: torch.Tensor, max_new_tokens: int) -> dict:
    return dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                output_logits=True)


@functools.cache
def plain_generate(arch: str, seed: int, batch_size: int, max_new_tokens: int):
    """A case's batch and plain `generate`'s output for it (kept: both decoding loops compare with it)."""
    target, _ = windowed_pair(arch)
    ids, mask = repetitive_batch(random.Random(f"window-{arch}-{seed}"), target.config.vocab_size, batch_size)
    return ids, mask, target.generate(ids, **generate_kwargs(mask, max_new_tokens))


def assert_same_output(reference, output, prompt_len: int, case=None) -> None:
    """Same tokens, and the same logits for every token up to each row's end (after its EOS, plain
    `generate` keeps computing logits for padding that LongSpec does not)."""
    assert torch.equal(reference.sequences, output.sequences), (case, reference.sequences.tolist(),
                                                               output.sequences.tolist())
    ref_logits, logits = torch.stack(reference.logits, dim=1), torch.stack(output.logits, dim=1)
    for row, tokens in enumerate(reference.sequences[:, prompt_len:].tolist()):
        steps = tokens.index(EOS) + 1 if EOS in tokens else len(tokens)
        torch.testing.assert_close(logits[row, :steps], ref_logits[row, :steps], rtol=0, atol=LOGIT_TOLERANCE,
                                   msg=lambda m: f"{case}, row {row}: {m}")


def plain_and_longspec(arch: str, seed: int, batch_size: int, max_new_tokens: int, **longspec_kwargs):
    """Plain and LongSpec `generate` on one case; asserts that they agree and returns LongSpec's stats."""
    target, draft = windowed_pair(arch)
    ids, mask, reference = plain_generate(arch, seed, batch_size, max_new_tokens)
    stats = LongSpecStats()
    output = target.generate(
        ids, assistant_model=draft, longspec_stats=stats, **generate_kwargs(mask, max_new_tokens), **longspec_kwargs
    )
    assert_same_output(reference, output, ids.shape[1], (arch, seed, longspec_kwargs))
    return stats


@pytest.mark.parametrize("arch", list(WINDOWED_TARGETS))
def test_targets_slide_as_configured_and_the_window_changes_their_output(arch):
    """The layers' kinds are the mix these tests mean to cover, and the window changes what plain
    `generate` produces on the test prompts: the equality tests below cannot pass by full attention."""
    target, _ = windowed_pair(arch)
    assert [getattr(layer.self_attn, "sliding_window", target.config.sliding_window)
            for layer in target.model.layers] == LAYER_WINDOWS[arch]
    ids, mask = repetitive_batch(random.Random(f"window-{arch}-0"), target.config.vocab_size, 3)
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert not torch.equal(target.generate(ids, **kwargs), full_attention_twin(arch).generate(ids, **kwargs))


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graph_steps", "eager_loop"])
@pytest.mark.parametrize("arch", list(WINDOWED_TARGETS))
def test_greedy_matches_plain_generate(arch, cuda_graphs):
    # cuda_graphs=True runs the fixed-shape (graph-ready) steps, eagerly on CPU; False the plain loop.
    cases = [
        dict(seed=1, batch_size=3, max_new_tokens=40, tree_widths=[2, 3, 2]),
        # Chains of 16 lookup tokens and a chain-shaped draft: nodes deeper than the window, whose
        # oldest ancestors fall outside it.
        dict(seed=2, batch_size=2, max_new_tokens=50, tree_widths=[1, 1, 1, 1, 1, 1], prompt_lookup_branches=2),
        dict(seed=3, batch_size=1, max_new_tokens=30, tree_widths=[4, 4], prompt_lookup_branches=2),
    ]
    for case in cases:
        plain_and_longspec(arch, cuda_graphs=cuda_graphs, **case)


def test_accepted_paths_longer_than_the_window():
    """Rounds that accept more tokens than the window is wide: the deepest accepted nodes were verified
    without their oldest ancestors, as the target's own attention computes them."""
    stats = plain_and_longspec(
        "qwen2", seed=10, batch_size=2, max_new_tokens=60, tree_widths=[1, 1], prompt_lookup_branches=2,
        cuda_graphs=False,
    )
    window = WINDOWED_TARGETS["qwen2"]["sliding_window"]
    assert max(stats.accepted_lengths) > window, f"no round accepted more than {window} tokens: {stats.accepted_lengths}"


@pytest.mark.parametrize("arch", list(WINDOWED_TARGETS))
def test_sampling_verify_applies_the_window(arch):
    """do_sample with top_k=1 runs the sampling verification; its one candidate per node is the windowed
    target's argmax, so the tokens are plain greedy generate's."""
    target, draft = windowed_pair(arch)
    ids, mask, reference = plain_generate(arch, 5, 2, 40)
    torch.manual_seed(0)
    sampling = dict(generate_kwargs(mask, 40), do_sample=True, top_k=1)
    output = target.generate(ids, assistant_model=draft, tree_widths=[2, 2, 2], **sampling)
    assert_same_output(reference, output, ids.shape[1], arch)


def test_window_wider_than_every_position_is_full_attention():
    """Mistral-7B's 4096-token window over a short context hides nothing: the same tokens as a target
    without a window (the attention then takes the kernel's plain path)."""
    target = make_target("mistral", seed=SEEDS["mistral"], sliding_window=4096)
    twin = full_attention_twin("mistral")
    draft = make_draft(target)
    ids, mask = repetitive_batch(random.Random("window-wide"), target.config.vocab_size, 2)
    kwargs = generate_kwargs(mask, 30)
    output = target.generate(ids, assistant_model=draft, tree_widths=[2, 2], **kwargs)
    assert_same_output(twin.generate(ids, **kwargs), output, ids.shape[1])
