"""Anchor-Offset position ids and cross-attention lag noise (DESIGN.md, method items 2 and 3).

Short training sequences are given position ids that look deep inside a long context, except for a
few leading "attention sink" tokens that keep their small indices:

    [0, 1, 2, 3, o + 4, o + 5, ..., o + length - 1]    with o uniform in [0, max_positions - length]

so the largest id is at most `max_positions - 1`. The target sees the same ids when it produces the
KV cache and the labels, so the draft learns to read a cache rotated at large positions.
"""

from __future__ import annotations

import torch

NUM_SINK_TOKENS = 4
MAX_CROSS_LAG = 4


def anchor_offset_position_ids(
    batch_size: int,
    length: int,
    max_positions: int,
    generator: torch.Generator | None = None,
    enabled: bool = True,
    num_sinks: int = NUM_SINK_TOKENS,
) -> torch.Tensor:
    """Position ids `(batch_size, length)` (int64, CPU), one random offset per row.

    Args:
        batch_size, length: shape of the batch.
        max_positions: the target's maximum position count; ids stay below it.
        generator: source of the offsets (pass a seeded one for reproducible training).
        enabled: False gives plain `0..length-1` in every row.
        num_sinks: leading tokens that keep ids `0..num_sinks-1`.
    """
    if length > max_positions:
        raise ValueError(f"sequence length {length} exceeds the target's {max_positions} positions")
    positions = torch.arange(length, dtype=torch.long).repeat(batch_size, 1)
    if not enabled:
        return positions
    offsets = torch.randint(0, max_positions - length + 1, (batch_size, 1), generator=generator)
    shifted = torch.arange(length) >= num_sinks
    return positions + offsets * shifted


def sample_cross_lag(batch_size: int, generator: torch.Generator | None = None, max_lag: int = MAX_CROSS_LAG) -> torch.Tensor:
    """Per-row cross-attention lag `(batch_size,)`, uniform in `[1, max_lag]`.

    At inference a tree node at depth d reads target KV up to d + 1 tokens behind it; drawing the lag
    at random trains the draft for every depth it will be used at.
    """
    return torch.randint(1, max_lag + 1, (batch_size,), generator=generator)
