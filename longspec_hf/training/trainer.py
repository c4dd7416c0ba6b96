"""The distillation loop: a frozen target teaches a LongSpec draft, distributed through `accelerate`.

Every micro-batch: draw Anchor-Offset position ids and a cross-attention lag per sequence, run the
frozen target once (its last-layer KV cache and its next-token logits at those ids), run the draft
over the same tokens reading that cache at the drawn lag, and fit the draft to the target (cross-
entropy to its argmax, or KL to its distribution).

Reproducibility: which rows a micro-batch holds and its random offsets/lags are pure functions of
`(seed, micro-batch index, process index)`, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..modeling import LongSpecDraftConfig, LongSpecDraftModel
from ..modeling.conversion import save_draft
from .anchor_offset import MAX_CROSS_LAG, anchor_offset_position_ids, sample_cross_lag
from .data import (
    DEFAULT_EXTENSIONS,
    hf_tokenize_function,
    iter_texts,
    most_frequent_tokens,
    pack_token_sequences,
    split_held_out,
)
from .distill import distillation_loss, greedy_acceptance, lag_mask, run_target

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT_PREFIX = "checkpoint-"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainingConfig:
    """Everything a training run needs; the `longspec train` flags map one to one onto these fields."""

    target: str | None = None  # path or Hub id of the target model
    # The target's Hub id, recorded in the draft's config (`target_name_or_path`, the `base_model` of its model
    # card); default: `target`. Give it when `target` is a local folder or GGUF file.
    base_model: str | None = None
    output_dir: str = "longspec-draft"
    gguf_file: str | None = None  # load the target from this GGUF file inside `target`
    tokenizer: str | None = None  # defaults to `target`
    data: list[str] = field(default_factory=list)  # files, directories or dataset names
    eval_data: list[str] = field(default_factory=list)  # held-out text; default: a fraction of `data`
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    text_field: str = "text"
    held_out_fraction: float = 0.02
    max_train_sequences: int | None = None
    max_eval_sequences: int | None = 64
    # A `.pt` file for the packed token rows: written by the first run, read by later ones with the same
    # data settings (tokenizing a large corpus can take minutes).
    data_cache: str | None = None

    sequence_length: int = 1024
    batch_size: int = 4  # sequences per process per micro-batch
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 5e-4
    min_learning_rate_ratio: float = 0.1  # the cosine decays to this fraction of the peak
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # "kl" (to the target's distribution) or "ce" (to its argmax). KL is the default: on the tiny CPU setup
    # (3 seeds, 100 steps) it reached held-out lag-1 acceptance 0.44 on average against 0.35 for CE.
    loss: str = "kl"

    anchor_offset: bool = True
    max_positions: int | None = None  # default: the target's max_position_embeddings
    max_lag: int = MAX_CROSS_LAG

    init_from: str | None = None  # an existing draft to start from
    sliding_window: int = 512  # window of a fresh draft
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32

    bf16: bool = True  # bf16 target and autocast when running on CUDA (fp32 on CPU regardless)
    save_dtype: str = "bfloat16"  # dtype of the final exported draft
    # Export the draft with a draft vocabulary: the `draft_vocab` tokens most frequent in the training
    # data (drafting then scores only those; see LongSpecDraftModel.set_draft_vocabulary).
    draft_vocab: int | None = None
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 500
    resume_from: str | None = None  # a checkpoint directory, or "latest" (newest under output_dir)
    # Stop after this many seconds of training with a checkpoint (`resume_from="latest"` continues); the
    # exported draft is the one of that step.
    max_seconds: float | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class TrainingResult:
    draft: LongSpecDraftModel  # the trained draft (merged when trained with LoRA), fp32, target attached
    step: int
    last_eval: dict[str, float]
    log_path: str


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float):
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class RowSampler:
    """Rows of micro-batch `m` on process `rank`: consecutive slices of a per-epoch shuffled order."""

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, seed: int):
        self.num_rows, self.batch_size, self.num_processes, self.seed = num_rows, batch_size, num_processes, seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._orders[epoch]

    def rows(self, micro_batch: int, rank: int) -> torch.Tensor:
        first = (micro_batch * self.num_processes + rank) * self.batch_size
        flat = torch.arange(first, first + self.batch_size)
        return torch.stack([self._order(int(p) // self.num_rows)[int(p) % self.num_rows] for p in flat])


def _generator(seed: int, *indices: int) -> torch.Generator:
    value = seed
    for index in indices:
        value = value * 1_000_003 + index + 1
    return torch.Generator().manual_seed(value % (2**63))


def load_target(config: TrainingConfig, device: torch.device):
    """The frozen target: bf16 on CUDA (when `config.bf16`), fp32 elsewhere."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" and config.bf16 else torch.float32
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    target = AutoModelForCausalLM.from_pretrained(config.target, dtype=dtype, **kwargs)
    return target.to(device=device, dtype=dtype)


def build_sequences(config: TrainingConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed `(train, held_out)` rows of `config.sequence_length` tokens from the configured text."""
    tokenize = hf_tokenize_function(tokenizer)
    separator = tokenizer.eos_token_id
    read = lambda sources: iter_texts(sources, config.extensions, config.text_field)  # noqa: E731
    if config.eval_data:
        train = pack_token_sequences(read(config.data), tokenize, config.sequence_length, separator, config.max_train_sequences)
        held_out = pack_token_sequences(read(config.eval_data), tokenize, config.sequence_length, separator, config.max_eval_sequences)
        return train, held_out
    limit = None if config.max_train_sequences is None else config.max_train_sequences + (config.max_eval_sequences or 0)
    rows = pack_token_sequences(read(config.data), tokenize, config.sequence_length, separator, limit)
    train, held_out = split_held_out(rows, config.held_out_fraction, config.seed)
    return train, held_out[: config.max_eval_sequences]


# The settings that decide the packed rows: a data cache made with others is refused.
_DATA_SETTINGS = (
    "data", "eval_data", "extensions", "text_field", "held_out_fraction", "max_train_sequences", "max_eval_sequences",
    "sequence_length", "target", "tokenizer", "gguf_file", "seed",
)


def load_or_build_sequences(config: TrainingConfig, tokenizer: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """[`build_sequences`], through `config.data_cache` when set. `tokenizer()` loads the tokenizer (only
    called when the rows are built)."""
    settings = {name: getattr(config, name) for name in _DATA_SETTINGS}
    if config.data_cache and os.path.exists(config.data_cache):
        cached = torch.load(config.data_cache)
        if cached["settings"] != settings:
            differing = sorted(k for k in settings if cached["settings"].get(k) != settings[k])
            raise ValueError(
                f"the data cache {config.data_cache} was built with other settings ({', '.join(differing)}): "
                "delete it or pass another --data-cache path"
            )
        return cached["train"], cached["held_out"]
    train_rows, held_out = build_sequences(config, tokenizer())
    if config.data_cache:
        os.makedirs(os.path.dirname(os.path.abspath(config.data_cache)), exist_ok=True)
        torch.save({"settings": settings, "train": train_rows, "held_out": held_out}, config.data_cache)
    return train_rows, held_out


def make_accelerator() -> Accelerator:
    """The run's `Accelerator`: on CPU (gloo) when several processes were launched on a machine without GPUs.

    A torchrun launch (`accelerate launch --multi_gpu`, `torchrun`) of several processes on such a machine
    would otherwise leave every process training on its own, each writing the same output folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=launched > 1 and not torch.accelerator.is_available())
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched, but accelerate runs this one as {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}): they would train separately"
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and accelerator.distributed_type != DistributedType.FSDP:
        warnings.warn(
            "FSDP was asked for, but accelerate shards only on GPUs and other accelerators: every process holds the "
            f"whole draft ({accelerator.distributed_type.value})",
            stacklevel=2,
        )
    return accelerator


def latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = [int(n[len(CHECKPOINT_PREFIX):]) for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{max(steps)}") if steps else None


class DraftTrainer:
    """Holds the models, optimizer, schedule and data of one run; [`train`] runs it to `max_steps` (or until
    `max_seconds`, leaving a checkpoint to resume from)."""

    def __init__(
        self,
        config: TrainingConfig,
        target=None,
        draft: LongSpecDraftModel | None = None,
        train_sequences: torch.Tensor | None = None,
        eval_sequences: torch.Tensor | None = None,
        tokenizer=None,
    ):
        self.config = config
        self.accelerator = make_accelerator()
        self.device = self.accelerator.device
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" and config.bf16 else None
        if config.loss not in ("ce", "kl"):
            raise ValueError(f"loss must be 'ce' or 'kl', got {config.loss!r}")

        self.target = target if target is not None else load_target(config, self.device)
        self.target.requires_grad_(False).eval().to(self.device)
        self.max_positions = config.max_positions or self.target.config.get_text_config().max_position_embeddings

        if train_sequences is None:

            def load_tokenizer():
                if tokenizer is not None:
                    return tokenizer
                from transformers import AutoTokenizer

                kwargs = {"gguf_file": config.gguf_file} if config.gguf_file and not config.tokenizer else {}
                return AutoTokenizer.from_pretrained(config.tokenizer or config.target, **kwargs)

            train_sequences, eval_sequences = load_or_build_sequences(config, load_tokenizer)
        self.train_sequences = train_sequences
        self.eval_sequences = eval_sequences

        unwrapped = draft if draft is not None else self._new_draft()
        if config.base_model:
            unwrapped.config.target_name_or_path = config.base_model
        unwrapped.attach_target(self.target)
        unwrapped.to(self.device).train()
        if config.lora:
            from peft import LoraConfig, get_peft_model

            lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=LORA_TARGET_MODULES)
            unwrapped = get_peft_model(unwrapped, lora_config)
        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        # The scheduler is stepped by hand once per optimizer step (not prepared: accelerate would step it
        # once per process).
        self.scheduler = LambdaLR(
            optimizer, cosine_with_warmup(config.warmup_steps, config.max_steps, config.min_learning_rate_ratio)
        )
        self.step = 0
        resume = latest_checkpoint(config.output_dir) if config.resume_from == "latest" else config.resume_from
        if resume:
            self._load_checkpoint(resume, unwrapped, optimizer)
        self.model, self.optimizer = self.accelerator.prepare(unwrapped, optimizer)
        self.sampler = RowSampler(
            len(self.train_sequences), config.batch_size, self.accelerator.num_processes, config.seed
        )
        self.log_path = os.path.join(config.output_dir, LOG_FILE)
        self.last_eval: dict[str, float] = {}

    def _new_draft(self) -> LongSpecDraftModel:
        if self.config.init_from:
            return LongSpecDraftModel.from_pretrained(self.config.init_from, dtype=torch.float32)
        torch.manual_seed(self.config.seed)
        draft_config = LongSpecDraftConfig.from_target_config(self.target.config, sliding_window=self.config.sliding_window)
        if self.config.target:
            draft_config.target_name_or_path = self.config.target
        return LongSpecDraftModel(draft_config)

    # ----- batches -----------------------------------------------------------------------------------
    def _positions_and_lags(self, generator: torch.Generator, batch_size: int, length: int):
        positions = anchor_offset_position_ids(
            batch_size, length, self.max_positions, generator=generator, enabled=self.config.anchor_offset
        )
        lags = sample_cross_lag(batch_size, generator=generator, max_lag=self.config.max_lag)
        return positions.to(self.device), lags.to(self.device)

    def _train_batch(self, micro_batch: int):
        rank = self.accelerator.process_index
        input_ids = self.train_sequences[self.sampler.rows(micro_batch, rank)].to(self.device)
        positions, lags = self._positions_and_lags(_generator(self.config.seed, micro_batch, rank), *input_ids.shape)
        return input_ids, positions, lags

    def _draft_loss(self, input_ids, positions, lags, target_batch) -> torch.Tensor:
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with autocast:
            logits = self.model(input_ids, positions, target_batch.key, target_batch.value, cross_lag=lags)
        return distillation_loss(logits, target_batch.logits, lag_mask(input_ids.shape[1], lags), self.config.loss)

    # ----- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        progress = tqdm(
            total=config.max_steps, initial=self.step, disable=not (config.progress and accelerator.is_main_process),
            desc="draft training",
        )
        started = time.time()
        # The run's layout (also on a resumed run, whose processes may differ from the first run's).
        self._log(
            step=self.step, num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
            sequences_per_step=config.batch_size * accumulation * accelerator.num_processes,
        )
        if self.step == 0 and self.eval_sequences is not None and config.eval_every:
            self.last_eval = self.evaluate()  # the untrained draft's figures, for comparison
            self._log(step=0, **{f"eval_{k}": v for k, v in self.last_eval.items()})
        while self.step < config.max_steps:
            self.model.train()
            step_loss = torch.zeros((), device=self.device)
            for micro in range(accumulation):
                input_ids, positions, lags = self._train_batch(self.step * accumulation + micro)
                target_batch = run_target(self.target, input_ids, positions)
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = accelerator.no_sync(self.model) if micro < accumulation - 1 else contextlib.nullcontext()
                with sync:
                    loss = self._draft_loss(input_ids, positions, lags, target_batch)
                    accelerator.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            progress.update(1)

            if self.step % config.log_every == 0 or self.step == config.max_steps:
                mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                self._log(
                    step=self.step, loss=mean_loss, lr=self.scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm) if grad_norm is not None else None, seconds=round(time.time() - started, 2),
                )
            if self.eval_sequences is not None and config.eval_every and (
                self.step % config.eval_every == 0 or self.step == config.max_steps
            ):
                self.last_eval = self.evaluate()
                progress.set_postfix(acceptance=f"{self.last_eval['acceptance']:.3f}")
                self._log(step=self.step, **{f"eval_{k}": v for k, v in self.last_eval.items()})
            saved = config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps
            if saved:
                self.save_checkpoint()
            if self._out_of_time(started) and self.step < config.max_steps:
                if not saved:
                    self.save_checkpoint()
                self._log(step=self.step, stopped=f"max_seconds {config.max_seconds} reached; resume from the checkpoint")
                break
        progress.close()
        draft = self.export()
        return TrainingResult(draft=draft, step=self.step, last_eval=self.last_eval, log_path=self.log_path)

    def _out_of_time(self, started: float) -> bool:
        """Whether `max_seconds` have passed, as every process agrees (the main process's clock decides)."""
        if self.config.max_seconds is None:
            return False
        late = self.accelerator.is_main_process and time.time() - started >= self.config.max_seconds
        if self.accelerator.num_processes == 1:
            return late  # no device round trip (it would wait for the step's kernels every step)
        return bool(self.accelerator.reduce(torch.tensor(float(late), device=self.device), reduction="sum") > 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss at lag 1 and greedy acceptance, averaged over this process's share of the held-out rows.

        Offsets are drawn from fixed seeds so that every evaluation sees the same positions.
        """
        self.model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batch_size = self.config.batch_size
        num_batches = min(self.config.eval_batches, math.ceil(len(self.eval_sequences) / batch_size))
        names = ["loss", "acceptance", "chain_accepted"] + [f"acceptance_lag{j}" for j in range(1, self.config.max_lag + 1)]
        # Row-weighted sums and row counts per metric; every process takes part in the reduction below,
        # also one that had no held-out batch.
        totals = torch.zeros(len(names), 2, device=self.device)
        for index in range(rank, num_batches, world):
            input_ids = self.eval_sequences[index * batch_size : (index + 1) * batch_size].to(self.device)
            generator = _generator(self.config.seed + 7919, index)
            positions, _ = self._positions_and_lags(generator, *input_ids.shape)
            target_batch = run_target(self.target, input_ids, positions)
            lags = torch.ones(len(input_ids), dtype=torch.long, device=self.device)
            metrics = {"loss": self._draft_loss(input_ids, positions, lags, target_batch).item()}
            autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
            with autocast:
                metrics.update(greedy_acceptance(self.model, input_ids, positions, target_batch, max_depth=self.config.max_lag))
            for i, name in enumerate(names):
                totals[i, 0] += metrics[name] * len(input_ids)
                totals[i, 1] += len(input_ids)
        totals = self.accelerator.reduce(totals, reduction="sum")
        self.model.train()
        return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}

    def _log(self, **record) -> None:
        if not self.accelerator.is_main_process:
            return
        os.makedirs(self.config.output_dir, exist_ok=True)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ----- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """`checkpoint-{step}/`: the draft (save_pretrained; LoRA: the adapter), optimizer, scheduler, step."""
        accelerator = self.accelerator
        directory = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.step}")
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)
            save_draft(unwrapped, os.path.join(directory, "draft"), state_dict=state_dict)
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
            with open(os.path.join(directory, "trainer_state.json"), "w") as handle:
                json.dump({"step": self.step, "config": asdict(self.config)}, handle, indent=2)
        accelerator.wait_for_everyone()
        return directory

    def _load_checkpoint(self, directory: str, unwrapped, optimizer) -> None:
        weights_dir = os.path.join(directory, "draft")
        if self.config.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(unwrapped, load_file(os.path.join(weights_dir, "adapter_model.safetensors")))
        else:
            unwrapped.load_state_dict(load_file(os.path.join(weights_dir, "model.safetensors")), strict=True)
        optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device))
        self.scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt")))
        with open(os.path.join(directory, "trainer_state.json")) as handle:
            self.step = json.load(handle)["step"]

    def export(self) -> LongSpecDraftModel:
        """Save the final draft to `output_dir` in `save_dtype` (LoRA merged in) and return it (fp32)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)
        draft = accelerator.unwrap_model(self.model)
        if self.config.lora:
            draft = draft.merge_and_unload()  # a plain draft: inference code knows nothing of adapters
            state_dict = draft.state_dict()
        if self.config.draft_vocab:
            draft.set_draft_vocabulary(most_frequent_tokens(self.train_sequences, self.config.draft_vocab))
            state_dict = {**state_dict, "draft_vocab_ids": draft.draft_vocab_ids}
        if accelerator.is_main_process:
            dtype = getattr(torch, self.config.save_dtype)
            # Weights in the save dtype; integer buffers (the draft vocabulary's token ids) as they are.
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
            # save_pretrained writes the dtype of the model's own parameters into config.json, so the file is
            # written from a copy that holds the exported tensors (built on the meta device, then given them).
            with torch.device("meta"):
                exported = type(draft)(copy.deepcopy(draft.config))
            exported.load_state_dict(state_dict, assign=True)
            exported.generation_config = draft.generation_config
            save_draft(exported, self.config.output_dir)
        accelerator.wait_for_everyone()
        return draft


def train(config: TrainingConfig, **overrides) -> TrainingResult:
    """Run a whole training job; keyword `overrides` (target, draft, train_sequences, ...) go to [`DraftTrainer`]."""
    return DraftTrainer(config, **overrides).train()
