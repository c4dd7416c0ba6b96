"""The automatic tree's acceptance, learned from a draft's own greedy calls.

[`tree_sizing`] scores trees with `a(w) = 1 - (1 - top1) * w ** -width_exponent`, the chance that a
level of `w` beams holds the target's token once its parent was accepted. Before any call, `top1` is the
prior: the draft's generation config's `acceptance_prior`, else the default. Every greedy call with a
draft tree then records, for each level a row reached in a round, one trial weighted `w ** -e`, and a
failure where the row stopped at that level. Later greedy calls use

    1 - top1 = (failures + PRIOR_TRIALS * (1 - top1_prior)) / (weighted trials + PRIOR_TRIALS)

(the moment estimate of the failure rate, the prior counting as `PRIOR_TRIALS` pseudo-trials), so that a
draft that is accepted more or less often than the prior says gets deeper or shallower trees after a few
calls. The width exponent stays the prior's.

What it never changes: the emitted tokens (every tree verifies exactly). Sampling calls keep the prior
alone, because a tree chosen from earlier calls would change which random numbers a seeded call draws.
Rounds that accepted prompt-lookup tokens, and calls in which `adaptive` skipped the draft, are not
recorded (their acceptance is not the tree's).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..modeling import LongSpecDraftModel
from .stats import LongSpecStats
from .tree_sizing import DEFAULT_TOP1_ACCEPTANCE, DEFAULT_WIDTH_EXPONENT

ATTRIBUTE = "_longspec_acceptance"
# How many weighted trials the prior is worth: a few calls of a few hundred tokens outweigh it.
PRIOR_TRIALS = 200.0
# Calls on one draft from several threads record one at a time.
_RECORDING = threading.Lock()


@dataclass
class AcceptanceCounts:
    """A draft's recorded tree levels: `failures` (rows that stopped at a level) and `weighted_trials`
    (rows that reached a level of `w` beams, each counting `w ** -width_exponent`)."""

    width_exponent: float
    failures: float = 0.0
    weighted_trials: float = 0.0

    def record(self, widths: tuple[int, ...], accepted_lengths: list[int], retrieval_accepted: list[int]) -> None:
        """Add the rounds of one call: the tree's `widths`, and per row and round the tokens gained and how
        many of them came from lookup chains (as [`LongSpecStats`] holds them)."""
        for gained, from_chains in zip(accepted_lengths, retrieval_accepted):
            if from_chains:
                continue
            accepted = gained - 1  # draft tokens of the round's path
            for level, width in enumerate(widths):
                if accepted < level:
                    break
                self.weighted_trials += width ** -self.width_exponent
                if accepted == level:
                    self.failures += 1
                    break

    def top1(self, prior_top1: float) -> float:
        """The `top1` the next greedy call's tree is chosen with."""
        failure = (self.failures + PRIOR_TRIALS * (1.0 - prior_top1)) / (self.weighted_trials + PRIOR_TRIALS)
        # At most 1: the prior's family then says a single beam is never accepted (wider levels still are).
        return 1.0 - min(max(failure, 0.01), 1.0)


def acceptance_counts(draft: LongSpecDraftModel) -> AcceptanceCounts | None:
    """What `draft`'s earlier greedy calls recorded (None before the first)."""
    return draft.__dict__.get(ATTRIBUTE)


def draft_prior(draft: LongSpecDraftModel) -> tuple[float, float]:
    """`(top1, width_exponent)` of the draft's generation config's `acceptance_prior`, else the defaults;
    a ValueError for a malformed one."""
    prior = getattr(getattr(draft, "generation_config", None), "acceptance_prior", None) or {}
    if not isinstance(prior, dict) or not set(prior) <= {"top1", "width_exponent"}:
        raise ValueError(
            f"The draft's generation_config.acceptance_prior must be a dict with keys 'top1' and/or "
            f"'width_exponent' (see longspec_hf.generation.tree_sizing), got {prior!r}. Fix or remove it."
        )
    return prior.get("top1", DEFAULT_TOP1_ACCEPTANCE), prior.get("width_exponent", DEFAULT_WIDTH_EXPONENT)


def record_call(draft: LongSpecDraftModel, stats: LongSpecStats, first_round: RoundsSeen) -> None:
    """Record on `draft` the rounds a greedy call added to `stats` since `first_round` (a `stats` object
    the caller passes in may hold earlier calls' rounds)."""
    if not stats.tree_widths or stats.drafted_rounds - first_round.drafted != stats.rounds - first_round.rounds:
        return
    _, width_exponent = draft_prior(draft)
    with _RECORDING:
        counts = draft.__dict__.get(ATTRIBUTE)
        if counts is None or counts.width_exponent != width_exponent:
            counts = AcceptanceCounts(width_exponent)
            draft.__dict__[ATTRIBUTE] = counts
        first = first_round.row_rounds
        counts.record(stats.tree_widths, stats.accepted_lengths[first:], stats.retrieval_accepted[first:])


@dataclass(frozen=True)
class RoundsSeen:
    """How far a [`LongSpecStats`] was filled when a call started."""

    rounds: int
    drafted: int
    row_rounds: int

    @classmethod
    def of(cls, stats: LongSpecStats) -> "RoundsSeen":
        return cls(stats.rounds, stats.drafted_rounds, len(stats.accepted_lengths))


def forget_acceptance(draft: LongSpecDraftModel) -> None:
    """Drop what `draft`'s calls recorded: the next calls choose their trees from the prior again."""
    draft.__dict__.pop(ATTRIBUTE, None)
