"""Two CPU processes (gloo) train one draft through accelerate: replicas stay equal and the run completes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch
from accelerate import debug_launcher

from longspec_hf import LongSpecDraftModel
from longspec_hf.training.trainer import LOG_FILE, TrainingConfig, train

from .conftest import make_target
from .test_integrations import tiny_tokenizer
from .test_training import toy_corpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    subprocess.run(
        [sys.executable, "-m", "tests.test_training_distributed", str(tmp_path)], cwd=REPO_ROOT, check=True, timeout=180
    )
    assert torch.equal(torch.load(tmp_path / "params_rank0.pt"), torch.load(tmp_path / "params_rank1.pt"))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoint-2" / "optimizer.pt").exists()
    with open(tmp_path / "train_log.jsonl") as handle:
        assert sum("eval_acceptance" in line for line in handle) == 3  # steps 0, 2 and 4


def test_accelerate_launch_command_trains_on_two_cpu_processes(tmp_path):
    """The command a user runs on a machine without GPUs: `accelerate launch --multi_gpu` starts the processes
    through torchrun and the trainer joins them over gloo (`--cpu` would start a single process)."""
    target = make_target("llama")
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    words = random.Random(0)
    with open(tmp_path / "train.txt", "w") as handle:
        for _ in range(100):
            handle.write(" ".join(f"w{words.randrange(4, 96)}" for _ in range(16)) + "\n")
    output_dir = tmp_path / "draft"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "longspec_hf.training", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "train.txt"),
        "--output-dir", str(output_dir), "--max-steps", "2", "--sequence-length", "32", "--batch-size", "2",
        "--held-out-fraction", "0.1", "--eval-every", "1", "--eval-batches", "2", "--log-every", "1", "--save-every", "1",
        "--warmup-steps", "1", "--sliding-window", "16", "--save-dtype", "float32", "--no-progress",
    ]
    # No GPU in sight, also on a machine that has some; one thread per process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, timeout=300, stdout=subprocess.PIPE, text=True)
    assert finished.stdout.count("draft saved to") == 1  # one report, from the main process

    with open(output_dir / LOG_FILE) as handle:
        log = [json.loads(line) for line in handle]
    assert log[0] == {"step": 0, "num_processes": 2, "distributed_type": "MULTI_CPU", "sequences_per_step": 4}
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert [r["step"] for r in log if "eval_acceptance" in r] == [0, 1, 2]
    assert (output_dir / "checkpoint-1" / "optimizer.pt").exists()

    draft = LongSpecDraftModel.from_pretrained(str(output_dir))
    ids = tiny_tokenizer()("w5 w9 w14 w22 w7 w40 w41 w90", return_tensors="pt").input_ids
    plain = target.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(target.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False), plain)


if __name__ == "__main__":
    debug_launcher(_train_on_two_processes, args=(sys.argv[1],), num_processes=2)
