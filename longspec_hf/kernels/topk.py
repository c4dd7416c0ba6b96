"""Top-k of the log-softmax of each row, in Triton: what a greedy draft needs from its logits per tree level.

What it computes is `reference.topk_log_softmax`: the `k` largest entries of `log_softmax(logits)` per
row (float32) and their indices, largest first, ties by lower index.

Why: a greedy tree level needs only each node's best few children and their log-probabilities, but
torch spends a log-softmax over the whole vocabulary plus a multi-pass radix top-k (about eight
launches) on it, which was a quarter of the draft's time per round on a small target. Here:

* Stage 1, program (row, chunk): one `CHUNK`-wide slice of the vocabulary in registers. It writes the
  slice's maximum and its sum of `exp(x - max)`, and its own top `k` by `k` rounds of "largest value not
  taken yet, lowest index among equals".
* Stage 2, program (row): the exact log-sum-exp from the chunks' (max, sum) pairs, and the top `k` of
  the `chunks * k` candidates the same way (the row's top `k` are among its chunks' top `k`).

Each round of "largest not taken yet" is a reduction whose cost is mostly its latency, so programs are
narrow (few warps) and many, rather than wide.

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
CHUNK = 4096
CHUNK_WARPS = 4
MERGE_WARPS = 4


@triton.jit
def _take_largest(values, positions, taken, valid):
    """(value, position) of the largest untaken valid entry, lowest position among equal values."""
    free = valid & (taken == 0)
    best = tl.max(tl.where(free, values, float("-inf")), axis=0)
    # `values == best` also catches -inf entries when nothing finite is left.
    position = tl.min(tl.where(free & (values == best), positions, 2147483647), axis=0)
    return best, position


@triton.jit
def _pop_largest(values, slots, taken, valid, payload):
    """`_take_largest` over `slots`, plus the `payload` entry at the taken slot, and `taken` updated."""
    best, slot = _take_largest(values, slots, taken, valid)
    item = tl.sum(tl.where(slots == slot, payload, 0), axis=0)
    return best, slot, item, tl.where(slots == slot, 1, taken)


@triton.jit(do_not_specialize=["vocab"])
def _chunk_topk_kernel(
    Logits, Cand_value, Cand_index, Chunk_max, Chunk_sum,
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

    taken = tl.zeros([CHUNK_SIZE], dtype=tl.int32)
    for rank in tl.static_range(K):
        best, position = _take_largest(x, offsets, taken, valid)
        tl.store(Cand_value + out * K + rank, best)
        tl.store(Cand_index + out * K + rank, position)
        taken = tl.where(offsets == position, 1, taken)


@triton.jit
def _merge_topk_kernel(
    Cand_value, Cand_index, Chunk_max, Chunk_sum, Out_value, Out_index,
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
    valid = slots < num_chunks * K
    values = tl.load(Cand_value + row * num_chunks * K + slots, mask=valid, other=float("-inf"))
    indices = tl.load(Cand_index + row * num_chunks * K + slots, mask=valid, other=0)
    # Candidates are ordered by chunk, then rank: the lowest slot among equal values has the lowest index.
    taken = tl.zeros([BLOCK_CANDIDATES], dtype=tl.int32)
    for rank in tl.static_range(K):
        best, slot, index, taken = _pop_largest(values, slots, taken, valid, indices)
        tl.store(Out_value + row * stride_or + rank * stride_ok, best - log_normalizer)
        tl.store(Out_index + row * stride_or + rank * stride_ok, index.to(tl.int64))


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
    cand_value = torch.empty(rows, num_chunks, k, dtype=torch.float32, device=device)
    cand_index = torch.empty(rows, num_chunks, k, dtype=torch.int32, device=device)
    chunk_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    chunk_sum = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    _chunk_topk_kernel[(rows, num_chunks)](
        logits, cand_value, cand_index, chunk_max, chunk_sum,
        vocab, num_chunks, *logits.stride(),
        K=k, CHUNK_SIZE=chunk_size, num_warps=chunk_warps,
    )
    _merge_topk_kernel[(rows,)](
        cand_value, cand_index, chunk_max, chunk_sum, values, indices,
        num_chunks, *values.stride(),
        K=k, BLOCK_CHUNKS=max(2, triton.next_power_of_2(num_chunks)),
        BLOCK_CANDIDATES=max(16, triton.next_power_of_2(num_chunks * k)),
        num_warps=merge_warps,
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
    tokens = tl.load(Child_token + row * num_pairs + slots, mask=valid, other=0)
    scores = tl.load(Parent_score + row * stride_pb + parent * stride_pn, mask=valid, other=float("-inf")) + child
    taken = tl.zeros([BLOCK], dtype=tl.int32)
    for rank in tl.static_range(WIDTH):
        best, slot, token, taken = _pop_largest(scores, slots, taken, valid, tokens)
        out = row * WIDTH + rank
        tl.store(Out_score + out, best)
        tl.store(Out_token + out, token)
        tl.store(Out_parent + out, (slot // per_parent).to(tl.int64))


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
