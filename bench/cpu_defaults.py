"""LongSpec's defaults on a CPU against plain `generate`: SmolLM2-135M-Instruct (fp32) with the bundled draft.

One held-out prompt (the end of transformers' `generation/utils.py`, as `longspec demo` uses), greedy.
Every configuration is called once untimed (4 new tokens: buffers, workspace) and once timed; the
output must equal plain `generate`'s. Prints one line per configuration: seconds, speed-up, tau, rounds,
the tree the call verified and ms per round.

    python bench/cpu_defaults.py --context 1024 --new-tokens 96
    python bench/cpu_defaults.py --configs plain auto default lookup1x8 demo
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers.generation.utils as held_out_source

import longspec_hf
from longspec_hf import assets

# name -> LongSpec keywords of generate (None: plain generate, no draft).
CONFIGS = {
    "plain": None,
    "auto": {},
    "default": dict(tree_widths=[4, 16, 16, 16, 16]),
    "auto+lookup": dict(prompt_lookup_branches=1, prompt_lookup_length=5),
    "lookup1": dict(tree_widths=[], prompt_lookup_branches=1, prompt_lookup_length=5),
    "lookup1x8": dict(tree_widths=[], prompt_lookup_branches=1, prompt_lookup_length=8),
    "lookup2": dict(tree_widths=[], prompt_lookup_branches=2, prompt_lookup_length=5),
    "11+lookup": dict(tree_widths=[1, 1], prompt_lookup_branches=1, prompt_lookup_length=5),
    "demo": dict(tree_widths=[1, 1, 1], prompt_lookup_branches=1, prompt_lookup_length=5, adaptive=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    target, tokenizer = assets.load_smollm2()
    draft = longspec_hf.LongSpecDraftModel.from_pretrained(assets.bundled_draft_dir())
    text = open(held_out_source.__file__, encoding="utf-8").read()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, -args.context:]
    names = ["plain"] + [name for name in args.configs if name != "plain"]
    reference = base_seconds = None
    rows = []
    for name in names:
        stats = longspec_hf.LongSpecStats()
        kwargs = {} if CONFIGS[name] is None else dict(assistant_model=draft, longspec_stats=stats, **CONFIGS[name])
        target.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)
        stats.reset()
        start = time.perf_counter()
        out = target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **kwargs)
        seconds = time.perf_counter() - start
        if reference is None:
            reference, base_seconds = out, seconds
        row = dict(config=name, seconds=seconds, speedup=base_seconds / seconds, same=torch.equal(out, reference),
                   tau=stats.mean_accepted_length, rounds=stats.rounds, tree_widths=list(stats.tree_widths),
                   ms_per_round=1e3 * seconds / max(1, stats.rounds))
        rows.append(row)
        print(f"{name:12s} {seconds:6.2f}s  x{row['speedup']:.2f} same={row['same']} tau={row['tau']:.2f} "
              f"rounds={row['rounds']} tree={tuple(row['tree_widths'])} ms/round={row['ms_per_round']:.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(context=args.context, new_tokens=args.new_tokens, threads=torch.get_num_threads(), rows=rows),
                      file, indent=1)


if __name__ == "__main__":
    main()
