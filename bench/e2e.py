"""End-to-end decoding speed on a real target: transformers vs LongSpec, same prompts, one run.

Example (GPU machine; SmolLM2 GGUF in /root/smollm2/model.gguf):

    PYTHONPATH=.:/tmp/site python3 bench/e2e.py --model-dir /root/smollm2 --gguf-file model.gguf \
        --contexts 1024 4096 7680 --new-tokens 256 --out $OUT/e2e.json

Prompts are held-out text: the Python standard library sources of the machine running the benchmark.
For every context length and prompt it runs transformers' autoregressive `generate`, transformers'
prompt lookup (10 tokens), LongSpec with a chain (widths [1]*5) and LongSpec with the default tree,
and reports tokens/s, speedups over both transformers baselines, the mean accepted length per round
(tau), and whether the output equals the autoregressive output (else the common-prefix length).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import longspec_hf
from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats

HELD_OUT_FILES = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py", "pathlib.py")


def held_out_prompts(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in HELD_OUT_FILES:
        candidates = [stdlib / name, stdlib / name.replace(".py", "") / "__init__.py"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            continue
        ids = tokenizer(path.read_text(), return_tensors="pt").input_ids
        if ids.shape[1] >= length:
            prompts.append(ids[:, :length])
        if len(prompts) == count:
            break
    if not prompts:
        raise RuntimeError(f"no standard-library file of {length} tokens found under {stdlib}")
    return prompts


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0]) if len(diff) else n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--draft", default=None, help="draft folder; a random draft when omitted")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per context length")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    load = dict(gguf_file=args.gguf_file) if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, **load)
    target = AutoModelForCausalLM.from_pretrained(args.model_dir, **load).to("cuda", dtype).eval()
    if args.draft:
        draft = AutoModel.from_pretrained(args.draft)
    else:
        torch.manual_seed(0)
        draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(target.config))
    draft = draft.to("cuda", dtype).eval()
    print(f"longspec_hf {longspec_hf.__version__}; draft: {args.draft or 'random'}; {torch.cuda.get_device_name()}")

    methods = {
        "hf_autoregressive": dict(),
        "hf_prompt_lookup": dict(prompt_lookup_num_tokens=10),
        "longspec_chain": dict(assistant_model=draft, tree_widths=[1] * 5),
        "longspec_tree": dict(assistant_model=draft),
    }
    warm = torch.randint(100, 1000, (1, 64), device="cuda")
    for kwargs in methods.values():
        target.generate(warm, max_new_tokens=16, do_sample=False, **kwargs)

    results = []
    for context in args.contexts:
        for index, ids in enumerate(held_out_prompts(tokenizer, context, args.prompts)):
            ids = ids.cuda()
            row = {"context": context, "prompt": index}
            reference = None
            for name, kwargs in methods.items():
                stats = LongSpecStats() if "assistant_model" in kwargs else None
                extra = dict(longspec_stats=stats) if stats is not None else {}
                out, seconds = timed(
                    lambda: target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **kwargs, **extra)
                )
                new = out.shape[1] - ids.shape[1]
                if reference is None:
                    reference = out
                row[name] = {
                    "tokens_per_s": new / seconds,
                    "seconds": seconds,
                    "equal_to_autoregressive": bool(torch.equal(out, reference)),
                    "common_prefix": common_prefix(out[:, ids.shape[1] :], reference[:, ids.shape[1] :]),
                    "tau": stats.mean_accepted_length if stats is not None else None,
                }
            results.append(row)
            print(json.dumps(row))

    if args.out:
        Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "dtype": args.dtype, "results": results}, indent=1))
    print()
    print("| context | method | tok/s | vs HF AR | vs HF lookup | tau | equal to AR (common prefix) |")
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        rows = [r for r in results if r["context"] == context]
        for name in methods:
            tps = statistics.median(r[name]["tokens_per_s"] for r in rows)
            ar = statistics.median(r["hf_autoregressive"]["tokens_per_s"] for r in rows)
            pld = statistics.median(r["hf_prompt_lookup"]["tokens_per_s"] for r in rows)
            taus = [r[name]["tau"] for r in rows if r[name]["tau"] is not None]
            equal = sum(r[name]["equal_to_autoregressive"] for r in rows)
            prefixes = ",".join(str(r[name]["common_prefix"]) for r in rows)
            tau = f"{statistics.mean(taus):.2f}" if taus else "-"
            print(f"| {context} | {name} | {tps:.1f} | {tps / ar:.2f}x | {tps / pld:.2f}x | {tau} | {equal}/{len(rows)} ({prefixes}) |")


if __name__ == "__main__":
    main()
