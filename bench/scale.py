"""Round costs and memory at users' scale: random-weight targets of real 7-8B layouts at 4k-128k tokens.

Speed and memory depend on shapes, not weights, so each target is a random model with a real layout
(`LAYOUTS`: Llama-3.1-8B, Qwen2.5-7B), built directly on the GPU in bf16, with a random draft from
`LongSpecDraftConfig.from_target_config`. With random weights the draft's proposals are (almost) never
accepted, so this times rounds, not tokens: for every method of `METHODS` and every (batch, context),

- ms per round: the wall time of a `generate` call with `--new-tokens` new tokens after its prefill,
  divided by its rounds (`LongSpecStats.rounds`; for transformers' own loop, one step per token after
  the first). Round ends are the moments the streamer receives each round's tokens, which the host can
  only do after the device finished that round; the first `--skip-rounds` rounds (graph capture,
  compilation, autotuning of a new shape) are left out and reported as "first use" seconds. The median
  over the calls after the first (contexts below `--single-call-from`), else the one call's value.
- prefill seconds: from the call's start to its first token.
- memory beyond the weights: peak (`torch.cuda.max_memory_allocated` after a reset) and resident
  (`memory_allocated` after the calls: what the method keeps, e.g. LongSpec's workspace or transformers'
  static cache), and the device's used memory (`torch.cuda.mem_get_info`) after the calls.
- the floor of one step: (weight bytes read per step + KV bytes of the context) / the copy bandwidth
  measured in the same run (a large device-to-device copy, read + write bytes, CUDA events). The
  input embedding table is not read by a step (one row per token) and is left out when it is not
  tied to the LM head.
- projected tokens/s = batch x tau / ms per round, with tau of the same tree shape measured on the real
  SmolLM2-135M pair (`--tau-file`, written by `bench/draft_tau.py`; 1 for the no-draft loop and
  transformers). Always labelled "projected": it is never a measured speed.

Results: `scale.json` (rewritten after every case, so a run cut short keeps what it measured),
`scale.md` (also printed last) and `scale.png` (ms per round against context, one line per method) under
`--out-dir`. Cases that cannot run are listed with the reason: not enough memory, or `--budget-s` (the
predicted time of the case would pass the budget), or `--skip METHOD@CONTEXT`.

    PYTHONPATH=. python bench/scale.py --models llama-3.1-8b --tau-file bench/results/scale_tau_cpu/draft_tau.json \\
        --out-dir $OUT --budget-s 330
    python bench/scale.py --device cpu --tiny --out-dir /tmp/scale     # every code path, on a tiny model

Methods are a table of name -> `generate` keyword arguments (`METHODS`): adding one is one line.
`--longspec-method NAME=JSON` adds a LongSpec method from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.streamers import BaseStreamer

import longspec_hf
from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats

GIB = 1 << 30
# Room past the longest context for the new tokens and the deepest tree.
POSITION_MARGIN = 2048
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
LAYOUTS: dict[str, tuple[type, type, dict]] = {
    "llama-3.1-8b": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=131072 + POSITION_MARGIN, tie_word_embeddings=False)),
    "qwen2.5-7b": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=131072 + POSITION_MARGIN, tie_word_embeddings=False)),
    # For checking every code path on a CPU (`--tiny`): the Llama-3.1 layout's structure, tiny sizes.
    "tiny-llama": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=16384, tie_word_embeddings=False)),
}

DEFAULT_TREE = [4, 16, 16, 16, 16]
SMALL_TREE = [2, 4, 4, 4]
DRAFT = "<draft>"  # stands for the draft model in METHODS
DRAFT_VOCAB = "<draft vocabulary size>"  # a method's draft vocabulary: the first that many token ids
ENVIRONMENT = "<environment>"  # variables set while a method's calls run
LONGSPEC = {"assistant_model": DRAFT}
COMPILED = {"compile_draft": True, "compile_target": True}
# The compiled target with the projections of one input grouped into one kernel (fused_projections.py; the
# default), and without it: every projection a cuBLAS product.
FUSED = {ENVIRONMENT: {"LONGSPEC_HF_FUSED_PROJECTIONS": "1"}}
CUBLAS = {ENVIRONMENT: {"LONGSPEC_HF_FUSED_PROJECTIONS": "0"}}
# ... and every other projection too (output, down, LM head) through the same kernel.
FUSED_ALL = {ENVIRONMENT: {"LONGSPEC_HF_FUSED_PROJECTIONS": "all"}}
# name -> generate keyword arguments (besides the prompt, max_new_tokens, do_sample=False, the streamer and
# longspec_stats). LongSpec methods run with CUDA graphs on a CUDA target ("graphs": the steps captured,
# "compiled": also through torch.compile). Display order; `--methods` gives the run order.
METHODS: dict[str, dict] = {
    "hf_eager": {},  # transformers' generate, DynamicCache
    "hf_static_compiled": {"cache_implementation": "static"},  # its static cache, compiled automatically on CUDA
    "no_draft_graphs": {**LONGSPEC, "tree_widths": []},
    "no_draft_compiled": {**LONGSPEC, "tree_widths": [], **COMPILED},
    "tree_graphs": {**LONGSPEC, "tree_widths": DEFAULT_TREE},
    "tree_compiled": {**LONGSPEC, "tree_widths": DEFAULT_TREE, **COMPILED},
    "small_tree_graphs": {**LONGSPEC, "tree_widths": SMALL_TREE},
    "small_tree_compiled": {**LONGSPEC, "tree_widths": SMALL_TREE, **COMPILED},
    # No tree_widths: the tree generate chooses for the context (the default); the case records it.
    "auto_tree_graphs": {**LONGSPEC},
    "auto_tree_compiled": {**LONGSPEC, **COMPILED},
    # The draft scoring a 32768-token draft vocabulary (`longspec draft-vocab`; the bundled SmolLM2 draft,
    # whose tau the projections use, drafts over 16384 of 49152 tokens): each draft level reads a quarter
    # of the LM head.
    "auto_tree_vocab_compiled": {**LONGSPEC, **COMPILED, DRAFT_VOCAB: 32768},
    "no_draft_fused_compiled": {**LONGSPEC, "tree_widths": [], **COMPILED, **FUSED},
    "auto_tree_fused_compiled": {**LONGSPEC, **COMPILED, **FUSED},
    "auto_tree_vocab_fused_compiled": {**LONGSPEC, **COMPILED, DRAFT_VOCAB: 32768, **FUSED},
    "no_draft_cublas_compiled": {**LONGSPEC, "tree_widths": [], **COMPILED, **CUBLAS},
    "auto_tree_vocab_cublas_compiled": {**LONGSPEC, **COMPILED, DRAFT_VOCAB: 32768, **CUBLAS},
    "no_draft_fused_all_compiled": {**LONGSPEC, "tree_widths": [], **COMPILED, **FUSED_ALL},
    "auto_tree_vocab_fused_all_compiled": {**LONGSPEC, **COMPILED, DRAFT_VOCAB: 32768, **FUSED_ALL},
}


def is_longspec(name: str) -> bool:
    return METHODS[name].get("assistant_model") is DRAFT


def tree_of(name: str) -> tuple[int, ...] | None:
    """The method's tree widths (() for the no-draft loop), None for transformers or a tree generate chooses."""
    if not is_longspec(name):
        return ()
    widths = METHODS[name].get("tree_widths")
    return tuple(widths) if widths is not None else None


def compiles(name: str) -> bool:
    kwargs = METHODS[name]
    return bool(kwargs.get("compile_target") or kwargs.get("compile_draft") or kwargs.get("cache_implementation") == "static")


def generate_kwargs(name: str, draft: LongSpecDraftModel) -> dict:
    """`METHODS[name]` with the draft in place of `DRAFT` (lists copied); sets the draft's vocabulary to
    the method's `DRAFT_VOCAB` (at most the target's vocabulary; the whole vocabulary without one)."""
    options = dict(METHODS[name])
    options.pop(ENVIRONMENT, None)
    vocab = options.pop(DRAFT_VOCAB, None)
    if vocab is not None:
        vocab = min(vocab, draft.config.target_vocab_size)
    # Only a change of vocabulary makes a new head (and so a new workspace): the calls of one method share one.
    if draft.config.draft_vocab_size != vocab:
        draft.set_draft_vocabulary(None if vocab is None else range(vocab))
    return {k: draft if v is DRAFT else (list(v) if isinstance(v, list) else v) for k, v in options.items()}


def add_longspec_method(spec: str) -> str:
    """`NAME=JSON` -> a LongSpec method with those generate arguments; returns NAME."""
    name, _, options = spec.partition("=")
    if not name or name in METHODS:
        raise SystemExit(f"--longspec-method needs a new NAME=JSON, got {spec!r}")
    METHODS[name] = {**LONGSPEC, **json.loads(options or "{}")}
    return name


# ----- bytes and the floor ----------------------------------------------------------------------------------
def kv_bytes_per_token(config, element_size: int) -> int:
    """K and V of one token in every layer."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes_read_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: all but the input embedding table, of which a step reads
    one row per token (unless it is also the LM head)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def floor_ms(weights_read: int, kv_per_token: int, batch: int, context: int, bandwidth: float) -> float:
    """ms of one step that reads the weights once and the KV of `context` tokens of `batch` rows once."""
    return 1e3 * (weights_read + batch * context * kv_per_token) / bandwidth


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written), median of `repeats`."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 3:
            times.append(seconds)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ----- tau of real drafts ------------------------------------------------------------------------------------
def load_tau(path: str | Path | None) -> dict[tuple[int, ...], dict]:
    """`{tree widths: {"tau", "context", "draft"}}` from `bench/draft_tau.py`'s JSON: greedy rows at the
    longest context each shape was measured at (rows without `tree_widths` name "default", which is the
    bundled draft's [4, 16, 16, 16, 16])."""
    if path is None:
        return {}
    taus: dict[tuple[int, ...], dict] = {}
    for row in json.loads(Path(path).read_text()):
        if row.get("mode", "greedy") != "greedy":
            continue
        widths = row.get("tree_widths")
        if widths is None:
            widths = DEFAULT_TREE if row["tree"] == "default" else [int(w) for w in row["tree"].split(",") if w]
        key = tuple(widths)
        if key not in taus or row["context"] > taus[key]["context"]:
            taus[key] = {"tau": row["tau"], "context": row["context"], "draft": row.get("draft")}
    return taus


def tau_for(name: str, taus: dict[tuple[int, ...], dict], chosen: list[int] | None = None) -> float | None:
    """Tokens per round: 1 for one-token decoding, the measured tau for a tree (the method's, else the
    tree generate `chosen` for the case), None when unknown."""
    tree = tree_of(name)
    if tree is None and chosen is not None:
        tree = tuple(chosen)
    if tree == ():
        return 1.0
    found = taus.get(tree) if tree is not None else None
    return found["tau"] if found else None


def projected_tokens_per_s(batch: int, tau: float | None, ms_per_round: float | None) -> float | None:
    if tau is None or not ms_per_round:
        return None
    return batch * tau * 1e3 / ms_per_round


# ----- one timed generate call -------------------------------------------------------------------------------
class RoundClock(BaseStreamer):
    """Host time of every `put`: the prompt, then each step's / round's tokens (batches: one column per
    put, the columns of one round in a burst)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def round_ends(put_times: list[float], burst_gap_s: float = 2e-4) -> list[float]:
    """The end of the prefill and of every round: puts after the prompt's, bursts (gaps under
    `burst_gap_s`, a batch's columns of one round) merged into their last put."""
    ends: list[float] = []
    for t in put_times[1:]:
        if ends and t - ends[-1] < burst_gap_s:
            ends[-1] = t
        else:
            ends.append(t)
    return ends


@dataclass
class Call:
    prefill_s: float
    rounds: int
    new_tokens: int
    wall_s: float
    ms_per_round_mean: float  # (wall - prefill) / rounds, every round
    ms_per_round: float  # the rounds after the first `skip` ones
    ms_per_round_median: float | None  # median of the rounds after the first `skip` ones
    first_rounds_extra_s: float  # the first `skip` rounds' time beyond `skip` steady rounds
    tau: float | None = None
    tree_widths: list[int] | None = None  # the tree the call verified (LongSpec)


def analyse_call(start: float, put_times: list[float], end: float, rounds: int, new_tokens: int, skip: int,
                 tau: float | None = None, tree_widths: list[int] | None = None) -> Call:
    ends = round_ends(put_times)
    prefill_end = ends[0] if ends else end
    mean = 1e3 * (end - prefill_end) / max(rounds, 1)
    steady, median, extra = mean, None, 0.0
    if len(ends) == rounds + 1 and rounds > 1:
        k = min(skip, rounds // 4)
        steady = 1e3 * (ends[-1] - ends[k]) / (rounds - k)
        intervals = [b - a for a, b in zip(ends[k:], ends[k + 1:])]
        median = 1e3 * statistics.median(intervals)
        extra = max(0.0, (ends[k] - ends[0]) - k * steady / 1e3)
    return Call(prefill_s=prefill_end - start, rounds=rounds, new_tokens=new_tokens, wall_s=end - start,
                ms_per_round_mean=mean, ms_per_round=steady, ms_per_round_median=median,
                first_rounds_extra_s=extra, tau=tau, tree_widths=tree_widths)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(target, draft, name: str, prompt: torch.Tensor, new_tokens: int, skip: int) -> Call:
    kwargs = generate_kwargs(name, draft)
    # A random draft is never accepted: what its calls would teach the running prior is not what a trained
    # draft's teach, so every call sizes its tree from the draft's prior, as a trained draft's first call.
    longspec_hf.forget_acceptance(draft)
    stats = LongSpecStats() if is_longspec(name) else None
    if stats is not None:
        kwargs["longspec_stats"] = stats
    clock = RoundClock()
    synchronize(prompt.device)
    start = time.perf_counter()
    with environment(METHODS[name].get(ENVIRONMENT, {})):
        out = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, streamer=clock, **kwargs)
    synchronize(prompt.device)
    end = time.perf_counter()
    generated = out.shape[1] - prompt.shape[1]
    # transformers: the prefill gives the first token, then one forward per token.
    rounds = stats.rounds if stats is not None else generated - 1
    tau = stats.mean_accepted_length if stats is not None else None
    tree = list(stats.tree_widths) if stats is not None else None
    return analyse_call(start, clock.times, end, rounds, generated, skip, tau, tree)


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """`os.environ` updated with `variables` inside the block."""
    outside = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in outside.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----- memory ----------------------------------------------------------------------------------------------------
def release(target, draft) -> None:
    """Drop what a method keeps between calls: LongSpec's workspace, transformers' static cache."""
    longspec_hf.release_workspace(draft)
    for attribute in ("_cache", "_previous_max_cache_length"):
        vars(target).pop(attribute, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryWatch:
    """Peak and resident memory beyond `base` (the weights) over a region; CUDA only."""

    def __init__(self, device: torch.device, base: int):
        self.cuda = device.type == "cuda"
        self.base = base
        self.values: dict[str, float | None] = {}

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if not self.cuda:
            self.values = dict(peak_gib=None, resident_gib=None, reserved_gib=None, device_used_gib=None)
            return
        free, total = torch.cuda.mem_get_info()
        self.values = dict(
            peak_gib=(torch.cuda.max_memory_allocated() - self.base) / GIB,
            resident_gib=(torch.cuda.memory_allocated() - self.base) / GIB,
            reserved_gib=(torch.cuda.memory_reserved() - self.base) / GIB,
            device_used_gib=(total - free) / GIB,
        )


def prefill_transient_bytes(config, batch: int, context: int, element_size: int) -> int:
    """A rough peak of an unchunked prefill beyond the KV cache: the MLP's three intermediate activations
    and a few hidden-size ones, for every token at once."""
    config = config.get_text_config()
    return batch * context * (3 * config.intermediate_size + 4 * config.hidden_size) * element_size


# ----- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    model: str
    batch: int
    context: int
    method: str
    floor_ms: float | None = None
    tau: float | None = None
    tau_measured_here: float | None = None  # mean accepted length of these random-weight calls
    tree_widths: list[int] | None = None  # the tree the calls verified (LongSpec; chosen by generate for auto_tree)
    ms_per_round: float | None = None
    ms_per_round_median: float | None = None
    ms_per_round_mean: float | None = None
    projected_tokens_per_s: float | None = None
    prefill_s: float | None = None
    prefill_includes_first_use: bool = False
    first_use_s: float | None = None
    calls: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None


class Budget:
    """Predicts each case's seconds and refuses cases that would end past `seconds` from the start."""

    def __init__(self, seconds: float | None, compile_estimate_s: float):
        self.start = time.perf_counter()
        self.seconds = seconds
        self.compile_estimate_s = compile_estimate_s
        self.prefill: dict[tuple[str, int, int], float] = {}  # (model, batch, context) -> seconds
        self.compiled: set[tuple] = set()  # (model, batch, tree or method) compiled in this process
        self.compile_s: dict[str, float] = {}  # method -> measured first-use seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def compile_key(self, model: str, batch: int, method: str, context: int):
        # LongSpec's compiled steps are specialised per tree shape and batch, not per context;
        # transformers' static cache is compiled per cache length (until dynamo makes it dynamic).
        if METHODS[method].get("cache_implementation") == "static":
            return (model, batch, method, context)
        environment = tuple(sorted(METHODS[method].get(ENVIRONMENT, {}).items()))
        return (model, batch, tree_of(method), bool(METHODS[method].get("compile_draft")), environment)

    def predict_s(self, model: str, config, batch: int, context: int, method: str, calls: int, new_tokens: int) -> float:
        prefill = self.prefill.get((model, batch, context))
        if prefill is None:
            known = [(c, s) for (m, b, c), s in self.prefill.items() if m == model and b == batch]
            if known:
                c0, s0 = max(known)
                prefill = s0 * (context / c0) ** 1.2
            else:
                prefill = batch * context * 2.5e-5 * (1 + context / 65536)
        seconds = calls * (prefill + new_tokens * 0.04 * batch)
        if compiles(method) and self.compile_key(model, batch, method, context) not in self.compiled:
            seconds += self.compile_s.get(method, self.compile_estimate_s)
        return seconds

    def refuses(self, predicted_s: float) -> str | None:
        if self.seconds is None or self.elapsed() + predicted_s <= self.seconds:
            return None
        return f"time budget: {predicted_s:.0f} s predicted, {self.seconds - self.elapsed():.0f} s of --budget-s left"


def measure(case: Case, target, draft, prompt, args, budget: Budget, base: int) -> None:
    calls = []
    with MemoryWatch(prompt.device, base) as memory:
        for _ in range(1 if case.context >= args.single_call_from else args.calls):
            calls.append(timed_call(target, draft, case.method, prompt, args.new_tokens, args.skip_rounds))
    case.memory = memory.values
    case.calls = [asdict(c) for c in calls]
    case.tree_widths = calls[-1].tree_widths
    clean = calls[1:] or calls
    case.ms_per_round = statistics.median(c.ms_per_round for c in clean)
    medians = [c.ms_per_round_median for c in clean if c.ms_per_round_median is not None]
    case.ms_per_round_median = statistics.median(medians) if medians else None
    case.ms_per_round_mean = statistics.median(c.ms_per_round_mean for c in clean)
    case.prefill_s = statistics.median(c.prefill_s for c in clean)
    key = budget.compile_key(case.model, case.batch, case.method, case.context)
    # One call of a method whose shapes this process has not compiled yet: its prefill compiled too.
    case.prefill_includes_first_use = len(calls) == 1 and compiles(case.method) and key not in budget.compiled
    taus = [c.tau for c in clean if c.tau is not None]
    case.tau_measured_here = statistics.mean(taus) if taus else None
    first = calls[0]
    if len(calls) > 1:
        case.first_use_s = max(0.0, first.prefill_s - case.prefill_s) + first.first_rounds_extra_s
    else:
        case.first_use_s = first.first_rounds_extra_s
    budget.prefill.setdefault((case.model, case.batch, case.context), case.prefill_s)
    if compiles(case.method):
        if key not in budget.compiled:
            budget.compile_s[case.method] = case.first_use_s
        budget.compiled.add(key)


def build_models(layout: str, device: torch.device, dtype: torch.dtype, seed: int):
    config_class, model_class, fields = LAYOUTS[layout]
    config = config_class(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # never built on the host: an 8B model in fp32 is 32 GB
        target = model_class(config)
    target = target.to(dtype).eval()
    target.generation_config.pad_token_id = 0
    target.generation_config.eos_token_id = None  # every call runs its full length
    with torch.device(device):
        draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(target.config))
    draft = draft.to(dtype).eval()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return target, draft


def method_sibling(name: str) -> str | None:
    """The graphs-only method of a compiled LongSpec method (its prefill has no compilation in it)."""
    other = name.replace("_compiled", "_graphs")
    return other if other != name and other in METHODS else None


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    element_size = torch.empty((), dtype=dtype).element_size()
    taus = load_tau(args.tau_file)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    report = {
        "meta": dict(device=name, dtype=args.dtype, new_tokens=args.new_tokens, calls=args.calls,
                     single_call_from=args.single_call_from, skip_rounds=args.skip_rounds, commit=args.commit,
                     torch=torch.__version__, transformers=transformers.__version__,
                     copy_bandwidth_bytes_per_s=bandwidth, tau_file=args.tau_file,
                     tau={",".join(map(str, k)): v for k, v in taus.items()}, command=" ".join(sys.argv)),
        "models": {},
        "cases": [],
    }
    budget = Budget(args.budget_s, args.compile_estimate_s)
    out = Path(args.out_dir)
    for layout in args.models:
        print(f"--- {layout}: building on {device}", flush=True)
        t0 = time.perf_counter()
        target, draft = build_models(layout, device, dtype, args.seed)
        config = target.config
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        kv_token = kv_bytes_per_token(config, element_size)
        read = weight_bytes_read_per_step(target)
        report["models"][layout] = dict(
            build_s=time.perf_counter() - t0, target_weight_bytes=weight_bytes(target), draft_weight_bytes=weight_bytes(draft),
            weight_bytes_read_per_step=read, kv_bytes_per_token=kv_token, allocated_after_build=base,
            config=config.to_dict() if args.full_config else {k: getattr(config, k, None) for k in (
                "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rope_parameters")},
        )
        print(f"    weights {weight_bytes(target) / GIB:.2f} GiB (read per step {read / GIB:.2f} GiB), draft "
              f"{weight_bytes(draft) / GIB:.2f} GiB, KV {kv_token / 1024:.0f} KiB per token; built in "
              f"{report['models'][layout]['build_s']:.1f} s", flush=True)
        for batch in args.batches:
            for context in args.contexts:
                prompt = None
                memory_reason = None
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info()
                    need = batch * context * kv_token + prefill_transient_bytes(config, batch, context, element_size)
                    if need + 2 * GIB > free:
                        memory_reason = (f"memory: KV cache {batch * context * kv_token / GIB:.1f} GiB + prefill "
                                         f"activations ~{prefill_transient_bytes(config, batch, context, element_size) / GIB:.1f} GiB "
                                         f"+ 2 GiB > {free / GIB:.1f} GiB free")
                for method in args.methods:
                    case = Case(layout, batch, context, method,
                                floor_ms=floor_ms(read, kv_token, batch, context, bandwidth), tau=tau_for(method, taus))
                    calls = 1 if context >= args.single_call_from else args.calls
                    reason = memory_reason
                    if f"{method}@{context}" in args.skip or f"{method}@{context}@{batch}" in args.skip:
                        reason = "--skip"
                    if reason is None:
                        reason = budget.refuses(budget.predict_s(layout, config, batch, context, method, calls, args.new_tokens))
                    if reason is not None:
                        case.skipped = reason
                        print(f"    skip {layout} batch {batch} context {context} {method}: {reason}", flush=True)
                        report["cases"].append(asdict(case))
                        continue
                    if prompt is None:
                        generator = torch.Generator(device="cpu").manual_seed(args.seed + context + batch)
                        prompt = torch.randint(100, config.vocab_size, (batch, context), generator=generator).to(device)
                    try:
                        measure(case, target, draft, prompt, args, budget, base)
                        case.tau = tau_for(method, taus, case.tree_widths)
                        case.projected_tokens_per_s = projected_tokens_per_s(batch, case.tau, case.ms_per_round)
                        print(f"    {layout} batch {batch} context {context} {method}: {case.ms_per_round:.2f} ms/round "
                              f"(floor {case.floor_ms:.2f}), prefill {case.prefill_s:.2f} s, first use "
                              f"{case.first_use_s:.1f} s, peak {fmt(case.memory.get('peak_gib'))} GiB "
                              f"[{budget.elapsed():.0f} s]", flush=True)
                    except Exception as error:  # noqa: BLE001 (record it and go on with the next case)
                        case.error = f"{type(error).__name__}: {error}"[:2000]
                        case.calls = [{"traceback": traceback.format_exc()[-4000:]}]
                        print(f"    FAILED {layout} batch {batch} context {context} {method}: {case.error[:300]}", flush=True)
                    finally:
                        release(target, draft)
                    report["cases"].append(asdict(case))
                    write_json(report, out)
                del prompt
                release(target, draft)
        del target, draft
        release_models()
    fill_first_use(report["cases"])
    write_json(report, out)
    return report


def release_models() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fill_first_use(cases: list[dict]) -> None:
    """A compiled method measured with one call: its prefill included compilation. Where its graphs-only
    sibling has a prefill at the same shape, the difference counts as first use, and the sibling's
    prefill as the compiled method's."""
    by_key = {(c["model"], c["batch"], c["context"], c["method"]): c for c in cases}
    for case in cases:
        sibling = method_sibling(case["method"])
        if not case["prefill_includes_first_use"] or sibling is None or case["prefill_s"] is None:
            continue
        other = by_key.get((case["model"], case["batch"], case["context"], sibling))
        if other and other["prefill_s"] is not None and case["prefill_s"] > other["prefill_s"]:
            case["first_use_s"] += case["prefill_s"] - other["prefill_s"]
            case["prefill_s_first_call"] = case["prefill_s"]
            case["prefill_s"] = other["prefill_s"]
            case["prefill_includes_first_use"] = False


# ----- output ----------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_json(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scale.json"
    path.write_text(json.dumps(report, indent=1))
    return path


def markdown(report: dict) -> str:
    meta = report["meta"]
    cases = report["cases"]
    methods = [m for m in METHODS if any(c["method"] == m for c in cases)]
    methods += [m for m in dict.fromkeys(c["method"] for c in cases) if m not in methods]
    tau_note = ", ".join(f"[{k}] {v['tau']:.2f} ({v['draft']}, {v['context']} tokens)" for k, v in meta["tau"].items()) or "no --tau-file"
    lines = [
        f"{meta['device']}, {meta['dtype']}, {meta['new_tokens']} new tokens per call, commit {meta['commit']}; copy "
        f"bandwidth {meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + write). ms per target step "
        "(transformers, no-draft loop) or per tree round; the floor is (weights read per step + KV of the context) / "
        "copy bandwidth.",
        "",
    ]
    groups = list(dict.fromkeys((c["model"], c["batch"]) for c in cases))
    by_key = {(c["model"], c["batch"], c["context"], c["method"]): c for c in cases}
    for model, batch in groups:
        contexts = sorted({c["context"] for c in cases if (c["model"], c["batch"]) == (model, batch)})
        if not any(c["ms_per_round"] is not None for c in cases if (c["model"], c["batch"]) == (model, batch)):
            lines += [f"**{model}, batch {batch}: nothing measured**", ""]
            lines += [f"- {c['context']} {c['method']}: {c['skipped'] or c['error']}" for c in cases
                      if (c["model"], c["batch"]) == (model, batch)]
            lines.append("")
            continue
        lines += [f"**{model}, batch {batch}: ms per step / round**", "",
                  "| context | floor | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for context in contexts:
            row = [by_key.get((model, batch, context, m)) for m in methods]
            floor = next((c["floor_ms"] for c in row if c), None)
            cells = [fmt(c["ms_per_round"], 2) if c and c["ms_per_round"] is not None else
                     ("failed" if c and c["error"] else "-") for c in row]
            lines.append(f"| {context} | {fmt(floor, 2)} | " + " | ".join(cells) + " |")
        lines += ["", f"**{model}, batch {batch}: projected tokens/s** (batch x tau / ms per round; tau of SmolLM2-135M "
                  f"with its trained draft on held-out code: {tau_note}; 1 for one-token decoding)", "",
                  "| context | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for context in contexts:
            row = [by_key.get((model, batch, context, m)) for m in methods]
            lines.append(f"| {context} | " + " | ".join(fmt(c and c["projected_tokens_per_s"], 0) for c in row) + " |")
        lines += ["", f"**{model}, batch {batch}: prefill and memory** (GiB beyond the weights; first use: graph "
                  "capture, compilation and autotuning of the call's shapes, left out of the ms per round)", "",
                  "| context | method | ms/round | x floor | x no-draft compiled | prefill s | first use s | peak GiB | "
                  "resident GiB | device used GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for context in contexts:
            step = by_key.get((model, batch, context, "no_draft_compiled"))
            step_ms = step["ms_per_round"] if step else None
            for method in methods:
                c = by_key.get((model, batch, context, method))
                if c is None:
                    continue
                if c["skipped"] or c["error"]:
                    lines.append(f"| {context} | {method} | {'skipped: ' + c['skipped'] if c['skipped'] else 'failed: ' + c['error'][:120]} "
                                 "| | | | | | | |")
                    continue
                memory = c["memory"]
                vs_step = c["ms_per_round"] / step_ms if step_ms else None
                prefill = fmt(c["prefill_s"], 2) + (" (with first use)" if c["prefill_includes_first_use"] and compiles(method) else "")
                if tree_of(method) is None and c.get("tree_widths") is not None:
                    method = f"{method} {c['tree_widths']}"  # the tree generate chose
                lines.append(
                    f"| {context} | {method} | {fmt(c['ms_per_round'], 2)} | {fmt(c['ms_per_round'] / c['floor_ms'], 2)} | "
                    f"{fmt(vs_step, 2)} | {prefill} | {fmt(c['first_use_s'])} | {fmt(memory.get('peak_gib'))} | "
                    f"{fmt(memory.get('resident_gib'))} | {fmt(memory.get('device_used_gib'))} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path | None:
    """ms per round against context, one line per method (and the floor), one panel per (model, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    meta, cases = report["meta"], [c for c in report["cases"] if c["ms_per_round"] is not None]
    groups = list(dict.fromkeys((c["model"], c["batch"]) for c in cases))
    if not groups:
        return None
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
    # One colour per method in every panel, in METHODS' order.
    names = [m for m in METHODS if any(c["method"] == m for c in cases)]
    names += [m for m in dict.fromkeys(c["method"] for c in cases) if m not in names]
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(names)}
    for axis, (model, batch) in zip(axes[0], groups):
        mine = [c for c in cases if (c["model"], c["batch"]) == (model, batch)]
        floors = sorted({c["context"]: c["floor_ms"] for c in mine}.items())
        axis.plot([c for c, _ in floors], [f for _, f in floors], "k--", marker="x", label="floor (bytes / copy bandwidth)")
        for method in [m for m in colors if any(c["method"] == m for c in mine)]:
            points = sorted((c["context"], c["ms_per_round"]) for c in mine if c["method"] == method)
            style = "-" if method.endswith("compiled") else ":"
            axis.plot([c for c, _ in points], [m for _, m in points], style, marker="o", color=colors[method], label=method)
        axis.set_xscale("log", base=2)
        axis.set_xticks([c for c, _ in floors], [f"{c // 1024}k" if c >= 1024 else str(c) for c, _ in floors])
        axis.set(xlabel="context (tokens)", ylabel="ms per step / round", title=f"{model}, batch {batch}")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{meta['device']}, {meta['dtype']}, random weights, {meta['new_tokens']} new tokens per call "
                    f"(commit {meta['commit']})", fontsize=10)
    figure.tight_layout()
    path = out / "scale.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen2.5-7b"], choices=list(LAYOUTS))
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny Llama at short contexts, every code path in seconds (e.g. with --device cpu)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 4096 32768 131072")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=None, help="run order (default: METHODS' order)")
    parser.add_argument("--longspec-method", action="append", default=[], metavar="NAME=JSON",
                        help="add a LongSpec method with these generate arguments, e.g. "
                        "'auto_tree_compiled={\"compile_draft\": true, \"compile_target\": true}'")
    parser.add_argument("--skip", nargs="*", default=[], metavar="METHOD@CONTEXT[@BATCH]")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (8 with --tiny)")
    parser.add_argument("--calls", type=int, default=3, help="calls per case below --single-call-from (the first warms up)")
    parser.add_argument("--single-call-from", type=int, default=65536,
                        help="one call per case from this context on (its prefill takes seconds)")
    parser.add_argument("--skip-rounds", type=int, default=3, help="first rounds of a call left out of ms per round")
    parser.add_argument("--tau-file", default=None, help="JSON of bench/draft_tau.py (SmolLM2 acceptance)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip cases predicted to end past this many seconds")
    parser.add_argument("--compile-estimate-s", type=float, default=60.0,
                        help="seconds a compiled method's first use is predicted to cost, until one is measured")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--copy-bytes", type=int, default=None, help="bytes of the copy that measures bandwidth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None, help="recorded with the results (default: git rev-parse)")
    parser.add_argument("--full-config", action="store_true", help="record the whole model config")
    parser.add_argument("--rescore", nargs="+", default=None, metavar="SCALE_JSON",
                        help="measure nothing: merge earlier scale.json files (a case measured in a later file "
                        "replaces one skipped in an earlier), recompute the projections with --tau-file, and write "
                        "the JSON, table and plot under --out-dir (no GPU needed)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "scale-results"))
    args = parser.parse_args(argv)
    for spec in args.longspec_method:
        name = add_longspec_method(spec)
        if args.methods is not None and name not in args.methods:
            args.methods.append(name)
    args.methods = args.methods or list(METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.tiny:
        args.models = ["tiny-llama"]
        args.contexts = args.contexts or [64, 256]
        args.new_tokens = args.new_tokens or 8
    args.contexts = args.contexts or [4096, 32768, 131072]
    args.new_tokens = args.new_tokens or 32
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.copy_bytes = args.copy_bytes or ((4 * GIB if on_cuda else 64 << 20) if not args.tiny else 16 << 20)
    args.commit = args.commit or git_commit()
    return args


def merge(reports: list[dict]) -> dict:
    """One report from several runs: every (model, batch, context, method) once, measured where any run
    measured it (the first such run), else as the first run recorded it; the runs' metadata under
    `meta["runs"]`."""
    for report in reports:
        infer_first_use(report["cases"])
    merged = json.loads(json.dumps(reports[0]))
    merged["meta"]["runs"] = [r["meta"] for r in reports]
    cases: dict[tuple, dict] = {}
    for report in reports:
        merged["models"].update({k: v for k, v in report["models"].items() if k not in merged["models"]})
        for case in report["cases"]:
            key = (case["model"], case["batch"], case["context"], case["method"])
            kept = cases.get(key)
            if kept is None or (kept["ms_per_round"] is None and case["ms_per_round"] is not None):
                cases[key] = case
    merged["cases"] = list(cases.values())
    fill_first_use(merged["cases"])
    return merged


def infer_first_use(cases: list[dict]) -> None:
    """In one run's cases (in the order they ran): a single call of a compiled LongSpec method that ran
    before in that run (same model and batch) compiled nothing in its prefill (its shapes do not depend
    on the context)."""
    seen = set()
    for case in cases:
        key = (case["model"], case["batch"], case["method"])
        if case["ms_per_round"] is None:
            continue
        if key in seen and is_known_longspec(case["method"]):
            case["prefill_includes_first_use"] = False
        seen.add(key)


def is_known_longspec(name: str) -> bool:
    return name in METHODS and is_longspec(name)


def rescore(report: dict, tau_file: str | None) -> dict:
    """`report` with tau and projected tokens/s taken from `tau_file` (methods this file does not know keep
    theirs)."""
    taus = load_tau(tau_file)
    report["meta"]["tau_file"] = tau_file
    report["meta"]["tau"] = {",".join(map(str, k)): v for k, v in taus.items()}
    for case in report["cases"]:
        if case["method"] in METHODS:
            case["tau"] = tau_for(case["method"], taus, case.get("tree_widths"))
        case["projected_tokens_per_s"] = projected_tokens_per_s(case["batch"], case["tau"], case["ms_per_round"])
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rescore:
        report = rescore(merge([json.loads(Path(p).read_text()) for p in args.rescore]), args.tau_file)
        write_json(report, Path(args.out_dir))
        return finish(report, args)
    if args.device.startswith("cuda"):
        # Every method compiles the same forward (transformers' static cache, LongSpec's steps): give dynamo
        # room for all their specialisations instead of letting it fall back to eager code past 8.
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return finish(run(args), args)


def finish(report: dict, args) -> dict:
    """Write the table and the plot, list what was skipped or failed, print the table last."""
    out = Path(args.out_dir)
    table = markdown(report)
    (out / "scale.md").write_text(table + "\n")
    try:
        path = plot(report, out)
    except Exception as error:  # noqa: BLE001 (the numbers are written already)
        path = None
        print(f"plot failed: {type(error).__name__}: {error}")
    skipped = [c for c in report["cases"] if c["skipped"]]
    failed = [c for c in report["cases"] if c["error"]]
    for c in skipped:
        print(f"skipped: {c['model']} batch {c['batch']} context {c['context']} {c['method']}: {c['skipped']}")
    for c in failed:
        print(f"FAILED: {c['model']} batch {c['batch']} context {c['context']} {c['method']}: {c['error'][:500]}")
    print(f"wrote {out / 'scale.json'}, {out / 'scale.md'}" + (f", {path}" if path else ""))
    print(table)
    return report


if __name__ == "__main__":
    main()
