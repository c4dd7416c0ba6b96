"""Adaptive drafting: stop drafting while speculation does not pay, try again now and then.

A round with a draft tree costs a draft pass per level plus a wider target forward; it pays only when
rows gain enough tokens per round. [`AdaptiveDrafting`] watches the tokens gained per row per round
(`LongSpecStats.accepted_lengths`): when their mean over the last `window` drafted rounds falls below
`min_mean_gain`, the next rounds verify no draft tree (`tree_widths=[]`: the root alone, plus the
prompt-lookup chains when those are on, which cost no model); after `probe_after` such rounds it drafts
again, and keeps drafting if the mean recovers. The tree shape never changes what is emitted (every
verification rule is exact for any proposal), so this is lossless by construction.
"""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW = 8
# Break-even guess for a small draft: about half a token more per round than plain decoding.
DEFAULT_MIN_MEAN_GAIN = 1.5
DEFAULT_PROBE_AFTER = 16


class AdaptiveDrafting:
    """Decides per round whether the draft runs.

    Args:
        window: drafted rounds whose mean gain is compared with `min_mean_gain`.
        min_mean_gain: mean tokens gained per row per round below which drafting stops.
        probe_after: rounds without the draft before drafting is tried again.
    """

    def __init__(
        self, window: int = DEFAULT_WINDOW, min_mean_gain: float = DEFAULT_MIN_MEAN_GAIN, probe_after: int = DEFAULT_PROBE_AFTER
    ):
        self.window = window
        self.min_mean_gain = min_mean_gain
        self.probe_after = probe_after
        self.recent: deque[float] = deque(maxlen=window)
        self.paused_rounds = 0
        self.drafting = True

    def draft_this_round(self) -> bool:
        if not self.drafting and self.paused_rounds >= self.probe_after:
            # Probe: draft again and judge it on fresh rounds.
            self.drafting = True
            self.recent.clear()
        return self.drafting

    def record(self, gains: list[int], drafted: bool) -> None:
        """Tokens gained by each active row in the round just verified."""
        if not drafted:
            self.paused_rounds += 1
            return
        if gains:
            self.recent.append(sum(gains) / len(gains))
        # Judge after a full window, or after a short probe that already fell below the bar.
        probe_failed = len(self.recent) >= min(2, self.window) and max(self.recent) < self.min_mean_gain
        full_window = len(self.recent) == self.window
        if full_window and sum(self.recent) / len(self.recent) < self.min_mean_gain or probe_failed:
            self.drafting = False
            self.paused_rounds = 0
