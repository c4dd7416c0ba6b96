"""Draft trees: beam-style expansion, ancestor masks and greedy acceptance.

Node numbering is shared by the draft and the target: node 0 is the root (the last committed token),
nodes `1..N` follow level by level. Every row of a batch has the same number of nodes per level, so
`depths` is shared, while tokens and parents differ per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """A drafted token tree for a batch.

    Attributes:
        tokens: `(B, 1 + N)` token of every node; column 0 is the root.
        parents: `(B, 1 + N)` index of each node's parent (the root points at itself).
        depths: `(1 + N,)` depth of each node (root 0).
        log_probs: `(B, 1 + N)` cumulative draft log-probability of each node's path (root 0).
        ancestors: `(B, 1 + N, 1 + N)` boolean; `ancestors[b, i, j]` iff node `j` is on the path to `i`
            (a node is its own ancestor). This is the tree attention mask.
        level_sizes: number of nodes in each level, root excluded.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    log_probs: torch.Tensor
    ancestors: torch.Tensor
    level_sizes: list[int] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return self.tokens.shape[1]

    @property
    def max_depth(self) -> int:
        return len(self.level_sizes)

    @classmethod
    def root_only(cls, root_tokens: torch.Tensor) -> "DraftTree":
        batch = root_tokens.shape[0]
        device = root_tokens.device
        return cls(
            tokens=root_tokens[:, None].clone(),
            parents=torch.zeros(batch, 1, dtype=torch.long, device=device),
            depths=torch.zeros(1, dtype=torch.long, device=device),
            log_probs=torch.zeros(batch, 1, device=device),
            ancestors=torch.ones(batch, 1, 1, dtype=torch.bool, device=device),
        )

    def add_level(self, tokens: torch.Tensor, parents: torch.Tensor, log_probs: torch.Tensor) -> None:
        """Append one level: `(B, n)` tokens, parent node indices and cumulative log-probs."""
        batch, size = tokens.shape
        start = self.num_nodes
        device = tokens.device
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.parents = torch.cat([self.parents, parents], dim=1)
        self.log_probs = torch.cat([self.log_probs, log_probs], dim=1)
        self.depths = torch.cat([self.depths, torch.full((size,), len(self.level_sizes) + 1, device=device)])
        total = start + size
        ancestors = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
        ancestors[:, :start, :start] = self.ancestors
        # A new node sees what its parent sees, plus itself.
        parent_rows = self.ancestors.gather(1, parents[..., None].expand(-1, -1, start))
        ancestors[:, start:, :start] = parent_rows
        ancestors[:, torch.arange(start, total), torch.arange(start, total)] = True
        self.ancestors = ancestors
        self.level_sizes.append(size)

    def level_slice(self, level: int) -> slice:
        """Node indices of `level` (1-based; level 0 is the root)."""
        start = 1 + sum(self.level_sizes[: level - 1]) if level > 0 else 0
        size = self.level_sizes[level - 1] if level > 0 else 1
        return slice(start, start + size)


def expand_level(log_probs: torch.Tensor, parent_scores: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """Pick the `width` best (parent, token) pairs by cumulative log-probability.

    Args:
        log_probs: `(B, n, V)` draft log-probabilities of the children of `n` parent nodes.
        parent_scores: `(B, n)` cumulative log-probabilities of the parents.
        width: how many children to keep in total.

    Returns:
        `(tokens, parent_local, scores)`, each `(B, width)`; `parent_local` indexes the `n` parents.
    """
    batch, num_parents, vocab = log_probs.shape
    width = min(width, num_parents * vocab)
    # The global top-`width` pairs are among each parent's own top-`width` children.
    per_parent = min(width, vocab)
    child_scores, child_tokens = log_probs.topk(per_parent, dim=-1)
    pair_scores = (parent_scores[..., None] + child_scores).reshape(batch, -1)
    scores, pair = pair_scores.topk(width, dim=-1)
    tokens = child_tokens.reshape(batch, -1).gather(1, pair)
    return tokens, pair // per_parent, scores


@dataclass
class GreedyAcceptance:
    """Result of greedy verification.

    Attributes:
        path: `(B, 1 + max_depth)` node indices from the root to the deepest accepted node, padded by
            repeating the last one.
        num_accepted: `(B,)` accepted draft nodes (root excluded); the row gains `num_accepted + 1` tokens.
        new_tokens: `(B, 1 + max_depth)` the accepted nodes' tokens followed by the target's bonus token.
    """

    path: torch.Tensor
    num_accepted: torch.Tensor
    new_tokens: torch.Tensor


def accept_greedy(tree: DraftTree, target_choice: torch.Tensor) -> GreedyAcceptance:
    """Accept the deepest node whose whole path matches the target's choice at every step.

    Args:
        tree: the verified tree.
        target_choice: `(B, 1 + N)` the target's token after each node (argmax of its processed scores).
    """
    batch, num_nodes = tree.tokens.shape
    accepted = torch.zeros(batch, num_nodes, dtype=torch.bool, device=tree.tokens.device)
    accepted[:, 0] = True
    for level in range(1, tree.max_depth + 1):
        nodes = tree.level_slice(level)
        parents = tree.parents[:, nodes]
        matches = tree.tokens[:, nodes] == target_choice.gather(1, parents)
        accepted[:, nodes] = accepted.gather(1, parents) & matches
    depth_if_accepted = torch.where(accepted, tree.depths[None, :], -1)
    num_accepted, deepest = depth_if_accepted.max(dim=1)
    # Walk up from the deepest accepted node; positions past its depth repeat it.
    path = torch.empty(batch, tree.max_depth + 1, dtype=torch.long, device=tree.tokens.device)
    node = deepest
    for depth in range(tree.max_depth, -1, -1):
        path[:, depth] = torch.where(num_accepted >= depth, node, deepest)
        node = torch.where(num_accepted >= depth, tree.parents.gather(1, node[:, None])[:, 0], node)
    path_tokens = tree.tokens.gather(1, path)
    bonus = target_choice.gather(1, deepest[:, None])
    steps = torch.arange(tree.max_depth + 1, device=path.device)[None, :]
    # new token j is the node at depth j + 1 for j < num_accepted, then the bonus token.
    shifted = torch.cat([path_tokens[:, 1:], bonus], dim=1)
    new_tokens = torch.where(steps < num_accepted[:, None], shifted, bonus)
    return GreedyAcceptance(path=path, num_accepted=num_accepted, new_tokens=new_tokens)
