"""Target scores at tree nodes, computed exactly as transformers computes them step by step.

transformers applies its logits processors to `(input_ids, scores)` where `input_ids` is the sequence so
far. At a tree node that sequence is the committed row plus the node's own path, so path-dependent
processors (repetition penalty, min length, no-repeat n-grams, user processors, ...) run once per
committed length and depth with those paths; processors that look at the scores alone run once over all nodes.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .tree import DraftTree

SCORES_ONLY_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)


def node_paths(tree: DraftTree, nodes: slice, depth: int) -> torch.Tensor:
    """`(B, n, depth)` tokens on the path from the root (excluded) to each node of `nodes` (included)."""
    current = torch.arange(nodes.start, nodes.stop, device=tree.tokens.device).expand(tree.tokens.shape[0], -1)
    path = torch.empty(*current.shape, depth, dtype=tree.tokens.dtype, device=current.device)
    for step in range(depth - 1, -1, -1):
        path[:, :, step] = tree.tokens.gather(1, current)
        current = tree.parents.gather(1, current)
    return path


def tree_scores(
    logits: torch.Tensor,
    processors: LogitsProcessorList,
    tokens: torch.Tensor,
    seq_len: torch.Tensor,
    tree: DraftTree,
) -> torch.Tensor:
    """Processed float32 scores `(B, 1 + N, V)` at every node of `tree`.

    Args:
        logits: `(B, 1 + N, V)` raw target logits at the nodes.
        processors: the logits processors transformers prepared for this `generate` call.
        tokens, seq_len: the committed rows; row `b` is `tokens[b, :seq_len[b]]` (its last token is the root).
        tree: the verified tree.
    """
    scores = logits.float()
    if len(processors) == 0:
        return scores
    batch, num_nodes, vocab = scores.shape
    if all(isinstance(p, SCORES_ONLY_PROCESSORS) for p in processors):
        flat = processors(tokens[:, :1].repeat_interleave(num_nodes, dim=0), scores.reshape(-1, vocab))
        return flat.view(batch, num_nodes, vocab)
    out = torch.empty_like(scores)
    # One processor call per (committed length, depth): rows of equal length share the call, so a large
    # batch of sampled rows does not pay one Python call per row.
    for length in seq_len.unique().tolist():
        rows = (seq_len == length).nonzero()[:, 0]
        committed = tokens[rows, :length]  # (R, length)
        for depth in range(tree.max_depth + 1):
            nodes = tree.level_slice(depth)
            count = nodes.stop - nodes.start
            input_ids = committed[:, None, :].expand(-1, count, -1)
            if depth > 0:
                input_ids = torch.cat([input_ids, node_paths(tree, nodes, depth)[rows]], dim=2)
            node_scores = scores[rows, nodes].reshape(len(rows) * count, vocab)
            processed = processors(input_ids.reshape(len(rows) * count, -1), node_scores.clone())
            out[rows, nodes] = processed.view(len(rows), count, vocab)
    return out
