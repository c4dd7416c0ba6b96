"""Adaptive rounds: each round verifies the tree that is expected to give the most tokens per second.

A round's plan is how many levels of the draft tree it verifies (`depth`, 0: the draft does not run and
the round is plain one-token decoding, or lookup chains alone) and whether the prompt-lookup chains hang
under the root. [`RoundPlanner`] picks the plan with the highest expected tokens per second of wall
time, both measured:

- Tokens: a beam tree's first `d` levels are exactly the tree drafted with `d` levels, so a round that
  verified `depth` levels and accepted `a` draft tokens would have accepted `min(a, d)` with `d` levels
  (exact for `d <= depth`, and for any `d` when `a < depth`; a lower bound otherwise). The lookup chains
  are computed on the host every round, so how many tokens the best of them matched is known whether
  or not they were verified. From the last `window` rounds this gives the expected tokens of every plan.
- Seconds: the wall time between the round's results and the previous round's, per plan (medians of
  recent rounds, kept on the workspace for later calls). Plans not run yet are interpolated between
  the measured corners (no draft, the full tree; with and without chains), which are each run a few
  times first.

Every `refresh_every` rounds the full tree runs once, so the draft's acceptance at every depth stays
known while shallower plans are chosen. The plan never changes what is emitted (every verification rule
is exact for any tree), so this is lossless by construction.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

DEFAULT_WINDOW = 16
DEFAULT_REFRESH_EVERY = 16
COST_SAMPLES = 8  # recent wall times kept per plan
SAMPLES_PER_CORNER = 2


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
        chain_match: tokens the best lookup chain agreed with the emitted ones (0 without lookup).
    """

    depth: int
    draft_accepted: int | None
    chain_match: int

    def gain(self, plan: Plan) -> int:
        """Tokens this row would have gained with `plan` (a lower bound where the round could not tell)."""
        drafted = min(self.draft_accepted or 0, plan.depth)
        return 1 + max(drafted, self.chain_match if plan.chains else 0)


class PlanCosts:
    """Recent wall seconds per round of each plan. The first round of a plan captures its CUDA graphs
    (or compiles), so it is not a sample of the plan's cost."""

    def __init__(self):
        self.samples: dict[Plan, deque[float]] = {}
        self.seen: set[Plan] = set()

    def record(self, plan: Plan, seconds: float) -> None:
        if plan not in self.seen:
            self.seen.add(plan)
            return
        self.samples.setdefault(plan, deque(maxlen=COST_SAMPLES)).append(seconds)

    def count(self, plan: Plan) -> int:
        return len(self.samples.get(plan, ()))

    def measured(self, plan: Plan) -> float | None:
        samples = self.samples.get(plan)
        return statistics.median(samples) if samples else None


class RoundPlanner:
    """Chooses every round's plan (see the module docstring).

    Args:
        max_depth: levels of the full draft tree (0: no draft; only the chains can be switched).
        lookup: whether prompt-lookup chains are available.
        costs: measured round costs, shared with later calls of the same shape.
        window: rounds whose outcomes estimate each plan's tokens per round.
        refresh_every: rounds after which the full tree runs again.
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
        # Measured first; every other plan's cost is interpolated from these.
        self.corners = list(dict.fromkeys([self.full, Plan(0, False), Plan(max_depth, False)]))
        self.outcomes: deque[list[RowOutcome]] = deque(maxlen=window)
        self.rounds_since_full = 0

    def choose(self) -> Plan:
        for corner in self.corners:
            if self.costs.count(corner) < SAMPLES_PER_CORNER:
                return corner
        if not self.outcomes or self.rounds_since_full >= self.refresh_every:
            return self.full
        return max(self.plans, key=self.tokens_per_second)

    def record(self, plan: Plan, seconds: float, outcomes: list[RowOutcome]) -> None:
        """The round just verified with `plan`: its wall time and each active row's outcome."""
        self.costs.record(plan, seconds)
        if outcomes:
            self.outcomes.append(outcomes)
        self.rounds_since_full = 0 if plan.depth == self.max_depth else self.rounds_since_full + 1

    def expected_gain(self, plan: Plan) -> float:
        """Mean tokens per row per round that `plan` would have gained over the recent rounds."""
        per_round = [statistics.fmean(row.gain(plan) for row in rows) for rows in self.outcomes]
        return statistics.fmean(per_round) if per_round else 1.0

    def cost(self, plan: Plan) -> float:
        """Measured seconds per round, else interpolated linearly in depth between the corners."""
        measured = self.costs.measured(plan)
        if measured is not None:
            return measured
        no_draft = self.costs.measured(Plan(0, False))
        full_tree = self.costs.measured(Plan(self.max_depth, False))
        if no_draft is None or full_tree is None:
            return float("inf")
        cost = no_draft + (full_tree - no_draft) * plan.depth / max(1, self.max_depth)
        if plan.chains:
            with_chains = self.costs.measured(self.full)
            cost += max(0.0, with_chains - full_tree) if with_chains is not None else 0.0
        return cost

    def tokens_per_second(self, plan: Plan) -> float:
        return self.expected_gain(plan) / self.cost(plan)
