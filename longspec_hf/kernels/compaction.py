"""Cache compaction in Triton: move the accepted tree entries into the committed cache of every layer
in one launch.

What it computes is `reference.compact_kv`: for each layer, key/value, row `b` and KV head,
`kv[..., dest_start[b] + j, :] = kv_scratch[..., source_index[b, j], :]` for `j < P`.

One program moves the `P` kept entries of one (layer, key/value, KV head) for one row and one slice
of the head dim: it gathers the `P` scratch rows into registers, then scatters them to consecutive
cache slots. Reading all of them before writing any keeps the result right when the scratch is a view
of the cache itself (scratch slots right after the committed prefix), where a destination slot can be
another entry's source. Programs never share slots, so no ordering between programs is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KEPT_ENTRIES = 512  # P: all entries of a program stay in registers at once
TILE_ELEMENTS = 8192  # BLOCK_P * BLOCK_D: a few registers per thread


# The cache size varies with every prompt: no specialisation on it, so no recompilation.
@triton.jit(do_not_specialize=["num_kept", "num_slots", "num_scratch"])
def _compact_kv_kernel(
    KV, Scratch, Source_index, Dest_start,
    num_kv_heads, num_kept, num_slots, num_scratch,
    stride_kl, stride_kc, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_sl, stride_sc, stride_sb, stride_sh, stride_ss, stride_sd,
    stride_ib, stride_ip,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (layer * 2 * Hkv + key_or_value * Hkv + head, row, head-dim block)."""
    layer_kind_head = tl.program_id(0)
    row = tl.program_id(1)
    dim_block = tl.program_id(2)
    head = layer_kind_head % num_kv_heads
    layer_kind = layer_kind_head // num_kv_heads
    layer = (layer_kind // 2).to(tl.int64)
    kind = (layer_kind % 2).to(tl.int64)
    row64 = row.to(tl.int64)
    head64 = head.to(tl.int64)

    kept = tl.arange(0, BLOCK_P)
    source = tl.load(Source_index + row64 * stride_ib + kept * stride_ip, mask=kept < num_kept, other=0).to(tl.int32)
    dest = tl.load(Dest_start + row).to(tl.int32) + kept
    # Out-of-range indices move nothing instead of touching memory outside the two buffers.
    entry_valid = (kept < num_kept) & (source >= 0) & (source < num_scratch) & (dest >= 0) & (dest < num_slots)
    dims = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = entry_valid[:, None] & (dims < HEAD_DIM)[None, :]

    scratch_base = Scratch + layer * stride_sl + kind * stride_sc + row64 * stride_sb + head64 * stride_sh
    entries = tl.load(scratch_base + source[:, None] * stride_ss + dims[None, :] * stride_sd, mask=valid)
    # Every thread of the program has read its entries before any thread overwrites a slot (aliasing).
    tl.debug_barrier()
    cache_base = KV + layer * stride_kl + kind * stride_kc + row64 * stride_kb + head64 * stride_kh
    tl.store(cache_base + dest[:, None] * stride_ks + dims[None, :] * stride_kd, entries, mask=valid)


INTERPRETED = type(_compact_kv_kernel).__name__ == "InterpretedFunction"


def unsupported_reason(kv, kv_scratch, source_index, dest_start) -> str | None:
    """Why these inputs cannot go to the kernel, or None when they can."""
    if kv.dtype not in SUPPORTED_DTYPES or kv_scratch.dtype != kv.dtype:
        return f"dtypes {kv.dtype}/{kv_scratch.dtype} (supported: {SUPPORTED_DTYPES}, equal)"
    if kv.dim() != 6 or kv_scratch.dim() != 6 or kv.shape[1] != 2 or source_index.dim() != 2:
        return "expected kv (L, 2, B, Hkv, S, D), scratch (L, 2, B, Hkv, Tt, D) and source_index (B, P)"
    if kv.shape[:4] != kv_scratch.shape[:4] or kv.shape[-1] != kv_scratch.shape[-1]:
        return "kv and scratch disagree on layers, batch, heads or head dim"
    if source_index.shape[1] > MAX_KEPT_ENTRIES:
        return f"more than {MAX_KEPT_ENTRIES} entries to keep"
    if any(t.device != kv.device for t in (kv_scratch, source_index, dest_start)):
        return "tensors on different devices"
    if kv.device.type != "cuda" and not INTERPRETED:
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 at import)"
    return None


def compact_kv(kv: torch.Tensor, kv_scratch: torch.Tensor, source_index: torch.Tensor, dest_start: torch.Tensor) -> None:
    """In-place compaction of all layers in one launch; same arguments as `reference.compact_kv`."""
    num_layers, _, batch, num_kv_heads, num_slots, head_dim = kv.shape
    num_kept = source_index.shape[1]
    if kv.numel() == 0 or num_kept == 0:
        return
    block_p = triton.next_power_of_2(num_kept)
    block_d = min(triton.next_power_of_2(head_dim), max(16, TILE_ELEMENTS // block_p))
    grid = (num_layers * 2 * num_kv_heads, batch, triton.cdiv(head_dim, block_d))
    _compact_kv_kernel[grid](
        kv, kv_scratch, source_index, dest_start,
        num_kv_heads, num_kept, num_slots, kv_scratch.shape[4],
        *kv.stride(), *kv_scratch.stride(), *source_index.stride(),
        HEAD_DIM=head_dim, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=4,
    )
