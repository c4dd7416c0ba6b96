"""Attention, cache and projection kernels. Each Triton kernel sits beside the pure-torch reference in
`reference.py`.

`prefix_tree_attention`, `prefix_attention`, `masked_attention`, `compact_kv`, `topk_log_softmax`,
`beam_select` and `grouped_linear` run the Triton kernels on CUDA tensors when Triton is installed and the
inputs are supported, and the torch reference otherwise (CPU, other dtypes).
`backend="torch"` or `backend="triton"` forces one (a forced Triton call on unsupported inputs raises).
Triton is optional: without it everything runs on the reference.

`torch.ops.longspec.grouped_linear` is `grouped_linear` as an operator that compiled graphs call (on any
device; the target's compiled forward reaches it through the graph pass of
`generation.fused_projections`).

This subpackage imports neither `generation` nor `modeling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from . import reference
from .reference import attention_with_lse, merge_attention, prefix_visibility, window_visibility

try:
    from . import compaction as _compaction_triton
    from . import projections as _projections_triton
    from . import topk as _topk_triton
    from . import tree_attention as _tree_attention_triton
except ImportError:  # triton is not installed
    _compaction_triton = _projections_triton = _topk_triton = _tree_attention_triton = None

__all__ = [
    "attention_with_lse",
    "beam_select",
    "compact_kv",
    "grouped_linear",
    "masked_attention",
    "merge_attention",
    "prefix_attention",
    "prefix_tree_attention",
    "prefix_visibility",
    "topk_log_softmax",
    "window_visibility",
]


def _use_triton(backend: str | None, triton_module, unsupported_reason, device: torch.device) -> bool:
    """Whether to run the Triton kernel: `backend` None picks it for supported CUDA inputs."""
    if backend == "torch":
        return False
    if backend is None:
        return triton_module is not None and device.type == "cuda" and unsupported_reason() is None
    if backend != "triton":
        raise ValueError(f"backend must be None, 'torch' or 'triton', not {backend!r}")
    if triton_module is None:
        raise RuntimeError("backend='triton' needs the triton package")
    reason = unsupported_reason()
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
    return True


def _dispatch(
    backend: str | None,
    device: torch.device,
    triton_module,
    unsupported_reason: Callable[[], str | None],
    kernel: str,
    reference_fn: Callable,
    args: tuple,
    *,
    custom_op: str | None = None,
):
    """The recipe every entry point shares: `triton_module.<kernel>(*args)` when `_use_triton` picks it,
    else `reference_fn(*args)`. Inside compiled code the Triton path goes through the module's custom
    operator `custom_op` instead (when the kernel has one), which torch.compile treats as opaque: it
    cannot trace a launch that picks its tiles in Python."""
    if not _use_triton(backend, triton_module, unsupported_reason, device):
        return reference_fn(*args)
    if custom_op is not None and torch.compiler.is_compiling():
        return getattr(triton_module, custom_op)(*args)
    return getattr(triton_module, kernel)(*args)


def prefix_tree_attention(
    query: torch.Tensor,
    key_prefix: torch.Tensor,
    value_prefix: torch.Tensor,
    prefix_start: torch.Tensor,
    prefix_end: torch.Tensor,
    key_tree: torch.Tensor,
    value_tree: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    window: int | None = None,
    tree_depths: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid tree attention, within a sliding `window` when one is given (see
    `reference.prefix_tree_attention` for the arguments and results)."""
    module = _tree_attention_triton
    return _dispatch(
        backend, query.device, module,
        lambda: module.unsupported_reason(query, key_prefix, value_prefix, key_tree, value_tree, tree_mask, scale),
        "prefix_tree_attention", reference.prefix_tree_attention,
        (query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale, window,
         tree_depths),
        custom_op="prefix_tree_attention_op",
    )


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-free attention over the slots `[start[b], end[b])` of a preallocated cache (see
    `reference.prefix_attention`). The Triton path reads the lengths on the device, so a CUDA graph
    can replay it while the lengths change."""
    module = _tree_attention_triton
    return _dispatch(
        backend, query.device, module, lambda: module.unsupported_reason(query, key, value, None, None, None, scale),
        "prefix_attention_with_lse", reference.prefix_attention, (query, key, value, start, end, scale),
        custom_op="prefix_attention_op",
    )


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` `(B, Hq, Tq, D)` over `key`/`value` `(B, Hkv, S, D)` where `visible` `(B, Tq, S)`
    (see `reference.attention_with_lse`): one launch for short key sets with an arbitrary mask, such as
    the draft's ring window and tree nodes. Masked slots must hold finite values on the Triton path."""
    module = _tree_attention_triton
    return _dispatch(
        backend, query.device, module, lambda: module.unsupported_reason(query, key, value, key, value, visible, scale),
        "tree_attention_with_lse", reference.attention_with_lse, (query, key, value, visible, scale),
        custom_op="masked_attention_op",
    )


def compact_kv(
    kv: torch.Tensor,
    kv_scratch: torch.Tensor,
    source_index: torch.Tensor,
    dest_start: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Fused in-place KV compaction of all layers (see `reference.compact_kv`)."""
    module = _compaction_triton
    _dispatch(
        backend, kv.device, module, lambda: module.unsupported_reason(kv, kv_scratch, source_index, dest_start),
        "compact_kv", reference.compact_kv, (kv, kv_scratch, source_index, dest_start),
    )


def topk_log_softmax(logits: torch.Tensor, k: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` log-probabilities `(R, k)` (float32) and their indices of each row of `logits` `(R, V)`
    (see `reference.topk_log_softmax`); the Triton path orders equal values by lower index."""
    module = _topk_triton
    return _dispatch(
        backend, logits.device, module, lambda: module.unsupported_reason(logits, k),
        "topk_log_softmax", reference.topk_log_softmax, (logits, k),
    )


def beam_select(
    child_scores: torch.Tensor,
    child_tokens: torch.Tensor,
    parent_scores: torch.Tensor,
    width: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `width` best (parent, child) pairs per batch row (see `reference.beam_select`); the Triton path
    orders equal scores by lower pair index (parent-major)."""
    module = _topk_triton
    return _dispatch(
        backend, child_scores.device, module, lambda: module.beam_select_unsupported_reason(child_scores, width),
        "beam_select", reference.beam_select, (child_scores, child_tokens, parent_scores, width),
    )


def grouped_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """`x @ w.T + b` `(M, N_i)` for each weight `(N_i, K)` of one input `x` `(M, K)`, in one launch on the
    Triton path (see `reference.grouped_linear`)."""
    biases = [None] * len(weights) if biases is None else list(biases)
    module = _projections_triton
    return _dispatch(
        backend, x.device, module, lambda: module.unsupported_reason(x, weights, biases),
        "grouped_linear", reference.grouped_linear, (x, list(weights), biases),
    )


@torch.library.custom_op("longspec::grouped_linear", mutates_args=())
def grouped_linear_op(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]]
) -> list[torch.Tensor]:
    """[`grouped_linear`] for compiled graphs: opaque to torch.compile, which cannot trace a launch that
    picks its tiles in Python; the kernel where it applies, the reference (cuBLAS or CPU) elsewhere."""
    return grouped_linear(x, weights, biases)


@grouped_linear_op.register_fake
def _(x, weights, biases):
    return [x.new_empty(x.shape[0], weight.shape[0]) for weight in weights]
