"""Train a LongSpec draft for SmolLM2-135M-Instruct on the H100 machine (see GPU.md, "A real model there").

Expects the joined GGUF at `--model-dir/model.gguf` and the gguf package importable. Training text: the
Python sources of this machine's site-packages; held-out text: its standard library (never trained on).
Writes the bf16 draft and its training log under `$OUT/longspec-smollm2-135m-instruct/`.

    PYTHONPATH=.:/tmp/site python bench/train_smollm2.py --model-dir /root/smollm2 --max-steps 400
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import site
import sysconfig

from longspec_hf.training.trainer import TrainingConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/root/smollm2")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-train-sequences", type=int, default=3000)
    args = parser.parse_args()

    stdlib = sysconfig.get_paths()["stdlib"]
    site_dirs = [d for d in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(d)]
    train_dirs = sorted(set(site_dirs))
    held_out = sorted(glob.glob(os.path.join(stdlib, "*.py")))  # top level only: no site-packages below it
    output_dir = os.path.join(os.environ.get("OUT", "."), "longspec-smollm2-135m-instruct")
    config = TrainingConfig(
        target=args.model_dir, gguf_file="model.gguf", data=train_dirs, eval_data=held_out, extensions=[".py"],
        output_dir=output_dir, sequence_length=args.sequence_length, batch_size=args.batch_size,
        max_steps=args.max_steps, max_train_sequences=args.max_train_sequences, max_eval_sequences=32,
        learning_rate=1e-3, warmup_steps=30, eval_every=100, eval_batches=4, log_every=10, save_every=0,
        max_positions=8192, progress=False,
    )
    result = train(config)
    print(json.dumps({"train_dirs": train_dirs, "step": result.step, **result.last_eval}))
    print(f"| step | held-out acceptance (lag 1) | chain accepted (depth 4) |\n|---|---|---|\n"
          f"| {result.step} | {result.last_eval.get('acceptance', float('nan')):.3f} | "
          f"{result.last_eval.get('chain_accepted', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
