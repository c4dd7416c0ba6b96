"""Mean accepted tokens per round (tau) of LongSpec drafts for SmolLM2-135M-Instruct on held-out text.

Batch 1, the draft's default tree, held-out standard-library prompts of each context length, 256 new
tokens; one row per draft, decoding mode and context (mean over prompts). Modes: `greedy`, or
`RULE@TEMPERATURE` for sampling with that verification rule (seeded). Run on the H100 machine:

    PYTHONPATH=.:/tmp/site python bench/draft_tau.py --drafts bundled $OUT/stage1 --contexts 1024 4096 7680
    PYTHONPATH=.:/tmp/site python bench/draft_tau.py --modes greedy recursive_rejection@0.7 point_mass@0.7
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from longspec_hf import LongSpecStats
from longspec_hf.assets import bundled_draft_dir
from longspec_hf.cli import held_out_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/root/smollm2")
    parser.add_argument("--drafts", nargs="+", default=["bundled"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["greedy"])
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file="model.gguf")
    target = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file="model.gguf")
    target = target.to("cuda", torch.bfloat16).eval()
    prompts = held_out_prompts(tokenizer, args.contexts, args.prompts)
    rows = []
    for name in args.drafts:
        path = bundled_draft_dir() if name == "bundled" else name
        draft = AutoModel.from_pretrained(path).to("cuda", torch.bfloat16).eval()
        for mode in args.modes:
            if mode == "greedy":
                decoding = dict(do_sample=False)
            else:
                rule, temperature = mode.split("@")
                decoding = dict(do_sample=True, temperature=float(temperature), sampling_rule=rule)
            for context, context_prompts in prompts.items():
                taus = []
                for ids in context_prompts:
                    torch.manual_seed(0)
                    stats = LongSpecStats()
                    target.generate(ids.cuda(), assistant_model=draft, max_new_tokens=args.new_tokens,
                                    longspec_stats=stats, **decoding)
                    taus.append(stats.mean_accepted_length)
                rows.append({"draft": name, "mode": mode, "context": context, "prompts": len(taus),
                             "tau": sum(taus) / len(taus), "tau_per_prompt": taus})
                print(json.dumps(rows[-1]), flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "draft_tau.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    print("| draft | mode | context | prompts | tau |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['draft']} | {row['mode']} | {row['context']} | {row['prompts']} | {row['tau']:.2f} |")


if __name__ == "__main__":
    main()
