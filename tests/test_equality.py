"""Randomized equality: generate(assistant_model=draft) returns exactly what generate() returns (greedy, fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from longspec_hf import LongSpecStats

from .conftest import make_draft, make_target

TREE_SHAPES = [[1, 1, 1, 1], [4, 16, 16, 16, 16], [2, 3], [3], [1], [6, 2, 2], [2, 4, 8]]
CASES_PER_TARGET = 100


def random_batch(rng: random.Random, vocab_size: int, batch_size: int, prompt_len: int):
    """Left-padded prompts of random lengths (row 0 always full length)."""
    ids = torch.tensor([[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(batch_size)])
    mask = torch.ones_like(ids)
    for row in range(1, batch_size):
        pad = rng.randrange(0, prompt_len)
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def eos_inside_generation(reference: torch.Tensor, prompt_len: int, rng: random.Random) -> list[int]:
    """EOS ids that the plain output produces mid-way, so that they land inside drafted trees."""
    generated = reference[:, prompt_len:].reshape(-1).tolist()
    if len(generated) < 4:
        return []
    picks = {generated[rng.randrange(1, len(generated))] for _ in range(rng.randrange(1, 3))}
    return sorted(picks)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_random_cases_match_plain_generate(arch):
    rng = random.Random(f"equality-{arch}")
    target = make_target(arch, seed=rng.randrange(1000))
    drafts = [make_draft(target, seed=s, sliding_window=w) for s, w in ((1, 8), (2, 32))]
    cases = CASES_PER_TARGET if arch in ("llama", "qwen2") else CASES_PER_TARGET // 3
    mismatches, accepted = [], []
    for case in range(cases):
        batch_size = rng.choice([1, 1, 2, 3])
        prompt_len = rng.randrange(1, 40)
        max_new_tokens = rng.choice([1, 2, 5, 17, 40, 80, 200]) if case % 5 else rng.randrange(1, 201)
        widths = rng.choice(TREE_SHAPES)
        draft = rng.choice(drafts)
        ids, mask = random_batch(rng, target.config.vocab_size, batch_size, prompt_len)
        kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        reference = target.generate(ids, **kwargs)
        if case % 3 == 0:
            eos = eos_inside_generation(reference, prompt_len, rng)
            if eos:
                kwargs["eos_token_id"] = eos if len(eos) > 1 else eos[0]
                reference = target.generate(ids, **kwargs)
        stats = LongSpecStats()
        # cuda_graphs=True runs the fixed-shape (graph-ready) steps, eagerly on CPU; False the plain loop.
        graphs = case % 2 == 0
        output = target.generate(
            ids, assistant_model=draft, tree_widths=widths, longspec_stats=stats, cuda_graphs=graphs, **kwargs
        )
        if not torch.equal(reference, output):
            mismatches.append((case, batch_size, prompt_len, max_new_tokens, widths, kwargs.get("eos_token_id"), graphs))
        accepted.extend(stats.accepted_lengths)
    assert not mismatches, f"{len(mismatches)} of {cases} cases differ: {mismatches[:5]}"
    # Random pairs agree now and then: drafted tokens were accepted, so the checks above covered
    # rounds that commit several tokens, not only one-token rounds.
    assert sum(length > 1 for length in accepted) >= 10, f"{len(accepted)} rounds, none accepted a drafted token"
