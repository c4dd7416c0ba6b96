"""Adaptive rounds: each round verifies the tree that is expected to give the most tokens per second.

A round's plan is how many levels of the draft tree it verifies (`depth`, 0: the draft does not run and
the round is plain one-token decoding, or lookup chains alone) and whether the prompt-lookup chains hang
under the root. [`RoundPlanner`] picks the plan with the highest expected tokens per second of wall
time:

- Tokens, measured: a beam tree's first `d` levels are exactly the tree drafted with `d` levels, so a
  round that verified `depth` levels and accepted `a` draft tokens would have accepted `min(a, d)` with
  `d` levels (exact for `d <= depth`, and for any `d` when `a < depth`; a lower bound otherwise). The
  lookup chains are computed on the host every round, so how many tokens the best of them matched is
  known whether or not they were verified. The last `window` rounds give every plan's expected tokens.
- Seconds, measured where a plan has run (the median wall time between consecutive rounds' results,
  kept on the workspace for later calls); otherwise scaled from the full plan by the draft's and the
  chains' shares of a round, measured once the plans without them have run, and until then the shares
  of a small target (`DRAFT_SHARE`, `CHAIN_SHARE`).
- A plan that has not run in this workspace first captures its CUDA graphs, which costs as much as
  tens of rounds. The planner moves to such a plan only when the time it saves over the tokens still to
  generate exceeds that one-time cost (measured on the first plan's first round).

Every `refresh_every` rounds on a shallower plan the full tree runs once, so the draft's acceptance at
every depth stays known. The plan never changes what is emitted (every verification rule is exact for
any tree), so this is lossless by construction.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from .retrieval import chain_match

DEFAULT_WINDOW = 16
MIN_ROUNDS = 8  # rounds of the full plan before any other plan is considered
DEFAULT_REFRESH_EVERY = 16
COST_SAMPLES = 8  # recent wall times kept per plan
# Shares of a round's wall time with SmolLM2-135M (bench/round_cost.py on an H100 and an H200, see
# BENCHMARKS.md): the five draft levels of the default tree with the wider verify they bring (0.31 with
# a compiled draft, 0.36 without) and two lookup chains (0.11-0.14).
DRAFT_SHARE = 0.3
CHAIN_SHARE = 0.12
# Until a first round's overhead is measured, a graph capture is taken to cost this many rounds.
DEFAULT_CAPTURE_ROUNDS = 30


@dataclass(frozen=True)
class Plan:
    """What one round verifies.

    Attributes:
        depth: draft tree levels (0: the draft does not run).
        chains: whether the prompt-lookup chains hang under the root.
    """

    depth: int
    chains: bool


@dataclass(frozen=True)
class RowOutcome:
    """What one row's round showed.

    Attributes:
        depth: draft levels the round verified.
        draft_accepted: draft tokens accepted along the draft tree; None when the accepted path ran along
            a lookup chain (the draft's own acceptance is then unknown; 0 is its lower bound).
        chain_match: tokens the best lookup chain was (or would have been) accepted for; 0 without
            lookup. A chain that was not verified and agreed with every emitted token counts with its
            whole length: an optimistic guess, which the next rounds with chains verify.
    """

    depth: int
    draft_accepted: int | None
    chain_match: int

    def gain(self, plan: Plan) -> int:
        """Tokens this row would have gained with `plan` (a lower bound where the round could not tell)."""
        drafted = min(self.draft_accepted or 0, plan.depth)
        return 1 + max(drafted, self.chain_match if plan.chains else 0)


def row_outcomes(
    plan: Plan,
    gained: list[int],
    from_chains: list[int],
    chains: list[list[list[int]]] | None,
    emitted: list[list[int]],
    active: list[bool],
) -> list[RowOutcome]:
    """The [`RowOutcome`] of every active row of a round verified with `plan`.

    Args:
        gained: tokens each row gained (accepted + the bonus token).
        from_chains: accepted tokens each row took from a lookup chain (0: its path stayed in the draft tree).
        chains: each row's lookup chains of the round (None without lookup), verified or not.
        emitted: each row's tokens of the round after the root (at least `gained[b]` of them).
        active: rows still generating.
    """
    rows = zip(gained, from_chains, chains or [[]] * len(gained), emitted, active)
    return [
        RowOutcome(
            depth=plan.depth,
            draft_accepted=count - 1 if not taken else None,
            chain_match=chain_outcome(row_chains, row_emitted[:count], verified=plan.chains),
        )
        for count, taken, row_chains, row_emitted, is_active in rows
        if is_active
    ]


def chain_outcome(chains: list[list[int]], emitted: list[int], verified: bool) -> int:
    """`RowOutcome.chain_match` of a row: what its best chain matched of the emitted tokens; an unverified
    chain that matched all of them counts with its whole length (it might have gone on matching)."""
    matched = chain_match(chains, emitted)
    if not verified and chains and matched == len(emitted):
        return max(matched, len(chains[0]))
    return matched


class PlanCosts:
    """Wall seconds per round of each plan, and what a plan's first round cost on top (its CUDA graphs'
    capture, or compilation): the first round of a plan is kept apart from its samples."""

    def __init__(self):
        self.samples: dict[Plan, deque[float]] = {}
        self.first_round: dict[Plan, float] = {}

    def record(self, plan: Plan, seconds: float) -> None:
        if plan not in self.first_round:
            self.first_round[plan] = seconds
            return
        self.samples.setdefault(plan, deque(maxlen=COST_SAMPLES)).append(seconds)

    def has_run(self, plan: Plan) -> bool:
        return plan in self.first_round

    def measured(self, plan: Plan) -> float | None:
        samples = self.samples.get(plan)
        return statistics.median(samples) if samples else None

    def first_round_overhead(self) -> float | None:
        """Median of (first round - steady round) over the plans where both are known."""
        overheads = [
            first - self.measured(plan) for plan, first in self.first_round.items() if plan in self.samples
        ]
        return max(0.0, statistics.median(overheads)) if overheads else None


class RoundPlanner:
    """Chooses every round's plan (see the module docstring).

    Args:
        max_depth: levels of the full draft tree (0: no draft; only the chains can be switched).
        lookup: whether prompt-lookup chains are available.
        costs: measured round costs, shared with later calls of the same shape.
        window: rounds whose outcomes estimate each plan's tokens per round.
        refresh_every: rounds on shallower plans after which the full tree runs again.
    """

    def __init__(
        self,
        max_depth: int,
        lookup: bool,
        costs: PlanCosts,
        window: int = DEFAULT_WINDOW,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
    ):
        self.max_depth = max_depth
        self.lookup = lookup
        self.costs = costs
        self.refresh_every = refresh_every
        self.full = Plan(max_depth, lookup)
        self.plans = [Plan(d, c) for d in range(max_depth + 1) for c in ((False, True) if lookup else (False,))]
        # Per recent round, the mean gain per row of every plan (in `self.plans` order), and their sums:
        # choosing a plan costs a few operations per plan, not a pass over the window.
        self.window = window
        self.round_gains: deque[list[float]] = deque()
        self.gain_sums = [0.0] * len(self.plans)
        self.current = self.full
        self.rounds_since_full = 0

    def choose(self, remaining_tokens: int) -> Plan:
        """The next round's plan, `remaining_tokens` being at most how many tokens are still to come."""
        if (
            self.costs.measured(self.full) is None
            or len(self.round_gains) < MIN_ROUNDS
            or self.rounds_since_full >= self.refresh_every
        ):
            self.current = self.full
            return self.current
        best = max(self.plans, key=self.tokens_per_second)
        if best != self.current and not self.costs.has_run(best):
            seconds_per_token = lambda plan: self.cost(plan) / self.expected_gain(plan)
            saved = remaining_tokens * (seconds_per_token(self.current) - seconds_per_token(best))
            if saved <= self.capture_cost():
                best = self.current
        self.current = best
        return best

    def record(self, plan: Plan, seconds: float, outcomes: list[RowOutcome]) -> None:
        """The round just verified with `plan`: its wall time and each active row's outcome."""
        self.costs.record(plan, seconds)
        if outcomes:
            gains = [sum(row.gain(p) for row in outcomes) / len(outcomes) for p in self.plans]
            self.round_gains.append(gains)
            self.gain_sums = [total + gain for total, gain in zip(self.gain_sums, gains)]
            if len(self.round_gains) > self.window:
                dropped = self.round_gains.popleft()
                self.gain_sums = [total - gain for total, gain in zip(self.gain_sums, dropped)]
        self.rounds_since_full = 0 if plan.depth == self.max_depth else self.rounds_since_full + 1

    def expected_gain(self, plan: Plan) -> float:
        """Mean tokens per row per round that `plan` would have gained over the recent rounds."""
        if not self.round_gains:
            return 1.0
        return self.gain_sums[self.plans.index(plan)] / len(self.round_gains)

    def cost(self, plan: Plan) -> float:
        """Measured seconds per round, else the full plan's scaled by the measured (or default) shares."""
        measured = self.costs.measured(plan)
        if measured is not None:
            return measured
        full = self.costs.measured(self.full)
        if full is None:
            return float("inf")
        cost = full
        if plan.depth < self.max_depth:
            cost -= self._share(Plan(0, self.full.chains), DRAFT_SHARE) * full * (self.max_depth - plan.depth) / self.max_depth
        if self.lookup and not plan.chains:
            cost -= self._share(Plan(self.max_depth, False), CHAIN_SHARE) * full
        return max(cost, 1e-9)

    def _share(self, without: Plan, default: float) -> float:
        """The share of the full plan's round that `without` saves: measured, else `default`."""
        full, other = self.costs.measured(self.full), self.costs.measured(without)
        if full is None or other is None or without == self.full:
            return default
        return min(1.0, max(0.0, 1.0 - other / full))

    def capture_cost(self) -> float:
        measured = self.costs.first_round_overhead()
        return measured if measured is not None else DEFAULT_CAPTURE_ROUNDS * self.cost(self.full)

    def tokens_per_second(self, plan: Plan) -> float:
        return self.expected_gain(plan) / self.cost(plan)
