"""Top-k of the log-softmax of each row, in Triton: what a greedy draft needs from its logits per tree level.

What it computes is `reference.topk_log_softmax`: the `k` largest entries of `log_softmax(logits)` per
row (float32) and their indices, largest first, ties by lower index.

Why: a greedy tree level needs only each node's best few children and their log-probabilities, but
torch spends a log-softmax over the whole vocabulary plus a multi-pass radix top-k (about eight
launches) on it, which was a quarter of the draft's time per round on a small target. Here:

* Every entry becomes one int64 sort key: the float's bits made order-preserving in the high half, the
  complement of its position in the low half. "Largest value, lowest position among equals" is then a
  single max reduction, and taking it out of the running a single compare.
* Stage 1, program (row, chunk): one `CHUNK`-wide slice of the vocabulary in registers. It writes the
  slice's maximum and its sum of `exp(x - max)`, and the keys of its own top `k`, by `k` rounds of
  "largest key left".
* Stage 2, program (row): the exact log-sum-exp from the chunks' (max, sum) pairs, and the top `k` of
  the `chunks * k` candidate keys the same way (the row's top `k` are among its chunks' top `k`).

Each round is a reduction whose cost is mostly its latency, so programs are narrow (one warp: no
shared-memory round trip per reduction) and many, rather than wide.

`beam_select` is the beam step that follows (`reference.beam_select`): the `width` best (parent, child)
pairs of a batch row by parent score + child log-probability, in one program per row instead of torch's
add, radix top-k, sort and gathers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 64
MAX_BEAM_CANDIDATES = 4096  # parents x children of one beam step, in one program's registers
# Stage-1 slice and warps, stage-2 warps (measured on an H200 for SmolLM2's vocabulary; BENCHMARKS.md).
CHUNK = 512
CHUNK_WARPS = 1
MERGE_WARPS = 1
# Inside the kernels as literals (the interpreter cannot do arithmetic with constexpr globals):
# -(2**63 - 1) is below the key of every non-NaN value (for padding and entries already taken);
# positions are below 2**31 - 1.


@triton.jit
def _sort_key(values, positions):
    """int64 keys ordered like (value, then the lower position first) for float32 `values`."""
    values = tl.where(values == 0.0, 0.0, values)  # -0.0 ties with 0.0, as in torch
    bits = values.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits (an involution).
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - positions).to(tl.int64)


@triton.jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_position(key):
    return 2147483647 - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit(do_not_specialize=["vocab"])
def _chunk_topk_kernel(
    Logits, Cand_key, Chunk_max, Chunk_sum,
    vocab, num_chunks, stride_lr, stride_lv,
    K: tl.constexpr, CHUNK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets = chunk * CHUNK_SIZE + tl.arange(0, CHUNK_SIZE)
    valid = offsets < vocab
    x = tl.load(Logits + row * stride_lr + offsets * stride_lv, mask=valid, other=float("-inf")).to(tl.float32)

    chunk_max = tl.max(x, axis=0)
    shift = tl.where(chunk_max == float("-inf"), 0.0, chunk_max)  # an all -inf slice sums to 0, not nan
    chunk_sum = tl.sum(tl.where(valid, tl.exp(x - shift), 0.0), axis=0)
    out = row * num_chunks + chunk
    tl.store(Chunk_max + out, chunk_max)
    tl.store(Chunk_sum + out, chunk_sum)

    keys = tl.where(valid, _sort_key(x, offsets), -9223372036854775807)
    for rank in tl.static_range(K):
        best = tl.max(keys, axis=0)
        tl.store(Cand_key + out * K + rank, best)
        keys = tl.where(keys == best, -9223372036854775807, keys)


@triton.jit
def _merge_topk_kernel(
    Cand_key, Chunk_max, Chunk_sum, Out_value, Out_index,
    num_chunks, stride_or, stride_ok,
    K: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, BLOCK_CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    chunk_valid = chunks < num_chunks
    chunk_max = tl.load(Chunk_max + row * num_chunks + chunks, mask=chunk_valid, other=float("-inf"))
    chunk_sum = tl.load(Chunk_sum + row * num_chunks + chunks, mask=chunk_valid, other=0.0)
    row_max = tl.max(chunk_max, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    scaled = tl.where(chunk_sum > 0, chunk_sum * tl.exp(chunk_max - shift), 0.0)
    log_normalizer = shift + tl.log(tl.sum(scaled, axis=0))

    slots = tl.arange(0, BLOCK_CANDIDATES)
    keys = tl.load(Cand_key + row * num_chunks * K + slots, mask=slots < num_chunks * K, other=-9223372036854775807)
    for rank in tl.static_range(K):
        best = tl.max(keys, axis=0)
        tl.store(Out_value + row * stride_or + rank * stride_ok, _key_value(best) - log_normalizer)
        tl.store(Out_index + row * stride_or + rank * stride_ok, _key_position(best).to(tl.int64))
        keys = tl.where(keys == best, -9223372036854775807, keys)


INTERPRETED = type(_chunk_topk_kernel).__name__ == "InterpretedFunction"


def unsupported_reason(logits: torch.Tensor, k: int) -> str | None:
    """Why these inputs cannot go to the kernel, or None when they can."""
    if logits.dtype not in SUPPORTED_DTYPES:
        return f"dtype {logits.dtype} (supported: {SUPPORTED_DTYPES})"
    if logits.dim() != 2:
        return "expected logits (rows, vocab)"
    if not 1 <= k <= min(MAX_K, logits.shape[1]):
        return f"k={k} outside [1, min({MAX_K}, vocab)]"
    if logits.shape[1] >= 2**31:
        return "vocabulary too large for int32 positions"
    if logits.device.type != "cuda" and not INTERPRETED:
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 at import)"
    return None


def topk_log_softmax(
    logits: torch.Tensor, k: int, chunk_size: int = CHUNK, chunk_warps: int = CHUNK_WARPS, merge_warps: int = MERGE_WARPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k of the row-wise log-softmax; same arguments and results as the reference (the launch
    parameters are for benchmarks)."""
    rows, vocab = logits.shape
    device = logits.device
    values = torch.empty(rows, k, dtype=torch.float32, device=device)
    indices = torch.empty(rows, k, dtype=torch.long, device=device)
    if rows == 0:
        return values, indices
    chunk_size = min(chunk_size, max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, chunk_size)
    cand_key = torch.empty(rows, num_chunks, k, dtype=torch.int64, device=device)
    chunk_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    chunk_sum = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    _chunk_topk_kernel[(rows, num_chunks)](
        logits, cand_key, chunk_max, chunk_sum,
        vocab, num_chunks, *logits.stride(),
        K=k, CHUNK_SIZE=chunk_size, num_warps=chunk_warps,
    )
    block_candidates = max(16, triton.next_power_of_2(num_chunks * k))
    _merge_topk_kernel[(rows,)](
        cand_key, chunk_max, chunk_sum, values, indices,
        num_chunks, *values.stride(),
        K=k, BLOCK_CHUNKS=max(2, triton.next_power_of_2(num_chunks)), BLOCK_CANDIDATES=block_candidates,
        num_warps=max(merge_warps, block_candidates // 1024),  # at most 32 keys per thread in registers
    )
    return values, indices


@triton.jit
def _beam_select_kernel(
    Child_value, Child_token, Parent_score, Out_token, Out_parent, Out_score,
    num_parents, per_parent, stride_pb, stride_pn,
    WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (batch row): the `WIDTH` best of its `num_parents * per_parent` (parent, child) pairs,
    largest first, the lower pair index (parent-major) first among equal scores."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK)
    num_pairs = num_parents * per_parent
    valid = slots < num_pairs
    parent = slots // per_parent
    child = tl.load(Child_value + row * num_pairs + slots, mask=valid, other=float("-inf"))
    scores = tl.load(Parent_score + row * stride_pb + parent * stride_pn, mask=valid, other=float("-inf")) + child
    keys = tl.where(valid, _sort_key(scores, slots), -9223372036854775807)
    for rank in tl.static_range(WIDTH):
        best = tl.max(keys, axis=0)
        slot = _key_position(best)
        out = row * WIDTH + rank
        tl.store(Out_score + out, _key_value(best))
        tl.store(Out_token + out, tl.load(Child_token + row * num_pairs + slot))
        tl.store(Out_parent + out, (slot // per_parent).to(tl.int64))
        keys = tl.where(keys == best, -9223372036854775807, keys)


def beam_select_unsupported_reason(child_scores: torch.Tensor, width: int) -> str | None:
    """Why these inputs cannot go to `beam_select`, or None when they can."""
    if child_scores.dim() != 3:
        return "expected child scores (batch, parents, children)"
    pairs = child_scores.shape[1] * child_scores.shape[2]
    if pairs > MAX_BEAM_CANDIDATES:
        return f"{pairs} (parent, child) pairs (at most {MAX_BEAM_CANDIDATES})"
    if not 1 <= width <= min(MAX_K, pairs):
        return f"width={width} outside [1, min({MAX_K}, pairs)]"
    if child_scores.device.type != "cuda" and not INTERPRETED:
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 at import)"
    return None


def beam_select(
    child_scores: torch.Tensor, child_tokens: torch.Tensor, parent_scores: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused beam step; same arguments and results as `reference.beam_select`."""
    batch, num_parents, per_parent = child_scores.shape
    device = child_scores.device
    tokens = torch.empty(batch, width, dtype=child_tokens.dtype, device=device)
    parents = torch.empty(batch, width, dtype=torch.long, device=device)
    scores = torch.empty(batch, width, dtype=torch.float32, device=device)
    if batch == 0:
        return tokens, parents, scores
    # The parents' scores are a slice of the tree's (read in place); the children come contiguous from
    # the top-k.
    parent_scores = parent_scores.float()
    _beam_select_kernel[(batch,)](
        child_scores.float().contiguous(), child_tokens.contiguous(), parent_scores,
        tokens, parents, scores,
        num_parents, per_parent, *parent_scores.stride(),
        WIDTH=width, BLOCK=max(16, triton.next_power_of_2(num_parents * per_parent)),
        num_warps=1 if num_parents * per_parent <= 512 else 4,
    )
    return tokens, parents, scores
