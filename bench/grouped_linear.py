"""A decoding step's projections on the GPU: the grouped Triton kernel vs cuBLAS vs the weight-read floor.

    PYTHONPATH=. python bench/grouped_linear.py --out $OUT [--sweep]

For each layer group of a layout (query/key/value, gate/up, and the output and down projections alone)
and a few row counts (a step of batch 1, 4, a 25-node tree + root, 64): bf16 times of
  - `separate`: one `F.linear` per weight, as the model runs them (cuBLAS, split-K reductions included);
  - `concatenated`: one `F.linear` with the group's weights copied end to end beforehand (what cuBLAS
    gets from packed weights; not what the package does, which never copies a weight);
  - `grouped`: `kernels.grouped_linear` (one launch, weights in place), default tiles;
  - `floor`: the weight bytes over the copy bandwidth measured in the same run.
Times are medians of CUDA-graph replays over enough weight copies to keep them out of L2
(`bench/attention.py`'s timer). The last table adds the groups up over a layer and the layout's layers:
the time a step would save. `--sweep` also times tile configurations of the kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
from attention import copies_for, copy_bandwidth_gbs, gpu_time_ms, rel_err

from longspec_hf.kernels import projections
from longspec_hf.kernels import reference

# hidden, query width, key/value width, MLP width, layers, q/k/v bias
LAYOUTS = {
    "Llama-3.1-8B": (4096, 4096, 1024, 14336, 32, False),
    "Qwen2.5-7B": (3584, 3584, 512, 18944, 28, True),
    "SmolLM2-135M": (576, 576, 192, 1536, 30, False),
}
ROWS = (1, 4, 26, 64)


def layer_groups(layout: str) -> dict[str, tuple[int, list[int], bool]]:
    """name -> (input width K, output widths, biased) of one layer's projection groups."""
    hidden, query, kv, mlp, _, bias = LAYOUTS[layout]
    return {
        "qkv": (hidden, [query, kv, kv], bias),
        "gate_up": (hidden, [mlp, mlp], False),
        "o": (query, [hidden], False),
        "down": (mlp, [hidden], False),
    }


def make_copies(k_dim: int, widths: list[int], biased: bool, rows: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight_bytes = 2 * k_dim * sum(widths)
    copies = []
    for _ in range(copies_for(weight_bytes)):
        weights = [torch.randn(n, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen) * k_dim**-0.5 for n in widths]
        biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if biased else None for n in widths]
        copies.append((weights, biases))
    x = torch.randn(rows, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, copies, weight_bytes


def time_methods(x, copies, configs: dict[str, dict | None]) -> dict[str, float]:
    times = {}
    times["separate"] = gpu_time_ms([lambda w=w, b=b: [F.linear(x, wi, bi) for wi, bi in zip(w, b)] for w, b in copies])
    concatenated = [(torch.cat(w), None if b[0] is None else torch.cat(b)) for w, b in copies]
    times["concatenated"] = gpu_time_ms([lambda w=w, b=b: F.linear(x, w, b) for w, b in concatenated])
    del concatenated
    for name, config in configs.items():
        try:
            times[name] = gpu_time_ms(
                [lambda w=w, b=b: projections.grouped_linear(x, w, b, config=config) for w, b in copies]
            )
        except Exception as error:  # noqa: BLE001 - a swept tile that does not fit (shared memory) is skipped
            if config is None:
                raise
            print(f"  {name}: {error!r:.100}")
    return times


def sweep_configs() -> dict[str, dict]:
    configs = {}
    for block_n, block_k, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5)):
        configs[f"n{block_n}_k{block_k}_w{warps}_s{stages}"] = dict(
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return configs


def bench_group(layout, name, rows, bandwidth, sweep: bool, seed: int) -> dict:
    k_dim, widths, biased = layer_groups(layout)[name]
    x, copies, weight_bytes = make_copies(k_dim, widths, biased, rows, seed)
    weights, biases = copies[0]
    expected = reference.grouped_linear(x.float(), [w.float() for w in weights],
                                        [None if b is None else b.float() for b in biases])
    got = projections.grouped_linear(x, weights, biases)
    error = max(rel_err(g, e) for g, e in zip(got, expected))
    configs = {"grouped": None, **(sweep_configs() if sweep else {})}
    times = time_methods(x, copies, configs)
    floor_ms = weight_bytes / bandwidth / 1e6
    best_swept = min((t, c) for c, t in times.items() if c not in ("separate", "concatenated", "grouped")) if sweep else None
    row = dict(layout=layout, group=name, rows=rows, widths=widths, k=k_dim, floor_ms=floor_ms, rel_err=error,
               separate_ms=times["separate"], concatenated_ms=times["concatenated"], grouped_ms=times["grouped"],
               grouped_config=projections.default_config(rows, sum(widths), 2))
    if best_swept:
        row.update(best_swept_ms=best_swept[0], best_swept_config=best_swept[1], sweep_ms=times)
    del x, copies
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", default="Llama-3.1-8B,Qwen2.5-7B")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--groups", default="qkv,gate_up,o,down")
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations (slow)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    began = time.time()
    bandwidth = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  copy_bandwidth_gbs=bandwidth, rows=[])
    for layout in args.layouts.split(","):
        for rows in map(int, args.rows.split(",")):
            for index, name in enumerate(args.groups.split(",")):
                row = bench_group(layout, name, rows, bandwidth, args.sweep, seed=rows * 10 + index)
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "sweep_ms"}), flush=True)
    result["seconds"] = time.time() - began
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouped_linear_bench.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nbf16; floor = weight bytes / {bandwidth:.0f} GB/s; ms are medians; % = floor / time")
    print("| layout | group | rows | floor ms | separate ms (%) | concatenated ms (%) | grouped ms (%) | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        pct = lambda ms: f"{ms:.4f} ({100 * r['floor_ms'] / ms:.0f}%)"  # noqa: E731
        print(f"| {r['layout']} | {r['group']} | {r['rows']} | {r['floor_ms']:.4f} | {pct(r['separate_ms'])} | "
              f"{pct(r['concatenated_ms'])} | {pct(r['grouped_ms'])} | {r['rel_err']:.1e} |")
    print("\nPer step (the groups of a layer times its layers): what the grouped projections save")
    print("| layout | rows | floor ms | separate ms | grouped q/k/v + gate/up, separate o + down ms | saved ms |")
    print("|---|---|---|---|---|---|")
    for (layout, rows), group_rows in itertools.groupby(result["rows"], key=lambda r: (r["layout"], r["rows"])):
        by_group = {r["group"]: r for r in group_rows}
        if set(by_group) != {"qkv", "gate_up", "o", "down"}:
            continue
        layers = LAYOUTS[layout][4]
        floor = layers * sum(r["floor_ms"] for r in by_group.values())
        separate = layers * sum(r["separate_ms"] for r in by_group.values())
        grouped = layers * (by_group["qkv"]["grouped_ms"] + by_group["gate_up"]["grouped_ms"]
                            + by_group["o"]["separate_ms"] + by_group["down"]["separate_ms"])
        print(f"| {layout} | {rows} | {floor:.3f} | {separate:.3f} | {grouped:.3f} | {separate - grouped:.3f} |")


if __name__ == "__main__":
    main()
