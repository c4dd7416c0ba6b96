"""Hybrid prefix + tree attention in Triton: one split-KV launch plus a small reduction.

What it computes is `reference.prefix_tree_attention`: every tree query attends to its row's committed
prefix `[prefix_start[b], prefix_end[b])` of a preallocated cache without any mask, and to the tree
keys under the ancestor mask; it returns the output and the log-sum-exp (LSE) of the scaled scores.

How (flash-decoding with grouped-query heads folded into the tile rows):

* The `G = Hq / Hkv` query heads that share a K/V head and the `Tq` tree queries form the `M = G * Tq`
  rows of one query tile, row `m = g * Tq + t`. A program therefore loads each K/V tile once for all of
  them: the prefix is read from memory once per KV head, not once per query head or per query.
* The keys of a row are seen as one sequence: the prefix, then the `Tt` tree keys. Program `split` of
  `num_splits` takes one contiguous chunk of it (whole `BLOCK_N` blocks), so the long prefix is spread
  over the whole GPU even at batch 1. Each program keeps an online softmax in base 2 and writes its
  normalised partial output and partial LSE; `_merge_splits_kernel` combines the splits exactly.
* Prefix blocks need no mask except the last partial one of a chunk; the ancestor mask is loaded and
  applied only on tree blocks, which live in their own tensor. Slots outside `[prefix_start,
  prefix_end)` are never loaded, so garbage in unwritten cache slots cannot reach the result.
* A sliding window (`window`, a compile-time switch: without it the kernel is the plain one) is a
  per-row lower bound on the prefix positions. Each program drops the prefix keys before its tile's
  earliest window start from its key sequence (so they are neither read nor given to a split), masks
  only the blocks where its rows' window starts differ, and applies the window to the tree blocks by
  node depth.

The same kernel with the tree (or the prefix) switched off gives the two passes of the paper's method,
merged afterwards with `merge_attention`; `two_pass_prefix_tree_attention` is that variant.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_window_arguments, merge_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2_E = math.log2(math.e)


@triton.jit
def _online_softmax_step(acc, row_max, row_sum, scores, value, qk_scale_log2,
                         MAY_HIDE_WHOLE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one block of raw scores `q @ k^T` `(BLOCK_M, BLOCK_N)` (-inf where hidden) and its values
    `(BLOCK_N, BLOCK_D)` into the running output `acc`, the row maximum of the base-2 scores
    `score * qk_scale_log2` and the row sum of `exp2(base-2 score - row_max)`."""
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale_log2)
    if MAY_HIDE_WHOLE_ROWS:
        # A row that has seen no key yet has max -inf; shift by 0 instead so that exp2 gives 0, not NaN.
        new_max_ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max_ref = new_max
    # Scaling inside the exponent's argument makes it one fused multiply-add per score.
    probs = tl.exp2(scores * qk_scale_log2 - new_max_ref[:, None])
    correction = tl.exp2(row_max - new_max_ref)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None]
    acc = tl.dot(probs.to(value.dtype), value, acc, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


# Sizes that change from call to call (a longer cache gets more splits) are not specialised on, so a
# new prompt length does not compile the kernel again.
@triton.jit(do_not_specialize=["num_queries", "num_tree", "num_splits", "window"])
def _prefix_tree_attention_kernel(
    Q, K_prefix, V_prefix, Prefix_start, Prefix_end, K_tree, V_tree, Tree_mask, Tree_depth,
    Out, Lse, Out_partial, Lse_partial,
    qk_scale_log2, window,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kpb, stride_kph, stride_kps, stride_kpd,
    stride_vpb, stride_vph, stride_vps, stride_vpd,
    stride_ktb, stride_kth, stride_kts, stride_ktd,
    stride_vtb, stride_vth, stride_vts, stride_vtd,
    stride_mb, stride_mq, stride_mt,
    stride_db, stride_dt,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    num_kv_heads, num_queries, num_tree, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PREFIX: tl.constexpr, USE_TREE: tl.constexpr, WINDOW: tl.constexpr, WRITE_FINAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (m block, split, batch row * KV head): attention of `BLOCK_M` folded query rows over one
    chunk of the row's keys (prefix, then tree). Writes the final output when there is one split,
    otherwise the chunk's normalised output and base-2 LSE into the partial buffers.

    With `WINDOW`, query `t` is tree node `t` at depth `Tree_depth[b, t]` below the prefix end, and sees
    only keys less than `window` positions before it."""
    block_m = tl.program_id(0)
    split = tl.program_id(1)
    batch_head = tl.program_id(2)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    batch64 = batch.to(tl.int64)
    kv_head64 = kv_head.to(tl.int64)

    num_rows = GROUP * num_queries
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    query_head = kv_head * GROUP + rows // num_queries
    query_index = rows % num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    key_offsets = tl.arange(0, BLOCK_N)

    q_ptrs = (Q + batch64 * stride_qb + query_head[:, None].to(tl.int64) * stride_qh
              + query_index[:, None] * stride_qt + dims[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    if WINDOW:
        # Every head of the group shares its query's depth (rows g * Tq + t).
        row_depth = tl.load(Tree_depth + batch64 * stride_db + query_index * stride_dt, mask=row_valid,
                            other=0).to(tl.int32)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # This program's chunk [chunk_lo, chunk_hi) of the row's keys: prefix positions first, then tree.
    if USE_PREFIX:
        prefix_start = tl.load(Prefix_start + batch).to(tl.int32)
        prefix_len = tl.maximum(tl.load(Prefix_end + batch).to(tl.int32) - prefix_start, 0)
        if WINDOW:
            # Query row m (prefix position prefix_len + depth) sees prefix positions >= its window start
            # prefix_len + depth - window + 1. Positions before the tile's earliest window start are seen
            # by no row: they leave the tile's key sequence, which then starts there.
            min_depth = tl.min(tl.where(row_valid, row_depth, 2147483647), 0)
            max_depth = tl.max(tl.where(row_valid, row_depth, 0), 0)
            skipped = tl.minimum(tl.maximum(prefix_len + min_depth - window + 1, 0), prefix_len)
            prefix_start += skipped
            prefix_len -= skipped
            row_window_lo = prefix_len + row_depth - window + 1
            # From here on every row of the tile sees every prefix key.
            all_rows_lo = prefix_len + max_depth - window + 1
    else:
        prefix_start = 0
        prefix_len = 0
    if USE_TREE:
        tree_len = num_tree
    else:
        tree_len = 0
    total_len = prefix_len + tree_len
    chunk = tl.cdiv(tl.cdiv(total_len, num_splits), BLOCK_N) * BLOCK_N
    chunk_lo = split * chunk
    chunk_hi = tl.minimum(chunk_lo + chunk, total_len)

    if USE_PREFIX:
        k_base = K_prefix + batch64 * stride_kpb + kv_head64 * stride_kph
        v_base = V_prefix + batch64 * stride_vpb + kv_head64 * stride_vph
        prefix_hi = tl.minimum(chunk_hi, prefix_len)
        free_lo = chunk_lo
        if WINDOW:
            # The chunk's blocks before `all_rows_lo` (at most a few: the tile's depths differ by less
            # than a tree's height) mask each row's keys before its window start.
            free_lo = chunk_lo + tl.cdiv(tl.maximum(all_rows_lo - chunk_lo, 0), BLOCK_N) * BLOCK_N
            for block_lo in range(chunk_lo, tl.minimum(free_lo, prefix_hi), BLOCK_N):
                positions = block_lo + key_offsets
                key_valid = positions < prefix_hi
                slots = prefix_start + positions
                k = tl.load(k_base + slots[:, None] * stride_kps + dims[None, :] * stride_kpd,
                            mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
                v = tl.load(v_base + slots[:, None] * stride_vps + dims[None, :] * stride_vpd,
                            mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
                visible = key_valid[None, :] & (positions[None, :] >= row_window_lo[:, None])
                scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), float("-inf"))
                acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale_log2,
                                                             True, DOT_PRECISION)
        full_hi = free_lo + tl.maximum(prefix_hi - free_lo, 0) // BLOCK_N * BLOCK_N
        # Whole blocks inside the prefix: no mask at all (but on padded head dims).
        first_slots = prefix_start + free_lo + key_offsets
        k_ptrs = k_base + first_slots[:, None] * stride_kps + dims[None, :] * stride_kpd
        v_ptrs = v_base + first_slots[:, None] * stride_vps + dims[None, :] * stride_vpd
        for _ in range(free_lo, full_hi, BLOCK_N):
            if D_PADDED:
                k = tl.load(k_ptrs, mask=dim_valid[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=dim_valid[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale_log2,
                                                         False, DOT_PRECISION)
            k_ptrs += BLOCK_N * stride_kps
            v_ptrs += BLOCK_N * stride_vps
        # The chunk's last, partial prefix block: keys past the prefix end are neither loaded nor seen.
        if full_hi < prefix_hi:
            positions = full_hi + key_offsets
            key_valid = positions < prefix_hi
            slots = prefix_start + positions
            k = tl.load(k_base + slots[:, None] * stride_kps + dims[None, :] * stride_kpd,
                        mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
            v = tl.load(v_base + slots[:, None] * stride_vps + dims[None, :] * stride_vpd,
                        mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
            scores = tl.where(key_valid[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), float("-inf"))
            acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale_log2,
                                                         False, DOT_PRECISION)

    if USE_TREE:
        kt_base = K_tree + batch64 * stride_ktb + kv_head64 * stride_kth
        vt_base = V_tree + batch64 * stride_vtb + kv_head64 * stride_vth
        mask_base = Tree_mask + batch64 * stride_mb
        tree_lo = tl.maximum(chunk_lo, prefix_len) - prefix_len
        tree_hi = tl.maximum(chunk_hi, prefix_len) - prefix_len
        for block_lo in range(tree_lo, tree_hi, BLOCK_N):
            nodes = block_lo + key_offsets
            node_valid = nodes < tree_hi
            k = tl.load(kt_base + nodes[:, None] * stride_kts + dims[None, :] * stride_ktd,
                        mask=node_valid[:, None] & dim_valid[None, :], other=0.0)
            v = tl.load(vt_base + nodes[:, None] * stride_vts + dims[None, :] * stride_vtd,
                        mask=node_valid[:, None] & dim_valid[None, :], other=0.0)
            # The ancestor mask row of query t serves all G heads of the group (rows g * Tq + t).
            visible = tl.load(mask_base + query_index[:, None] * stride_mq + nodes[None, :] * stride_mt,
                              mask=row_valid[:, None] & node_valid[None, :], other=0) != 0
            if WINDOW:
                node_depth = tl.load(Tree_depth + batch64 * stride_db + nodes * stride_dt, mask=node_valid,
                                     other=0).to(tl.int32)
                visible = visible & (node_depth[None, :] > row_depth[:, None] - window)
            scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), float("-inf"))
            acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale_log2,
                                                         True, DOT_PRECISION)

    # A row that saw nothing has row_sum 0: output 0 and LSE -inf (log2(0) = -inf), as the reference.
    out = tl.where(row_sum[:, None] > 0, acc / row_sum[:, None], 0.0)
    lse_log2 = row_max + tl.log2(row_sum)
    if WRITE_FINAL:
        out_ptrs = (Out + batch64 * stride_ob + query_head[:, None].to(tl.int64) * stride_oh
                    + query_index[:, None] * stride_ot + dims[None, :] * stride_od)
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
        lse_ptrs = Lse + batch64 * stride_lb + query_head.to(tl.int64) * stride_lh + query_index * stride_lt
        tl.store(lse_ptrs, lse_log2 * 0.6931471805599453, mask=row_valid)  # to base e: * ln(2)
    else:
        # Partial buffers are contiguous (B, Hkv, num_splits, M[, D]).
        partial_row = (batch_head.to(tl.int64) * num_splits + split) * num_rows + rows
        tl.store(Out_partial + partial_row[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=row_valid[:, None] & dim_valid[None, :])
        tl.store(Lse_partial + partial_row, lse_log2, mask=row_valid)


@triton.jit(do_not_specialize=["num_queries", "num_splits"])
def _merge_splits_kernel(
    Out_partial, Lse_partial, Out, Lse,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    num_kv_heads, num_queries, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (m block, batch row * KV head): exact softmax merge of the splits,
    `out = sum_s 2^(lse_s - max) out_s / sum_s 2^(lse_s - max)`, `lse = max + log2(sum)` (then to base e).

    `BLOCK_S` splits are loaded at once and folded in with a running maximum: the merge is a chain of
    dependent loads, so its time is the number of load rounds, not the bytes."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    num_rows = GROUP * num_queries
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    # Everything per row is kept as (M, 1) and per split as (S, M, 1), slices of one (S, M, D) layout,
    # so that no broadcast needs a layout conversion.
    row_valid = (rows < num_rows)[:, None]
    dim_valid = (dims < HEAD_DIM)[None, None, :]
    first_row = (batch_head.to(tl.int64) * num_splits * num_rows + rows)[None, :, None]
    split_offsets = tl.arange(0, BLOCK_S)[:, None, None]

    lse_max = tl.full([BLOCK_M, 1], float("-inf"), dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split_lo in range(0, num_splits, BLOCK_S):
        splits = split_lo + split_offsets
        valid = (splits < num_splits) & row_valid[None, :, :]
        partial_rows = first_row + splits.to(tl.int64) * num_rows  # (S, M, 1)
        lse_splits = tl.load(Lse_partial + partial_rows, mask=valid, other=float("-inf"))
        out_splits = tl.load(Out_partial + partial_rows * HEAD_DIM + dims[None, None, :],
                             mask=valid & dim_valid, other=0.0)
        new_max = tl.maximum(lse_max, tl.max(lse_splits, axis=0))
        # Rows no split saw stay at -inf; shift them by 0 so that their weights are exactly 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(lse_max - shift)
        weight = tl.exp2(lse_splits - shift[None, :, :])
        # A split that saw no key has weight 0; skip its (zero) output explicitly so that it cannot add NaN.
        contribution = tl.where(weight > 0, weight * out_splits, 0.0)
        acc = acc * rescale + tl.sum(contribution, axis=0)
        weight_sum = weight_sum * rescale + tl.sum(weight, axis=0)
        lse_max = new_max

    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    out = tl.where(weight_sum > 0, acc / weight_sum, 0.0)
    lse = (lse_ref + tl.log2(weight_sum)) * 0.6931471805599453  # to base e: * ln(2)
    query_head = (kv_head * GROUP + rows // num_queries)[:, None]
    query_index = (rows % num_queries)[:, None]
    out_ptrs = (Out + batch.to(tl.int64) * stride_ob + query_head.to(tl.int64) * stride_oh
                + query_index * stride_ot + dims[None, :] * stride_od)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid & (dims < HEAD_DIM)[None, :])
    lse_ptrs = Lse + batch.to(tl.int64) * stride_lb + query_head.to(tl.int64) * stride_lh + query_index * stride_lt
    tl.store(lse_ptrs, lse, mask=row_valid)


# True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import):
# they then run on CPU tensors.
INTERPRETED = type(_prefix_tree_attention_kernel).__name__ == "InterpretedFunction"


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Allocation of outputs and workspaces (one place, so that tests can poison every buffer)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so that CPU tests exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(num_rows: int, head_dim: int, element_size: int = 2) -> dict:
    """Tile shape and launch parameters for `M = G * Tq` folded query rows of head dim `head_dim`
    (16-bit tiles chosen from a sweep on an H100, bench/results/HISTORY.md).

    The K/V pipeline stages must fit in shared memory with the query tile, so the key block shrinks as
    rows get wider. Narrow heads (64 x 16 bit) with many rows are compute-bound: 64-row blocks, long key
    blocks and twice as many splits as multiprocessors pay for re-reading K/V once per row block. With
    few rows (one block) the kernel is bound by reading K/V and one wave of shorter blocks is faster.
    """
    if element_size >= 4:
        # float32 (exact mode) multiplies on FMA units with both operands spread over registers: on sm90
        # every wider tile spills, tens of KiB per thread at 64-128 rows; 16 x 16 tiles on 8 warps do
        # not (tests/test_kernels_compile_for_gpu.py checks the compiled kernels).
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1}
    block_d = max(16, triton.next_power_of_2(head_dim))
    row_bytes = block_d * element_size
    rows_pow2 = max(16, triton.next_power_of_2(num_rows))
    if row_bytes <= 128 and num_rows > 64:
        block_m, block_n, num_stages, programs_per_sm = 64, 128, 3, 2
    elif row_bytes <= 256:  # also narrow heads with few rows
        block_m, block_n, num_stages, programs_per_sm = min(128, rows_pow2), 64, 3, 1
    else:
        block_m, block_n, num_stages, programs_per_sm = min(64, rows_pow2), 32, 2, 1
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": 8 if block_m >= 128 else 4,
        "num_stages": num_stages,
        "programs_per_sm": programs_per_sm,
    }


MERGE_TILE = 8192  # fp32 elements of the (splits, rows, dims) tile one merge program loads per round


def merge_config(num_rows: int, block_d: int, num_splits: int) -> dict:
    """Tile of the split merge: up to 16 splits per load round and as many rows as fit `MERGE_TILE`.
    Few splits make the tile many rows deep, which spills registers on 4 warps (sm90): 8 then."""
    block_s = min(16, max(2, triton.next_power_of_2(num_splits)))
    block_m = max(1, min(triton.next_power_of_2(num_rows), MERGE_TILE // (block_s * block_d)))
    return {"BLOCK_S": block_s, "BLOCK_M": block_m, "num_warps": 8 if block_s <= 4 else 4}


def default_num_splits(num_programs_per_split: int, num_keys: int, block_n: int, device: torch.device,
                       programs_per_sm: int = 1) -> int:
    """Enough splits to fill every multiprocessor with `programs_per_sm` programs in one wave (no
    straggling partial wave), but no chunk shorter than four blocks: beyond that the merge costs more
    than it spreads."""
    fill = max(1, _multiprocessor_count(device) * programs_per_sm // max(1, num_programs_per_split))
    return max(1, min(fill, triton.cdiv(num_keys, 4 * block_n)))


def _launch(
    query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale,
    window=None, tree_depths=None, *, config=None, num_splits=None,
):
    """Attention of `query` over the prefix (when `key_prefix` is given) and the masked tree (when
    `key_tree` is given) in one split-KV launch (+ the merge launch when `num_splits > 1`), within a
    sliding `window` when one is given (queries are then the tree nodes at `tree_depths`)."""
    batch, num_q_heads, num_queries, head_dim = query.shape
    reference_kv = key_prefix if key_prefix is not None else key_tree
    num_kv_heads = reference_kv.shape[1]
    group = num_q_heads // num_kv_heads
    num_rows = group * num_queries
    device = query.device
    out = _new_buffer((batch, num_q_heads, num_queries, head_dim), query.dtype, device)
    lse = _new_buffer((batch, num_q_heads, num_queries), torch.float32, device)
    if out.numel() == 0:
        return out, lse

    cfg = dict(default_config(num_rows, head_dim, query.element_size()), **(config or {}))
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_blocks_m = triton.cdiv(num_rows, block_m)
    use_prefix, use_tree = key_prefix is not None, key_tree is not None
    num_tree = key_tree.shape[2] if use_tree else 0
    if num_splits is None:
        # key_prefix may be a whole preallocated cache: its length bounds the chunk count from above,
        # the kernel divides each row's actual length. A window bounds it too: a tile reads the prefix
        # keys from its earliest window start on, fewer than `window` plus its spread of depths.
        max_prefix_keys = key_prefix.shape[2] if use_prefix else 0
        if window is not None:
            max_prefix_keys = min(max_prefix_keys, window - 1 + num_tree)
        max_keys = max_prefix_keys + num_tree
        num_splits = default_num_splits(batch * num_kv_heads * num_blocks_m, max_keys, block_n, device,
                                        cfg.get("programs_per_sm", 1))

    if use_prefix:
        prefix_start = prefix_start.to(device=device)
        prefix_end = prefix_end.to(device=device)
    else:
        key_prefix = value_prefix = prefix_start = prefix_end = query  # unused placeholders
    if use_tree:
        tree_mask_bytes = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
        tree_mask_strides = tree_mask_bytes.stride()
    else:
        key_tree = value_tree = tree_mask_bytes = query
        tree_mask_strides = (0, 0, 0)
    if window is not None:
        tree_depths = tree_depths.to(device=device, dtype=torch.int32)
        # (T,): one tree shape for every row, read with batch stride 0.
        depth_strides = tree_depths.stride() if tree_depths.dim() == 2 else (0, tree_depths.stride(0))
    else:
        tree_depths, depth_strides = query, (0, 0)  # unused placeholder

    if num_splits > 1:
        out_partial = _new_buffer((batch, num_kv_heads, num_splits, num_rows, head_dim), torch.float32, device)
        lse_partial = _new_buffer((batch, num_kv_heads, num_splits, num_rows), torch.float32, device)
    else:
        out_partial, lse_partial = out, lse  # unused

    block_d = max(16, triton.next_power_of_2(head_dim))
    _prefix_tree_attention_kernel[(num_blocks_m, num_splits, batch * num_kv_heads)](
        query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask_bytes, tree_depths,
        out, lse, out_partial, lse_partial,
        scale * LOG2_E, window if window is not None else 0,
        *query.stride(), *key_prefix.stride(), *value_prefix.stride(),
        *key_tree.stride(), *value_tree.stride(), *tree_mask_strides, *depth_strides,
        *out.stride(), *lse.stride(),
        num_kv_heads, num_queries, num_tree, num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, D_PADDED=block_d != head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, USE_PREFIX=use_prefix, USE_TREE=use_tree, WINDOW=window is not None,
        WRITE_FINAL=num_splits == 1,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        merge = merge_config(num_rows, block_d, num_splits)
        _merge_splits_kernel[(triton.cdiv(num_rows, merge["BLOCK_M"]), batch * num_kv_heads)](
            out_partial, lse_partial, out, lse,
            *out.stride(), *lse.stride(),
            num_kv_heads, num_queries, num_splits,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, **merge,
        )
    return out, lse


def unsupported_reason(query, key_prefix, value_prefix, key_tree, value_tree, tree_mask, scale) -> str | None:
    """Why these inputs cannot go to the kernel, or None when they can (`key_tree`, `value_tree` and
    `tree_mask` None: prefix-only attention)."""
    if key_tree is None:
        key_tree, value_tree, tree_mask = key_prefix, value_prefix, query[..., 0]
    tensors = (query, key_prefix, value_prefix, key_tree, value_tree)
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (supported: {SUPPORTED_DTYPES})"
    if any(t.dtype != query.dtype for t in tensors):
        return "query, key and value dtypes differ"
    if any(t.dim() != 4 for t in tensors) or tree_mask.dim() != 3:
        return "expected 4-D query/key/value and a 3-D tree mask"
    if any(t.device != query.device for t in (*tensors, tree_mask)):
        return "tensors on different devices"
    if query.device.type != "cuda" and not INTERPRETED:
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 at import)"
    if not scale > 0:
        return "scale must be positive"
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM or any(t.shape[-1] != head_dim for t in tensors):
        return f"head dim {head_dim} (at most {MAX_HEAD_DIM}, equal for all inputs)"
    if key_prefix.shape[1] == 0 or query.shape[1] % key_prefix.shape[1] or key_tree.shape[1] != key_prefix.shape[1]:
        return "query heads must be a multiple of the KV heads"
    return None


def prefix_tree_attention(
    query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale,
    window=None, tree_depths=None, *, config: dict | None = None, num_splits: int | None = None,
):
    """Fused hybrid tree attention; same arguments and results as `reference.prefix_tree_attention`.

    `config` overrides tile parameters (BLOCK_M, BLOCK_N, num_warps, num_stages) and `num_splits` the
    number of chunks per row (benchmarks and tests; the defaults suit an H100).
    """
    check_window_arguments(query, key_tree, window, tree_depths)
    return _launch(query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask,
                   scale, window, tree_depths, config=config, num_splits=num_splits)


def prefix_attention_with_lse(query, key_prefix, value_prefix, prefix_start, prefix_end, scale, **launch):
    """Mask-free attention over the prefix slots `[prefix_start[b], prefix_end[b])`, with its LSE."""
    return _launch(query, key_prefix, value_prefix, prefix_start, prefix_end, None, None, None, scale, **launch)


def tree_attention_with_lse(query, key_tree, value_tree, tree_mask, scale, **launch):
    """Attention over the tree keys under the ancestor mask, with its LSE."""
    return _launch(query, None, None, None, None, key_tree, value_tree, tree_mask, scale, **launch)


def two_pass_prefix_tree_attention(
    query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale,
):
    """The paper's method: a mask-free prefix pass with LSE, a masked tree pass, then an exact merge."""
    out_prefix, lse_prefix = prefix_attention_with_lse(query, key_prefix, value_prefix, prefix_start, prefix_end, scale)
    out_tree, lse_tree = tree_attention_with_lse(query, key_tree, value_tree, tree_mask, scale, num_splits=1)
    return merge_attention(out_prefix, lse_prefix, out_tree, lse_tree)


# torch.compile cannot look inside a Triton launch that picks its tiles in Python, so compiled code
# reaches the kernels through these opaque operators (outputs are fresh, never views).
def _fake_attention_outputs(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(query, memory_format=torch.contiguous_format), query.new_empty(query.shape[:3], dtype=torch.float32)


@torch.library.custom_op("longspec::prefix_attention", mutates_args=())
def prefix_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor, end: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return prefix_attention_with_lse(query, key, value, start, end, scale)


@prefix_attention_op.register_fake
def _(query, key, value, start, end, scale):
    return _fake_attention_outputs(query)


@torch.library.custom_op("longspec::masked_attention", mutates_args=())
def masked_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return tree_attention_with_lse(query, key, value, visible, scale)


@masked_attention_op.register_fake
def _(query, key, value, visible, scale):
    return _fake_attention_outputs(query)


@torch.library.custom_op("longspec::prefix_tree_attention", mutates_args=())
def prefix_tree_attention_op(
    query: torch.Tensor,
    key_prefix: torch.Tensor,
    value_prefix: torch.Tensor,
    prefix_start: torch.Tensor,
    prefix_end: torch.Tensor,
    key_tree: torch.Tensor,
    value_tree: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    window: Optional[int] = None,
    tree_depths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return prefix_tree_attention(
        query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale,
        window, tree_depths,
    )


@prefix_tree_attention_op.register_fake
def _(query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale,
      window=None, tree_depths=None):
    return _fake_attention_outputs(query)
