"""Train a LongSpec draft for SmolLM2-135M-Instruct on the H100 machine (see GPU.md, "A real model there").

Expects the joined GGUF at `--model-dir/model.gguf` and the gguf package importable. Training text: the
Python sources of a fixed list of packages in this machine's site-packages, whole files in a seeded
shuffled order (so that every package contributes however many sequences are taken). Held-out text: the
standard library, which is never trained on (packages that vendor copies of it are left out). Writes the
bf16 draft and its training log under `$OUT/<--name>/`.

Stage 1 (2k tokens, Anchor-Offset positions) and stage 2 (8k tokens, from stage 1):

    PYTHONPATH=.:/tmp/site python bench/train_smollm2.py --max-steps 2000 --name stage1
    PYTHONPATH=.:/tmp/site python bench/train_smollm2.py --sequence-length 8192 --batch-size 2 \\
        --max-steps 300 --learning-rate 3e-4 --init-from $OUT/stage1 --name stage2

Stage 3 (the bundled draft): 2k tokens again from stage 2, the files shuffled with another seed:

    PYTHONPATH=.:/tmp/site python bench/train_smollm2.py --max-steps 2200 --max-train-sequences 12000 \\
        --learning-rate 5e-4 --seed 1 --init-from $OUT/stage2 --name stage3

Anchor-Offset ablation at equal steps: the same command with `--no-anchor-offset`.

A run longer than one command may last: keep it out of $OUT, stop it in time with a checkpoint, and go
on in the next command (the tokenized rows are cached too):

    PYTHONPATH=.:/tmp/site python bench/train_smollm2.py --output-root /root/drafts --name stage4 \\
        --max-steps 6000 --max-seconds 480 --data-cache /root/drafts/rows.pt --resume ...
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sysconfig

from longspec_hf.training.trainer import TrainingConfig, train

# Packages with long, real Python sources. pip and setuptools are left out: they vendor copies of
# standard-library modules, the held-out text.
TRAINING_PACKAGES = (
    "transformers", "torch", "numpy", "sympy", "networkx", "accelerate", "peft", "huggingface_hub", "triton",
    "jinja2", "safetensors", "tokenizers", "gguf",
)


def training_files(seed: int) -> list[str]:
    """Every `.py` file of the training packages that exist here, shuffled with `seed`."""
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], "/tmp/site"]
    files = set()
    for package in TRAINING_PACKAGES:
        for root in roots:
            files.update(glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True))
    files = sorted(files)
    random.Random(seed).shuffle(files)
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/root/smollm2")
    parser.add_argument("--name", default="longspec-smollm2-135m-instruct", help="output folder under $OUT")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-train-sequences", type=int, default=20000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--init-from", default=None, help="continue from this draft folder")
    parser.add_argument("--no-anchor-offset", action="store_true", help="plain position ids (ablation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-root", default=os.environ.get("OUT", "."), help="the run's folder goes here")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None, help="stop with a checkpoint after this long")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    parser.add_argument("--data-cache", default=None, help="a .pt file for the tokenized rows (reused when present)")
    args = parser.parse_args()

    stdlib = sysconfig.get_paths()["stdlib"]
    held_out = sorted(glob.glob(os.path.join(stdlib, "*.py")))  # top level only: no site-packages below it
    files = training_files(args.seed)
    output_dir = os.path.join(args.output_root, args.name)
    config = TrainingConfig(
        target=args.model_dir, gguf_file="model.gguf", data=files, eval_data=held_out, extensions=[".py"],
        output_dir=output_dir, sequence_length=args.sequence_length, batch_size=args.batch_size,
        max_steps=args.max_steps, max_train_sequences=args.max_train_sequences, max_eval_sequences=32,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, eval_every=max(100, args.max_steps // 5),
        eval_batches=4, log_every=10, save_every=args.save_every, max_positions=8192, progress=False,
        anchor_offset=not args.no_anchor_offset, init_from=args.init_from, seed=args.seed,
        max_seconds=args.max_seconds, resume_from="latest" if args.resume else None, data_cache=args.data_cache,
    )
    result = train(config)
    summary = {"name": args.name, "files": len(files), "step": result.step, **result.last_eval}
    print(json.dumps(summary))
    print(f"| {args.name} | {result.step} | {result.last_eval.get('acceptance', float('nan')):.3f} | "
          f"{result.last_eval.get('chain_accepted', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
