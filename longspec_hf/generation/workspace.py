"""The buffers and CUDA graphs of LongSpec decoding, kept on the draft between `generate` calls.

A `generate` call allocates the target cache, the token buffer and the draft's cache, and captures its
CUDA graphs against their addresses. Capturing costs as much as tens of decoding rounds of a small
target, so, like transformers' static cache, the [`DecodingWorkspace`] stays on the draft, in its one
attribute `_longspec_workspace`, and the next call reuses it when it fits: same target, batch size,
tree shape, acceptance mode, inference mode and weights (by address), and a capacity at least what the
call needs but not far beyond it (a smaller call gets a fresh, smaller workspace, so memory follows the
last call). `release_workspace(draft)` frees it.

A workspace holds its target weakly and no reference cycle: its memory is returned the moment it is
replaced or released, or its target is deleted, without waiting for the garbage collector. A call
claims it for its duration (`claim_workspace`); a call made meanwhile on another thread gets buffers of
its own.

The graphs read every per-call quantity (prompt length, padding, lengths) from these buffers on the
device, so reusing them only means resetting the buffers' contents (`DecodingWorkspace.start`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..modeling import LongSpecDraftModel, local_tensor
from .adaptive import PlanCosts
from .cache import LongSpecCache
from .candidate_generator import LongSpecCandidateGenerator
from .cuda_graphs import GraphedCall
from .fused_projections import projection_pass
from .options import LongSpecOptions
from .placement import HeadSharding, head_sharding, layer_devices, on_one_device
from .tree import DraftTree
from .verify import GraphedVerify

ATTRIBUTE = "_longspec_workspace"
# Capacity is allocated in whole blocks of this many slots (fewer on CPU, where no graph capture is
# saved by reuse and spare slots only hold memory); a kept workspace is reused while its spare slots
# stay below SPARE_BLOCKS blocks.
CAPACITY_BLOCK_CUDA = 256
CAPACITY_BLOCK_CPU = 16
SPARE_BLOCKS = 32


@dataclass(frozen=True)
class WorkspaceKey:
    """What a workspace's buffers and graphs were built for, besides the capacity."""

    device: torch.device
    dtype: torch.dtype
    token_dtype: torch.dtype
    batch_size: int
    tree_widths: tuple[int, ...]
    max_tree_nodes: int
    accept_in_graph: bool
    capture: bool
    compile_draft: bool
    compile_target: bool
    # Tensors made under torch.inference_mode cannot be updated in place outside it (and vice versa
    # for graphs captured there), so a workspace serves calls of the mode it was made in.
    inference_mode: bool
    models: tuple[int, int]
    weights: tuple[int, ...]

    @classmethod
    def of(
        cls,
        target: PreTrainedModel,
        draft: LongSpecDraftModel,
        input_ids: torch.Tensor,
        tree_widths: list[int],
        max_tree_nodes: int,
        accept_in_graph: bool,
        capture: bool,
        compile_draft: bool = False,
        compile_target: bool = False,
    ) -> "WorkspaceKey":
        # (A tensor-parallel target's parameters are DTensors: the address is their local shard's.)
        tensors = itertools.chain(target.parameters(), target.buffers(), draft.parameters(), draft.buffers())
        return cls(
            device=input_ids.device,
            dtype=target.dtype,
            token_dtype=input_ids.dtype,
            batch_size=input_ids.shape[0],
            tree_widths=tuple(tree_widths),
            max_tree_nodes=max_tree_nodes,
            accept_in_graph=accept_in_graph,
            capture=capture,
            compile_draft=compile_draft,
            compile_target=compile_target,
            inference_mode=torch.is_inference_mode_enabled(),
            models=(id(target), id(draft)),
            # Graphs hold raw addresses: moved or replaced weights need new graphs.
            weights=tuple(local_tensor(t).data_ptr() for t in tensors),
        )


def _no_workspace() -> None:
    return None


class DecodingWorkspace:
    """Everything of a LongSpec decoding call that lives at fixed addresses.

    Attributes:
        cache: the target's [`LongSpecCache`]; its `pad_start` is this workspace's `pad_start`.
        tokens: `(B, capacity)` token buffer; row `b` holds its sequence in `[0, seq_len[b])`.
        seq_len: `(B,)` current length of each row, left padding included.
        pad_start: `(B,)` left-padding length of each row.
        drafter: the candidate generator with the draft's constant-size cache.
        verify: the target's verify forward, one graph per tree shape.
        draft_graphs: the greedy tree proposal's graph per number of levels, made on first use.
        plan_costs: measured wall time per round of each adaptive plan (`adaptive.py`).
    """

    def __init__(
        self,
        key: WorkspaceKey,
        target: PreTrainedModel,
        draft: LongSpecDraftModel,
        capacity: int,
        sharding: HeadSharding | None = None,
    ):
        self.key = key
        # A tensor-parallel target's head split (its cache holds this process's heads).
        self.sharding = sharding
        # Weakly: a kept workspace never keeps its target alive (see `keep_on`).
        self.target = weakref.ref(target)
        text_config = target.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        batch, device = key.batch_size, key.device
        self.cache = LongSpecCache(
            num_layers=text_config.num_hidden_layers,
            batch_size=batch,
            num_kv_heads=sharding.local_heads if sharding is not None else text_config.num_key_value_heads,
            head_dim=head_dim,
            capacity=capacity,
            max_tree_nodes=key.max_tree_nodes,
            pad_start=torch.zeros(batch, dtype=torch.long, device=device),
            device=device,
            dtype=key.dtype,
            layer_devices=layer_devices(target, device),
            head_group=sharding.group if sharding is not None else None,
        )
        self.pad_start = self.cache.pad_start
        self.tokens = torch.zeros(batch, capacity, dtype=key.token_dtype, device=device)
        self.seq_len = torch.zeros(batch, dtype=torch.long, device=device)
        # Read once, here, before any forward: the graph pass of the compiled steps, if switched on.
        graph_pass = projection_pass(device) if key.compile_draft or key.compile_target else None
        self.drafter = LongSpecCandidateGenerator(
            draft, target, list(key.tree_widths), batch, self.cache.target_kv, graph_pass=graph_pass
        )
        self.verify = GraphedVerify(
            target,
            self.cache,
            self.seq_len,
            self.pad_start,
            self.tokens,
            key.accept_in_graph,
            key.capture,
            compiled=key.compile_target,
            graph_pass=graph_pass,
        )
        self.draft_graphs: dict[int, GraphedCall[DraftTree]] = {}
        self.plan_costs = PlanCosts()
        # Set while a call decodes with it (under _CLAIMING): a concurrent call gets buffers of its own.
        self.in_use = False

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def fits(self, key: WorkspaceKey, capacity: int, target: PreTrainedModel) -> bool:
        spare = SPARE_BLOCKS * (CAPACITY_BLOCK_CUDA if key.capture else CAPACITY_BLOCK_CPU)
        return key == self.key and self.target() is target and capacity <= self.capacity <= capacity + spare

    def keep_on(self, draft: LongSpecDraftModel) -> None:
        """Keep this workspace on `draft` for later calls, until it is replaced or released, or its target
        is deleted: its memory (the target's cache above all) then goes with it."""
        setattr(draft, ATTRIBUTE, self)
        target = self.target()
        if target is not None:
            weakref.finalize(target, _release_if_kept, weakref.ref(draft), weakref.ref(self))

    def start(self, input_ids: torch.Tensor, pad_start: torch.Tensor, pad_token_id: int) -> None:
        """Reset the buffers for a new call with prompt `input_ids` `(B, P)`."""
        prompt_len = input_ids.shape[1]
        self.cache.start(pad_start)
        self.tokens.fill_(pad_token_id)
        self.tokens[:, :prompt_len] = input_ids
        self.seq_len.fill_(prompt_len)
        self.drafter.cache.reset()

    # A kept workspace holds CUDA graphs: copies of the draft (deepcopy, pickle) start without one.
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (_no_workspace, ())


# Claiming a kept workspace (check that it is free, then mark it used) is one step for all threads.
_CLAIMING = threading.Lock()


@contextlib.contextmanager
def claim_workspace(
    target: PreTrainedModel,
    draft: LongSpecDraftModel,
    input_ids: torch.Tensor,
    options: LongSpecOptions,
    max_new_tokens: int,
    *,
    accept_in_graph: bool,
    do_sample: bool,
) -> Iterator[DecodingWorkspace]:
    """A workspace that this call alone uses until the block ends (errors included).

    The draft's kept workspace when it is free and fits the call; else a new one, kept on the draft in
    its place when the call uses CUDA graphs (the old one is released first, so the two never hold
    memory together), unless the kept one is in use by another call (another thread): it is then
    neither shared nor replaced.

    Args:
        accept_in_graph: greedy acceptance runs inside the verify graph (no logits processors).
        do_sample: the call samples (its draft runs eagerly, so `compile_draft` does not apply).
    """
    # Graphs hold one device's work: a target spread over devices (device_map) runs its forwards eagerly, and
    # so does a tensor-parallel one (its forwards communicate with the other processes).
    sharding = head_sharding(target)
    capture = input_ids.device.type == "cuda" and on_one_device(target, input_ids.device) and sharding is None
    keep = options.cuda_graphs
    key = WorkspaceKey.of(
        target,
        draft,
        input_ids,
        list(options.tree_widths),
        options.max_tree_nodes,
        accept_in_graph,
        capture,
        compile_draft=options.compile_draft and keep and not do_sample,
        compile_target=options.compile_target and keep,
    )
    # Finished rows keep riding along in the batch: leave room for one more path past the last token.
    capacity = input_ids.shape[1] + max_new_tokens + 2 * (options.max_depth + 1)
    with _CLAIMING:
        kept: DecodingWorkspace | None = getattr(draft, ATTRIBUTE, None)
        if kept is not None and not kept.in_use and keep and kept.fits(key, capacity, target):
            workspace = kept
        else:
            keep = keep and (kept is None or not kept.in_use)
            if keep:
                release_workspace(draft)
            block = CAPACITY_BLOCK_CUDA if capture else CAPACITY_BLOCK_CPU
            workspace = DecodingWorkspace(
                key, target, draft, -(-capacity // block) * block if keep else capacity, sharding
            )
            if keep:
                workspace.keep_on(draft)
        workspace.in_use = True
    try:
        yield workspace
    finally:
        workspace.in_use = False


def release_workspace(draft: LongSpecDraftModel) -> None:
    """Free the buffers and CUDA graphs that `generate` keeps on `draft` between calls."""
    draft.__dict__.pop(ATTRIBUTE, None)


def _release_if_kept(draft_ref: weakref.ref, workspace_ref: weakref.ref) -> None:
    """When a target is deleted: drop the workspace kept for it, if the draft still keeps that one."""
    draft, workspace = draft_ref(), workspace_ref()
    if draft is not None and workspace is not None:
        stop_keeping(draft, workspace)


def stop_keeping(draft: LongSpecDraftModel, workspace: DecodingWorkspace) -> None:
    """Make sure no later call reuses `workspace`'s buffers: `draft` no longer keeps it (if it did)."""
    if draft.__dict__.get(ATTRIBUTE) is workspace:
        release_workspace(draft)
