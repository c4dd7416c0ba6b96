"""Grouped projections kernel against the torch reference.

CPU: the cases run in one child process whose Triton runs in the interpreter (fp32, fp16); GPU
(`-m gpu`): 8B-layout groups in bf16 and fp32. Results are compared with the reference in float64.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from longspec_hf import kernels
from longspec_hf.kernels import reference

# name -> (rows, output widths, K, biased): widths not multiples of the column block, K not a multiple
# of the reduction block, one to four weights, rows from 1 to the kernel's limit.
CPU_CASES = {
    "qkv_one_row": (1, [64, 16, 16], 64, False),
    "qkv_biased": (5, [48, 40, 40], 96, True),
    "gate_up_ragged_k": (3, [40, 40], 100, False),
    "one_weight": (17, [24], 32, True),
    "four_weights": (2, [20, 33, 7, 64], 48, False),
    "most_rows": (64, [16, 24], 40, False),
}
CPU_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Relative error of the largest output vs float64: fp32 accumulates exactly in IEEE; fp16 rounds its
# outputs (2^-11 of each value).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(case: tuple, dtype: torch.dtype, device: str, seed: int):
    rows, widths, k_dim, biased = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k_dim, generator=gen)
    weights = [torch.randn(n, k_dim, generator=gen) * k_dim**-0.5 for n in widths]
    biases = [torch.randn(n, generator=gen) if biased else None for n in widths]
    move = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return move(x), [move(w) for w in weights], [move(b) for b in biases]


def worst_relative_error(outputs, x, weights, biases) -> float:
    """Largest |output - float64 reference| over the largest reference value, across the weights."""
    double = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    expected = reference.grouped_linear(double(x), [double(w) for w in weights], [double(b) for b in biases])
    assert [tuple(o.shape) for o in outputs] == [tuple(e.shape) for e in expected]
    assert all(o.dtype == x.dtype for o in outputs)
    return max(float((o.double().cpu() - e).abs().max() / e.abs().max()) for o, e in zip(outputs, expected))


def interpreter_cases() -> dict:
    """Run in the interpreter child: every CPU case through the dispatcher's Triton path."""
    results = {}
    for seed, (name, case) in enumerate(CPU_CASES.items()):
        for dtype_name, dtype in CPU_DTYPES.items():
            try:
                x, weights, biases = make_inputs(case, dtype, "cpu", seed)
                outputs = kernels.grouped_linear(x, weights, biases, backend="triton")
                results[f"{name}-{dtype_name}"] = dict(error_vs_float64=worst_relative_error(outputs, x, weights, biases))
            except Exception:
                results[f"{name}-{dtype_name}"] = dict(error=traceback.format_exc())
    return results


@pytest.mark.parametrize("key", [f"{name}-{d}" for name in CPU_CASES for d in CPU_DTYPES])
def test_kernel_matches_reference_in_interpreter(interpreter_results, key):
    result = interpreter_results[key]
    assert "error" not in result, result.get("error")
    assert result["error_vs_float64"] < TOLERANCE[CPU_DTYPES[key.rsplit("-", 1)[1]]]


def test_dispatch_on_cpu_is_the_reference_and_the_operator_returns_fresh_outputs():
    x, weights, biases = make_inputs(CPU_CASES["qkv_biased"], torch.float32, "cpu", seed=3)
    expected = reference.grouped_linear(x, weights, biases)
    for outputs in (kernels.grouped_linear(x, weights, biases), torch.ops.longspec.grouped_linear(x, weights, biases)):
        assert all(torch.equal(o, e) for o, e in zip(outputs, expected))
    assert all(torch.equal(o, e) for o, e in zip(kernels.grouped_linear(x, weights), reference.grouped_linear(x, weights, [None] * 3)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b: (x.double(), [t.double() for t in w], [t.double() for t in b]), "dtype"),
        (lambda x, w, b: (x, w * 2, b * 2), "1 to 4 weights"),
        (lambda x, w, b: (x[:, :20], w, b), "weights must be contiguous"),
        (lambda x, w, b: (x, [w[0].t().contiguous().t(), *w[1:]], b), "weights must be contiguous"),
        (lambda x, w, b: (x, w, [b[0], None, b[2]]), "every weight has a bias or none"),
        (lambda x, w, b: (torch.cat([x] * 13), w, b), "65 rows"),
    ],
)
def test_inputs_the_kernel_cannot_take_are_named(change, message):
    pytest.importorskip("triton")
    from longspec_hf.kernels import projections

    x, weights, biases = change(*make_inputs(CPU_CASES["qkv_biased"], torch.float32, "cpu", seed=4))
    reason = projections.unsupported_reason(x, weights, biases)
    assert reason is not None and message in reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 26, 64])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_kernel_matches_reference_on_gpu(group, rows, dtype):
    from longspec_hf.kernels import projections

    widths, k_dim, biased = {"qkv": ([4096, 1024, 1024], 4096, True), "gate_up": ([14336, 14336], 4096, False),
                             "down": ([4096], 14336, False)}[group]
    x, weights, biases = make_inputs((rows, widths, k_dim, biased), dtype, "cuda", seed=rows)
    outputs = projections.grouped_linear(x, weights, biases)
    torch.cuda.synchronize()
    assert worst_relative_error(outputs, x, weights, biases) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_dispatch_on_cuda_uses_the_kernel(monkeypatch):
    from longspec_hf.kernels import projections

    calls = []
    kernel = projections.grouped_linear
    monkeypatch.setattr(projections, "grouped_linear", lambda *a: calls.append(1) or kernel(*a))
    x, weights, biases = make_inputs(CPU_CASES["qkv_biased"], torch.bfloat16, "cuda", seed=5)
    outputs = torch.ops.longspec.grouped_linear(x, weights, biases)
    assert calls == [1]
    assert worst_relative_error(outputs, x, weights, biases) < TOLERANCE[torch.bfloat16]
