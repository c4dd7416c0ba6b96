"""What a LongSpec `generate` call reports about its rounds."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LongSpecStats:
    """Statistics of one LongSpec `generate` call.

    Attributes:
        rounds: draft-and-verify rounds (target forwards after the prefill).
        accepted_lengths: tokens each active row gained in each round (accepted draft tokens + 1).
        retrieval_accepted: for the same rows and rounds, how many of the accepted tokens came from
            prompt-lookup chains (0 when prompt lookup is off).
        drafted_rounds: rounds in which the draft ran (all rounds with a draft, unless `adaptive`
            paused it).
        draft_cache_nbytes: bytes of the draft's own cache (its window ring and tree scratch: constant
            in the context length).
        tree_widths: the draft tree's level widths the call verified (chosen automatically unless the
            call or its generation config gave them).
        prompt_lookup: `(branches, length)` of the prompt-lookup chains beside the tree (`(0, 0)`: none).
    """

    rounds: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    retrieval_accepted: list[int] = field(default_factory=list)
    drafted_rounds: int = 0
    draft_cache_nbytes: int = 0
    tree_widths: tuple[int, ...] = ()
    prompt_lookup: tuple[int, int] = (0, 0)

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens gained per row per round (tau); 0.0 when no round ran."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def mean_retrieval_accepted(self) -> float:
        """Mean tokens per row per round accepted from prompt-lookup chains."""
        return sum(self.retrieval_accepted) / len(self.retrieval_accepted) if self.retrieval_accepted else 0.0

    @property
    def round_shape(self) -> str:
        """The round's shape in words, e.g. `tree [4, 6, 6] + 1 lookup chain of 16`."""
        branches, length = self.prompt_lookup
        chains = f" + {branches} lookup chain{'s' if branches > 1 else ''} of {length}" if branches else ""
        return f"tree {list(self.tree_widths)}{chains}"

    def reset(self) -> None:
        self.rounds = 0
        self.drafted_rounds = 0
        self.draft_cache_nbytes = 0
        self.tree_widths = ()
        self.prompt_lookup = (0, 0)
        self.accepted_lengths.clear()
        self.retrieval_accepted.clear()
