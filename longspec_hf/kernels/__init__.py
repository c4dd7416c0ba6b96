"""Attention and cache kernels. Each Triton kernel sits beside the pure-torch reference in `reference.py`.

`prefix_tree_attention`, `prefix_attention`, `masked_attention`, `compact_kv`, `topk_log_softmax` and `beam_select`
run the Triton kernels
on CUDA tensors when Triton is installed and the inputs are supported, and the torch reference otherwise
(CPU, other dtypes).
`backend="torch"` or `backend="triton"` forces one (a forced Triton call on unsupported inputs raises).
Triton is optional: without it everything runs on the reference.

This subpackage imports neither `generation` nor `modeling`.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import attention_with_lse, merge_attention, prefix_visibility

try:
    from . import compaction as _compaction_triton
    from . import topk as _topk_triton
    from . import tree_attention as _tree_attention_triton
except ImportError:  # triton is not installed
    _compaction_triton = _topk_triton = _tree_attention_triton = None

__all__ = [
    "attention_with_lse",
    "beam_select",
    "compact_kv",
    "masked_attention",
    "merge_attention",
    "prefix_attention",
    "prefix_tree_attention",
    "prefix_visibility",
    "topk_log_softmax",
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
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid tree attention (see `reference.prefix_tree_attention` for the arguments and results)."""
    args = (query, key_prefix, value_prefix, prefix_start, prefix_end, key_tree, value_tree, tree_mask, scale)
    module = _tree_attention_triton
    reason = lambda: module.unsupported_reason(query, key_prefix, value_prefix, key_tree, value_tree, tree_mask, scale)
    if _use_triton(backend, module, reason, query.device):
        if torch.compiler.is_compiling():
            return module.prefix_tree_attention_op(*args)
        return module.prefix_tree_attention(*args)
    return reference.prefix_tree_attention(*args)


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
    reason = lambda: module.unsupported_reason(query, key, value, None, None, None, scale)
    if _use_triton(backend, module, reason, query.device):
        if torch.compiler.is_compiling():
            return module.prefix_attention_op(query, key, value, start, end, scale)
        return module.prefix_attention_with_lse(query, key, value, start, end, scale)
    return reference.prefix_attention(query, key, value, start, end, scale)


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
    reason = lambda: module.unsupported_reason(query, key, value, key, value, visible, scale)
    if _use_triton(backend, module, reason, query.device):
        if torch.compiler.is_compiling():
            return module.masked_attention_op(query, key, value, visible, scale)
        return module.tree_attention_with_lse(query, key, value, visible, scale)
    return reference.attention_with_lse(query, key, value, visible, scale)


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
    reason = lambda: module.unsupported_reason(kv, kv_scratch, source_index, dest_start)
    if _use_triton(backend, module, reason, kv.device):
        module.compact_kv(kv, kv_scratch, source_index, dest_start)
    else:
        reference.compact_kv(kv, kv_scratch, source_index, dest_start)


def topk_log_softmax(logits: torch.Tensor, k: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` log-probabilities `(R, k)` (float32) and their indices of each row of `logits` `(R, V)`
    (see `reference.topk_log_softmax`); the Triton path orders equal values by lower index."""
    module = _topk_triton
    reason = lambda: module.unsupported_reason(logits, k)
    if _use_triton(backend, module, reason, logits.device):
        return module.topk_log_softmax(logits, k)
    return reference.topk_log_softmax(logits, k)


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
    reason = lambda: module.beam_select_unsupported_reason(child_scores, width)
    if _use_triton(backend, module, reason, child_scores.device):
        return module.beam_select(child_scores, child_tokens, parent_scores, width)
    return reference.beam_select(child_scores, child_tokens, parent_scores, width)
