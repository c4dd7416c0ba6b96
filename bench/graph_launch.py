"""Host time of one CUDA graph replay, by what the graph holds.

    PYTHONPATH=. python bench/graph_launch.py --out $OUT

The decoding loop replays two graphs per round; `bench/round_cost.py` showed that replaying the tree's
graphs blocks the host ten to fifty times longer per node than replaying the no-draft step's graph. This
times `graph.replay()` alone (the device drained before each call, so a full launch queue never blocks
it) for graphs of `--kernels` small elementwise kernels, plain or with a few device-to-device copies
(`copy_` between contiguous tensors: memcpy nodes) or the same copies as kernels, to see whether memcpy
nodes take a graph off the driver's fast launch path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def capture(num_kernels: int, num_copies: int, as_kernels: bool) -> torch.cuda.CUDAGraph:
    x = torch.zeros(4096, device="cuda")
    src, dst = torch.ones(4096, device="cuda"), torch.empty(4096, device="cuda")
    every_copy = num_kernels // max(1, num_copies)

    def body():
        for i in range(num_kernels):
            x.add_(1.0)
            if num_copies and i % every_copy == 0:
                if as_kernels:
                    torch.add(src, 0.0, out=dst)  # the same bytes moved by an elementwise kernel
                else:
                    dst.copy_(src)  # contiguous, same dtype: cudaMemcpyAsync

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.keep = (x, src, dst)
    return graph


def replay_host_ms(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times[5:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", type=int, default=500)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for copies, as_kernels in [(0, False), (1, False), (10, False), (10, True)]:
        graph = capture(args.kernels, copies, as_kernels)
        graph.replay()
        rows.append(dict(kernels=args.kernels, copies=copies, copies_as_kernels=as_kernels,
                         host_ms=replay_host_ms(graph)))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "graph_launch.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
