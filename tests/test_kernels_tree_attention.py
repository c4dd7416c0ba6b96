"""Fused prefix + tree attention kernel against the torch reference.

CPU: the cases run in one child process whose Triton runs in the interpreter (fp32, fp16, small
shapes); each test below checks one case's numbers. GPU (`-m gpu`): real head layouts and contexts in
bf16/fp16 against a float64 dense computation.
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch

from transformers.masking_utils import sliding_window_overlay

from longspec_hf import kernels
from longspec_hf.kernels import reference, testing

# name -> shape of one CPU case. lengths: committed prefix per row, placed at random left pads in a cache
# of `capacity` slots; tree None: Tt = Tq with random ancestor masks, else Tt keys under a random mask
# (the draft's cross-attention), some query rows seeing none of them.
CPU_CASES = {
    "ragged_gqa_splits": dict(lengths=[37, 0, 64], capacity=80, kv_heads=2, group=3, queries=5, head_dim=16,
                              num_splits=3, config=dict(BLOCK_M=16, BLOCK_N=16), query_layout="bthd"),
    "ragged_gqa_one_split": dict(lengths=[37, 0, 64], capacity=80, kv_heads=2, group=3, queries=5, head_dim=16,
                                 num_splits=1, config=dict(BLOCK_M=16, BLOCK_N=16)),
    "default_launch_single_query": dict(lengths=[150, 93], capacity=160, kv_heads=1, group=4, queries=1, head_dim=64),
    "padded_head_dim_many_row_blocks": dict(lengths=[20, 45], capacity=50, kv_heads=2, group=2, queries=17,
                                            head_dim=24, num_splits=2, config=dict(BLOCK_M=16, BLOCK_N=16),
                                            kv_layout="bshd"),
    "cross_attention_tree": dict(lengths=[30, 12], capacity=40, kv_heads=2, group=1, queries=3, tree=9,
                                 head_dim=32, num_splits=2, config=dict(BLOCK_M=16, BLOCK_N=16)),
    "empty_prefixes": dict(lengths=[0, 0], capacity=8, kv_heads=1, group=2, queries=6, head_dim=16, num_splits=2),
    # More splits than one merge round loads (16), and a shorter row whose last splits see no key.
    "merge_in_rounds": dict(lengths=[300, 170], capacity=320, kv_heads=1, group=2, queries=3, head_dim=16,
                            num_splits=20, config=dict(BLOCK_M=16, BLOCK_N=16)),
    "tree_across_chunks": dict(lengths=[5], capacity=9, kv_heads=1, group=1, queries=40, head_dim=16,
                               num_splits=4, config=dict(BLOCK_M=16, BLOCK_N=16)),
    "tree_of_256": dict(lengths=[70], capacity=80, kv_heads=1, group=1, queries=256, head_dim=16),
    # Keys that grow along the prefix: later blocks raise a row's maximum by tens (base 2), some
    # blocks not at all, and the scores (up to ~300 in base 2) overflow fp32 unless every step's
    # exponentials are taken against the running maximum.
    "growing_scores": dict(lengths=[150, 61], capacity=160, kv_heads=1, group=2, queries=3, head_dim=16,
                           num_splits=2, config=dict(BLOCK_M=16, BLOCK_N=16), key_growth=0.6),
    # Sliding windows (a target layer's `sliding_window`). The window starts mid-block and mid-chunk in
    # the long row, one row has no prefix, and splits beyond the window see nothing.
    "window_ragged_gqa_splits": dict(lengths=[37, 0, 64], capacity=80, kv_heads=2, group=3, queries=5, head_dim=16,
                                     num_splits=3, config=dict(BLOCK_M=16, BLOCK_N=16), window=20),
    # A chain of 40 nodes (depths 0..39, 2 heads: 5 row blocks): each row's window starts elsewhere, a row
    # block's starts span several key blocks, and deep nodes lose their oldest ancestors too.
    "window_chain_spread_over_blocks": dict(lengths=[50, 9], capacity=64, kv_heads=1, group=2, queries=40,
                                            head_dim=16, num_splits=3, config=dict(BLOCK_M=16, BLOCK_N=16),
                                            window=24, chain=True),
    # Windows of 1 and 2: a node sees itself (and its parent); no prefix key is in reach of most nodes.
    "window_of_one": dict(lengths=[30, 5], capacity=40, kv_heads=2, group=2, queries=9, head_dim=16, num_splits=2,
                          config=dict(BLOCK_M=16, BLOCK_N=16), window=1),
    "window_of_two": dict(lengths=[30, 5], capacity=40, kv_heads=2, group=2, queries=9, head_dim=16, num_splits=2,
                          config=dict(BLOCK_M=16, BLOCK_N=16), window=2, chain=True),
    # Default tiles and splits, one tree shared by the rows with its depths given once `(T,)` (how the
    # verify forward's trees are laid out).
    "window_default_launch_shared_depths": dict(lengths=[150, 93], capacity=160, kv_heads=1, group=4, queries=7,
                                                head_dim=64, window=70, shared_tree=True),
    # A window wider than every row: the same numbers as full attention.
    "window_wider_than_rows": dict(lengths=[37, 12], capacity=48, kv_heads=2, group=2, queries=6, head_dim=16,
                                   num_splits=2, config=dict(BLOCK_M=16, BLOCK_N=16), window=500),
}
WINDOW_CASES = [name for name, shape in CPU_CASES.items() if shape.get("window")]
# Cases whose rows all have a prefix, also run through the prefix-only entry point.
PREFIX_ONLY_CASES = ["default_launch_single_query", "padded_head_dim_many_row_blocks"]
# Cases run through `masked_attention` over their tree keys alone (default launch parameters).
MASKED_CASES = ["ragged_gqa_splits", "tree_across_chunks"]
CPU_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Relative error bound of the output, by dtype: fp32 is exact up to summation order; fp16 rounds the
# inputs of the probability @ value product and the output.
REL_TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}


def make_inputs(shape: dict, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Random inputs of one case; cache slots outside each row's prefix hold NaN, and so do those before
    the earliest window start of a row when the case has a window (no program may read them: a NaN
    value read under a zero probability still makes the output NaN)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, capacity = shape["lengths"], shape["capacity"]
    batch, kv_heads, head_dim, num_queries = len(lengths), shape["kv_heads"], shape["head_dim"], shape["queries"]
    num_q_heads = kv_heads * shape["group"]
    randn = lambda *size: torch.randn(*size, generator=gen).to(dtype)
    if shape.get("query_layout") == "bthd":  # the (B, T, H, D) projection output seen as (B, H, T, D)
        query = randn(batch, num_queries, num_q_heads, head_dim).transpose(1, 2)
    else:
        query = randn(batch, num_q_heads, num_queries, head_dim)
    start, end = testing.ragged_bounds(lengths, capacity, gen)
    caches = []
    for _ in range(2):
        if shape.get("kv_layout") == "bshd":
            cache = randn(batch, capacity, kv_heads, head_dim).transpose(1, 2)
        else:
            cache = randn(batch, kv_heads, capacity, head_dim)
        if shape.get("key_growth"):
            slots = torch.arange(capacity, dtype=torch.float32)
            cache = cache * (1 + shape["key_growth"] * slots).to(dtype)[:, None]
        for row in range(batch):  # garbage outside the committed prefix must never reach the result
            cache[row, :, : start[row]] = float("nan")
            cache[row, :, end[row]:] = float("nan")
            if shape.get("window"):  # the root (depth 0) has the earliest window start
                cache[row, :, : max(0, end[row] - shape["window"] + 1)] = float("nan")
        caches.append(cache)
    num_tree = shape.get("tree") or num_queries
    if shape.get("tree"):
        tree_mask = torch.rand(batch, num_queries, num_tree, generator=gen) < 0.4
        tree_mask[:, 0] = False
    elif shape.get("chain"):
        tree_mask = testing.ancestor_mask(list(range(-1, num_queries - 1))).expand(batch, -1, -1)
    elif shape.get("shared_tree"):
        tree_mask = testing.random_tree_masks(1, num_queries, gen).expand(batch, -1, -1)
    else:
        tree_mask = testing.random_tree_masks(batch, num_queries, gen)
    inputs = dict(
        query=query, key_prefix=caches[0], value_prefix=caches[1], prefix_start=start, prefix_end=end,
        key_tree=randn(batch, kv_heads, num_tree, head_dim), value_tree=randn(batch, kv_heads, num_tree, head_dim),
        tree_mask=tree_mask, scale=head_dim**-0.5,
    )
    if shape.get("window"):
        # A node's ancestors, itself included, are its path from the root.
        depths = tree_mask.sum(dim=-1) - 1
        inputs.update(window=shape["window"], tree_depths=depths[0] if shape.get("shared_tree") else depths)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def compare(out, lse, ref_out, ref_lse) -> dict:
    """Relative output error, LSE error where finite, and whether NaNs or -inf positions disagree."""
    out64, ref64 = out.double(), ref_out.double()
    lse_finite = torch.isfinite(ref_lse)
    return dict(
        out_rel_err=float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)),
        lse_abs_err=float((lse - ref_lse)[lse_finite].abs().max()) if lse_finite.any() else 0.0,
        has_nan=bool(out.isnan().any() or lse.isnan().any()),
        lse_inf_mismatch=bool((torch.isfinite(lse) != lse_finite).any()),
        out_dtype=str(out.dtype).removeprefix("torch."), lse_dtype=str(lse.dtype).removeprefix("torch."),
    )


def _poisoned_buffer(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def interpreter_cases() -> dict:
    """Run in the interpreter child: every CPU case through the kernel module and the dispatcher."""
    from longspec_hf.kernels import tree_attention

    tree_attention._new_buffer = _poisoned_buffer  # every output and workspace element must be written
    results = {}
    jobs = [(f"{name}-{dtype_name}", name, dtype_name, "fused") for name in CPU_CASES for dtype_name in CPU_DTYPES]
    jobs += [(f"ragged_gqa_splits-{d}-two_pass", "ragged_gqa_splits", d, "two_pass") for d in CPU_DTYPES]
    jobs += [(f"cross_attention_tree-{d}-dispatch", "cross_attention_tree", d, "dispatch") for d in CPU_DTYPES]
    jobs += [(f"{name}-{d}-prefix_only", name, d, "prefix_only") for name in PREFIX_ONLY_CASES for d in CPU_DTYPES]
    jobs += [(f"{name}-{d}-masked", name, d, "masked") for name in MASKED_CASES for d in CPU_DTYPES]
    jobs += [(f"{name}-{d}-dispatch", name, d, "dispatch") for name in WINDOW_CASES[:1] for d in CPU_DTYPES]
    for seed, (key, name, dtype_name, variant) in enumerate(jobs):
        try:
            shape = CPU_CASES[name]
            inputs = make_inputs(shape, CPU_DTYPES[dtype_name], "cpu", seed)
            ref_out, ref_lse = reference.prefix_tree_attention(**inputs)
            if variant == "prefix_only":  # the draft's cross-attention: no tree at all
                prefix_args = [inputs[k] for k in ("query", "key_prefix", "value_prefix", "prefix_start", "prefix_end")]
                ref_out, ref_lse = reference.prefix_attention(*prefix_args, inputs["scale"])
                out, lse = kernels.prefix_attention(*prefix_args, inputs["scale"], backend="triton")
            elif variant == "masked":  # the draft's self-attention: the tree keys under their mask alone
                masked_args = [inputs[k] for k in ("query", "key_tree", "value_tree", "tree_mask")]
                ref_out, ref_lse = reference.attention_with_lse(*masked_args, inputs["scale"])
                out, lse = kernels.masked_attention(*masked_args, inputs["scale"], backend="triton")
            elif variant == "fused":
                out, lse = tree_attention.prefix_tree_attention(
                    **inputs, config=shape.get("config"), num_splits=shape.get("num_splits"))
            elif variant == "two_pass":
                out, lse = tree_attention.two_pass_prefix_tree_attention(**inputs)
            else:
                out, lse = kernels.prefix_tree_attention(**inputs, backend="triton")
            results[key] = compare(out, lse, ref_out, ref_lse)
        except Exception:
            results[key] = dict(error=traceback.format_exc())
    return results


CPU_KEYS = [f"{name}-{d}" for name in CPU_CASES for d in CPU_DTYPES]
CPU_KEYS += [f"ragged_gqa_splits-{d}-two_pass" for d in CPU_DTYPES]
CPU_KEYS += [f"cross_attention_tree-{d}-dispatch" for d in CPU_DTYPES]
CPU_KEYS += [f"{name}-{d}-prefix_only" for name in PREFIX_ONLY_CASES for d in CPU_DTYPES]
CPU_KEYS += [f"{name}-{d}-masked" for name in MASKED_CASES for d in CPU_DTYPES]
CPU_KEYS += [f"{name}-{d}-dispatch" for name in WINDOW_CASES[:1] for d in CPU_DTYPES]


@pytest.mark.parametrize("key", CPU_KEYS)
def test_kernel_matches_reference_in_interpreter(interpreter_results, key):
    result = interpreter_results[key]
    assert "error" not in result, result.get("error")
    dtype_name = key.split("-")[1]
    assert not result["has_nan"], "unwritten output element or garbage slot read"
    assert not result["lse_inf_mismatch"], "rows that see no key must get lse -inf, and only they"
    assert result["out_rel_err"] < REL_TOLERANCE[dtype_name]
    assert result["lse_abs_err"] < 10 * REL_TOLERANCE[dtype_name]
    assert (result["out_dtype"], result["lse_dtype"]) == (dtype_name, "float32")


def test_dispatch_on_cpu_is_the_reference():
    inputs = make_inputs(CPU_CASES["ragged_gqa_splits"], torch.float32, "cpu", seed=100)
    ref_out, ref_lse = reference.prefix_tree_attention(**inputs)
    for backend in (None, "torch"):
        out, lse = kernels.prefix_tree_attention(**inputs, backend=backend)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0, equal_nan=True)


def test_dispatch_rejects_unknown_or_impossible_backend():
    inputs = make_inputs(CPU_CASES["empty_prefixes"], torch.float32, "cpu", seed=101)
    with pytest.raises(ValueError):
        kernels.prefix_tree_attention(**inputs, backend="cuda")
    with pytest.raises((ValueError, RuntimeError)):  # no CUDA here, or no triton at all
        kernels.prefix_tree_attention(**inputs, backend="triton")


@pytest.mark.parametrize("name", WINDOW_CASES)
def test_reference_window_is_transformers_rule(name):
    """The reference's window against transformers' own mask function over explicit positions (float64)."""
    inputs = make_inputs(CPU_CASES[name], torch.float32, "cpu", seed=110 + WINDOW_CASES.index(name))
    out, lse = reference.prefix_tree_attention(**inputs)
    dense_out, dense_lse = dense_float64_attention(**inputs)
    torch.testing.assert_close(out.double(), dense_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), dense_lse, rtol=1e-5, atol=1e-5)


def test_reference_window_hides_exactly_the_far_keys():
    """A chain of 3 nodes after a prefix of 5, window 3: node t (position 5 + t) sees positions 3 + t ..
    5 + t, i.e. prefix slots 3 + t .. 4 and its ancestors at most 2 levels up. Checked through the output:
    values are one-hot per key and all scores equal, so the output is the mean of the visible keys' one-hots."""
    prefix_len, nodes, window = 5, 3, 3
    num_keys = prefix_len + nodes
    values = torch.eye(num_keys)[None, None]  # key k's value is the one-hot e_k
    query = torch.zeros(1, 1, nodes, num_keys)
    keys = torch.zeros(1, 1, num_keys, num_keys)
    tree_mask = testing.ancestor_mask([-1, 0, 1])[None]
    out, _ = reference.prefix_tree_attention(
        query, keys[:, :, :prefix_len], values[:, :, :prefix_len], torch.tensor([0]), torch.tensor([prefix_len]),
        keys[:, :, prefix_len:], values[:, :, prefix_len:], tree_mask, 1.0, window, torch.arange(nodes),
    )
    expected = torch.zeros(nodes, num_keys)
    for node, visible in enumerate([[3, 4, 5], [4, 5, 6], [5, 6, 7]]):
        expected[node, visible] = 1 / 3
    torch.testing.assert_close(out[0, 0], expected)


def test_window_arguments_are_checked():
    inputs = make_inputs(CPU_CASES["ragged_gqa_splits"], torch.float32, "cpu", seed=120)
    depths = inputs["tree_mask"].sum(-1) - 1
    for window, tree_depths, message in ((8, None, "needs tree_depths"), (0, depths, "positive"),
                                         (True, depths, "positive"), (8, depths[:, :2], "tree_depths must be")):
        with pytest.raises(ValueError, match=message):
            kernels.prefix_tree_attention(**inputs, window=window, tree_depths=tree_depths)
    cross = make_inputs(CPU_CASES["cross_attention_tree"], torch.float32, "cpu", seed=121)
    with pytest.raises(ValueError, match="one query per tree node"):
        kernels.prefix_tree_attention(**cross, window=8, tree_depths=torch.zeros(9, dtype=torch.long))


def test_ancestor_mask_of_a_known_tree():
    #   0 -> 1 -> 3
    #   0 -> 2
    mask = testing.ancestor_mask([-1, 0, 0, 1])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


# ----------------------------------------------------------------------------------------------------- GPU


def dense_float64_attention(query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree,
                            tree_mask, scale, window=None, tree_depths=None):
    """Independent float64 ground truth: concatenate prefix and tree keys, one boolean mask, plain softmax.
    A window is applied with transformers' own mask function over every key's and query's position."""
    num_slots = key_prefix.shape[2]
    group = query.shape[1] // key_prefix.shape[1]
    visible = torch.cat([reference.prefix_visibility(prefix_start, prefix_end, num_slots)
                         .expand(-1, query.shape[2], -1), tree_mask], dim=-1)
    if window is not None:
        # Positions in the row's sequence: slot s at s - prefix_start, tree node t at prefix length + depth.
        depths = tree_depths.expand(query.shape[0], -1)
        prefix_len = (prefix_end - prefix_start)[:, None]
        slots = torch.arange(num_slots, device=query.device)
        key_positions = torch.cat([slots[None, :] - prefix_start[:, None], prefix_len + depths], dim=1)
        query_positions = prefix_len + depths
        in_window = sliding_window_overlay(window)(None, None, query_positions[:, :, None], key_positions[:, None, :])
        visible = visible & in_window
    visible = visible[:, None]
    keys = torch.cat([key_prefix, key_tree], dim=2).double().repeat_interleave(group, dim=1)
    values = torch.cat([value_prefix, value_tree], dim=2).double().nan_to_num(0.0).repeat_interleave(group, dim=1)
    scores = (query.double() @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return probs @ values, lse


GPU_CASES = {
    # layout (query heads, KV heads, head dim), tree queries, prefix lengths of a ragged batch of 2
    "llama3_8b_tree64": dict(heads=(32, 8, 128), queries=64, lengths=[16384, 9001]),
    "qwen25_7b_tree64": dict(heads=(28, 4, 128), queries=64, lengths=[16384, 12345]),
    "smollm2_tree64": dict(heads=(9, 3, 64), queries=64, lengths=[8192, 777]),
    "llama3_8b_tree256": dict(heads=(32, 8, 128), queries=256, lengths=[8192, 3000]),
    "llama3_8b_single_query": dict(heads=(32, 8, 128), queries=1, lengths=[32768, 100]),
    "head_dim_96": dict(heads=(16, 4, 96), queries=16, lengths=[8192, 4096]),
    "head_dim_256": dict(heads=(8, 2, 256), queries=64, lengths=[8192, 2500]),
    "cross_attention_tree": dict(heads=(32, 8, 128), queries=16, tree=69, lengths=[16384, 5000]),
}


# Sliding windows at real sizes: Mistral-7B-v0.1's 4096 over a long context (random tree; a chain of 64,
# whose window starts span the default key blocks), and a narrow window shorter than the chain.
GPU_WINDOW_CASES = {
    "mistral_7b_window4096_tree64": dict(heads=(32, 8, 128), queries=64, lengths=[16384, 3000], window=4096),
    "mistral_7b_window4096_chain64": dict(heads=(32, 8, 128), queries=64, lengths=[16384, 4100], window=4096,
                                          chain=True),
    "smollm2_window40_chain64": dict(heads=(9, 3, 64), queries=64, lengths=[8192, 20], window=40, chain=True),
}


def gpu_inputs(case: dict, dtype: torch.dtype, seed: int) -> dict:
    num_q_heads, kv_heads, head_dim = case["heads"]
    shape = dict(lengths=case["lengths"], capacity=max(case["lengths"]) + 300, kv_heads=kv_heads,
                 group=num_q_heads // kv_heads, queries=case["queries"], tree=case.get("tree"), head_dim=head_dim,
                 query_layout="bthd", window=case.get("window"), chain=case.get("chain"))
    return make_inputs(shape, dtype, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fused", "two_pass"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernel_matches_float64_on_gpu(name, variant, monkeypatch):
    from longspec_hf.kernels import tree_attention

    monkeypatch.setattr(tree_attention, "_new_buffer", _poisoned_buffer)
    inputs = gpu_inputs(GPU_CASES[name], torch.bfloat16, seed=list(GPU_CASES).index(name))
    fn = tree_attention.prefix_tree_attention if variant == "fused" else tree_attention.two_pass_prefix_tree_attention
    out, lse = fn(**inputs)
    ref_out, ref_lse = dense_float64_attention(**inputs)
    result = compare(out, lse, ref_out, ref_lse)
    assert not result["has_nan"] and not result["lse_inf_mismatch"], result
    assert result["out_rel_err"] < 1e-2, result
    assert result["lse_abs_err"] < 2e-2, result


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(GPU_WINDOW_CASES))
def test_windowed_kernel_matches_float64_on_gpu(name, dtype, tolerance, monkeypatch):
    from longspec_hf.kernels import tree_attention

    monkeypatch.setattr(tree_attention, "_new_buffer", _poisoned_buffer)
    inputs = gpu_inputs(GPU_WINDOW_CASES[name], dtype, seed=20 + list(GPU_WINDOW_CASES).index(name))
    result = compare(*kernels.prefix_tree_attention(**inputs), *dense_float64_attention(**inputs))
    assert not result["has_nan"] and not result["lse_inf_mismatch"], result
    assert result["out_rel_err"] < tolerance, result
    assert result["lse_abs_err"] < 2 * tolerance, result


@pytest.mark.gpu
def test_fp16_and_fp32_on_gpu(monkeypatch):
    from longspec_hf.kernels import tree_attention

    monkeypatch.setattr(tree_attention, "_new_buffer", _poisoned_buffer)
    for dtype, tol in ((torch.float16, 3e-3), (torch.float32, 1e-5)):
        inputs = gpu_inputs(GPU_CASES["qwen25_7b_tree64"], dtype, seed=7)
        result = compare(*tree_attention.prefix_tree_attention(**inputs), *dense_float64_attention(**inputs))
        assert not result["has_nan"] and result["out_rel_err"] < tol, (dtype, result)


@pytest.mark.gpu
def test_dispatch_on_cuda_uses_the_kernel(monkeypatch):
    from longspec_hf.kernels import tree_attention

    calls = []
    fused = tree_attention.prefix_tree_attention
    monkeypatch.setattr(tree_attention, "prefix_tree_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    inputs = gpu_inputs(GPU_CASES["smollm2_tree64"], torch.bfloat16, seed=3)
    out, lse = kernels.prefix_tree_attention(**inputs)
    ref_out, ref_lse = kernels.prefix_tree_attention(**inputs, backend="torch")
    assert calls == [1]
    result = compare(out, lse, ref_out, ref_lse)
    assert result["out_rel_err"] < 1e-2 and math.isfinite(result["lse_abs_err"])


def test_prefix_attention_is_the_hybrid_attention_with_no_tree_visible():
    inputs = make_inputs(CPU_CASES["default_launch_single_query"], torch.float32, "cpu", seed=102)
    inputs["tree_mask"] = torch.zeros_like(inputs["tree_mask"])
    hybrid_out, hybrid_lse = reference.prefix_tree_attention(**inputs)
    prefix_args = [inputs[k] for k in ("query", "key_prefix", "value_prefix", "prefix_start", "prefix_end")]
    for backend in (None, "torch"):
        out, lse = kernels.prefix_attention(*prefix_args, inputs["scale"], backend=backend)
        torch.testing.assert_close(out, hybrid_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, hybrid_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("queries", [1, 16])
def test_masked_attention_at_the_drafts_shapes_on_gpu(dtype, tolerance, queries, monkeypatch):
    """The draft's self-attention: SmolLM2's heads over a 512-slot ring and the first tree nodes, read as
    a strided view of the cache's slots, under an arbitrary mask where every node sees itself."""
    from longspec_hf.kernels import tree_attention

    calls = []
    kernel = tree_attention.tree_attention_with_lse
    monkeypatch.setattr(tree_attention, "tree_attention_with_lse", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(queries)
    window, scratch, used = 512, 69, 16 + queries
    key_slots, value_slots = (torch.randn(2, 3, window + scratch, 64, device="cuda", generator=gen).to(dtype)
                              for _ in range(2))
    key, value = key_slots[:, :, : window + used], value_slots[:, :, : window + used]
    query = torch.randn(2, 9, queries, 64, device="cuda", generator=gen).to(dtype)
    visible = torch.rand(2, queries, window + used, device="cuda", generator=gen) < 0.7
    nodes = torch.arange(queries, device="cuda")
    visible[:, nodes, window + used - queries + nodes] = True
    out, lse = kernels.masked_attention(query, key, value, visible, 0.125)
    ref_out, ref_lse = reference.attention_with_lse(query, key, value, visible, 0.125)
    assert calls == [1]
    assert float((out.float() - ref_out.float()).norm() / ref_out.float().norm()) < tolerance
    assert float((lse - ref_lse).abs().max()) < 10 * tolerance
