"""Decoding speed of transformers and LongSpec on the same prompts, measured in one run.

Methods (all greedy, batch 1, the same `max_new_tokens`):

- `hf_autoregressive`: `target.generate()`.
- `hf_prompt_lookup`: transformers' prompt lookup decoding (`prompt_lookup_num_tokens=10`).
- `hf_static_compiled`: `target.generate(cache_implementation="static")`, transformers' fastest path: a
  preallocated cache, and on CUDA the decoding forward compiled automatically (`torch.compile`,
  CUDA graphs). Each call gets a cache sized for it (not the largest of earlier calls); its compilation,
  once per cache size, happens in the untimed warm-up call of each prompt.
- `longspec_no_draft`: LongSpec's loop with an empty tree: its cache and attention, one token per target
  forward. It separates the infrastructure gain from the speculation gain.
- `longspec_chain`: LongSpec with widths `[1] * 5`.
- `longspec_tree`: LongSpec with the draft's default tree.
- `longspec_hybrid`: the default tree plus two prompt-lookup chains (`prompt_lookup_branches=2`).
- `longspec_hybrid_adaptive`: the hybrid tree, each round planned from measured costs (`adaptive=True`).
- `longspec_hybrid_short` / `longspec_hybrid_long`: the hybrid tree with chains of 7 / 12 tokens
  (`prompt_lookup_length`; the default is 16).
- `longspec_hybrid_leaf`: the hybrid tree plus a chain under the draft's best deepest node
  (`prompt_lookup_under_draft=True`).
- `longspec_tree_deep`: a tree of seven levels (`DEEP_TREE`), two below the default's five.
- `longspec_tree_deep_adaptive`: that tree, each round verifying as many of its levels as the measured
  acceptance and round costs make worth it (`adaptive=True`).
- `longspec_tree_whole_vocab`: the default tree with a copy of the draft that drafts over the whole
  vocabulary (`set_draft_vocabulary(None)`), against a draft saved with a draft vocabulary.

`longspec_*_eager` variants run the same loop without CUDA graphs (`cuda_graphs=False`), which shows
what the graphs save. Every LongSpec method but the eager ones uses them on a CUDA target.
`longspec_*_compiled` variants also run the draft block through `torch.compile` (`compile_draft=True`);
`longspec_*_compiled_all` ones the target's verify forward too (`compile_target=True`), the no-draft loop
included.

For each method: tokens/s, speedups over the transformers baselines and over the no-draft loop that runs
on the same infrastructure (`longspec_tree_compiled_all` against `longspec_no_draft_compiled_all`, an eager
method against `longspec_no_draft_eager`, the others against `longspec_no_draft`), mean accepted tokens
per round (tau) with a histogram of accepted lengths, and whether the tokens equal the reference output
(else the common-prefix length): transformers' autoregressive `generate` when it runs, else the first
method.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from .generation import LongSpecStats
from .modeling import LongSpecDraftModel

# Two levels of 16 below the default tree: on held-out code the default's deepest level is reached in
# 30-58% of rounds (BENCHMARKS.md).
DEEP_TREE = [4, 16, 16, 16, 16, 16, 16]

METHODS = (
    "hf_autoregressive",
    "hf_static_compiled",
    "hf_prompt_lookup",
    "longspec_no_draft",
    "longspec_chain",
    "longspec_tree",
    "longspec_hybrid",
    "longspec_hybrid_adaptive",
)
EAGER_METHODS = ("longspec_no_draft_eager", "longspec_tree_eager")
COMPILED_METHODS = (
    "longspec_chain_compiled",
    "longspec_tree_compiled",
    "longspec_hybrid_compiled",
    "longspec_hybrid_adaptive_compiled",
    "longspec_no_draft_compiled_all",
    "longspec_chain_compiled_all",
    "longspec_tree_compiled_all",
    "longspec_hybrid_compiled_all",
    "longspec_hybrid_adaptive_compiled_all",
    "longspec_hybrid_short_compiled_all",
    "longspec_hybrid_long_compiled_all",
    "longspec_hybrid_leaf_compiled_all",
    "longspec_tree_deep_compiled_all",
    "longspec_tree_deep_adaptive_compiled_all",
)
# Not run by default: the same draft without its draft vocabulary, for an A/B against `longspec_tree`.
VOCABULARY_METHODS = ("longspec_tree_whole_vocab", "longspec_tree_whole_vocab_compiled_all")
# Not run by default: the draft config's fixed tree without lookup chains, against which the automatic
# round (`longspec_tree`: the defaults) is measured.
FIXED_TREE_METHODS = (
    "longspec_tree_fixed", "longspec_tree_fixed_compiled_all", "longspec_tree_fixed_lookup", "longspec_tree_fixed_lookup_compiled_all"
)
ALL_METHODS = METHODS + EAGER_METHODS + COMPILED_METHODS + VOCABULARY_METHODS + FIXED_TREE_METHODS


def method_kwargs(name: str, draft: LongSpecDraftModel) -> dict:
    if name == "hf_static_compiled":  # compiled by transformers itself, not a LongSpec `_compiled` variant
        return {"cache_implementation": "static"}
    if name.endswith("_eager"):
        return dict(method_kwargs(name.removesuffix("_eager"), draft), cuda_graphs=False)
    if name.endswith("_compiled_all"):
        base = method_kwargs(name.removesuffix("_compiled_all"), draft)
        return dict(base, compile_draft=True, compile_target=True)
    if name.endswith("_compiled"):
        return dict(method_kwargs(name.removesuffix("_compiled"), draft), compile_draft=True)
    return {
        "hf_autoregressive": {},
        "hf_prompt_lookup": {"prompt_lookup_num_tokens": 10},
        "longspec_no_draft": {"assistant_model": draft, "tree_widths": []},
        "longspec_chain": {"assistant_model": draft, "tree_widths": [1] * 5},
        "longspec_tree": {"assistant_model": draft},
        "longspec_tree_fixed": {"assistant_model": draft, "tree_widths": fixed_tree(draft), "prompt_lookup_branches": 0},
        "longspec_tree_fixed_lookup": {
            "assistant_model": draft, "tree_widths": fixed_tree(draft), "prompt_lookup_branches": 1, "prompt_lookup_length": 16
        },
        "longspec_hybrid": {"assistant_model": draft, "prompt_lookup_branches": 2},
        "longspec_hybrid_adaptive": {"assistant_model": draft, "prompt_lookup_branches": 2, "adaptive": True},
        "longspec_hybrid_short": {"assistant_model": draft, "prompt_lookup_branches": 2, "prompt_lookup_length": 7},
        "longspec_hybrid_long": {"assistant_model": draft, "prompt_lookup_branches": 2, "prompt_lookup_length": 12},
        "longspec_hybrid_leaf": {"assistant_model": draft, "prompt_lookup_branches": 2, "prompt_lookup_under_draft": True},
        "longspec_tree_deep": {"assistant_model": draft, "tree_widths": DEEP_TREE},
        "longspec_tree_deep_adaptive": {"assistant_model": draft, "tree_widths": DEEP_TREE, "adaptive": True},
        "longspec_tree_whole_vocab": {"assistant_model": whole_vocabulary_copy(draft)},
    }[name]


def fixed_tree(draft: LongSpecDraftModel) -> list[int]:
    """The tree of the draft's generation config (else its config): what a call used before the automatic round."""
    widths = getattr(getattr(draft, "generation_config", None), "tree_widths", None)
    return list(widths if widths is not None else draft.config.tree_widths)


@functools.lru_cache(maxsize=2)
def whole_vocabulary_copy(draft: LongSpecDraftModel) -> LongSpecDraftModel:
    """A copy of `draft` that drafts over the whole vocabulary; one per draft, so that its CUDA graphs
    are kept between calls like the draft's own."""
    if draft.draft_vocab_ids is None:
        return draft
    # Built anew rather than deep-copied: the draft holds its target's modules and its kept buffers.
    config = copy.deepcopy(draft.config)
    config.draft_vocab_size = None
    whole = LongSpecDraftModel(config)
    whole.load_state_dict({k: v for k, v in draft.state_dict().items() if k != "draft_vocab_ids"})
    whole.generation_config = copy.deepcopy(draft.generation_config)
    return whole.to(draft.device, draft.dtype).eval()


def fresh_static_cache(target: PreTrainedModel) -> None:
    """Forget the static cache of earlier calls, so that the next `cache_implementation="static"` call gets a
    cache of its own length: transformers keeps the longest length seen (`_previous_max_cache_length`;
    older versions keep the cache itself as `_cache`), and a short prompt after a long one would then
    decode over the long cache."""
    for attribute in ("_cache", "_previous_max_cache_length"):
        vars(target).pop(attribute, None)


def describe_device(device: str | torch.device) -> str:
    """`NVIDIA H200`-style GPU names; for a CPU its model name and core count (`platform.processor()` is
    empty on many Linux systems)."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


@dataclass
class Measurement:
    context: int
    prompt: int
    method: str
    tokens_per_s: float
    seconds: float
    new_tokens: int
    reference: str  # the method whose output this one is compared with
    equal_to_reference: bool
    common_prefix: int
    tau: float | None = None
    accepted_lengths: list[int] = field(default_factory=list)
    round_shape: str = ""  # LongSpec: the tree's widths and lookup chains the call used


class StopAfter(StoppingCriteria):
    """Stop every row once the sequence is `length` tokens long."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


def reference_method(methods: tuple[str, ...] | list[str]) -> str:
    """The method every output is compared with: transformers' autoregressive `generate` when it runs."""
    return "hf_autoregressive" if "hf_autoregressive" in methods else methods[0]


def no_draft_baseline(method: str) -> str:
    """The no-draft loop on the same infrastructure as `method` (CUDA graphs or not, compiled target or not);
    compiling the draft alone changes nothing for a loop without one."""
    for suffix in ("_eager", "_compiled_all"):
        if method.endswith(suffix):
            return "longspec_no_draft" + suffix
    return "longspec_no_draft"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[-1], b.shape[-1])
    differ = (a[0, :n] != b[0, :n]).nonzero()
    return int(differ[0]) if len(differ) else n


def run_benchmark(
    target: PreTrainedModel,
    draft: LongSpecDraftModel,
    prompts: dict[int, list[torch.Tensor]],
    new_tokens: int,
    methods: tuple[str, ...] = METHODS,
    progress=print,
) -> list[Measurement]:
    """Time every method on every prompt (`prompts[context]` = list of `(1, context)` id tensors)."""
    device = target.device
    reference_name = reference_method(methods)
    # The reference runs first on every prompt, so every other output is compared with it.
    methods = (reference_name, *(m for m in methods if m != reference_name))
    vocab_size = target.get_output_embeddings().weight.shape[0]
    warm = torch.randint(min(100, vocab_size // 2), min(1000, vocab_size), (1, 64), device=device)
    for name in methods:
        if name.startswith("hf_static"):
            fresh_static_cache(target)
        target.generate(warm, max_new_tokens=16, do_sample=False, **method_kwargs(name, draft))
    results = []
    for context, context_prompts in prompts.items():
        for index, ids in enumerate(context_prompts):
            ids = ids.to(device)
            reference = None
            for name in methods:
                kwargs = method_kwargs(name, draft)
                stats = LongSpecStats() if "assistant_model" in kwargs else None
                if stats is not None:
                    kwargs["longspec_stats"] = stats
                if name.startswith("hf_static"):
                    fresh_static_cache(target)
                # An untimed short run on the same prompt first: first-use costs of new shapes (kernel
                # selection, allocator growth, CUDA graph capture) are paid once per prompt length in a
                # server, not per call. It asks for the same max_new_tokens (the same buffer sizes) and
                # stops after 16 tokens.
                target.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1] + 16)]),
                    **kwargs,
                )
                if stats is not None:
                    stats.reset()
                _synchronize(device)
                start = time.perf_counter()
                out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
                _synchronize(device)
                seconds = time.perf_counter() - start
                generated = out[:, ids.shape[1] :]
                reference = generated if reference is None else reference
                result = Measurement(
                    context=context,
                    prompt=index,
                    method=name,
                    tokens_per_s=generated.shape[1] / seconds,
                    seconds=seconds,
                    new_tokens=generated.shape[1],
                    reference=reference_name,
                    equal_to_reference=bool(torch.equal(generated, reference)),
                    common_prefix=_common_prefix(generated, reference),
                    tau=stats.mean_accepted_length if stats is not None else None,
                    accepted_lengths=list(stats.accepted_lengths) if stats is not None else [],
                    round_shape=stats.round_shape if stats is not None else "",
                )
                results.append(result)
                progress(
                    f"context {context} prompt {index} {name}: {result.tokens_per_s:.1f} tok/s"
                    + (f", tau {result.tau:.2f}, {result.round_shape}" if result.tau is not None else "")
                )
    return results


def summary_rows(results: list[Measurement]) -> list[dict]:
    """One row per (context, method): medians over prompts; speedups against both transformers baselines and
    the no-draft loop of the same infrastructure ([`no_draft_baseline`]), None where that did not run."""
    rows = []
    for context in sorted({r.context for r in results}):
        at_context = [r for r in results if r.context == context]

        def median_tps(method: str) -> float | None:
            values = [r.tokens_per_s for r in at_context if r.method == method]
            return statistics.median(values) if values else None

        autoregressive, lookup = median_tps("hf_autoregressive"), median_tps("hf_prompt_lookup")
        static = median_tps("hf_static_compiled")
        for method in dict.fromkeys(r.method for r in at_context):
            runs = [r for r in at_context if r.method == method]
            tps = median_tps(method)
            no_draft = median_tps(no_draft_baseline(method))
            taus = [r.tau for r in runs if r.tau is not None]
            rows.append(
                {
                    "context": context,
                    "method": method,
                    "tokens_per_s": tps,
                    "vs_hf_autoregressive": tps / autoregressive if autoregressive else None,
                    "vs_hf_static_compiled": tps / static if static else None,
                    "vs_hf_prompt_lookup": tps / lookup if lookup else None,
                    "vs_longspec_no_draft": tps / no_draft if no_draft else None,
                    "no_draft_method": no_draft_baseline(method) if no_draft else None,
                    "tau": statistics.mean(taus) if taus else None,
                    "reference": runs[0].reference,
                    "equal": sum(r.equal_to_reference for r in runs),
                    "runs": len(runs),
                    "common_prefix": [r.common_prefix for r in runs],
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    reference = rows[0]["reference"] if rows else "hf_autoregressive"
    lines = [
        f"| context | method | tok/s | vs HF AR | vs HF static+compile | vs HF lookup | vs no-draft loop | tau | "
        f"equal to {reference} (common prefix) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tau = f"{row['tau']:.2f}" if row["tau"] is not None else "-"
        prefixes = ",".join(map(str, row["common_prefix"]))
        lines.append(
            f"| {row['context']} | {row['method']} | {row['tokens_per_s']:.1f} | {ratio(row['vs_hf_autoregressive'])} | "
            f"{ratio(row.get('vs_hf_static_compiled'))} | {ratio(row['vs_hf_prompt_lookup'])} | {ratio(row['vs_longspec_no_draft'])} | {tau} | "
            f"{row['equal']}/{row['runs']} ({prefixes}) |"
        )
    return "\n".join(lines)


def report_meta(results: list[Measurement], meta: dict | None, device: str | torch.device | None = None) -> dict:
    """`meta` with what the report needs to say where it was measured: a device name (from `device`, or the
    CPU's description where the name is empty: `platform.processor()` gives "" on many Linux systems) and
    the new tokens per call (from the results when `meta` lacks them)."""
    meta = dict(meta or {})
    if not meta.get("device") and (device is not None or "device" in meta):
        meta["device"] = describe_device(device if device is not None else "cpu")
    if meta.get("new_tokens") is None and results:
        meta["new_tokens"] = max(r.new_tokens for r in results)
    return meta


def plot_caption(meta: dict) -> str:
    """One line for every plot: device, dtype and new tokens per call (what the numbers depend on)."""
    parts = [str(meta.get("device") or "unknown device"), str(meta.get("dtype") or "unknown dtype"),
             f"{meta['new_tokens']} new tokens per prompt" if meta.get("new_tokens") is not None else None,
             "greedy, batch 1"]
    if meta.get("target"):
        parts.append(f"target {meta['target']}")
    return ", ".join(p for p in parts if p)


def write_report(
    results: list[Measurement], out_dir: str | Path, meta: dict | None = None, device: str | torch.device | None = None
) -> dict[str, Path]:
    """`results.json`, `results.md` and, when matplotlib is installed, `speed.png` and `accepted_lengths.png`.

    The plots say the device, dtype and new tokens per prompt (`meta`'s `device`, `dtype`, `new_tokens`);
    see [`report_meta`] for the values filled in when `meta` lacks them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = report_meta(results, meta, device)
    rows = summary_rows(results)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    payload = {"meta": meta, "summary": rows, "runs": [r.__dict__ for r in results]}
    files["json"].write_text(json.dumps(payload, indent=1))
    files["markdown"].write_text(markdown_table(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    caption = plot_caption(meta)
    contexts = sorted({r["context"] for r in rows})
    # Speedups over transformers' generate when it ran, else over the matching no-draft loop.
    baseline, baseline_label = (
        ("vs_hf_autoregressive", "HF autoregressive")
        if any(r["vs_hf_autoregressive"] is not None for r in rows)
        else ("vs_longspec_no_draft", "the no-draft loop")
    )
    figure, (speed, speedup) = plt.subplots(1, 2, figsize=(11, 4.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["context"], r) for r in rows if r["method"] == method]
        speed.plot([c for c, _ in points], [r["tokens_per_s"] for _, r in points], marker="o", label=method)
        ratios = [float("nan") if r[baseline] is None else r[baseline] for _, r in points]
        speedup.plot([c for c, _ in points], ratios, marker="o", label=method)
    speed.set(xlabel="prompt tokens", ylabel="tokens/s", xticks=contexts, title="decoding speed")
    speedup.set(xlabel="prompt tokens", ylabel=f"speedup over {baseline_label}", xticks=contexts, title="speedup")
    speed.legend(fontsize=8)
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout()
    files["speed_plot"] = out / "speed.png"
    figure.savefig(files["speed_plot"], dpi=120)
    plt.close(figure)
    tree_method = next((r.method for r in results if r.method.startswith("longspec_tree")), None)
    counts = Counter(n for r in results if r.method == tree_method for n in r.accepted_lengths)
    if counts:
        figure, axis = plt.subplots(figsize=(5.5, 3.9))
        lengths = sorted(counts)
        axis.bar(lengths, [counts[n] for n in lengths])
        axis.set(xlabel="tokens gained per round", ylabel="rounds", title=f"{tree_method}: accepted lengths")
        figure.suptitle(caption, fontsize=7)
        figure.tight_layout()
        files["histogram"] = out / "accepted_lengths.png"
        figure.savefig(files["histogram"], dpi=120)
        plt.close(figure)
    return files
