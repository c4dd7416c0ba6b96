"""Host time of one CUDA graph replay, by what the graph holds.

    PYTHONPATH=. python bench/graph_launch.py --out $OUT

The decoding loop replays two graphs per round; `bench/round_cost.py` showed that replaying the tree's
graphs blocks the host ten to fifty times longer per node than replaying the no-draft step's graph. This
times `graph.replay()` alone (the device drained before each call, so a full launch queue never blocks
it) for graphs of `--kernels` small elementwise kernels, plain or with a few device-to-device copies
(`copy_` between contiguous tensors: memcpy nodes) or the same copies as kernels, to see whether memcpy
nodes take a graph off the driver's fast launch path. With `--gemm-rows`, graphs of `--kernels` bf16
GEMMs shaped like a SmolLM2 layer's projections (576 -> 576, 576 -> 1536, 1536 -> 576) for each given
number of rows: cuBLAS picks other kernels (some launched in thread-block clusters) as the rows grow, and
the tree's verify forward runs its GEMMs over tens of rows where the no-draft step runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from graph_nodes import describe


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


def capture_gemms(num_kernels: int, rows: int) -> torch.cuda.CUDAGraph:
    widths = [(576, 576), (576, 1536), (1536, 576)]
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for k, n in widths]
    inputs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k, _ in widths]
    outputs = [torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for _, n in widths]

    def body():
        for i in range(num_kernels):
            j = i % len(widths)
            torch.matmul(inputs[j], weights[j].t(), out=outputs[j])  # the layout of nn.Linear

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph(keep_graph=True)  # readable by graph_nodes.describe
    with torch.cuda.graph(graph):
        body()
    graph.keep = (weights, inputs, outputs)
    return graph


def kernel_names(graph: torch.cuda.CUDAGraph) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = {e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(names)


def replay_device_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


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
    parser.add_argument("--gemm-rows", type=int, nargs="*", default=[])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for copies, as_kernels in [(0, False), (1, False), (10, False), (10, True)]:
        graph = capture(args.kernels, copies, as_kernels)
        graph.replay()
        rows.append(dict(kernels=args.kernels, copies=copies, copies_as_kernels=as_kernels,
                         host_ms=replay_host_ms(graph)))
        print(json.dumps(rows[-1]), flush=True)
    gemm_rows = []
    for num_rows in args.gemm_rows:
        graph = capture_gemms(args.kernels, num_rows)
        graph.replay()
        gemm_rows.append(dict(kernels=args.kernels, gemm_rows=num_rows, host_ms=replay_host_ms(graph),
                              device_ms=replay_device_ms(graph), cublas_kernels=kernel_names(graph),
                              graph=describe(graph, os.path.join(args.out, f"gemms_{num_rows}_rows.dot"))))
        print(json.dumps(gemm_rows[-1]), flush=True)
    with open(os.path.join(args.out, "graph_launch.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, gemms=gemm_rows), f, indent=1)


if __name__ == "__main__":
    main()
