"""Fused KV compaction kernel against the torch reference.

CPU: the cases run in one child process whose Triton runs in the interpreter (fp32, fp16); GPU
(`-m gpu`): an 8B-shaped 32-layer cache in bf16. Compaction only moves data, so results must be equal.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from longspec_hf import kernels
from longspec_hf.kernels import reference

# name -> (layers, batch, KV heads, slots, scratch slots, head dim, kept entries per row, scratch aliases cache)
CPU_CASES = {
    "separate_scratch": (3, 2, 2, 40, 9, 16, 4, False),
    "padded_head_dim": (2, 3, 1, 33, 7, 24, 7, False),
    "scratch_inside_cache": (2, 2, 2, 48, 12, 16, 5, True),
    "nothing_kept": (2, 2, 1, 20, 5, 16, 0, False),
}
CPU_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def make_inputs(case: tuple, dtype: torch.dtype, device: str, seed: int):
    """Random cache, scratch and accepted paths. Rows commit different lengths; when the scratch aliases
    the cache it is the slots right after the longest row, and a kept entry can land on another's source."""
    layers, batch, heads, slots, scratch_slots, head_dim, kept, aliased = case
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, batch, heads, slots, head_dim, generator=gen).to(dtype).to(device)
    if aliased:
        scratch_start = slots - scratch_slots
        kv_scratch = kv[:, :, :, :, scratch_start:]
        dest_start = torch.tensor([scratch_start - 2 * row for row in range(batch)])
    else:
        kv_scratch = torch.randn(layers, 2, batch, heads, scratch_slots, head_dim, generator=gen).to(dtype).to(device)
        dest_start = torch.randint(0, slots - kept + 1, (batch,), generator=gen)
    # An accepted path: distinct scratch slots, in increasing order as tree nodes are numbered.
    source_index = torch.stack([torch.randperm(scratch_slots, generator=gen)[:kept].sort().values for _ in range(batch)])
    return kv, kv_scratch, source_index.to(device), dest_start.to(device)


def expected_after(kv, kv_scratch, source_index, dest_start):
    """The reference applied to a copy (keeping the aliasing between scratch and cache, if any)."""
    expected = kv.clone()
    if kv_scratch.data_ptr() != kv.data_ptr() and kv_scratch.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr():
        scratch = expected.as_strided(kv_scratch.shape, kv_scratch.stride(), kv_scratch.storage_offset())
    else:
        scratch = kv_scratch.clone()
    reference.compact_kv(expected, scratch, source_index, dest_start)
    return expected


def interpreter_cases() -> dict:
    """Run in the interpreter child: every CPU case through the dispatcher's Triton path."""
    results = {}
    for seed, (name, case) in enumerate(CPU_CASES.items()):
        for dtype_name, dtype in CPU_DTYPES.items():
            try:
                inputs = make_inputs(case, dtype, "cpu", seed)
                expected = expected_after(*inputs)
                kernels.compact_kv(*inputs, backend="triton")
                results[f"{name}-{dtype_name}"] = dict(equal=bool(torch.equal(inputs[0], expected)))
            except Exception:
                results[f"{name}-{dtype_name}"] = dict(error=traceback.format_exc())
    return results


@pytest.mark.parametrize("key", [f"{name}-{d}" for name in CPU_CASES for d in CPU_DTYPES])
def test_kernel_matches_reference_in_interpreter(interpreter_results, key):
    result = interpreter_results[key]
    assert "error" not in result, result.get("error")
    assert result["equal"]


def test_dispatch_on_cpu_is_the_reference():
    for backend in (None, "torch"):
        inputs = make_inputs(CPU_CASES["scratch_inside_cache"], torch.float32, "cpu", seed=11)
        expected = expected_after(*inputs)
        kernels.compact_kv(*inputs, backend=backend)
        assert torch.equal(inputs[0], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("aliased", [False, True])
def test_kernel_matches_reference_on_gpu(aliased):
    from longspec_hf.kernels import compaction

    # 8B-shaped: 32 layers, 8 KV heads, head dim 128; 6 accepted entries per row, ragged rows.
    inputs = make_inputs((32, 2, 8, 4096, 69, 128, 6, aliased), torch.bfloat16, "cuda", seed=int(aliased))
    expected = expected_after(*inputs)
    compaction.compact_kv(*inputs)
    torch.cuda.synchronize()
    assert torch.equal(inputs[0], expected)


@pytest.mark.gpu
def test_dispatch_on_cuda_uses_the_kernel(monkeypatch):
    from longspec_hf.kernels import compaction

    calls = []
    fused = compaction.compact_kv
    monkeypatch.setattr(compaction, "compact_kv", lambda *a: calls.append(1) or fused(*a))
    inputs = make_inputs(CPU_CASES["separate_scratch"], torch.bfloat16, "cuda", seed=5)
    expected = expected_after(*inputs)
    kernels.compact_kv(*inputs)
    assert calls == [1] and torch.equal(inputs[0], expected)
