"""Top-k of the log-softmax per tree level of a greedy draft, and the beam step after it: the fused
kernels vs torch.

    PYTHONPATH=. python bench/topk.py --out $OUT
    PYTHONPATH=. python bench/topk.py --sweep --out $OUT   # also stage-1 slice and warp counts
    git show REV:longspec_hf/kernels/topk.py > /tmp/before.py
    PYTHONPATH=. python bench/topk.py --baseline /tmp/before.py --out $OUT   # another version, same run

SmolLM2's vocabulary (49152) in bf16; rows are the nodes of one tree level (1, 4, 16) and a wider one
(64), k the children kept per node. torch: `log_softmax(logits.float()).topk(k)` (what the draft did
before). The beam step: the `width` best (parent, child) pairs of `n` parents' top-`k` children,
`topk.beam_select` vs `reference.beam_select` (add, top-k, gather). Median device times inside CUDA
graphs, all in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch
from attention import gpu_time_ms

from longspec_hf.kernels import reference, topk


# (stage-1 slice, stage-1 warps, stage-2 warps)
SWEEP = [(4096, 4, 4), (4096, 2, 2), (2048, 2, 2), (2048, 1, 1), (1024, 1, 1), (1024, 2, 1), (1024, 1, 2), (512, 1, 1),
         (512, 1, 2), (256, 1, 2)]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_topk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--sweep", action="store_true", help="also time stage-1 slice sizes and warp counts")
    parser.add_argument("--baseline", default=None, help="another version of kernels/topk.py, timed as `baseline_ms`")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    baseline = load_module(args.baseline) if args.baseline else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for rows, k in [(1, 4), (4, 16), (16, 16), (64, 16)]:
        logits = [torch.randn(rows, args.vocab, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
        fused = gpu_time_ms([lambda x=x: topk.topk_log_softmax(x, k) for x in logits])
        torch_ms = gpu_time_ms([lambda x=x: reference.topk_log_softmax(x, k) for x in logits])
        rows_out.append(dict(rows=rows, k=k, fused_ms=fused, torch_ms=torch_ms, speedup=torch_ms / fused))
        if baseline is not None:
            rows_out[-1]["baseline_ms"] = gpu_time_ms([lambda x=x: baseline.topk_log_softmax(x, k) for x in logits])
        print(json.dumps(rows_out[-1]), flush=True)
    beam_rows = []
    for batch, parents, k, width in [(1, 1, 4, 4), (1, 16, 16, 16), (4, 16, 16, 16)]:
        child_scores = torch.randn(batch, parents, k, device="cuda", generator=gen).sort(-1, descending=True).values
        child_tokens = torch.randint(0, args.vocab, (batch, parents, k), device="cuda", generator=gen)
        parent_scores = torch.randn(batch, parents, device="cuda", generator=gen)
        inputs = (child_scores, child_tokens, parent_scores, width)
        assert torch.equal(topk.beam_select(*inputs)[2], reference.beam_select(*inputs)[2])
        fused = gpu_time_ms([lambda: topk.beam_select(*inputs)])
        torch_ms = gpu_time_ms([lambda: reference.beam_select(*inputs)])
        beam_rows.append(dict(batch=batch, parents=parents, k=k, width=width, fused_ms=fused, torch_ms=torch_ms))
        if baseline is not None:
            beam_rows[-1]["baseline_ms"] = gpu_time_ms([lambda: baseline.beam_select(*inputs)])
        print(json.dumps(beam_rows[-1]), flush=True)
    sweep_rows = []
    if args.sweep:
        for rows, k in [(1, 4), (16, 16)]:
            logits = [torch.randn(rows, args.vocab, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
            for chunk, chunk_warps, merge_warps in SWEEP:
                ms = gpu_time_ms([lambda x=x: topk.topk_log_softmax(x, k, chunk, chunk_warps, merge_warps) for x in logits])
                sweep_rows.append(dict(rows=rows, k=k, chunk=chunk, chunk_warps=chunk_warps, merge_warps=merge_warps, ms=ms))
                print(json.dumps(sweep_rows[-1]), flush=True)
    with open(os.path.join(args.out, "topk.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), vocab=args.vocab, rows=rows_out, beam=beam_rows,
                       sweep=sweep_rows), f, indent=1)
    print("| rows | k | fused ms | baseline ms | torch ms | speedup vs torch |\n|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['k']} | {r['fused_ms']:.4f} | {r.get('baseline_ms', float('nan')):.4f} | "
              f"{r['torch_ms']:.4f} | {r['speedup']:.1f}x |")
    print("| beam batch | parents x k | width | fused ms | baseline ms | torch ms |\n|---|---|---|---|---|---|")
    for r in beam_rows:
        print(f"| {r['batch']} | {r['parents']} x {r['k']} | {r['width']} | {r['fused_ms']:.4f} | "
              f"{r.get('baseline_ms', float('nan')):.4f} | {r['torch_ms']:.4f} |")


if __name__ == "__main__":
    main()
