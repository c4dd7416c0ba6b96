"""Speculation pays when the draft agrees with the target, and the output stays identical."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from longspec_hf import LongSpecStats

from .conftest import make_draft, make_target


def agreeing_pair(vocab_size: int = 256):
    """A target whose next token depends on the current token only: attention and MLP outputs are zero,
    so logits = lm_head(norm(embed(x))). A draft with zeroed block outputs computes lm_head(embed(x)):
    the RMS norm only rescales, so the argmax agrees. A little noise makes the draft imperfect."""
    target = make_target(vocab_size=vocab_size)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    draft = make_draft(target)
    with torch.no_grad():
        for projection in (draft.self_attn.o_proj, draft.cross_attn.o_proj, draft.mlp.down_proj):
            projection.weight.normal_(std=1e-3)
    # The automatic tree of so small a target is no tree (a draft level costs more than its forward):
    # the generation config names the one these tests draft with (a config of its own, not one derived
    # from the model config, which from_pretrained would derive again without it).
    target.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tree_widths=[4, 16, 16, 16, 16]
    )
    return target, draft


def test_agreeing_draft_accepts_long_paths():
    target, draft = agreeing_pair()
    ids = torch.randint(3, 256, (2, 16))
    reference = target.generate(ids, max_new_tokens=120, do_sample=False)
    stats = LongSpecStats()
    output = target.generate(ids, assistant_model=draft, max_new_tokens=120, do_sample=False, longspec_stats=stats)
    assert torch.equal(reference, output)
    assert stats.mean_accepted_length > 2.0
    # Fewer target forwards than tokens: one prefill plus one per round.
    assert stats.rounds < 120 / 2


def test_a_chain_under_the_draft_continues_accepted_paths():
    """The agreeing pair above walks a cycle of its bigram map, so the path the draft gets right has
    occurred before: the chain under the draft's leaf continues it, and a round gains the draft's depth
    plus the chain (3 + 4 + 1 tokens), more than the root's chains alone allow (4 + 1)."""
    target, draft = agreeing_pair()
    ids = torch.randint(3, 256, (2, 16))
    reference = target.generate(ids, max_new_tokens=120, do_sample=False)
    kwargs = dict(max_new_tokens=120, do_sample=False, tree_widths=[1, 1, 1], prompt_lookup_branches=1, prompt_lookup_length=4)
    without, with_leaf_chain = LongSpecStats(), LongSpecStats()
    assert torch.equal(target.generate(ids, assistant_model=draft, longspec_stats=without, **kwargs), reference)
    output = target.generate(
        ids, assistant_model=draft, prompt_lookup_under_draft=True, longspec_stats=with_leaf_chain, **kwargs
    )
    assert torch.equal(output, reference)
    assert max(without.accepted_lengths) <= 5
    assert max(with_leaf_chain.accepted_lengths) == 8
    assert with_leaf_chain.mean_accepted_length > without.mean_accepted_length + 0.5


def test_chain_and_tree_gain_at_most_depth_plus_one_per_round():
    target = make_target()
    draft = make_draft(target)
    ids = torch.randint(3, 96, (1, 10))
    for widths in ([1, 1, 1], [4, 16, 16, 16, 16]):
        stats = LongSpecStats()
        target.generate(ids, assistant_model=draft, max_new_tokens=40, do_sample=False, tree_widths=widths, longspec_stats=stats)
        assert all(1 <= n <= len(widths) + 1 for n in stats.accepted_lengths)


def test_no_tree_is_plain_decoding_through_the_longspec_cache():
    target = make_target()
    draft = make_draft(target)
    ids = torch.randint(3, 96, (2, 10))
    stats = LongSpecStats()
    output = target.generate(ids, assistant_model=draft, max_new_tokens=15, do_sample=False, tree_widths=[], longspec_stats=stats)
    assert torch.equal(output, target.generate(ids, max_new_tokens=15, do_sample=False))
    assert stats.accepted_lengths == [1] * (2 * 14)
