"""Draft trees built level by level in preallocated buffers."""

from __future__ import annotations

import pytest
import torch

from longspec_hf.generation.tree import DraftTree, beam_level_sizes

from .conftest import make_draft, make_target


@pytest.mark.parametrize("seed", range(4))
def test_filled_tree_matches_a_walk_of_its_parents(seed):
    generator = torch.Generator().manual_seed(seed)
    batch = 3
    level_sizes = [int(n) for n in torch.randint(1, 6, (4,), generator=generator)]
    roots = torch.randint(0, 100, (batch,), generator=generator)
    tree = DraftTree.empty(roots, level_sizes)
    tokens, parents = [roots[:, None]], [torch.zeros(batch, 1, dtype=torch.long)]
    for level, size in enumerate(level_sizes, start=1):
        previous = 1 if level == 1 else level_sizes[level - 2]
        level_tokens = torch.randint(0, 100, (batch, size), generator=generator)
        parent_local = torch.randint(0, previous, (batch, size), generator=generator)
        tree.fill_level(level, level_tokens, parent_local, -torch.rand(batch, size, generator=generator))
        tokens.append(level_tokens)
        parents.append(parent_local + tree.level_slice(level - 1).start)
    assert torch.equal(tree.tokens, torch.cat(tokens, dim=1))
    assert torch.equal(tree.parents, torch.cat(parents, dim=1))
    for row in range(batch):
        for node in range(tree.num_nodes):
            path, walker = [node], node
            while walker != 0:
                walker = int(tree.parents[row, walker])
                path.append(walker)
            assert int(tree.depths[node]) == len(path) - 1
            assert tree.ancestors[row, node].nonzero()[:, 0].tolist() == sorted(set(path))


def test_levels_narrow_where_the_vocabulary_runs_out():
    assert beam_level_sizes([8, 64, 64], vocab_size=4) == [4, 16, 64]
    assert beam_level_sizes([4, 16], vocab_size=50_000) == [4, 16]


def test_tree_wider_than_the_vocabulary_allows_is_still_lossless():
    target = make_target(seed=5, vocab_size=4)
    draft = make_draft(target, seed=6)
    prompt = torch.tensor([[3, 1, 3, 3, 1, 1, 3, 2, 3, 1]])
    fixed = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None)
    expected = target.generate(prompt, **fixed)
    output = target.generate(prompt, assistant_model=draft, tree_widths=[8, 64], **fixed)
    assert torch.equal(output, expected)
