"""Where the time of a LongSpec round goes, on a target shaped like SmolLM2-135M or an 8B model (random weights).

Round costs do not depend on the weights, only on the shapes, so this needs no checkpoint: the target
is a random model of SmolLM2-135M's layout with the bundled draft (random weights would do as well), or
with `--layout llama-3.1-8b` / `qwen2.5-7b` one of `bench/scale.py`'s layouts with a random draft. For each method it reports the wall time per round and, from CUDA events around every graph
replay, the GPU time of the draft's tree proposal and of the verify forward; the rest of a round is
eager launches and host work. `--profile` adds a torch.profiler table of host time per op,
`--profile-graphs` the kernels inside each captured graph (count and device time per replay).

    PYTHONPATH=. python bench/round_cost.py --context 4096 --out $OUT
    PYTHONPATH=. python bench/round_cost.py --layout llama-3.1-8b --context 131072 --new-tokens 64 \
        --methods no_draft_compiled_all tree_compiled_all --profile-graphs --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict

import torch
from graph_nodes import KeptGraphs, describe
from transformers import LlamaConfig, LlamaForCausalLM

import longspec_hf  # noqa: F401  (registers the draft with AutoModel)
from longspec_hf import LongSpecStats
from longspec_hf.assets import bundled_draft_dir
from longspec_hf.generation import cuda_graphs
from longspec_hf.modeling import LongSpecDraftModel

SMOLLM2_LAYOUT = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)

METHODS = {
    "no_draft": dict(tree_widths=[]),
    "tree": dict(),
    "hybrid": dict(prompt_lookup_branches=2),
    "tree_compiled": dict(compile_draft=True),
    "hybrid_compiled": dict(prompt_lookup_branches=2, compile_draft=True),
    "hybrid_adaptive_compiled": dict(prompt_lookup_branches=2, compile_draft=True, adaptive=True),
    "no_draft_compiled_all": dict(tree_widths=[], compile_target=True),
    "tree_compiled_all": dict(compile_draft=True, compile_target=True),
    "hybrid_compiled_all": dict(prompt_lookup_branches=2, compile_draft=True, compile_target=True),
    "hybrid_leaf_compiled_all": dict(
        prompt_lookup_branches=2, prompt_lookup_under_draft=True, compile_draft=True, compile_target=True
    ),
}


def make_models(layout: str, device: torch.device) -> tuple[torch.nn.Module, LongSpecDraftModel]:
    """A random bf16 target of `layout` and its draft: the bundled one for SmolLM2's layout, a random one
    for the 8B layouts (`bench/scale.py`'s models)."""
    if layout != "smollm2":
        from scale import build_models

        return build_models(layout, device, torch.bfloat16, seed=0)
    target = LlamaForCausalLM(LlamaConfig(**SMOLLM2_LAYOUT)).to(device, torch.bfloat16).eval()
    return target, LongSpecDraftModel.from_pretrained(bundled_draft_dir()).to(device, torch.bfloat16)


class GraphTimer:
    """Records CUDA events around every `GraphedCall` replay, keyed by the wrapped function's name."""

    def __init__(self):
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self.calls: dict[str, cuda_graphs.GraphedCall] = {}
        self.original = cuda_graphs.GraphedCall.__call__

    def __enter__(self):
        timer = self

        def timed_call(call):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timer.original(call)
            end.record()
            fn = call.fn
            name = getattr(getattr(fn, "func", fn), "__name__", "graph")
            timer.events[name].append((start, end))
            timer.calls[name] = call
            return result

        cuda_graphs.GraphedCall.__call__ = timed_call
        return self

    def __exit__(self, *exc):
        cuda_graphs.GraphedCall.__call__ = self.original

    def median_ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        out = {}
        for name, pairs in self.events.items():
            times = sorted(s.elapsed_time(e) for s, e in pairs[1:])  # the first call captures
            out[name] = times[len(times) // 2] if times else float("nan")
        return out


def launch_cost(call: cuda_graphs.GraphedCall, replays: int = 20) -> dict[str, float]:
    """Host ms per `replay()` call with the device idle before each call (`idle_host_ms`) and with replays
    queued back to back (`host_ms`), and GPU ms per replay when queued back to back."""
    graph = call.graph
    idle = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        idle.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    host = 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        t0 = time.perf_counter()
        graph.replay()
        host += time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return dict(host_ms=1e3 * host / replays, idle_host_ms=1e3 * sorted(idle)[len(idle) // 2],
                gpu_ms=start.elapsed_time(end) / replays, nodes=graph_nodes(graph))


def graph_nodes(graph: torch.cuda.CUDAGraph) -> int:
    try:  # needs cuda-python; -1 without it
        from cuda.bindings import runtime

        _, _, count = runtime.cudaGraphGetNodes(graph.raw_cuda_graph(), 0)
        return int(count)
    except Exception:
        return -1


def profile_round(target, prompt, kwargs, out: str, method: str) -> None:
    """torch.profiler over 32 eager tokens: GPU time and launches per op, so the ops inside graphs show."""
    from torch.profiler import ProfilerActivity, profile

    stats = LongSpecStats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        target.generate(prompt, max_new_tokens=32, cuda_graphs=False, longspec_stats=stats, **kwargs)
    rounds = stats.rounds
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"--- {method}, eager: {rounds} rounds, {launches / rounds:.0f} kernel launches and {gpu_ms / rounds:.3f} ms of kernel time per round")
    print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))


def profile_graphs(calls: dict[str, cuda_graphs.GraphedCall], method: str, replays: int = 10) -> None:
    """torch.profiler over replays of each captured graph: kernels per replay and device time by kernel."""
    from torch.profiler import ProfilerActivity, profile

    for name, call in calls.items():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                call.graph.replay()
            torch.cuda.synchronize()
        by_kernel = defaultdict(lambda: [0, 0.0])
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                by_kernel[event.name[:90]][0] += 1
                by_kernel[event.name[:90]][1] += event.device_time_total
        kernels = sum(count for count, _ in by_kernel.values()) / replays
        busy_ms = sum(us for _, us in by_kernel.values()) / replays / 1e3
        print(f"--- {method}, graph {name}: {kernels:.0f} kernels, {busy_ms:.3f} ms busy per replay")
        for kernel, (count, us) in sorted(by_kernel.items(), key=lambda item: -item[1][1])[:45]:
            print(f"{count / replays:6.0f} {us / replays:9.1f} us  {kernel}")


def profile_host(target, prompt, kwargs, method: str, new_tokens: int, trace_dir: str | None = None) -> None:
    """torch.profiler with graphs: host time per op, what the graphs leave on the host. With `trace_dir`,
    also the device's activity and a Chrome trace of the call (host ops and kernels on one timeline)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trace_dir else [])
    stats = LongSpecStats()
    with profile(activities=activities, with_stack=False) as prof:
        target.generate(prompt, max_new_tokens=new_tokens, longspec_stats=stats, **kwargs)
    rounds = stats.rounds
    print(f"--- {method}, graphs: host time per op over {rounds} rounds")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50))
    if trace_dir:
        prof.export_chrome_trace(os.path.join(trace_dir, f"{method}_trace.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--layout", default="smollm2", choices=["smollm2", "llama-3.1-8b", "qwen2.5-7b"])
    parser.add_argument("--method", action="append", default=[], metavar="NAME=JSON",
                        help="an extra method: generate keyword arguments as JSON, e.g. 'wide={\"tree_widths\": [4, 8]}', "
                             "and optionally \"draft_vocab_size\": N")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler GPU time per op (eager)")
    parser.add_argument("--profile-host", action="store_true", help="also print host time per op (with graphs)")
    parser.add_argument("--profile-graphs", action="store_true", help="also print the kernels inside each graph")
    parser.add_argument("--trace", action="store_true", help="with --profile-host, also write a Chrome trace")
    parser.add_argument("--graph-nodes", action="store_true",
                        help="also describe each graph's nodes (types, roots, cluster launches) and dump it as DOT")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    for spec in args.method:
        name, _, options = spec.partition("=")
        METHODS[name] = json.loads(options or "{}")
        args.methods.append(name)

    torch.manual_seed(0)
    device = torch.device("cuda")
    target, draft = make_models(args.layout, device)
    # No EOS, no logits processors: every call runs its full length on the greedy graph path.
    target.generation_config.pad_token_id = 0
    target.generation_config.eos_token_id = None
    prompt = torch.randint(100, target.config.vocab_size, (1, args.context), device=device)
    own_vocabulary = draft.draft_vocab_ids
    results = {}
    for method in args.methods:
        options = dict(METHODS[method])
        # `draft_vocab_size` (a method option of this script, not of generate): the draft scores only the
        # first that many token ids, as a draft with a draft vocabulary reads that many rows of the LM head.
        vocab = options.pop("draft_vocab_size", None)
        draft.set_draft_vocabulary(own_vocabulary if vocab is None else range(vocab))
        kwargs = dict(assistant_model=draft, do_sample=False, **options)
        # Warm-up of the same shape: Triton compilation, cuBLAS, and the graphs, kept for the timed call.
        with KeptGraphs() if args.graph_nodes else contextlib.nullcontext():
            target.generate(prompt, max_new_tokens=args.new_tokens, **kwargs)
        stats = LongSpecStats()
        with GraphTimer() as timer:
            torch.cuda.synchronize()
            start = time.perf_counter()
            target.generate(prompt, max_new_tokens=args.new_tokens, longspec_stats=stats, **kwargs)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        graphs = timer.median_ms()
        launch = {name: launch_cost(call) for name, call in timer.calls.items()}
        row = dict(
            rounds=stats.rounds,
            tau=stats.mean_accepted_length,
            wall_ms_per_round=1e3 * wall / stats.rounds,
            graph_gpu_ms=graphs,
            graph_launch=launch,
        )
        if args.graph_nodes:
            row["graph_nodes"] = {name: describe(call.graph, os.path.join(args.out, f"{method}_{name}.dot"))
                                  for name, call in timer.calls.items()}
        results[method] = row
        print(method, json.dumps(row))
        if args.profile:
            profile_round(target, prompt, kwargs, args.out, method)
        if args.profile_graphs:
            profile_graphs(timer.calls, method)
        if args.profile_host:
            profile_host(target, prompt, kwargs, method, args.new_tokens, args.out if args.trace else None)
    with open(os.path.join(args.out, "round_cost.json"), "w") as f:
        json.dump(results, f, indent=1)
    graphs = ("propose_tree", "merge_positions_verify")
    print("| method | rounds | tau | wall ms/round | draft graph GPU ms | verify graph GPU ms |")
    for method, row in results.items():
        gpu = [row["graph_gpu_ms"].get(name, float("nan")) for name in graphs]
        print(f"| {method} | {row['rounds']} | {row['tau']:.2f} | {row['wall_ms_per_round']:.3f} | {gpu[0]:.3f} | {gpu[1]:.3f} |")


if __name__ == "__main__":
    main()
