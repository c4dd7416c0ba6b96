"""KV compaction after verification vs the attention of one verify step, 8B-shaped cache.

    PYTHONPATH=. python bench/compaction.py --out $OUT

Cache: 32 layers, 8 KV heads, head dim 128, bf16, batch 1, 32k committed slots; tree scratch of 69
nodes (the default tree); 6 accepted entries move into place. Compared with: the fused tree attention
of one verify step over all 32 layers (69 queries, Llama-3-8B heads), and the torch reference gather.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from attention import gpu_time_ms

from longspec_hf.kernels import compaction, reference, testing, tree_attention

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, TREE_NODES = 32, 8, 32, 128, 69


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--accepted", type=int, default=6)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    committed = args.context
    kv = randn(LAYERS, 2, 1, KV_HEADS, committed + 128, HEAD_DIM)
    kv_tree = randn(LAYERS, 2, 1, KV_HEADS, TREE_NODES, HEAD_DIM)
    parents = testing.random_parents(TREE_NODES, torch.Generator().manual_seed(0))
    # The accepted path: the deepest node and its ancestors, root first, cut to `accepted` entries.
    path = [TREE_NODES - 1]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    path = (path[::-1] + list(range(TREE_NODES)))[: args.accepted]
    source_index = torch.tensor([path], device="cuda")
    dest_start = torch.tensor([committed], device="cuda")

    check = kv.clone()
    reference.compact_kv(check, kv_tree, source_index, dest_start)
    compaction.compact_kv(kv, kv_tree, source_index, dest_start)
    assert torch.equal(kv, check), "fused compaction differs from the reference"
    del check

    fused_ms = gpu_time_ms([lambda: compaction.compact_kv(kv, kv_tree, source_index, dest_start)], reps=25)
    torch_ms = gpu_time_ms([lambda: reference.compact_kv(kv, kv_tree, source_index, dest_start)], reps=25)

    tree_mask = testing.ancestor_mask(parents)[None].cuda()
    queries = [randn(1, TREE_NODES, Q_HEADS, HEAD_DIM).transpose(1, 2) for _ in range(LAYERS)]
    prefix_start = torch.zeros(1, dtype=torch.int32, device="cuda")
    prefix_end = torch.full((1,), committed, dtype=torch.int32, device="cuda")

    def verify_step_attention():
        for layer in range(LAYERS):
            tree_attention.prefix_tree_attention(
                queries[layer], kv[layer, 0], kv[layer, 1], prefix_start, prefix_end,
                kv_tree[layer, 0], kv_tree[layer, 1], tree_mask, HEAD_DIM**-0.5)

    attention_ms = gpu_time_ms([verify_step_attention], reps=9)
    result = dict(device=torch.cuda.get_device_name(), context=committed, accepted=args.accepted,
                  cache_gb=kv.numel() * 2 / 1e9, moved_bytes=2 * LAYERS * 2 * KV_HEADS * args.accepted * HEAD_DIM * 2,
                  fused_compaction_ms=fused_ms, torch_compaction_ms=torch_ms,
                  verify_attention_32_layers_ms=attention_ms, fused_share_of_verify=fused_ms / attention_ms)
    with open(os.path.join(args.out, "compaction_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    print(f"\n| compaction (32 layers, {args.accepted} entries, {committed // 1024}k ctx) | ms | share of verify attention |")
    print("|---|---|---|")
    print(f"| fused Triton, one launch | {fused_ms:.4f} | {100 * fused_ms / attention_ms:.2f}% |")
    print(f"| torch reference gather | {torch_ms:.4f} | {100 * torch_ms / attention_ms:.2f}% |")
    print(f"| verify-step attention, 32 layers, {TREE_NODES} queries | {attention_ms:.4f} | 100% |")


if __name__ == "__main__":
    main()
