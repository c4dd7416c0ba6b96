"""Distillation from the frozen target: its last-layer KV cache, its next-token labels, losses, acceptance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling import output_cache

LOSS_KINDS = ("ce", "kl")


@dataclass
class TargetBatch:
    """What the target provides for one batch of sequences.

    Attributes:
        key, value: `(B, Hkv, T, D)` its last-layer K/V (rotated at the batch's position ids).
        logits: `(B, T, V)` its next-token logits at every index (index i predicts token i + 1).
    """

    key: torch.Tensor
    value: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def run_target(target, input_ids: torch.Tensor, position_ids: torch.Tensor) -> TargetBatch:
    """One forward of the frozen `target` over `input_ids` `(B, T)` at `position_ids` `(B, T)`."""
    out = target(input_ids=input_ids, position_ids=position_ids, use_cache=True)
    last_layer = output_cache(out).layers[-1]
    return TargetBatch(key=last_layer.keys, value=last_layer.values, logits=out.logits)


def lag_mask(length: int, cross_lag: torch.Tensor) -> torch.Tensor:
    """`(B, T)` True at indices that see at least one target slot (index >= lag); the others carry no loss.

    At inference every draft query sees some committed context, so queries with none are not trained.
    """
    index = torch.arange(length, device=cross_lag.device)
    return index[None, :] >= cross_lag[:, None]


def distillation_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor, kind: str = "ce"
) -> torch.Tensor:
    """Mean per-token loss of the draft against the target over positions where `mask` `(B, T)` is True.

    `kind="ce"`: cross-entropy to the target's argmax (what greedy verification accepts).
    `kind="kl"`: KL(target || draft) over the whole vocabulary (what sampling verification accepts).
    """
    draft = draft_logits[mask].float()  # (N, V)
    target = target_logits[mask].float()
    if kind == "ce":
        return F.cross_entropy(draft, target.argmax(dim=-1))
    if kind == "kl":
        return F.kl_div(F.log_softmax(draft, dim=-1), F.log_softmax(target, dim=-1), log_target=True, reduction="batchmean")
    raise ValueError(f"loss must be one of {LOSS_KINDS}, got {kind!r}")


@torch.no_grad()
def greedy_acceptance(
    draft,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    target_batch: TargetBatch,
    max_depth: int = 4,
) -> dict[str, float]:
    """Held-out greedy agreement between draft and target.

    Returns:
        `acceptance_lag{j}`: fraction of indices (>= j) where the draft's argmax at lag j equals the
            target's argmax; `acceptance` is the lag-1 figure (the tree root).
        `chain_accepted`: mean number of draft tokens a greedy chain of `max_depth` tokens gets accepted,
            started at every index t: the node at depth k sits at index t + k and reads the target at lag
            k + 1, as at inference. The inputs are the data tokens (teacher forcing), so a chain is only
            continued while the data token equals the token the chain would have fed (the target's
            argmax); this makes the figure a slight underestimate. Mean tokens per round ~ 1 + this.
    """
    batch, length = input_ids.shape
    target_next = target_batch.logits.argmax(dim=-1)  # (B, T)
    matches = []
    metrics: dict[str, float] = {}
    for lag in range(1, max_depth + 1):
        lags = torch.full((batch,), lag, device=input_ids.device)
        logits = draft(input_ids, position_ids, target_batch.key, target_batch.value, cross_lag=lags)
        match = logits.argmax(dim=-1) == target_next
        matches.append(match)
        metrics[f"acceptance_lag{lag}"] = match[:, lag:].float().mean().item()
    metrics["acceptance"] = metrics["acceptance_lag1"]

    # A chain that starts at t continues at depth k >= 1 only if the data token at t + k is the one accepted.
    fed_token_ok = torch.ones_like(target_next, dtype=torch.bool)
    fed_token_ok[:, 1:] = input_ids[:, 1:] == target_next[:, :-1]
    num_starts = length - max_depth + 1
    alive = torch.ones(batch, num_starts, dtype=torch.bool, device=input_ids.device)
    accepted = torch.zeros(batch, num_starts, device=input_ids.device)
    for depth in range(max_depth):
        at = slice(depth, depth + num_starts)
        ok = matches[depth][:, at] & (fed_token_ok[:, at] if depth > 0 else True)
        alive = alive & ok
        accepted += alive.float()
    # Chains starting at index 0 have no target context at lag 1: leave them out, as in the loss.
    metrics["chain_accepted"] = accepted[:, 1:].mean().item()
    return metrics
