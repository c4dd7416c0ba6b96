"""The target's attention during LongSpec decoding, registered through transformers' AttentionInterface.

A LongSpec forward passes `longspec=LongSpecAttentionInputs(...)` to `target(...)`; transformers forwards
that keyword down to every attention call. The registered function then reads the layer's K/V from the
[`LongSpecCache`] and computes either

- prefill: causal attention over the prompt's first chunk, padding excluded; a later chunk attends to
  the committed chunks before it and causally to itself: where no row is padded and the layer has no
  sliding window, as one SDPA call over the cache's slots with the causal mask aligned to its last key
  (which FlashAttention runs without a mask, as fast as a prompt in one piece), otherwise through the
  hybrid kernel below with the chunk as a "tree" whose ancestor mask is causal, or
- tree verification: the hybrid attention of `kernels.prefix_tree_attention` (committed prefix without a
  mask, tree nodes with their ancestor mask, merged exactly through their log-sum-exp).

Any forward without that keyword is delegated to the implementation the user had chosen. The switch is
scoped by [`longspec_attention`], which restores the user's implementation on exit, errors included.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import kernels
from ._compat import attention_implementation, eager_attention
from .cache import LongSpecCache

ATTENTION_PREFIX = "longspec_"


@dataclass
class LongSpecAttentionInputs:
    """What a LongSpec forward tells the attention.

    Attributes:
        cache: the target cache holding every layer's K/V.
        tree_mask: `(B, T, T)` ancestor mask for a tree forward; None for the prefill.
        left_padded: prefill only: whether any row has left padding (known on the host, so the attention
            takes the plain causal path without reading the device, also inside compiled code).
        chunk_depths: a prefill chunk after the first: `(T,)` each query's slot after the committed
            slots (`0..T-1`); `tree_mask` is then the chunk's causal mask.
        chunk_start: with `chunk_depths`, the chunk's first slot (every slot before it is committed).
    """

    cache: LongSpecCache
    tree_mask: torch.Tensor | None = None
    left_padded: bool = True
    chunk_depths: torch.Tensor | None = None
    chunk_start: int = 0


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pad_start: torch.Tensor,
    scale: float,
    left_padded: bool,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention over the prompt slots; slots before `pad_start[b]` are padding. With a sliding
    `window`, a query also sees only keys less than `window` slots before it (transformers' rule; slot
    distances are position distances, the padding being on the left)."""
    length = query.shape[2]
    if window is not None and window >= length:
        window = None  # no key of the prompt is that far back: plain causal attention
    if not left_padded and window is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    slots = torch.arange(length, device=query.device)
    distance = slots[:, None] - slots[None, :]  # query slot - key slot
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    visible = visible[None]  # one mask for all rows, unless they differ by their padding
    if left_padded:
        visible = visible & (slots[None, None, :] >= pad_start[:, None, None])
        # Padding queries see themselves only (their outputs are never used), so no row is empty.
        visible = visible | torch.eye(length, dtype=torch.bool, device=query.device)[None]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )


def _flash_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether SDPA runs these through FlashAttention, by torch's own rule (CUDA, 16-bit, its head dims)."""
    if query.device.type != "cuda":
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, False, True)
    return torch.backends.cuda.can_use_flash_attention(params)


def _later_chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries `(B, Hq, T, D)` of the last `T` of `S` unpadded slots, keys/values `(B, Hkv, S, D)`: query
    `i` sees slots `0 .. S - T + i`, the causal mask aligned to the last key (`causal_lower_right`)."""
    mask = causal_lower_right(query.shape[2], key.shape[2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)


def longspec_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    fallback: str,
    longspec: LongSpecAttentionInputs | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function. Returns `(B, T, Hq, D)` like transformers' implementations.

    `sliding_window` is what the model passes for this layer (Mistral: every layer; Qwen2/Qwen3: the
    layers of kind "sliding_attention"; None: full attention); LongSpec applies it exactly as the
    model's own attention would."""
    if longspec is None:
        # transformers registers no "eager" function: each model family brings its own.
        attention = eager_attention(module) if fallback == "eager" else ALL_ATTENTION_FUNCTIONS[fallback]
        return attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            sliding_window=sliding_window, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = longspec.cache
    layer = cache.layer_kv(module.layer_idx)
    if longspec.tree_mask is None:
        out = _prefill_attention(query, key, value, layer.pad_start, scale, longspec.left_padded, sliding_window)
    elif longspec.chunk_depths is not None:
        # `key`/`value`: the chunk's K/V as the cache stored them; its committed slots end where it begins.
        window = sliding_window if sliding_window is not None and sliding_window < cache.capacity else None
        end = longspec.chunk_start + query.shape[2]
        slots_key, slots_value = layer.kv[0][:, :, :end], layer.kv[1][:, :, :end]
        if window is None and not longspec.left_padded and _flash_takes(query, slots_key, slots_value):
            out = _later_chunk_attention(query, slots_key, slots_value, scale)
        else:
            out, _ = kernels.prefix_tree_attention(
                query, layer.kv[0], layer.kv[1], layer.pad_start, layer.committed_len, key, value,
                _on(longspec.tree_mask, query), scale, window, _on(longspec.chunk_depths, query),
            )
    else:
        num_nodes = query.shape[2]
        window = tree_depths = None
        # Positions stay below capacity + tree size: a window at least that wide hides nothing, and the
        # kernel's plain path serves it (e.g. a 4096-token window over shorter contexts).
        if sliding_window is not None and sliding_window < cache.capacity + cache.max_tree_nodes:
            window = sliding_window
            # A node's ancestors (itself included) are its path from the root: its depth is their count - 1.
            tree_depths = _on(longspec.tree_mask, query).sum(dim=-1, dtype=torch.int32) - 1
        out, _ = kernels.prefix_tree_attention(
            query,
            layer.kv[0],
            layer.kv[1],
            layer.pad_start,
            layer.committed_len,
            layer.kv_tree[0, :, :, :num_nodes],
            layer.kv_tree[1, :, :, :num_nodes],
            _on(longspec.tree_mask, query),
            scale,
            window,
            tree_depths,
        )
    return out.transpose(1, 2).contiguous(), None


def _on(tensor: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """`tensor` on the query's device (a layer of a target spread over devices runs on its own)."""
    return tensor if tensor is None or tensor.device == query.device else tensor.to(query.device)


def _registered_name(fallback: str) -> str:
    """The name under which the LongSpec attention over `fallback` is registered (attention and mask)."""
    name = ATTENTION_PREFIX + fallback
    with _INSTALLING:
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, functools.partial(longspec_attention_forward, fallback=fallback))
            # Forwards that are not LongSpec's (another thread's plain generate while a LongSpec call runs)
            # get the fallback's own masks; LongSpec's forwards pass a 4D placeholder mask, which
            # transformers hands through as it is, so no mask is built for them.
            if fallback in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[fallback])
    return name


@dataclass
class _Installation:
    """The LongSpec attention installed on one model: the user's implementation and how many calls use it."""

    original: str
    calls: int = 0


# Models whose attention is LongSpec's while at least one LongSpec call on them runs. Guarded by
# _INSTALLING, so that a call never restores the user's implementation under another call still decoding.
_INSTALLING = threading.RLock()
_installed: weakref.WeakKeyDictionary[PreTrainedModel, _Installation] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def longspec_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run `model` with the LongSpec attention inside the block.

    The first of concurrent calls on `model` installs it, the last one restores the user's choice (on
    errors too). Forwards without LongSpec inputs are delegated to the user's implementation, so a plain
    `generate` on another thread meanwhile computes exactly what it would otherwise.
    """
    with _INSTALLING:
        installation = _installed.get(model)
        if installation is None:
            original = attention_implementation(model)
            if original.startswith(ATTENTION_PREFIX):  # installed by hand: leave it to its owner
                yield
                return
            model.set_attn_implementation(_registered_name(original))
            installation = _installed[model] = _Installation(original)
        installation.calls += 1
    try:
        yield
    finally:
        with _INSTALLING:
            installation.calls -= 1
            if installation.calls == 0:
                del _installed[model]
                model.set_attn_implementation(installation.original)
