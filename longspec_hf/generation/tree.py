"""Draft trees: beam-style expansion (top-k or sampled children), ancestor masks and greedy acceptance.

Node numbering is shared by the draft and the target: node 0 is the root (the last committed token),
nodes `1..N` follow level by level. Every row of a batch has the same number of nodes per level, so
`depths` is shared, while tokens and parents differ per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels


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
        draft_log_probs: in sampling mode, entry `L` is the `(B, n_L, V)` (root: `(B, 1, V)`) draft
            log-distribution q at the first `n_L` nodes of level `L` (the draft's nodes; retrieval nodes come
            after them), for the levels the draft expanded: the distribution their children were drafted
            from. Empty in greedy mode.
        retrieval: `(B, 1 + N)` boolean, True at prompt-lookup nodes (`add_chains`): fixed proposals that
            no draft distribution produced. None when the tree has none.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    log_probs: torch.Tensor
    ancestors: torch.Tensor
    level_sizes: list[int] = field(default_factory=list)
    draft_log_probs: list[torch.Tensor] = field(default_factory=list)
    retrieval: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return self.tokens.shape[1]

    @property
    def max_depth(self) -> int:
        return len(self.level_sizes)

    @classmethod
    def root_only(cls, root_tokens: torch.Tensor) -> "DraftTree":
        """The roots `(B,)` alone: a tree of depth 0."""
        return cls.empty(root_tokens, [])

    @classmethod
    def empty(cls, root_tokens: torch.Tensor, level_sizes: list[int]) -> "DraftTree":
        """The roots `(B,)` with room for levels of `level_sizes` nodes below them, for `fill_level` to fill
        in order. Every buffer has its final size from the start, so drafting a level writes a few slices
        in place instead of growing five tensors: fewer and smaller kernels in the draft's CUDA graph."""
        batch, device = root_tokens.shape[0], root_tokens.device
        num_nodes = 1 + sum(level_sizes)
        tokens = root_tokens.new_empty(batch, num_nodes)
        tokens[:, 0] = root_tokens
        ancestors = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.bool, device=device)
        ancestors[:, 0, 0] = True
        tree = cls(
            tokens=tokens,
            parents=torch.zeros(batch, num_nodes, dtype=torch.long, device=device),
            depths=torch.empty(num_nodes, dtype=torch.long, device=device),
            log_probs=torch.zeros(batch, num_nodes, device=device),
            ancestors=ancestors,
            level_sizes=list(level_sizes),
        )
        for level in range(tree.max_depth + 1):
            tree.depths[tree.level_slice(level)] = level
        return tree

    def fill_level(self, level: int, tokens: torch.Tensor, parent_local: torch.Tensor, log_probs: torch.Tensor) -> None:
        """Write level `level` (1-based; the levels above it are filled): `(B, n)` tokens, parents as
        indices into level `level - 1`, and cumulative log-probs."""
        nodes, parent_level = self.level_slice(level), self.level_slice(level - 1)
        self.tokens[:, nodes] = tokens
        parents = self.parents[:, nodes]
        torch.add(parent_local, parent_level.start, out=parents)
        self.log_probs[:, nodes] = log_probs
        # A node sees what its parent sees (only earlier levels can be set there), plus itself.
        earlier = self.ancestors[:, :, : nodes.start]
        self.ancestors[:, nodes, : nodes.start] = earlier.gather(1, parents[..., None].expand(-1, -1, nodes.start))
        self.ancestors[:, nodes, nodes].diagonal(dim1=1, dim2=2).fill_(True)

    def add_chains(self, chains: torch.Tensor) -> "DraftTree":
        """A new tree with `K` chains of `L` tokens hung under the root (see [`ChainLayout`]).

        Args:
            chains: `(B, K, L)` tokens; chain `k` is the path root -> `chains[:, k, 0]` -> ... .
        """
        _, num_chains, length = chains.shape
        if num_chains == 0 or length == 0:
            return self
        return ChainLayout.build(self.level_sizes, num_chains, length, chains.device).merge(self, chains)

    def level_slice(self, level: int) -> slice:
        """Node indices of `level` (1-based; level 0 is the root)."""
        start = 1 + sum(self.level_sizes[: level - 1]) if level > 0 else 0
        size = self.level_sizes[level - 1] if level > 0 else 1
        return slice(start, start + size)


@dataclass
class ChainLayout:
    """Where a draft tree's nodes and `K` prompt-lookup chains of `L` tokens go in the merged tree.

    Level `d` of the merged tree is the draft tree's level `d` followed by the `d`-th node of every
    chain, so levels stay contiguous and equal in size across rows (the layout every consumer relies
    on) and the draft's nodes keep their position within a level (which `draft_log_probs` is indexed
    by). The layout depends only on the shapes: built once per `generate` call, merging a round's
    tree and chains is a handful of indexed copies with no host work, so it can run inside a CUDA graph.

    With `leaf_length > 0` one more chain hangs under a draft node of the deepest level (which node
    differs per row: `merge` takes it), continuing that node's path where it occurred before.

    Attributes:
        draft_index: `(1 + N,)` merged index of each draft node (the root stays 0).
        chain_index: `(K, L)` merged index of each chain node.
        leaf_index: `(leaf_length,)` merged index of each node of the chain under the draft leaf.
        parents, depths, retrieval: `(M,)` of the merged tree; `parents` is right for chain nodes only
            (draft nodes' parents and the leaf chain's first parent differ per row: set in `merge`).
        ancestors: `(M, M)` ancestor mask of the chain nodes (the leaf chain's without the leaf's own
            path, added per row in `merge`); rows of draft nodes are filled in `merge`.
        level_sizes: the merged tree's level sizes.
        draft_level_sizes: the level sizes of the draft trees it merges.
    """

    draft_index: torch.Tensor
    chain_index: torch.Tensor
    leaf_index: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    retrieval: torch.Tensor
    ancestors: torch.Tensor
    level_sizes: list[int]
    draft_level_sizes: list[int]

    @classmethod
    def build(
        cls,
        draft_level_sizes: list[int],
        num_chains: int,
        length: int,
        device: torch.device,
        leaf_length: int = 0,
    ) -> "ChainLayout":
        draft_depth = len(draft_level_sizes)
        if leaf_length and not draft_depth:
            raise ValueError("a chain under the draft's leaf needs a draft tree")
        draft_index = [0]
        chain_index = [[0] * length for _ in range(num_chains)]
        leaf_index: list[int] = []
        parents, depths, retrieval, level_sizes = [0], [0], [False], []
        for level in range(1, max(draft_depth + leaf_length, length) + 1):
            size = 0
            if level <= draft_depth:
                for _ in range(draft_level_sizes[level - 1]):
                    draft_index.append(len(parents))
                    parents.append(0)  # per row, set in merge
                    depths.append(level)
                    retrieval.append(False)
                size += draft_level_sizes[level - 1]
            if level <= length:
                for chain in range(num_chains):
                    chain_index[chain][level - 1] = len(parents)
                    parents.append(chain_index[chain][level - 2] if level > 1 else 0)
                    depths.append(level)
                    retrieval.append(True)
                size += num_chains
            if draft_depth < level <= draft_depth + leaf_length:
                # The first node's parent is the row's leaf (set in merge); the root stands in for it here.
                parents.append(leaf_index[-1] if leaf_index else 0)
                leaf_index.append(len(parents) - 1)
                depths.append(level)
                retrieval.append(True)
                size += 1
            level_sizes.append(size)
        ancestors = torch.zeros(len(parents), len(parents), dtype=torch.bool)
        ancestors[0, 0] = True
        for node, parent in enumerate(parents):
            if retrieval[node]:
                ancestors[node] = ancestors[parent]
                ancestors[node, node] = True
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            draft_index=as_long(draft_index),
            chain_index=as_long(chain_index).reshape(num_chains, length),
            leaf_index=as_long(leaf_index),
            parents=as_long(parents),
            depths=as_long(depths),
            retrieval=torch.tensor(retrieval, device=device),
            ancestors=ancestors.to(device),
            level_sizes=level_sizes,
            draft_level_sizes=list(draft_level_sizes),
        )

    @property
    def num_nodes(self) -> int:
        """Nodes of the merged tree, root included."""
        return self.parents.shape[0]

    @property
    def leaf_length(self) -> int:
        """Nodes of the chain under the draft's leaf (0: none)."""
        return self.leaf_index.shape[0]

    def merge(
        self,
        tree: DraftTree,
        chains: torch.Tensor,
        leaf: torch.Tensor | None = None,
        leaf_chain: torch.Tensor | None = None,
    ) -> DraftTree:
        """The merged tree of `tree` (a draft tree of `draft_level_sizes`) and `chains` `(B, K, L)`; with a
        leaf chain, also `leaf` `(B,)` (each row's draft node it hangs under) and `leaf_chain`
        `(B, leaf_length)` (its tokens)."""
        if tree.retrieval is not None:
            raise ValueError("add_chains is applied once per tree")
        if tree.level_sizes != self.draft_level_sizes:
            raise ValueError(f"tree levels {tree.level_sizes} do not match the layout's {self.draft_level_sizes}")
        if (leaf_chain is not None) != bool(self.leaf_length):
            raise ValueError(f"the layout's leaf chain has {self.leaf_length} nodes: pass leaf and leaf_chain to match")
        batch, num_nodes = tree.tokens.shape[0], self.num_nodes
        draft = self.draft_index
        tokens = tree.tokens.new_empty(batch, num_nodes)
        tokens[:, draft] = tree.tokens
        tokens[:, self.chain_index.reshape(-1)] = chains.reshape(batch, -1).to(tokens.dtype)
        parents = self.parents.expand(batch, -1).clone()
        parents[:, draft] = draft[tree.parents]
        log_probs = tree.log_probs.new_zeros(batch, num_nodes)
        log_probs[:, draft] = tree.log_probs
        ancestors = self.ancestors.expand(batch, -1, -1).clone()
        ancestors[:, draft[:, None], draft[None, :]] = tree.ancestors
        if leaf_chain is not None:
            merged_leaf = draft[leaf]
            tokens[:, self.leaf_index] = leaf_chain.to(tokens.dtype)
            # (A one-element index, not a scalar one: a scalar tensor index is read on the host, which a
            # CUDA graph capture does not allow.)
            parents[:, self.leaf_index[:1]] = merged_leaf[:, None]
            # Every node of the leaf chain also sees the leaf's path.
            leaf_path = ancestors.gather(1, merged_leaf[:, None, None].expand(-1, 1, num_nodes))
            ancestors[:, self.leaf_index] |= leaf_path
        return DraftTree(
            tokens=tokens,
            parents=parents,
            depths=self.depths,
            log_probs=log_probs,
            ancestors=ancestors,
            level_sizes=list(self.level_sizes),
            draft_log_probs=list(tree.draft_log_probs),
            retrieval=self.retrieval.expand(batch, -1),
        )


def beam_level_sizes(widths: list[int], vocab_size: int) -> list[int]:
    """Nodes per level of a tree drafted with `widths` (`expand_level` keeps at most every (parent, token)
    pair, so a level is narrower than its width when the vocabulary is tiny)."""
    sizes: list[int] = []
    for width in widths:
        sizes.append(min(width, (sizes[-1] if sizes else 1) * vocab_size))
    return sizes


def expand_level(
    log_probs: torch.Tensor, parent_scores: torch.Tensor, width: int, sample_children: bool = False
) -> tuple[torch.Tensor, ...]:
    """Pick `width` (parent, token) children of `n` parent nodes.

    Greedy mode keeps the `width` best pairs by cumulative log-probability (a beam step). Sampling mode
    gives every parent the same NUMBER of children as the beam step would (that number depends only on
    the parents' scores and the shape of q, never on which tokens are drawn), and draws that many
    children per parent without replacement from q by Gumbel-top-k. Children of one parent then come
    out in draw order, parents in order, which is what recursive rejection sampling needs.

    Args:
        log_probs: `(B, n, V)` draft log-probabilities q of the children of `n` parent nodes.
        parent_scores: `(B, n)` cumulative log-probabilities of the parents.
        width: how many children to keep in total.
        sample_children: draw the children from q instead of taking its top tokens.

    Returns:
        `(tokens, parent_local, scores)`, each `(B, width)`; `parent_local` indexes the `n` parents.
    """
    batch, num_parents, vocab = log_probs.shape
    width = min(width, num_parents * vocab)
    # The global top-`width` pairs are among each parent's own top-`width` children.
    per_parent = min(width, vocab)
    child_scores, child_tokens = log_probs.topk(per_parent, dim=-1)
    if not sample_children:
        return kernels.beam_select(child_scores, child_tokens, parent_scores, width)
    pair_scores = (parent_scores[..., None] + child_scores).reshape(batch, -1)
    pair = pair_scores.topk(width, dim=-1).indices
    # How many children each parent gets; take ranks 0..count-1 of each parent (a prefix even when tied
    # scores made the beam step pick a later rank), ordered parent-major.
    counts = torch.zeros(batch, num_parents, dtype=torch.long, device=log_probs.device)
    counts.scatter_add_(1, pair // per_parent, torch.ones_like(pair))
    ranks = torch.arange(per_parent, device=log_probs.device)
    keep = (ranks[None, None, :] < counts[..., None]).reshape(batch, -1)
    flat = torch.arange(num_parents * per_parent, device=log_probs.device).expand(batch, -1)
    order = torch.where(keep, flat, num_parents * per_parent).sort(dim=-1).values[:, :width]
    # Gumbel-top-k: the top `per_parent` of log q + Gumbel noise are draws without replacement, in order.
    # Clamping the exponential keeps the noise finite (log 0 would give inf - inf = nan at q = 0).
    exponential = torch.empty_like(log_probs).exponential_().clamp_(min=torch.finfo(log_probs.dtype).tiny)
    drawn = (log_probs - exponential.log()).topk(per_parent, dim=-1).indices
    tokens = drawn.reshape(batch, -1).gather(1, order)
    parent_local = order // per_parent
    token_log_probs = log_probs.reshape(batch, -1).gather(1, parent_local * vocab + tokens)
    return tokens, parent_local, parent_scores.gather(1, parent_local) + token_log_probs


def expand_level_greedy(
    logits: torch.Tensor, parent_scores: torch.Tensor, width: int, vocab_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`expand_level` in greedy mode, from the draft's raw logits `(B, n, V)`: only each parent's top
    children are normalised (`kernels.topk_log_softmax`), never the whole `(B, n, V)` log-softmax.

    With `vocab_ids` `(V,)` (a draft vocabulary, increasing token ids) the logits are over those tokens
    only; the children are the same as from logits over the whole vocabulary that are -inf elsewhere."""
    batch, num_parents, vocab = logits.shape
    width = min(width, num_parents * vocab)
    per_parent = min(width, vocab)
    child_scores, child_tokens = kernels.topk_log_softmax(logits.reshape(-1, vocab), per_parent)
    if vocab_ids is not None:
        child_tokens = vocab_ids[child_tokens]
    shape = (batch, num_parents, per_parent)
    return kernels.beam_select(child_scores.view(shape), child_tokens.view(shape), parent_scores, width)


@dataclass
class GreedyAcceptance:
    """Result of verifying a tree (greedy or sampling): the form the decoding loop compacts and outputs.

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
    bonus = target_choice.gather(1, deepest[:, None])[:, 0]
    return acceptance_from_deepest(tree, deepest, num_accepted, bonus)


def acceptance_from_deepest(
    tree: DraftTree, deepest: torch.Tensor, num_accepted: torch.Tensor, bonus: torch.Tensor
) -> GreedyAcceptance:
    """Express an accepted path as a [`GreedyAcceptance`].

    Args:
        tree: the verified tree.
        deepest: `(B,)` the deepest accepted node (0 when no draft node was accepted).
        num_accepted: `(B,)` its depth.
        bonus: `(B,)` the target's token after `deepest`.
    """
    batch = deepest.shape[0]
    # Walk up from the deepest accepted node; positions past its depth repeat it.
    path = torch.empty(batch, tree.max_depth + 1, dtype=torch.long, device=tree.tokens.device)
    node = deepest
    for depth in range(tree.max_depth, -1, -1):
        path[:, depth] = torch.where(num_accepted >= depth, node, deepest)
        node = torch.where(num_accepted >= depth, tree.parents.gather(1, node[:, None])[:, 0], node)
    path_tokens = tree.tokens.gather(1, path)
    bonus = bonus[:, None].to(path_tokens.dtype)
    steps = torch.arange(tree.max_depth + 1, device=path.device)[None, :]
    # new token j is the node at depth j + 1 for j < num_accepted, then the bonus token.
    shifted = torch.cat([path_tokens[:, 1:], bonus], dim=1)
    new_tokens = torch.where(steps < num_accepted[:, None], shifted, bonus)
    return GreedyAcceptance(path=path, num_accepted=num_accepted, new_tokens=new_tokens)
