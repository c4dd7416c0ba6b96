"""Top-k of the log-softmax per tree level of a greedy draft: the fused kernel vs torch.

    PYTHONPATH=. python bench/topk.py --out $OUT

SmolLM2's vocabulary (49152) in bf16; rows are the nodes of one tree level (1, 4, 16) and a wider one
(64), k the children kept per node. torch: `log_softmax(logits.float()).topk(k)` (what the draft did
before). Median device times inside CUDA graphs, both in the same run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from attention import gpu_time_ms

from longspec_hf.kernels import reference, topk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for rows, k in [(1, 4), (4, 16), (16, 16), (64, 16)]:
        logits = [torch.randn(rows, args.vocab, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
        fused = gpu_time_ms([lambda x=x: topk.topk_log_softmax(x, k) for x in logits])
        torch_ms = gpu_time_ms([lambda x=x: reference.topk_log_softmax(x, k) for x in logits])
        rows_out.append(dict(rows=rows, k=k, fused_ms=fused, torch_ms=torch_ms, speedup=torch_ms / fused))
        print(json.dumps(rows_out[-1]), flush=True)
    with open(os.path.join(args.out, "topk.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), vocab=args.vocab, rows=rows_out), f, indent=1)
    print("| rows | k | fused ms | torch ms | speedup |\n|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['k']} | {r['fused_ms']:.4f} | {r['torch_ms']:.4f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
