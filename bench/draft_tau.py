"""Mean accepted tokens per round (tau) of LongSpec drafts for SmolLM2-135M-Instruct on held-out text.

Greedy, batch 1, the draft's default tree, held-out standard-library prompts of each context length,
256 new tokens; one row per draft and context (mean over prompts). Run on the H100 machine:

    PYTHONPATH=.:/tmp/site python bench/draft_tau.py --drafts bundled $OUT/stage1 --contexts 1024 4096 7680
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
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file="model.gguf")
    target = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file="model.gguf")
    target = target.to("cuda", torch.bfloat16).eval()
    prompts = held_out_prompts(tokenizer, args.contexts, args.prompts)
    rows = []
    for name in args.drafts:
        path = bundled_draft_dir() if name == "bundled" else name
        draft = AutoModel.from_pretrained(path).to("cuda", torch.bfloat16).eval()
        for context, context_prompts in prompts.items():
            taus = []
            for ids in context_prompts:
                stats = LongSpecStats()
                target.generate(ids.cuda(), assistant_model=draft, max_new_tokens=args.new_tokens, do_sample=False,
                                longspec_stats=stats)
                taus.append(stats.mean_accepted_length)
            rows.append({"draft": name, "context": context, "prompts": len(taus), "tau": sum(taus) / len(taus),
                         "tau_per_prompt": taus})
            print(json.dumps(rows[-1]), flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "draft_tau.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    print("| draft | context | prompts | tau |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['draft']} | {row['context']} | {row['prompts']} | {row['tau']:.2f} |")


if __name__ == "__main__":
    main()
