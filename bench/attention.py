"""Tree attention on the GPU: fused split-KV kernel vs the paper's two-pass method vs masked SDPA vs the
KV-read floor.

    PYTHONPATH=. python bench/attention.py --out $OUT

Batch 1, bf16, one layer: Tq tree queries (random ancestor mask) over a committed prefix of `context`
slots plus the Tq tree keys. Every variant gets the same inputs; timings are medians over CUDA-event
timed replays of a CUDA graph that cycles through enough copies of the inputs to keep them out of L2.
The floor is the K and V bytes (prefix and tree) over the device-to-device copy bandwidth measured in
the same run. `--sweep` also times tile configurations of the fused kernel at a few points;
`--baseline FILE` times another version of `tree_attention.py` against the current one instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
import triton

from longspec_hf.kernels import testing, tree_attention

LAYOUTS = {  # query heads, KV heads, head dim
    "Llama-3-8B": (32, 8, 128),
    "Qwen2.5-7B": (28, 4, 128),
    "SmolLM2-135M": (9, 3, 64),
}
L2_BYTES = 50 * 2**20


def gpu_time_ms(calls, reps: int = 15, target_ms: float = 3.0) -> float:
    """Median device time of one call. `calls` are closures over distinct input copies; they are run
    round-robin inside a CUDA graph (launch gaps shrink as in a real decoding step), after warm-up."""
    for call in calls:
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / len(calls)
    rounds = max(1, min(200 // len(calls), math.ceil(target_ms / max(estimate, 1e-3) / len(calls))))
    num_inner = rounds * len(calls)

    def eager():
        for i in range(num_inner):
            calls[i % len(calls)]()

    run = eager
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            eager()
        run = graph.replay
        run()
    except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager launches
        print(f"  (graph capture failed, timing eager launches: {error!r:.120})")
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / num_inner)
    return statistics.median(times)


def copy_bandwidth_gbs(num_bytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written: the faster of the copy
    engine path (`copy_`) and an elementwise kernel (`mul(..., out=)`), so that the floor is not low."""
    src = torch.randn(num_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = min(gpu_time_ms([lambda: dst.copy_(src)], reps=20), gpu_time_ms([lambda: torch.mul(src, 1.0, out=dst)], reps=20))
    del src, dst
    return 2 * num_bytes / ms / 1e6


def make_case(layout, context: int, num_tree: int, seed: int):
    """Inputs of one layer at batch 1: a cache of exactly `context` committed slots, a random tree."""
    num_q_heads, kv_heads, head_dim = LAYOUTS[layout]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    tree_mask = testing.random_tree_masks(1, num_tree, torch.Generator().manual_seed(seed)).cuda()
    return dict(
        query=randn(1, num_tree, num_q_heads, head_dim).transpose(1, 2),
        key_prefix=randn(1, kv_heads, context, head_dim), value_prefix=randn(1, kv_heads, context, head_dim),
        prefix_start=torch.zeros(1, dtype=torch.int32, device="cuda"),
        prefix_end=torch.full((1,), context, dtype=torch.int32, device="cuda"),
        key_tree=randn(1, kv_heads, num_tree, head_dim), value_tree=randn(1, kv_heads, num_tree, head_dim),
        tree_mask=tree_mask, scale=head_dim**-0.5,
    )


def sdpa_inputs(case):
    """What masked SDPA gets: prefix and tree keys in one tensor, KV heads repeated to the query heads
    (as transformers' repeat_kv does; done once here, outside the timing), one boolean mask."""
    group = case["query"].shape[1] // case["key_prefix"].shape[1]
    context, num_tree = case["key_prefix"].shape[2], case["key_tree"].shape[2]
    keys = torch.cat([case["key_prefix"], case["key_tree"]], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([case["value_prefix"], case["value_tree"]], dim=2).repeat_interleave(group, dim=1)
    mask = torch.cat([torch.ones(1, num_tree, context, dtype=torch.bool, device="cuda"), case["tree_mask"]], dim=-1)
    return case["query"], keys, values, mask[:, None], case["scale"]


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def layer_kv_bytes(layout, context: int, num_tree: int) -> int:
    _, kv_heads, head_dim = LAYOUTS[layout]
    return 2 * kv_heads * (context + num_tree) * head_dim * 2


def copies_for(nbytes: int) -> int:
    """Enough input copies that one round through them moves over 3x the L2 size."""
    return max(1, min(8, math.ceil(3 * L2_BYTES / nbytes)))


def bench_point(layout, context, num_tree, bandwidth, seed):
    num_copies = copies_for(layer_kv_bytes(layout, context, num_tree))
    copies = [make_case(layout, context, num_tree, seed + i) for i in range(num_copies)]
    case = copies[0]
    row = dict(layout=layout, context=context, tree=num_tree)
    row["floor_ms"] = layer_kv_bytes(layout, context, num_tree) / bandwidth / 1e6
    fused = lambda c: (lambda: tree_attention.prefix_tree_attention(**c))
    two_pass = lambda c: (lambda: tree_attention.two_pass_prefix_tree_attention(**c))
    prefix_only = lambda c: (lambda: tree_attention.prefix_attention_with_lse(
        c["query"], c["key_prefix"], c["value_prefix"], c["prefix_start"], c["prefix_end"], c["scale"]))
    row["fused_ms"] = gpu_time_ms([fused(c) for c in copies])
    row["two_pass_ms"] = gpu_time_ms([two_pass(c) for c in copies])
    row["prefix_pass_only_ms"] = gpu_time_ms([prefix_only(c) for c in copies])

    out, lse = tree_attention.prefix_tree_attention(**case)
    two_out, _ = tree_attention.two_pass_prefix_tree_attention(**case)
    del copies[1:]
    # SDPA's inputs are 2x-7x larger (repeated heads): fewer copies reach the same L2 turnover.
    sdpa_copies = [sdpa_inputs(case)]
    sdpa_bytes = sdpa_copies[0][1].numel() * 2 * 2
    for i in range(1, copies_for(sdpa_bytes)):
        sdpa_copies.append(sdpa_inputs(make_case(layout, context, num_tree, seed + 100 + i)))
    sdpa = lambda q, k, v, m, s: (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s))
    row["sdpa_mask_ms"] = gpu_time_ms([sdpa(*c) for c in sdpa_copies])
    sdpa_out = F.scaled_dot_product_attention(*sdpa_copies[0][:3], attn_mask=sdpa_copies[0][3], scale=case["scale"])
    row["fused_vs_sdpa_rel_err"] = rel_err(out, sdpa_out)
    row["two_pass_vs_sdpa_rel_err"] = rel_err(two_out, sdpa_out)
    row["fused_over_floor"] = row["fused_ms"] / row["floor_ms"]
    row["sdpa_over_fused"] = row["sdpa_mask_ms"] / row["fused_ms"]
    row["fused_tflops"] = 4 * case["query"].shape[1] * num_tree * (context + num_tree) * case["query"].shape[3] / row["fused_ms"] / 1e9
    return row


SWEEP_CONFIGS = {
    "m128_n64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "m128_n64_w8_s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    "m128_n128_w8_s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "m128_n128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m128_n64_w8_s2": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "m64_n64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "m64_n128_w4_s3": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "m256_n64_w8_s2": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2),
    # One row block for all 4 x 64 folded rows of a KV head: K/V is read once per split.
    "m256_n64_w16_s2": dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=2),
    "m256_n64_w16_s3": dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3),
    "m256_n32_w8_s3": dict(BLOCK_M=256, BLOCK_N=32, num_warps=8, num_stages=3),
    "m256_n32_w16_s4": dict(BLOCK_M=256, BLOCK_N=32, num_warps=16, num_stages=4),
    "m128_n32_w4_s4": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    "m256_n128_w16_s2": dict(BLOCK_M=256, BLOCK_N=128, num_warps=16, num_stages=2),
    "m128_n128_w8_s1": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=1),
}
SWEEP_POINTS = [("Llama-3-8B", 32768, 64), ("Llama-3-8B", 131072, 64), ("Llama-3-8B", 131072, 16),
                ("Llama-3-8B", 131072, 128), ("Qwen2.5-7B", 131072, 64), ("SmolLM2-135M", 131072, 64),
                ("Llama-3-8B", 4096, 64)]


def sweep(bandwidth, points=SWEEP_POINTS):
    """Fused-kernel time per tile configuration and split count (x1, x2 the default) at a few points."""
    rows = []
    for layout, context, num_tree in points:
        num_copies = copies_for(layer_kv_bytes(layout, context, num_tree))
        copies = [make_case(layout, context, num_tree, i) for i in range(num_copies)]
        floor = layer_kv_bytes(layout, context, num_tree) / bandwidth / 1e6
        group = LAYOUTS[layout][0] // LAYOUTS[layout][1]
        for name, config in SWEEP_CONFIGS.items():
            blocks = math.ceil(group * num_tree / config["BLOCK_M"]) * LAYOUTS[layout][1]
            base = tree_attention.default_num_splits(blocks, context + num_tree, config["BLOCK_N"], torch.device("cuda"))
            for splits in sorted({base, 2 * base}):
                try:
                    ms = gpu_time_ms([(lambda c=c: tree_attention.prefix_tree_attention(**c, config=config, num_splits=splits)) for c in copies], reps=9)
                except Exception as error:  # noqa: BLE001 - a config may not compile (shared memory)
                    print(f"  sweep {layout} {context} {num_tree} {name} x{splits}: {error!r:.200}")
                    continue
                rows.append(dict(layout=layout, context=context, tree=num_tree, config=name, num_splits=splits,
                                 ms=ms, over_floor=ms / floor))
        best = min((r for r in rows if r["layout"] == layout and r["context"] == context and r["tree"] == num_tree),
                   key=lambda r: r["ms"], default=None)
        if best:
            print(f"sweep {layout:13s} ctx {context:6d} tree {num_tree:3d}: best {best['config']} x{best['num_splits']} "
                  f"{best['ms']:.4f} ms ({best['over_floor']:.2f}x floor)", flush=True)
    return rows


def load_baseline(path: str):
    """The kernels of another version of `tree_attention.py` (e.g. `git show REV:longspec_hf/kernels/
    tree_attention.py > FILE`), loaded beside the current ones: its custom operators are left out (they
    would be registered twice) and its relative import is made absolute."""
    source = open(path).read()
    source = source.split("# torch.compile cannot look inside")[0]
    source = source.replace("from .reference import", "from longspec_hf.kernels.reference import")
    # Triton reads a kernel's source through inspect, which needs a file: write the trimmed module.
    trimmed = os.path.join(os.path.dirname(os.path.abspath(path)), "_baseline_tree_attention.py")
    with open(trimmed, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("baseline_tree_attention", trimmed)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_with_baseline(baseline, points, repeats: int = 2):
    """Baseline vs current fused attention (kernel + split merge), alternating, at `points`
    (layout, context, tree queries, prefix only); `repeats` timings each."""
    rows = []
    for layout, context, num_tree, prefix_only in points:
        copies = [make_case(layout, context, num_tree, i) for i in range(copies_for(layer_kv_bytes(layout, context, num_tree)))]

        def call(module, case):
            if prefix_only:  # the draft's cross-attention: no tree keys
                args = [case[k] for k in ("query", "key_prefix", "value_prefix", "prefix_start", "prefix_end", "scale")]
                return lambda: module.prefix_attention_with_lse(*args)
            return lambda: module.prefix_tree_attention(**case)

        times = {"baseline": [], "current": []}
        for _ in range(repeats):
            for name, module in (("baseline", baseline), ("current", tree_attention)):
                times[name].append(1e3 * gpu_time_ms([call(module, c) for c in copies]))
        difference = float((call(baseline, copies[0])()[0].float() - call(tree_attention, copies[0])()[0].float()).abs().max())
        row = dict(layout=layout, context=context, tree=num_tree, prefix_only=prefix_only, baseline_us=times["baseline"],
                   current_us=times["current"], max_abs_difference=difference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    parser.add_argument("--trees", default="16,64,128")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-points", default=None,
                        help="LAYOUT:CONTEXT:TREE,... instead of the default sweep points")
    parser.add_argument("--baseline", default=None,
                        help="another version of tree_attention.py to time against the current one at --baseline-points")
    parser.add_argument("--baseline-points", default="SmolLM2-135M:4096:1,SmolLM2-135M:4096:16:prefix,SmolLM2-135M:4096:69",
                        help="LAYOUT:CONTEXT:TREE[:prefix],...")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.baseline:
        points = [(p.split(":")[0], int(p.split(":")[1]), int(p.split(":")[2]), p.endswith(":prefix"))
                  for p in args.baseline_points.split(",")]
        rows = compare_with_baseline(load_baseline(args.baseline), points)
        with open(os.path.join(args.out, "attention_baseline.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), baseline=args.baseline, rows=rows), f, indent=1)
        return
    began = time.time()

    bandwidth = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, copy_bandwidth_gbs=bandwidth, rows=[])
    if args.sweep:
        points = SWEEP_POINTS
        if args.sweep_points:
            points = [(p.split(":")[0], int(p.split(":")[1]), int(p.split(":")[2])) for p in args.sweep_points.split(",")]
        result["sweep"] = sweep(bandwidth, points)
    for layout in args.layouts.split(","):
        for context in map(int, filter(None, args.contexts.split(","))):
            for num_tree in map(int, args.trees.split(",")):
                row = bench_point(layout, context, num_tree, bandwidth, seed=context + num_tree)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    result["seconds"] = time.time() - began
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nbatch 1, bf16, one layer; floor = K+V bytes / {bandwidth:.0f} GB/s; ms are medians")
    print("| layout | context | tree | fused ms | two-pass ms | SDPA+mask ms | floor ms | fused/floor | SDPA/fused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['layout']} | {r['context'] // 1024}k | {r['tree']} | {r['fused_ms']:.4f} | {r['two_pass_ms']:.4f} | "
              f"{r['sdpa_mask_ms']:.4f} | {r['floor_ms']:.4f} | {r['fused_over_floor']:.2f} | {r['sdpa_over_fused']:.1f} |")


if __name__ == "__main__":
    main()
