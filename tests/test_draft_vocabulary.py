"""A draft vocabulary: drafting scores only some of the target's tokens; outputs stay exact."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from longspec_hf import LongSpecDraftModel, LongSpecStats
from longspec_hf.generation.candidate_generator import LongSpecCandidateGenerator
from longspec_hf.modeling import TargetKV

from .conftest import make_draft, make_target
from .test_equality import TREE_SHAPES, random_batch


def some_tokens(vocab_size: int, count: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(vocab_size), count)


def drafter_for(draft, target, batch_size: int, target_kv: TargetKV, widths) -> LongSpecCandidateGenerator:
    return LongSpecCandidateGenerator(draft, target, widths, batch_size, target_kv=lambda: target_kv)


def test_tree_over_a_draft_vocabulary_equals_the_tree_of_masked_logits():
    """Drafting over the vocabulary's logits gives the tree that full logits, -inf outside it, give."""
    target = make_target("llama", seed=3)
    draft = make_draft(target, seed=4)
    vocab = target.config.vocab_size
    ids = some_tokens(vocab, 40, seed=5)
    restricted = copy.deepcopy(draft)
    restricted.set_draft_vocabulary(ids)
    masked = copy.deepcopy(draft)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[ids] = True
    full_logits = masked._logits
    masked._logits = lambda hidden, target=None, draft_vocabulary=False: full_logits(hidden, target).masked_fill(~keep, float("-inf"))

    torch.manual_seed(6)
    batch, context, widths = 2, 30, [3, 6, 6]
    target_kv = TargetKV(
        key=torch.randn(batch, 2, context, 8),
        value=torch.randn(batch, 2, context, 8),
        start=torch.tensor([0, 5]),
        end=torch.tensor([context, context - 3]),
    )
    tokens = torch.randint(3, vocab, (batch, 40))
    seq_len = torch.tensor([24, 21])
    pad_start = torch.tensor([0, 5])
    trees = [
        drafter_for(model, target, batch, target_kv, widths).propose_tree(tokens, seq_len, pad_start)
        for model in (restricted, masked)
    ]
    assert torch.equal(trees[0].tokens, trees[1].tokens)
    assert torch.equal(trees[0].parents, trees[1].parents)
    torch.testing.assert_close(trees[0].log_probs, trees[1].log_probs)
    proposed = trees[0].tokens[:, 1:]
    assert bool(torch.isin(proposed, torch.tensor(ids)).all())
    # Without the vocabulary the draft proposes other tokens too (else this test would prove nothing).
    plain = drafter_for(copy.deepcopy(draft), target, batch, target_kv, widths).propose_tree(tokens, seq_len, pad_start)
    assert not bool(torch.isin(plain.tokens[:, 1:], torch.tensor(ids)).all())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_a_draft_vocabulary_matches_plain_generate(arch):
    rng = random.Random(f"draft-vocab-{arch}")
    target = make_target(arch, seed=7)
    draft = make_draft(target, seed=8)
    vocab = target.config.vocab_size
    for case in range(12):
        draft.set_draft_vocabulary(some_tokens(vocab, rng.choice([1, 10, 48, vocab - 1]), seed=case))
        ids, mask = random_batch(rng, vocab, rng.choice([1, 2, 3]), rng.randrange(1, 120))
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([1, 9, 40]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        extra = dict(prompt_lookup_branches=2) if case % 3 == 0 else {}
        output = target.generate(ids, assistant_model=draft, tree_widths=rng.choice(TREE_SHAPES), **extra, **kwargs)
        assert torch.equal(reference, output), case


def test_a_draft_vocabulary_of_the_likely_tokens_keeps_acceptance():
    """With the target's own next tokens in the vocabulary the draft accepts as much as without one;
    with those tokens left out nothing can be accepted. (Shows the vocabulary is what drafting uses.)"""
    target = make_target("llama", seed=9)
    draft = make_draft(target, seed=10)
    vocab = target.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 50), generator=torch.Generator().manual_seed(11))
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    generated = sorted(set(reference[0, 50:].tolist()))

    def accepted(token_ids) -> float:
        draft.set_draft_vocabulary(token_ids)
        stats = LongSpecStats()
        output = target.generate(prompt, assistant_model=draft, max_new_tokens=30, do_sample=False, longspec_stats=stats)
        assert torch.equal(output, reference)
        return stats.mean_accepted_length

    whole = accepted(None)
    assert accepted([t for t in range(vocab) if t not in generated]) == 1.0
    others = [t for t in range(vocab) if t not in generated][:20]
    assert accepted(generated + others) >= whole


def test_sampling_drafts_from_a_q_that_is_zero_outside_the_draft_vocabulary():
    """Sampling mode: the tree's tokens come from the vocabulary, and the q kept for verification is the
    warped softmax over it, zero elsewhere (the rules then stay exact: test_sampling.py)."""
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

    target = make_target("llama", seed=12)
    draft = make_draft(target, seed=13)
    vocab = target.config.vocab_size
    ids = sorted(some_tokens(vocab, 30, seed=14))
    draft.set_draft_vocabulary(ids)
    batch, context = 2, 20
    target_kv = TargetKV(
        key=torch.randn(batch, 2, context, 8), value=torch.randn(batch, 2, context, 8),
        start=torch.zeros(batch, dtype=torch.long), end=torch.full((batch,), context),
    )
    drafter = drafter_for(draft, target, batch, target_kv, [3, 5])
    tokens = torch.randint(3, vocab, (batch, 30))
    seq_len, pad_start = torch.tensor([21, 21]), torch.zeros(batch, dtype=torch.long)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    torch.manual_seed(15)
    tree = drafter.propose_tree(tokens, seq_len, pad_start, draft_warpers=warpers, sample_children=True)
    assert bool(torch.isin(tree.tokens[:, 1:], torch.tensor(ids)).all())
    root_q = tree.draft_log_probs[0][:, 0]  # (B, V)
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isneginf(root_q[:, outside]).all())
    # On the vocabulary: the warped softmax of the draft's logits over those tokens alone.
    whole = copy.deepcopy(draft)
    whole.set_draft_vocabulary(None)
    whole_drafter = drafter_for(whole, target, batch, target_kv, [3, 5])
    torch.manual_seed(15)
    whole_q = whole_drafter.propose_tree(tokens, seq_len, pad_start, draft_warpers=warpers, sample_children=True).draft_log_probs[0][:, 0]
    expected = torch.log_softmax(whole_q[:, ids], dim=-1)
    torch.testing.assert_close(root_q[:, ids], expected)


def test_draft_vocabulary_is_saved_and_loaded(tmp_path):
    target = make_target("llama", seed=16)
    draft = make_draft(target, seed=17)
    draft.set_draft_vocabulary([40, 3, 17, 3, 90])
    assert draft.config.draft_vocab_size == 4
    assert draft.draft_vocab_ids.tolist() == [3, 17, 40, 90]
    draft.save_pretrained(tmp_path)
    loaded = LongSpecDraftModel.from_pretrained(tmp_path)
    assert loaded.config.draft_vocab_size == 4
    assert loaded.draft_vocab_ids.tolist() == [3, 17, 40, 90]
    prompt = torch.randint(3, target.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(18))
    stats = [LongSpecStats(), LongSpecStats()]
    for model, stat in zip((draft, loaded), stats):
        target.generate(prompt, assistant_model=model, max_new_tokens=20, do_sample=False, longspec_stats=stat)
    assert stats[0].accepted_lengths == stats[1].accepted_lengths
    loaded.set_draft_vocabulary(None)
    loaded.save_pretrained(tmp_path / "whole")
    assert LongSpecDraftModel.from_pretrained(tmp_path / "whole").draft_vocab_ids is None


def test_bad_draft_vocabularies_are_refused(tmp_path):
    target = make_target("llama", seed=19)
    draft = make_draft(target, seed=20)
    vocab = target.config.vocab_size
    with pytest.raises(ValueError, match="at least one token id"):
        draft.set_draft_vocabulary([])
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\)"):
        draft.set_draft_vocabulary([1, vocab])
    # A checkpoint whose ids are not increasing (hand-edited or corrupt) is refused before decoding.
    draft.set_draft_vocabulary([4, 5, 6])
    draft.save_pretrained(tmp_path)
    loaded = LongSpecDraftModel.from_pretrained(tmp_path)
    loaded.draft_vocab_ids.copy_(torch.tensor([6, 5, 4]))
    prompt = torch.randint(3, vocab, (1, 10))
    with pytest.raises(ValueError, match="draft_vocab_ids must be increasing"):
        target.generate(prompt, assistant_model=loaded, max_new_tokens=5, do_sample=False)
    # A config with a draft vocabulary over weights without its ids is an incomplete checkpoint.
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["draft_vocab_ids"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="incomplete.*draft_vocab_ids"):
        LongSpecDraftModel.from_pretrained(tmp_path)


def test_the_draft_heads_rows_follow_in_place_updates_of_the_target_head():
    """The rows are kept at one address (CUDA graphs read them) and refreshed when the head changes."""
    target = make_target("llama", seed=21)
    draft = make_draft(target, seed=22)
    draft.set_draft_vocabulary([2, 9, 30])
    draft.attach_target(target)
    rows = draft._target.draft_head[0]
    head = target.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(0.5)
    draft.attach_target(target)
    assert draft._target.draft_head[0] is rows
    assert torch.equal(rows, head[[2, 9, 30]])
    # A new vocabulary set while the target stays attached is used from the next drafting step on.
    draft.set_draft_vocabulary([1, 5])
    hidden = torch.randn(1, 3, target.config.hidden_size)
    torch.testing.assert_close(draft._logits(hidden, draft_vocabulary=True), draft._logits(hidden)[..., [1, 5]])
