"""Two CPU processes (gloo) train one draft through accelerate: replicas stay equal and the run completes."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from accelerate import debug_launcher

from longspec_hf.training.trainer import TrainingConfig, train

from .conftest import make_target
from .test_training import toy_corpus


def _train_on_two_processes(output_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a two-core machine
    target = make_target("llama")
    rows = toy_corpus(48, 32, target.config.vocab_size)
    config = TrainingConfig(
        output_dir=output_dir, sequence_length=32, batch_size=4, max_steps=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, warmup_steps=1, eval_every=2, eval_batches=3, log_every=2, save_every=2,
        sliding_window=16, progress=False, save_dtype="float32",
        max_seconds=3600.0,  # never reached: the processes agree on the clock every step and run on
    )
    result = train(config, target=target, train_sequences=rows[8:], eval_sequences=rows[:8])
    # DDP keeps the replicas identical: every process compares its weights with process 0's.
    flat = torch.cat([p.detach().flatten() for p in result.draft.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    assert torch.distributed.get_world_size() == 2
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0])
    torch.save(flat, os.path.join(output_dir, f"params_rank{torch.distributed.get_rank()}.pt"))


def test_two_process_gloo_training(tmp_path):
    # Launch from a fresh interpreter: forking this pytest process, whose earlier tests started thread
    # pools and a single-process accelerate state, can deadlock the children.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-m", "tests.test_training_distributed", str(tmp_path)], cwd=root, check=True, timeout=180
    )
    assert torch.equal(torch.load(tmp_path / "params_rank0.pt"), torch.load(tmp_path / "params_rank1.pt"))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoint-2" / "optimizer.pt").exists()
    with open(tmp_path / "train_log.jsonl") as handle:
        assert sum("eval_acceptance" in line for line in handle) == 3  # steps 0, 2 and 4


if __name__ == "__main__":
    debug_launcher(_train_on_two_processes, args=(sys.argv[1],), num_processes=2)
