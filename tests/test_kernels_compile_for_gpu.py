"""Every Triton kernel's default launches compile for a Hopper GPU (sm90), on a machine without one.

The launches are the package's own (recorded, not run, from its entry points on CPU tensors of 8B-layout
shapes), compiled by Triton with its bundled ptxas. This catches code the interpreter accepts but the
compiler does not, tiles that need more shared memory than a multiprocessor has, and registers that
spill to memory (every load and store of a spilled value is memory traffic the kernel did not ask for).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from longspec_hf.kernels import compaction, projections, testing, topk, tree_attention  # noqa: E402

# Largest dynamic shared memory per block on sm90 (227 KiB).
SM90_SHARED_BYTES = 232448


def attention_inputs(num_tree: int, context: int = 8192, dtype=torch.bfloat16, heads=(32, 8, 128)):
    """A tree over a preallocated cache; Llama-3.1-8B heads (32 query, 8 key/value, dim 128) by default."""
    num_q_heads, num_kv_heads, head_dim = heads
    query = torch.empty(1, num_q_heads, num_tree, head_dim, dtype=dtype)
    key_prefix, value_prefix = (torch.empty(1, num_kv_heads, context + 128, head_dim, dtype=dtype) for _ in range(2))
    key_tree, value_tree = (torch.empty(1, num_kv_heads, num_tree, head_dim, dtype=dtype) for _ in range(2))
    mask = torch.ones(1, num_tree, num_tree, dtype=torch.bool)
    bounds = torch.zeros(1, dtype=torch.long), torch.full((1,), context)
    return query, key_prefix, value_prefix, *bounds, key_tree, value_tree, mask, head_dim**-0.5


def masked_inputs(query, key_prefix, value_prefix, start, end, key_tree, value_tree, mask, scale):
    """The arguments of `tree_attention_with_lse` among those of `prefix_tree_attention`."""
    return query, key_tree, value_tree, mask, scale


def record(module, call):
    with testing.recorded_launches(module) as launches:
        call()
    return launches  # compiled after the block: the module's kernels are its own again


SMOLLM2_HEADS = (9, 3, 64)
LAUNCHES = {
    "tree_attention_64_nodes_split": lambda: record(
        tree_attention, lambda: tree_attention.prefix_tree_attention(*attention_inputs(64), num_splits=8)),
    "tree_attention_one_node": lambda: record(
        tree_attention, lambda: tree_attention.prefix_tree_attention(*attention_inputs(1), num_splits=1)),
    "tree_attention_window_fp32": lambda: record(
        tree_attention, lambda: tree_attention.prefix_tree_attention(
            *attention_inputs(16, dtype=torch.float32), window=4096, tree_depths=torch.arange(16), num_splits=4)),
    "tree_attention_smollm2_fp32": lambda: record(
        tree_attention, lambda: tree_attention.prefix_tree_attention(
            *attention_inputs(69, dtype=torch.float32, heads=SMOLLM2_HEADS), num_splits=4)),
    "tree_attention_smollm2": lambda: record(
        tree_attention, lambda: tree_attention.prefix_tree_attention(*attention_inputs(69, heads=SMOLLM2_HEADS))),
    # The draft's two attentions at a tree level: the target's cache, and its own ring and tree keys.
    "prefix_attention_draft_level": lambda: record(tree_attention, lambda: tree_attention.prefix_attention_with_lse(
        *attention_inputs(16)[:5], 128**-0.5)),
    "masked_attention_draft_ring": lambda: record(tree_attention, lambda: tree_attention.tree_attention_with_lse(
        *masked_inputs(*attention_inputs(16)))),
    "compaction": lambda: record(compaction, lambda: compaction.compact_kv(
        torch.empty(32, 2, 1, 8, 8192, 128, dtype=torch.bfloat16), torch.empty(32, 2, 1, 8, 69, 128, dtype=torch.bfloat16),
        torch.arange(6)[None], torch.tensor([100]))),
    "topk": lambda: record(topk, lambda: topk.topk_log_softmax(torch.empty(16, 128256, dtype=torch.bfloat16), 16)),
    "beam_select": lambda: record(topk, lambda: topk.beam_select(
        torch.empty(1, 16, 16, dtype=torch.float32), torch.empty(1, 16, 16, dtype=torch.long), torch.empty(1, 16), 16)),
}
for rows in (1, 26, 64):
    LAUNCHES[f"grouped_linear_{rows}_rows"] = lambda rows=rows: record(projections, lambda: projections.grouped_linear(
        torch.empty(rows, 4096, dtype=torch.bfloat16),
        [torch.empty(n, 4096, dtype=torch.bfloat16) for n in (4096, 1024, 1024)], [None] * 3))
LAUNCHES["grouped_linear_fp32_biased"] = lambda: record(projections, lambda: projections.grouped_linear(
    torch.empty(26, 4096), [torch.empty(n, 4096) for n in (14336, 14336)], [torch.empty(14336)] * 2))
# Launches held to no register spills. Not SmolLM2's 16-bit tree attention: its tile (64 rows, 128 keys,
# two programs per multiprocessor) spills a few hundred bytes per thread and was the fastest measured.
SPILL_FREE = [name for name in LAUNCHES if name != "tree_attention_smollm2"]


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_default_launches_compile_for_sm90(name):
    launches = LAUNCHES[name]()
    assert launches
    for kernel, args, options in launches:
        usage = testing.compile_for_gpu(kernel, args, options, capability=90)
        assert usage["shared_bytes"] <= SM90_SHARED_BYTES, (kernel.__name__, usage)
        assert 0 < usage["registers"] <= 255
        if name in SPILL_FREE:
            assert usage["spilled_bytes"] == 0, (kernel.__name__, usage)



def test_a_tile_too_large_for_shared_memory_is_seen():
    """The check above can fail: 64-row tiles of 128 float32 columns with deep stages do not fit."""
    launches = record(projections, lambda: projections.grouped_linear(
        torch.empty(64, 4096), [torch.empty(4096, 4096)], [None],
        config=dict(BLOCK_N=128, BLOCK_K=256, num_stages=4)))
    kernel, args, options = launches[0]
    assert testing.compile_for_gpu(kernel, args, options)["shared_bytes"] > SM90_SHARED_BYTES
