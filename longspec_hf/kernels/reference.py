"""Pure-torch definitions of what the LongSpec kernels compute.

These functions are the CPU path and the ground truth that every Triton kernel in this package is
tested against. They favour clarity over speed, but stay O(memory) sane: grouped query heads are
folded into the query axis instead of repeating K/V.

Shapes use these letters:
    B  batch rows            Hq query heads          Hkv key/value heads (Hq = G * Hkv)
    Tq queries per row       S  key slots            D  head dim
"""

from __future__ import annotations

import torch


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scaled scores.

    Args:
        query: `(B, Hq, Tq, D)`.
        key, value: `(B, Hkv, S, D)`; `Hq` must be a multiple of `Hkv` (grouped-query attention).
        visible: boolean, broadcastable to `(B, Tq, S)`; True where a query may attend to a key.
        scale: multiplier of `q @ k^T`.

    Returns:
        `out` `(B, Hq, Tq, D)` in the query's dtype and `lse` `(B, Hq, Tq)` in float32. A query that
        sees no key gets `out = 0` and `lse = -inf`, so that merging it with another part is exact.
    """
    batch, num_q_heads, num_queries, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_q_heads // num_kv_heads
    # Fold the query heads that share a K/V head into the query axis: (B, Hkv, G*Tq, D).
    q = query.float().reshape(batch, num_kv_heads, group * num_queries, head_dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale
    scores = scores.view(batch, num_kv_heads, group, num_queries, -1)
    mask = visible[:, None, None]  # (B|1, 1, 1, Tq|1, S) against scores (B, Hkv, G, Tq, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G, Tq)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # exactly 0 where masked
    # A slot no query sees may hold garbage (an unwritten cache slot can be NaN or inf), and 0 * NaN is NaN:
    # zero such values so that they cannot reach the output through the zero probabilities.
    seen_by_some_query = visible.any(dim=-2)[:, None, :, None]  # (B|1, 1, S, 1) against value (B, Hkv, S, D)
    value = value.float().masked_fill(~seen_by_some_query, 0.0)
    out = torch.matmul(probs.view(batch, num_kv_heads, group * num_queries, -1), value)
    out = out.view(batch, num_q_heads, num_queries, head_dim)
    return out.to(query.dtype), lse.reshape(batch, num_q_heads, num_queries)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine attention computed over two disjoint key sets.

    `softmax` over the union weighs each part by its share of the total mass:
    `w = exp(lse_a) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_a - lse_b)`. A part that saw no key
    (`lse = -inf`) gets weight 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0).unsqueeze(-1)
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse


def prefix_visibility(prefix_start: torch.Tensor, prefix_end: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Boolean `(B, 1, S)`: slot `s` of row `b` is visible iff `prefix_start[b] <= s < prefix_end[b]`."""
    slots = torch.arange(num_slots, device=prefix_start.device)
    return ((slots >= prefix_start[:, None]) & (slots < prefix_end[:, None]))[:, None, :]


def _slots_to_read(key: torch.Tensor, end: torch.Tensor) -> int:
    """How many leading cache slots of `key` `(B, Hkv, S, D)` to attend over: only slots below the longest
    row's `end` can be visible, so eagerly the preallocated tail is skipped; compiled code and a CUDA graph
    being captured (this is the CUDA path where Triton is missing) cannot wait for that value and take
    the whole cache."""
    if torch.compiler.is_compiling() or (key.is_cuda and torch.cuda.is_current_stream_capturing()):
        return key.shape[2]
    return int(end.max()) if end.numel() else 0


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` `(B, Hq, Tq, D)` over the slots `[start[b], end[b])` of `key`/`value`
    `(B, Hkv, S, D)`, every query of row `b` seeing all of them. Returns `out` `(B, Hq, Tq, D)` and
    `lse` `(B, Hq, Tq)` (float32). Every row needs at least one slot."""
    num_slots = _slots_to_read(key, end)
    visible = prefix_visibility(start, end, num_slots)
    return attention_with_lse(query, key[:, :, :num_slots], value[:, :, :num_slots], visible, scale)


def check_window_arguments(query: torch.Tensor, key_tree: torch.Tensor, window: int | None, tree_depths) -> None:
    """Raise a ValueError unless `window` and `tree_depths` are a valid pair for `prefix_tree_attention`."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if tree_depths is None:
        raise ValueError("a window needs tree_depths: the positions of the tree queries and keys")
    num_tree = key_tree.shape[2]
    if query.shape[2] != num_tree:
        raise ValueError(f"a window needs one query per tree node ({query.shape[2]} queries, {num_tree} tree keys)")
    if tree_depths.shape[-1] != num_tree or tree_depths.dim() not in (1, 2):
        raise ValueError(f"tree_depths must be (T,) or (B, T) with T = {num_tree}, got {tuple(tree_depths.shape)}")


def window_visibility(
    prefix_end: torch.Tensor, tree_depths: torch.Tensor, window: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys a sliding window of `window` positions leaves visible to the tree queries.

    Tree node `t` of row `b` sits right after the row's committed slots, at slot `prefix_end[b] +
    tree_depths[b, t]` of the sequence it would be committed into; slot `s` of the cache is slot `s`. Slot
    and position differ by the row's left padding only, so distances are the same in both. The rule is
    transformers' (`masking_utils.sliding_window_overlay`): a query at position `q` sees a key at
    position `k` iff `k > q - window`, i.e. `window` positions including its own.

    Returns:
        `(prefix, tree)` boolean, `(B, T, num_slots)` for the cache slots and `(B, T, T)` for the tree nodes
        (query node `i`, key node `j`); to be combined with the padding bounds and the ancestor mask.
    """
    depths = tree_depths.to(prefix_end.device, torch.long).expand(prefix_end.shape[0], -1)
    query_slot = prefix_end[:, None] + depths  # (B, T)
    slots = torch.arange(num_slots, device=prefix_end.device)
    prefix = slots[None, None, :] > query_slot[:, :, None] - window
    tree = depths[:, None, :] > depths[:, :, None] - window
    return prefix, tree


def prefix_tree_attention(
    query: torch.Tensor,
    key_prefix: torch.Tensor,
    value_prefix: torch.Tensor,
    prefix_start: torch.Tensor,
    prefix_end: torch.Tensor,
    key_tree: torch.Tensor,
    value_tree: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    window: int | None = None,
    tree_depths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid tree attention: the committed prefix without a mask, the tree with its ancestor mask.

    Args:
        query: `(B, Hq, Tq, D)`, one query per tree node.
        key_prefix, value_prefix: `(B, Hkv, S, D)`; row `b` attends to slots `[prefix_start[b], prefix_end[b])`
            (left padding before `prefix_start`, uncommitted slots from `prefix_end` on).
        prefix_start, prefix_end: `(B,)` integer tensors.
        key_tree, value_tree: `(B, Hkv, Tt, D)`, the K/V of the tree nodes.
        tree_mask: `(B, Tq, Tt)` boolean; True where query node `i` may see tree node `j` (its ancestors
            and itself).
        scale: multiplier of `q @ k^T`.
        window: None for full attention; else a sliding window (a layer's `sliding_window`): each query
            also sees only keys less than `window` positions before it (see `window_visibility`). Needs
            `Tq == Tt` (query `t` is tree node `t`) and `tree_depths`.
        tree_depths: `(Tt,)` or `(B, Tt)` integer depth of each tree node below the row's committed
            prefix (0: the node right after it); only read with a window.

    Returns:
        `out` `(B, Hq, Tq, D)` and `lse` `(B, Hq, Tq)` (float32) of attention over both parts together.
    """
    check_window_arguments(query, key_tree, window, tree_depths)
    num_slots = _slots_to_read(key_prefix, prefix_end)
    prefix_visible = prefix_visibility(prefix_start, prefix_end, num_slots)
    if window is not None:
        prefix_in_window, tree_in_window = window_visibility(prefix_end, tree_depths, window, num_slots)
        prefix_visible = prefix_visible & prefix_in_window
        tree_mask = tree_mask & tree_in_window
    out_p, lse_p = attention_with_lse(
        query, key_prefix[:, :, :num_slots], value_prefix[:, :, :num_slots], prefix_visible, scale
    )
    out_t, lse_t = attention_with_lse(query, key_tree, value_tree, tree_mask, scale)
    return merge_attention(out_p, lse_p, out_t, lse_t)


def compact_kv(
    kv: torch.Tensor,
    kv_scratch: torch.Tensor,
    source_index: torch.Tensor,
    dest_start: torch.Tensor,
) -> None:
    """Move accepted tree entries from the scratch slots into the committed cache, in place, all layers at once.

    Args:
        kv: `(num_layers, 2, B, Hkv, S, D)` preallocated cache (2 = key, value).
        kv_scratch: `(num_layers, 2, B, Hkv, Tt, D)` tree scratch of the same layers.
        source_index: `(B, P)` scratch slot of the `j`-th entry to keep in row `b`.
        dest_start: `(B,)` first cache slot to write in row `b`; entry `j` lands at `dest_start[b] + j`.
    """
    rows = torch.arange(source_index.shape[0], device=source_index.device)[:, None]
    dest_index = dest_start[:, None] + torch.arange(source_index.shape[1], device=source_index.device)
    # Advanced indices on dims 2 and 4 (split by a slice) put the index dims first: (B, P, L, 2, Hkv, D).
    kv[:, :, rows, :, dest_index] = kv_scratch[:, :, rows, :, source_index]


def topk_log_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest entries of `log_softmax(logits)` of each row `(R, V)`, computed in float32, and
    their indices, both `(R, k)`, largest first (the order of equal values is unspecified here)."""
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


def beam_select(
    child_scores: torch.Tensor, child_tokens: torch.Tensor, parent_scores: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam step: the `width` best (parent, child) pairs of each batch row by cumulative score.

    Args:
        child_scores: `(B, n, k)` log-probabilities of each parent's `k` candidate children.
        child_tokens: `(B, n, k)` their tokens.
        parent_scores: `(B, n)` cumulative log-probabilities of the parents.
        width: pairs to keep (at most `n * k`).

    Returns:
        `(tokens, parent_local, scores)`, each `(B, width)`, best first (the order of equal scores is
        unspecified here); `parent_local` indexes the `n` parents, `scores` are float32 cumulative
        log-probabilities.
    """
    batch, _, per_parent = child_scores.shape
    pair_scores = (parent_scores.float()[..., None] + child_scores.float()).reshape(batch, -1)
    scores, pair = pair_scores.topk(width, dim=-1)
    tokens = child_tokens.reshape(batch, -1).gather(1, pair)
    return tokens, pair // per_parent, scores


def grouped_linear(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """Several linear layers applied to one input: `[x @ w.T + b for w, b in zip(weights, biases)]`.

    Args:
        x: `(M, K)` rows (the tokens of a forward).
        weights: `(N_i, K)` each, in `nn.Linear`'s layout.
        biases: `(N_i,)` or None, one per weight.

    Returns:
        `(M, N_i)` per weight, in `x`'s dtype.
    """
    return [torch.nn.functional.linear(x, weight, bias) for weight, bias in zip(weights, biases)]
