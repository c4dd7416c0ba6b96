"""The automatic tree's acceptance learned from a draft's own greedy calls (`running_prior.py`)."""

from __future__ import annotations

import pytest
import torch

from longspec_hf import LongSpecStats, forget_acceptance
from longspec_hf.generation import entry, running_prior, tree_sizing
from longspec_hf.generation.running_prior import PRIOR_TRIALS, AcceptanceCounts

from .conftest import make_draft, make_target
from .test_tree_sizing import LLAMA_8B, meta_pair


def test_a_round_counts_one_trial_per_level_reached_and_a_failure_where_it_stopped():
    counts = AcceptanceCounts(width_exponent=1.0)
    # Tree [4, 2, 2]: a row that gained 1 token stopped at level 0; 3 tokens: stopped at level 2; 4 tokens:
    # passed every level (no failure); the round with a lookup-chain token is not the tree's and is skipped.
    counts.record((4, 2, 2), accepted_lengths=[1, 3, 4, 2], retrieval_accepted=[0, 0, 0, 1])
    assert counts.failures == 2
    assert counts.weighted_trials == pytest.approx((1 / 4) + (1 / 4 + 1 / 2 + 1 / 2) + (1 / 4 + 1 / 2 + 1 / 2))


def test_the_estimate_starts_at_the_prior_and_follows_the_counts():
    counts = AcceptanceCounts(width_exponent=0.4)
    assert counts.top1(0.58) == pytest.approx(0.58)
    always = AcceptanceCounts(width_exponent=0.4)
    always.record((4, 16, 16), [4] * 2000, [0] * 2000)  # every level accepted: the failure rate goes to 0
    never = AcceptanceCounts(width_exponent=0.4)
    never.record((4, 16, 16), [1] * 2000, [0] * 2000)  # never accepted: every first level fails
    assert always.top1(0.58) > 0.95
    assert never.top1(0.58) == 0.0  # the failure rate, 4**0.4 > 1, is capped at 1
    # Few rounds barely move it: the prior counts as PRIOR_TRIALS weighted trials.
    few = AcceptanceCounts(width_exponent=0.4)
    few.record((4,), [1] * 4, [0] * 4)
    assert 0.5 < few.top1(0.58) < 0.58
    # A draft that is never accepted gets a shallower tree than the prior's, one that always is the deepest.
    target, draft = meta_pair(LLAMA_8B)
    cost = tree_sizing.round_cost(target, draft, 1, 32768, tree_sizing.CUDA)
    prior_tree = tree_sizing.choose_round_shape(cost, top1=0.58).tree_widths
    assert len(tree_sizing.choose_round_shape(cost, top1=never.top1(0.58)).tree_widths) < len(prior_tree)
    deepest = tree_sizing.choose_round_shape(cost, top1=always.top1(0.58)).tree_widths
    assert len(deepest) == len(tree_sizing.DEFAULT_TREE_WIDTHS) == len(prior_tree)


def _chosen_top1s(monkeypatch) -> list[float]:
    chosen = []
    original = entry.choose_round_shape

    def spy(*args, **kwargs):
        chosen.append(kwargs["top1"])
        return original(*args, **kwargs)

    monkeypatch.setattr(entry, "choose_round_shape", spy)
    return chosen


def test_greedy_calls_record_and_use_their_acceptance_sampling_calls_keep_the_prior(monkeypatch):
    target = make_target("llama", seed=4)
    draft = make_draft(target, seed=5)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    chosen = _chosen_top1s(monkeypatch)
    prior_top1, _ = running_prior.draft_prior(draft)

    stats = LongSpecStats()
    reference = target.generate(ids, max_new_tokens=40, do_sample=False)
    output = target.generate(ids, assistant_model=draft, tree_widths=[4, 4, 4], max_new_tokens=40, do_sample=False,
                             longspec_stats=stats)
    assert torch.equal(output, reference)
    counts = running_prior.acceptance_counts(draft)
    assert counts is not None and counts.weighted_trials > 0
    expected = AcceptanceCounts(counts.width_exponent)
    expected.record((4, 4, 4), stats.accepted_lengths, stats.retrieval_accepted)
    assert (counts.failures, counts.weighted_trials) == (expected.failures, expected.weighted_trials)

    # A random draft is rarely accepted: the next greedy call sizes its tree with a lower top1.
    assert torch.equal(target.generate(ids, assistant_model=draft, max_new_tokens=40, do_sample=False), reference)
    assert chosen[-1] == pytest.approx(counts.top1(prior_top1)) and chosen[-1] < prior_top1
    # A sampling call chooses from the prior alone and records nothing.
    before = (counts.failures, counts.weighted_trials)
    torch.manual_seed(0)
    target.generate(ids, assistant_model=draft, max_new_tokens=10, do_sample=True)
    assert chosen[-1] == prior_top1
    assert (counts.failures, counts.weighted_trials) == before

    forget_acceptance(draft)
    target.generate(ids, assistant_model=draft, tree_widths=[], max_new_tokens=4, do_sample=False)
    assert running_prior.acceptance_counts(draft) is None  # no tree, nothing to record
    target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False)
    assert chosen[-1] == prior_top1


def test_a_stats_object_passed_to_several_calls_is_recorded_once_per_round():
    target = make_target("llama", seed=4)
    draft = make_draft(target, seed=5)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(7))
    stats = LongSpecStats()
    target.generate(ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=20, do_sample=False, longspec_stats=stats)
    once = running_prior.acceptance_counts(draft).weighted_trials
    target.generate(ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=20, do_sample=False, longspec_stats=stats)
    assert running_prior.acceptance_counts(draft).weighted_trials == pytest.approx(2 * once)
    assert PRIOR_TRIALS > 0
