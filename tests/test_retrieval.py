"""Prompt-lookup branches and adaptive drafting: exact trees, identical greedy output, higher acceptance."""

from __future__ import annotations

import random

import pytest
import torch

from longspec_hf import LongSpecStats
from longspec_hf.generation import adaptive
from longspec_hf.generation.adaptive import Plan, PlanCosts, RoundPlanner, RowOutcome
from longspec_hf.generation.retrieval import (
    CANDIDATES_PER_BRANCH,
    NgramIndex,
    best_leaf_suffix,
    find_continuations,
    latest_continuation,
)
from longspec_hf.generation.tree import ChainLayout, DraftTree, accept_greedy

from .conftest import make_draft, make_target
from .test_equality import eos_inside_generation

TREE_SHAPES = [[4, 16, 16, 16, 16], [2, 3], [1, 1, 1], [3], []]


def test_continuations_are_the_tokens_after_earlier_occurrences_of_the_suffix():
    tokens = torch.tensor([[0, 0, 5, 6, 7, 8, 5, 6, 9, 5, 6, 7, 1], [5, 6, 7, 5, 6, 7, 5, 6, 0, 0, 0, 0, 0]])
    chains, found = find_continuations(tokens, torch.tensor([10, 8]), torch.tensor([2, 0]), 3, 4, filler=0)
    # Row 0 ends in "5": "5" occurred at 6 and 2 (latest first); the padding is never matched.
    assert chains[0].tolist() == [[6, 9, 5, 0], [6, 7, 8, 5], [0, 0, 0, 0]]
    assert found[0].sum(dim=1).tolist() == [3, 4, 0]
    # Row 1 ends in "7 5 6": its earlier occurrence continues "7 5 6" (then the text ends); "5 6" adds "7 5 6 7".
    assert chains[1, :2].tolist() == [[7, 5, 6, 0], [7, 5, 6, 7]]
    assert found[1].sum(dim=1).tolist() == [3, 4, 0]


def brute_force_continuations(text: list[int], num_branches: int, length: int, max_ngram: int = 3):
    """The documented ranking, computed directly: every continuation start scored by its longest
    matching suffix, then by recency; the first K*CANDIDATES_PER_BRANCH considered."""
    size = len(text)
    scored = []
    for begin in range(1, size):
        matched = [n for n in range(1, max_ngram + 1) if n <= begin and text[begin - n : begin] == text[size - n :]]
        if matched:
            scored.append((max(matched), begin))
    scored.sort(reverse=True)
    chosen = []
    for _, begin in scored[: num_branches * CANDIDATES_PER_BRANCH]:
        chain = text[begin : begin + length]
        if not any(c[: len(chain)] == chain for c in chosen):
            chosen.append(chain)
        if len(chosen) == num_branches:
            break
    return chosen


def test_ngram_index_matches_the_brute_force_ranking_while_it_grows():
    rng = random.Random("ngram-index")
    for _ in range(200):
        vocab = rng.choice([2, 3, 5, 20])
        text = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        index = NgramIndex([text[:1]])
        for end in range(2, len(text) + 1):
            index.extend(0, text[end - 1 : end])
            num_branches, length = rng.choice([1, 2, 4]), rng.choice([1, 3, 6])
            assert index.continuations(0, num_branches, length) == brute_force_continuations(
                text[:end], num_branches, length
            )


def test_chain_layout_merges_like_the_reference_walk():
    """The precomputed layout gives every node the parent, depth and ancestors its chain position implies."""
    tree = DraftTree.empty(torch.tensor([3]), [2])
    tree.fill_level(1, torch.tensor([[10, 11]]), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    layout = ChainLayout.build(tree.level_sizes, num_chains=2, length=3, device=torch.device("cpu"))
    merged = layout.merge(tree, torch.tensor([[[30, 31, 32], [40, 41, 42]]]))
    assert merged.level_sizes == [4, 2, 2]
    assert merged.tokens.tolist() == [[3, 10, 11, 30, 40, 31, 41, 32, 42]]
    for node in range(1, merged.num_nodes):
        path, walker = [], node
        while walker != 0:
            path.append(walker)
            walker = int(merged.parents[0, walker])
        assert merged.depths[node] == len(path)
        assert sorted(merged.ancestors[0, node].nonzero()[:, 0].tolist()) == sorted(path + [0])
    with pytest.raises(ValueError):
        layout.merge(merged, torch.zeros(1, 2, 3, dtype=torch.long))


def test_chains_join_the_tree_level_by_level():
    tree = DraftTree.empty(torch.tensor([3, 4]), [2, 1])
    tree.fill_level(1, torch.tensor([[10, 11], [12, 13]]), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))
    tree.fill_level(2, torch.tensor([[20], [21]]), torch.tensor([[1], [0]]), torch.zeros(2, 1))
    merged = tree.add_chains(torch.tensor([[[30, 31, 32]], [[40, 41, 42]]]))
    assert merged.level_sizes == [3, 2, 1]
    assert merged.tokens.tolist() == [[3, 10, 11, 30, 20, 31, 32], [4, 12, 13, 40, 21, 41, 42]]
    assert merged.parents.tolist() == [[0, 0, 0, 0, 2, 3, 5], [0, 0, 0, 0, 1, 3, 5]]
    assert merged.retrieval[0].tolist() == [False, False, False, True, False, True, True]
    assert merged.ancestors[0, 6].nonzero()[:, 0].tolist() == [0, 3, 5, 6]
    # The target agrees with row 0's chain and row 1's draft path.
    choice = torch.tensor([[30, 0, 0, 31, 0, 32, 7], [12, 21, 0, 0, 8, 0, 0]])
    acceptance = accept_greedy(merged, choice)
    assert acceptance.num_accepted.tolist() == [3, 2]
    assert acceptance.new_tokens.tolist() == [[30, 31, 32, 7], [12, 21, 8, 8]]


def test_leaf_chain_hangs_under_each_rows_best_deepest_node():
    """A leaf chain continues the path of the draft's most likely deepest node (a different node per row):
    right parents, depths and ancestors, and acceptance can run along the draft path into the chain."""
    tree = DraftTree.empty(torch.tensor([3, 4]), [2, 2])
    level_one_scores = torch.tensor([[-1.0, -2.0]] * 2)
    tree.fill_level(1, torch.tensor([[10, 11], [12, 13]]), torch.zeros(2, 2, dtype=torch.long), level_one_scores)
    # Row 0's best leaf is node 4 (under 2), row 1's is node 3 (under 1).
    level_two_scores = torch.tensor([[-3.0, -2.5], [-2.0, -4.0]])
    tree.fill_level(2, torch.tensor([[20, 21], [22, 23]]), torch.tensor([[0, 1], [0, 1]]), level_two_scores)
    leaf, suffix = best_leaf_suffix(tree, ngram=3)
    assert leaf.tolist() == [4, 3]
    assert suffix.tolist() == [[3, 11, 21], [4, 12, 22]]
    layout = ChainLayout.build(tree.level_sizes, num_chains=1, length=2, device=torch.device("cpu"), leaf_length=3)
    leaf_chain = torch.tensor([[50, 51, 52], [60, 61, 62]])
    merged = layout.merge(tree, torch.tensor([[[30, 31]], [[40, 41]]]), leaf, leaf_chain)
    assert merged.level_sizes == [3, 3, 1, 1, 1]
    assert merged.tokens.tolist() == [[3, 10, 11, 30, 20, 21, 31, 50, 51, 52], [4, 12, 13, 40, 22, 23, 41, 60, 61, 62]]
    assert merged.retrieval[0].tolist() == [False, False, False, True, False, False, True, True, True, True]
    for row, merged_leaf in ((0, 5), (1, 4)):
        assert int(merged.parents[row, 7]) == merged_leaf
        for node in range(1, merged.num_nodes):
            path, walker = [], node
            while walker != 0:
                path.append(walker)
                walker = int(merged.parents[row, walker])
            assert merged.depths[node] == len(path)
            assert sorted(merged.ancestors[row, node].nonzero()[:, 0].tolist()) == sorted(path + [0])
    # Row 0: the target agrees with 11, 21, then the chain 50, 51 and picks 9 after 51.
    choice = torch.zeros(2, merged.num_nodes, dtype=torch.long)
    choice[0, [0, 2, 5, 7, 8]] = torch.tensor([11, 21, 50, 51, 9])
    acceptance = accept_greedy(merged, choice)
    assert acceptance.num_accepted.tolist() == [4, 0]
    assert acceptance.new_tokens[0, :5].tolist() == [11, 21, 50, 51, 9]
    with pytest.raises(ValueError, match="leaf chain"):
        layout.merge(tree, torch.tensor([[[30, 31]], [[40, 41]]]))


def test_verify_graph_tree_steps_read_nothing_on_the_host():
    """What the verify graph runs besides the target (leaf lookup, merge, greedy acceptance) works on
    meta tensors, which have no values: so none of it reads a device value on the host, which a CUDA
    graph capture would refuse (a scalar tensor used as an index did)."""
    meta = torch.device("meta")
    tree = DraftTree.empty(torch.empty(2, dtype=torch.long, device=meta), [2, 3])
    for level, width in enumerate(tree.level_sizes, start=1):
        tree.fill_level(
            level,
            torch.empty(2, width, dtype=torch.long, device=meta),
            torch.zeros(2, width, dtype=torch.long, device=meta),
            torch.empty(2, width, device=meta),
        )
    layout = ChainLayout.build(tree.level_sizes, num_chains=2, length=4, device=meta, leaf_length=3)
    tokens = torch.empty(2, 50, dtype=torch.long, device=meta)
    seq_len = torch.empty(2, dtype=torch.long, device=meta)
    pad_start = torch.empty(2, dtype=torch.long, device=meta)
    leaf, suffix = best_leaf_suffix(tree)
    leaf_chain, _ = latest_continuation(tokens, seq_len, pad_start, suffix, layout.leaf_length)
    merged = layout.merge(tree, torch.empty(2, 2, 4, dtype=torch.long, device=meta), leaf, leaf_chain)
    acceptance = accept_greedy(merged, torch.empty(2, merged.num_nodes, dtype=torch.long, device=meta))
    assert merged.tokens.shape == (2, 1 + 5 + 2 * 4 + 3)
    assert acceptance.new_tokens.shape == (2, 1 + merged.max_depth)


def test_latest_continuation_on_the_device_matches_a_brute_force_search():
    """`latest_continuation` (fixed shapes, for the verify graph): the longest matched tail of the suffix,
    then the latest occurrence, followed by at least one token; slots before a row's padding end and
    from its length on hold other tokens and are never matched nor returned."""
    rng = random.Random("device-lookup")
    for case in range(200):
        rows = [[rng.randrange(5) for _ in range(rng.randrange(1, 30))] for _ in range(3)]
        pad_start = torch.tensor([rng.randrange(4) for _ in rows])
        seq_len = pad_start + torch.tensor([len(r) for r in rows])
        tokens = torch.randint(0, 5, (3, int(seq_len.max()) + rng.randrange(3)))
        for b, row in enumerate(rows):
            tokens[b, int(pad_start[b]) : int(seq_len[b])] = torch.tensor(row)
        suffix = torch.tensor([[rng.randrange(5) for _ in range(3)] for _ in rows])
        length = rng.choice([1, 4])
        chain, found = latest_continuation(tokens, seq_len, pad_start, suffix, length, filler=-7)
        for b, row in enumerate(rows):
            got = [t for t, f in zip(chain[b].tolist(), found[b].tolist()) if f]
            assert got == _latest_continuation_reference(row, suffix[b].tolist(), length), (case, b)
            assert found[b].tolist() == sorted(found[b].tolist(), reverse=True)  # a prefix is real
            assert all(t == -7 for t, f in zip(chain[b].tolist(), found[b].tolist()) if not f)


def _latest_continuation_reference(row: list[int], suffix: list[int], length: int) -> list[int]:
    """Brute force: among end positions e < len(row) - 1, the longest tail of `suffix` ending at e, then
    the latest e; the tokens after it (at most `length`, within the row)."""
    best = None
    for end in range(len(row) - 1):
        matched = 0
        while matched < len(suffix) and end - matched >= 0 and row[end - matched] == suffix[-1 - matched]:
            matched += 1
        if matched and (best is None or (matched, end) >= best):
            best = (matched, end)
    return [] if best is None else row[best[1] + 1 : best[1] + 1 + length]


def repetitive_batch(rng: random.Random, vocab_size: int, batch_size: int, max_len: int):
    """Left-padded prompts made of a short random pattern repeated with a few random edits."""
    rows = []
    for _ in range(batch_size):
        pattern = [rng.randrange(3, vocab_size) for _ in range(rng.randrange(2, 9))]
        row = (pattern * (max_len // len(pattern) + 1))[: rng.randrange(1, max_len + 1)]
        for _ in range(rng.randrange(0, 3)):
            row[rng.randrange(len(row))] = rng.randrange(3, vocab_size)
        rows.append(row)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def repetitive_case(rng: random.Random, target, new_token_choices: list[int], with_eos: bool):
    """A repetitive left-padded batch, its greedy generate() keywords (with an EOS the plain output
    reaches when `with_eos` and one exists) and the plain output."""
    ids, mask = repetitive_batch(rng, target.config.vocab_size, rng.choice([1, 2, 3]), rng.randrange(2, 40))
    kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice(new_token_choices), do_sample=False)
    reference = target.generate(ids, **kwargs)
    if with_eos:
        eos = eos_inside_generation(reference, ids.shape[1], rng)
        if eos:
            kwargs["eos_token_id"] = eos if len(eos) > 1 else eos[0]
            reference = target.generate(ids, **kwargs)
    return ids, kwargs, reference


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_random_cases_with_prompt_lookup_match_plain_generate(arch):
    rng = random.Random(f"retrieval-{arch}")
    target = make_target(arch, seed=rng.randrange(1000))
    drafts = [make_draft(target, seed=s, sliding_window=w) for s, w in ((1, 8), (2, 32))]
    mismatches = []
    cases = 60
    for case in range(cases):
        ids, kwargs, reference = repetitive_case(rng, target, [1, 3, 17, 60, 120], with_eos=case % 3 == 0)
        max_new_tokens = kwargs["max_new_tokens"]
        widths = rng.choice(TREE_SHAPES)
        branches = rng.choice([1, 2, 4])
        adaptive = rng.random() < 0.3
        output = target.generate(
            ids, assistant_model=rng.choice(drafts), tree_widths=widths, prompt_lookup_branches=branches,
            adaptive=adaptive, **kwargs,
        )
        if not torch.equal(reference, output):
            mismatches.append((case, ids.shape, max_new_tokens, widths, branches, adaptive))
    assert not mismatches, f"{len(mismatches)} of {cases} cases differ: {mismatches[:5]}"


def test_chains_of_any_length_match_plain_generate():
    """`prompt_lookup_length` sets the chains' length, shorter or much longer than the draft's tree (which
    also sets how far one round can advance a row and the cache's spare slots)."""
    rng = random.Random("chain-length")
    target = make_target("llama", seed=13)
    draft = make_draft(target, seed=14)
    mismatches = []
    gained = []
    for case in range(16):
        ids, mask = repetitive_batch(rng, target.config.vocab_size, rng.choice([1, 2]), rng.randrange(2, 40))
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([3, 25, 70]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        length = rng.choice([1, 3, 12, 20])
        stats = LongSpecStats()
        output = target.generate(
            ids, assistant_model=draft, tree_widths=rng.choice([[2], [2, 2, 2]]), prompt_lookup_branches=2,
            prompt_lookup_length=length, adaptive=rng.random() < 0.3, longspec_stats=stats, **kwargs,
        )
        if not torch.equal(reference, output):
            mismatches.append((case, length))
        gained.append((length, max(stats.accepted_lengths)))
    assert not mismatches
    # A round gains at most one token past its longest chain or tree path, and long chains do get used.
    assert all(most <= max(length, 3) + 1 for length, most in gained)
    assert max(most for length, most in gained if length >= 12) > 8


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chains_under_the_draft_match_plain_generate(arch):
    """`prompt_lookup_under_draft=True`: one more chain under the draft's best deepest node, looked up on
    the device each round (random trees, batches with padding, EOS inside rounds, adaptive plans)."""
    rng = random.Random(f"under-draft-{arch}")
    target = make_target(arch, seed=rng.randrange(1000))
    draft = make_draft(target, seed=3, sliding_window=8)
    mismatches = []
    for case in range(24):
        ids, kwargs, reference = repetitive_case(rng, target, [1, 17, 60], with_eos=case % 3 == 0)
        options = dict(
            tree_widths=rng.choice([[4, 16, 16, 16, 16], [2, 3], [1, 1, 1], [3]]),
            prompt_lookup_branches=rng.choice([1, 2]),
            prompt_lookup_length=rng.choice([None, 3, 9]),
            adaptive=rng.random() < 0.3,
        )
        output = target.generate(ids, assistant_model=draft, prompt_lookup_under_draft=True, **options, **kwargs)
        if not torch.equal(reference, output):
            mismatches.append((case, options))
    assert not mismatches


def test_prompt_lookup_raises_acceptance_with_a_random_draft():
    """A repetitive prompt: the target keeps copying, so the chains are accepted where the random draft is not."""
    rng = random.Random("lookup-gain")
    target = make_target("llama", seed=7)
    draft = make_draft(target, seed=11)  # untrained: a random draft
    ids, mask = repetitive_batch(rng, target.config.vocab_size, 4, 60)
    kwargs = dict(attention_mask=mask, max_new_tokens=80, do_sample=False, assistant_model=draft, tree_widths=[2, 3])
    reference = target.generate(ids, attention_mask=mask, max_new_tokens=80, do_sample=False)
    without, with_lookup = LongSpecStats(), LongSpecStats()
    assert torch.equal(target.generate(ids, longspec_stats=without, **kwargs), reference)
    assert torch.equal(target.generate(ids, longspec_stats=with_lookup, prompt_lookup_branches=3, **kwargs), reference)
    assert with_lookup.mean_accepted_length > without.mean_accepted_length + 1.0, (
        with_lookup.mean_accepted_length, without.mean_accepted_length,
    )
    assert with_lookup.mean_retrieval_accepted > 1.0
    assert sum(without.retrieval_accepted) == 0


def test_row_outcome_counterfactual_gains():
    # Verified 3 levels, accepted 2 draft tokens (3 emitted with the bonus); the best chain matched all 3
    # emitted tokens, which bounds what it would have been accepted for from below.
    row = RowOutcome(depth=3, draft_accepted=2, chain_match=3)
    assert row.gain(Plan(0, False)) == 1
    assert row.gain(Plan(1, False)) == 2 and row.gain(Plan(2, False)) == 3 and row.gain(Plan(5, False)) == 3
    assert row.gain(Plan(1, True)) == 4
    # The accepted path ran along a chain: the draft's own acceptance is unknown (0 at least).
    assert RowOutcome(depth=3, draft_accepted=None, chain_match=4).gain(Plan(3, False)) == 1


def test_chain_outcome_is_optimistic_only_where_the_round_could_not_tell():
    # Not verified, agreed with both emitted tokens: it might have gone on, counted whole.
    assert adaptive.chain_outcome([[5, 6, 7, 8]], [5, 6], verified=False) == 4
    # Verified: what was accepted along it is exact.
    assert adaptive.chain_outcome([[5, 6, 7, 8]], [5, 6], verified=True) == 2
    # A mismatch inside the emitted tokens is exact either way; the best chain counts.
    assert adaptive.chain_outcome([[5, 9, 7, 8], [5, 6, 1, 1]], [5, 6, 7], verified=False) == 2
    assert adaptive.chain_outcome([], [5], verified=False) == 0


def test_row_outcomes_of_a_round():
    gained, from_chains = [3, 1, 2], [0, 0, 2]
    chains = [[[5, 6, 7, 8]], [[1]], [[4, 4, 9]]]
    emitted = [[5, 6, 9, 0], [2, 0, 0, 0], [4, 4, 1, 0]]
    active = [True, False, True]
    verified = adaptive.row_outcomes(Plan(3, True), gained, from_chains, chains, emitted, active)
    # Row 1 is done; row 2's path ran along its chain, so the draft's own acceptance is unknown.
    assert verified == [RowOutcome(3, 2, 2), RowOutcome(3, None, 2)]
    unverified = adaptive.row_outcomes(Plan(3, False), gained, [0, 0, 0], chains, emitted, active)
    assert unverified == [RowOutcome(3, 2, 2), RowOutcome(3, 1, 3)]
    assert adaptive.row_outcomes(Plan(3, False), gained, [0, 0, 0], None, emitted, active)[1].chain_match == 0


def run_planner(planner, cost, accepted: int, chain: int, rounds: int, remaining: int, capture: float = 5.0):
    """Rounds whose wall time follows `cost(plan)` (plus `capture` on a plan's first round), the draft
    accepting `accepted` tokens (at most the plan's depth) and the best chain matching `chain`."""
    chosen = []
    for _ in range(rounds):
        plan = planner.choose(remaining_tokens=remaining)
        chosen.append(plan)
        seconds = cost(plan) + (0.0 if planner.costs.has_run(plan) else capture)
        outcome = RowOutcome(plan.depth, min(accepted, plan.depth), chain)
        planner.record(plan, seconds, [outcome, outcome])
    return chosen


# A round costs 1 + 0.2 per draft level + 0.1 for the chains.
def linear_cost(plan: Plan) -> float:
    return 1.0 + 0.2 * plan.depth + 0.1 * plan.chains


def test_planner_keeps_the_full_tree_while_it_is_best():
    planner = RoundPlanner(max_depth=5, lookup=True, costs=PlanCosts())
    chosen = run_planner(planner, linear_cost, accepted=5, chain=0, rounds=30, remaining=10**6)
    # The draft accepts everything and the chains nothing: after the first rounds on the full plan it
    # drops the chains (6 tokens in 2.0 s; with them 2.1 s) and stays there.
    assert chosen[: adaptive.MIN_ROUNDS] == [Plan(5, True)] * adaptive.MIN_ROUNDS
    assert set(chosen[adaptive.MIN_ROUNDS :]) == {Plan(5, False)}
    assert planner.costs.measured(Plan(5, False)) == pytest.approx(2.0)
    assert planner.capture_cost() == pytest.approx(5.0)
    # Shares now measured: the chains' 0.1 of 2.1; the draft's share still the default one.
    assert planner.cost(Plan(0, True)) == pytest.approx(2.1 * (1 - adaptive.DRAFT_SHARE))


def test_planner_does_not_capture_a_new_plan_for_a_short_call():
    planner = RoundPlanner(max_depth=5, lookup=True, costs=PlanCosts())
    # Dropping the chains saves 0.1 s per 6 tokens: over 60 tokens 1 s, less than a 5 s capture.
    chosen = run_planner(planner, linear_cost, accepted=5, chain=0, rounds=10, remaining=60)
    assert set(chosen) == {Plan(5, True)}


def test_planner_falls_back_to_plain_decoding_and_refreshes_the_full_tree():
    cost = lambda plan: 1.0 + 0.2 * plan.depth
    planner = RoundPlanner(max_depth=4, lookup=False, costs=PlanCosts(), refresh_every=5)
    chosen = run_planner(planner, cost, accepted=0, chain=0, rounds=40, remaining=10**6)
    # Nothing is ever accepted: plain one-token rounds, with the full tree once every 6 rounds to see
    # whether the draft started paying.
    after_warmup = chosen[adaptive.MIN_ROUNDS :]
    assert set(after_warmup) == {Plan(0, False), Plan(4, False)}
    full_rounds = [i for i, plan in enumerate(after_warmup) if plan == Plan(4, False)]
    assert all(b - a == 6 for a, b in zip(full_rounds, full_rounds[1:])) and len(full_rounds) >= 5


def test_planner_picks_a_shallower_tree_when_acceptance_is_short():
    cost = lambda plan: 1.0 + 0.25 * plan.depth
    planner = RoundPlanner(max_depth=5, lookup=False, costs=PlanCosts(), refresh_every=100)
    chosen = run_planner(planner, cost, accepted=2, chain=0, rounds=30, remaining=10**6)
    # 3 tokens: depth 2 (1.5 s) beats depth 5 (2.25 s) and plain decoding (1 token in 1 s).
    assert chosen[-1] == Plan(2, False)
    assert planner.costs.measured(Plan(2, False)) == pytest.approx(1.5)


def test_planner_keeps_chains_that_match():
    planner = RoundPlanner(max_depth=5, lookup=True, costs=PlanCosts(), refresh_every=100)
    chosen = run_planner(planner, linear_cost, accepted=1, chain=8, rounds=30, remaining=10**6)
    # Chains give 9 tokens per round: cheapest with them is no draft at all (9 tokens in 1.1 s).
    assert chosen[-1] == Plan(0, True)


def test_adaptive_mode_output_and_stats(llama_pair):
    target, draft = llama_pair
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = target.generate(ids, max_new_tokens=50, do_sample=False)
    stats = LongSpecStats()
    # The draft's own tree (a tiny target's automatic tree is no tree: nothing to plan).
    output = target.generate(
        ids, assistant_model=draft, tree_widths=draft.config.tree_widths, adaptive=True, max_new_tokens=50,
        do_sample=False, longspec_stats=stats,
    )
    assert torch.equal(output, reference)
    assert 0 < stats.drafted_rounds <= stats.rounds
    # Round costs are kept with the workspace (by plan), adaptive or not.
    costs = draft._longspec_workspace.plan_costs
    assert costs.has_run(Plan(len(draft.config.tree_widths), False))


@pytest.mark.parametrize(
    "bad",
    [
        dict(prompt_lookup_branches=-1),
        dict(prompt_lookup_branches=True),
        dict(adaptive=1),
        dict(prompt_lookup_branches=1, prompt_lookup_length=0),
        dict(prompt_lookup_length=8),
        dict(prompt_lookup_under_draft=True),
    ],
)
def test_bad_lookup_arguments_are_refused(llama_pair, bad):
    target, draft = llama_pair
    with pytest.raises(ValueError, match=list(bad)[-1]):
        target.generate(torch.tensor([[5, 6]]), assistant_model=draft, max_new_tokens=2, **bad)


def test_lookup_keywords_need_a_longspec_draft(llama_pair):
    target, _ = llama_pair
    with pytest.raises(ValueError, match="prompt_lookup_branches"):
        target.generate(torch.tensor([[5, 6]]), max_new_tokens=2, prompt_lookup_branches=2)
