"""Several linear layers of one input in one Triton launch: the query/key/value or gate/up projections of
a decoding step.

What it computes is `reference.grouped_linear`: `x @ w_i.T + b_i` for up to `MAX_WEIGHTS` weights that
read the same rows `x` `(M, K)`, with `M` a decoding step's few tokens (one per row, or a tree's nodes).

Why: with a handful of rows a projection is a matrix-vector product, bound by reading its weight. A
step of an 8B-class target runs each of them as its own cuBLAS call, and the small ones do not fill the
GPU: the key and value projections (8 MiB each) read at under 40% of the copy bandwidth, and cuBLAS adds
a split-K reduction launch to several of them. Here:

* Program `n` owns `BLOCK_N` output columns of one weight: the weights are laid end to end along the
  output axis, so one launch spans all of them and the small ones ride with the large. Each program
  runs the whole reduction over `K` itself: no split-K pass, no atomics, the same sums on every run.
* The rows `x` are one tile of `BLOCK_M` (the step's rows padded to the matrix-unit minimum of 16):
  every weight byte is read once. Accumulation is in float32, fp32 inputs multiply in IEEE precision.
* Weights and biases stay where the model keeps them (no concatenated copy): the program picks its
  weight's pointers from its index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WEIGHTS = 4
MAX_ROWS = 64  # beyond this a step is a matrix product, which cuBLAS does well


@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "num_rows"])
def _grouped_linear_kernel(
    x_ptr, stride_xm, k_dim, num_rows,
    w0_ptr, w1_ptr, w2_ptr, w3_ptr,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    o0_ptr, o1_ptr, o2_ptr, o3_ptr,
    n0, n1, n2, n3,
    NUM_WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Which weight this program's columns belong to, and its block index within that weight.
    block = tl.program_id(0)
    w_ptr, b_ptr, o_ptr, n_out = w0_ptr, b0_ptr, o0_ptr, n0
    first_of_next = tl.cdiv(n0, BLOCK_N)
    if NUM_WEIGHTS > 1:
        if block >= first_of_next:
            block -= first_of_next
            w_ptr, b_ptr, o_ptr, n_out = w1_ptr, b1_ptr, o1_ptr, n1
            first_of_next = tl.cdiv(n1, BLOCK_N)
            if NUM_WEIGHTS > 2:
                if block >= first_of_next:
                    block -= first_of_next
                    w_ptr, b_ptr, o_ptr, n_out = w2_ptr, b2_ptr, o2_ptr, n2
                    first_of_next = tl.cdiv(n2, BLOCK_N)
                    if NUM_WEIGHTS > 3:
                        if block >= first_of_next:
                            block -= first_of_next
                            w_ptr, b_ptr, o_ptr, n_out = w3_ptr, b3_ptr, o3_ptr, n3

    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows
    col_ok = offs_n < n_out
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    # The (BLOCK_K, BLOCK_N) tile of w.T: consecutive k of one output column are contiguous in memory.
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * k_dim + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, k_dim, BLOCK_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w_tile = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k_start < k_dim
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = o_ptr + offs_m[:, None] * n_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# True when the kernel was built by the Triton interpreter (TRITON_INTERPRET=1 at import): it then runs
# on CPU tensors.
INTERPRETED = type(_grouped_linear_kernel).__name__ == "InterpretedFunction"


def default_config(num_rows: int, total_columns: int, element_size: int) -> dict:
    """Tiles for `num_rows` rows and `total_columns` output columns over all weights.

    Narrow column blocks give enough programs to keep every multiprocessor reading even for the 6144
    columns of an 8B layout's query/key/value (384 programs of 16); 32-column blocks for wider groups
    (gate/up: 28672) halve the programs' fixed cost. A tile's row of the weight is 512 bytes of 16-bit
    values (256 of float32, which are for exactness, not speed), loaded as wide vectors, and the stages
    keep several tiles in flight. Compiled for sm90 (Triton 3.9, 16-byte aligned inputs) these tiles
    use at most 124 registers without spills (float32 tiles of 32 rows or more need 8 warps for that),
    and four programs of 16 rows (48 KiB of stages each) fit one multiprocessor's shared memory.
    """
    block_m = max(16, triton.next_power_of_2(num_rows))
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": 16 if total_columns <= 8192 else 32,
        "BLOCK_K": 256 if element_size <= 2 else 64,
        "num_warps": 8 if element_size > 2 and block_m >= 32 else 4,
        "num_stages": 3 if block_m == 64 or element_size > 2 else 4,
    }


def unsupported_reason(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> str | None:
    """Why these inputs cannot go to the kernel, or None when they can."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (supported: {SUPPORTED_DTYPES})"
    if not 1 <= len(weights) <= MAX_WEIGHTS or len(biases) != len(weights):
        return f"1 to {MAX_WEIGHTS} weights, with one bias entry (a tensor or None) each"
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < 16:
        return "x must be (M, K) with contiguous rows and K >= 16"
    if x.shape[0] > MAX_ROWS or x.shape[0] == 0:
        return f"{x.shape[0]} rows (the kernel takes 1 to {MAX_ROWS})"
    if any(w.dim() != 2 or w.shape[1] != x.shape[1] or not w.is_contiguous() for w in weights):
        return "weights must be contiguous (N_i, K) with x's K"
    if len({b is None for b in biases}) > 1:
        return "either every weight has a bias or none has"
    present = [b for b in biases if b is not None]
    if any(b.dim() != 1 or b.shape[0] != w.shape[0] or not b.is_contiguous() for b, w in zip(present, weights)):
        return "biases must be contiguous (N_i,)"
    if any(t.dtype != x.dtype or t.device != x.device for t in (*weights, *present)):
        return "x, weights and biases must share dtype and device"
    if x.device.type != "cuda" and not INTERPRETED:
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 at import)"
    return None


def grouped_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    *,
    config: dict | None = None,
) -> list[torch.Tensor]:
    """Same arguments and results as `reference.grouped_linear`; `config` overrides the tiles and launch
    parameters of [`default_config`] (benchmarks and tests)."""
    reason = unsupported_reason(x, weights, biases)
    if reason is not None:
        raise ValueError(f"grouped_linear kernel: {reason}")
    num_rows, k_dim = x.shape
    widths = [w.shape[0] for w in weights]
    config = {**default_config(num_rows, sum(widths), x.element_size()), **(config or {})}
    outputs = [torch.empty(num_rows, n, dtype=x.dtype, device=x.device) for n in widths]
    blocks = sum(triton.cdiv(n, config["BLOCK_N"]) for n in widths)
    grid = (blocks, triton.cdiv(num_rows, config["BLOCK_M"]))
    has_bias = biases[0] is not None

    def slots(items: list, filler) -> list:
        # The kernel has MAX_WEIGHTS slots; unused ones get zero columns, so no program reads them.
        return list(items) + [filler] * (MAX_WEIGHTS - len(items))

    _grouped_linear_kernel[grid](
        x, x.stride(0), k_dim, num_rows,
        *slots(weights, weights[0]),
        *slots(biases if has_bias else weights, weights[0]),  # without biases: never read
        *slots(outputs, outputs[0]),
        *slots(widths, 0),
        NUM_WEIGHTS=len(weights), HAS_BIAS=has_bias, EVEN_K=k_dim % config["BLOCK_K"] == 0,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return outputs
