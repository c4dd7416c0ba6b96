"""The target's preallocated KV cache for LongSpec decoding.

All layers live in one tensor `kv` of shape `(num_layers, 2, B, Hkv, capacity, D)`, so that an accepted
path is compacted into place in every layer with one gather/scatter. Row `b` holds its left padding in
slots `[0, pad_start[b])` and its committed tokens in `[pad_start[b], committed_len[b])`; token slot `s`
has position `s - pad_start[b]`. A tree forward writes its K/V into the separate `kv_tree` scratch.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import kernels
from ..modeling import TargetKV


class _LayerView(CacheLayerMixin):
    """One layer of a [`LongSpecCache`]; exists so that `len(cache)` and per-layer queries answer correctly."""

    def __init__(self, cache: "LongSpecCache", layer_idx: int):
        super().__init__()
        # A proxy, not a reference: the cache holds its layers, and a cycle would keep its K/V memory
        # until the garbage collector runs.
        self.cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return self.cache.capacity

    def get_max_cache_shape(self) -> int:
        return self.cache.capacity


class LongSpecCache(Cache):
    """Preallocated target cache with per-row committed lengths, tree scratch slots and `compact`.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the target's cache layout.
        capacity: slots per row (prompt with its padding + every token that can be committed).
        max_tree_nodes: scratch slots for one verification tree (root included).
        pad_start: `(B,)` left-padding length of every row.
        device, dtype: of the K/V tensors.

    Before each target forward call [`begin_prefill`] or [`begin_tree`]: they say where `update` writes.
    """

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        max_tree_nodes: int,
        pad_start: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__(layers=[_LayerView(self, i) for i in range(num_layers)])
        self.kv = torch.zeros(num_layers, 2, batch_size, num_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.kv_tree = torch.zeros(
            num_layers, 2, batch_size, num_kv_heads, max_tree_nodes, head_dim, device=device, dtype=dtype
        )
        self.pad_start = pad_start.to(device=device, dtype=torch.long)
        self.committed_len = torch.zeros(batch_size, device=device, dtype=torch.long)
        # Passed as a LongSpec forward's `attention_mask`: transformers hands a 4D mask to the attention
        # as it is instead of building one (the LongSpec attention reads positions from the cache).
        self.mask_placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        self._write_tree = False
        self._write_start = self._write_len = 0

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def max_tree_nodes(self) -> int:
        return self.kv_tree.shape[4]

    # ----- write plans ---------------------------------------------------------------------------------
    def begin_prefill(self, start: int, end: int) -> None:
        """The next forward writes prompt slots `[start, end)` of every row (a chunk of the prompt); the
        slots before `start` are committed (`committed_len` = `start`). [`end_prefill`] commits the rest."""
        if end > self.capacity:
            raise ValueError(f"prompt of {end} slots exceeds the cache capacity {self.capacity}")
        self._write_tree, self._write_start, self._write_len = False, start, end - start
        self.committed_len.fill_(start)

    def end_prefill(self, num_tokens: int) -> None:
        """The prompt's `num_tokens` slots are written: commit them."""
        self.committed_len.fill_(num_tokens)

    def begin_tree(self, num_nodes: int) -> None:
        """The next forward writes tree scratch slots `[0, num_nodes)`; nothing is committed."""
        if num_nodes > self.max_tree_nodes:
            raise ValueError(f"tree of {num_nodes} nodes exceeds the scratch size {self.max_tree_nodes}")
        self._write_tree, self._write_len = True, num_nodes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `(B, Hkv, T, D)` keys/values where the current plan says and return the layer's visible K/V.

        The LongSpec attention reads the cache itself (through the layer index); the returned tensors
        are the prompt chunk (prefill) or the tree nodes (tree forward).
        """
        target = self.kv_tree if self._write_tree else self.kv
        start = 0 if self._write_tree else self._write_start
        length = key_states.shape[2]
        # (Not under torch.compile: comparing the traced length with the plan would pin it to one prompt length.)
        if not torch.compiler.is_compiling() and length != self._write_len:
            raise RuntimeError(f"forward of {length} tokens does not match the cache's write plan ({self._write_len})")
        written = slice(start, start + length)
        target[layer_idx, 0, :, :, written] = key_states
        target[layer_idx, 1, :, :, written] = value_states
        return target[layer_idx, 0, :, :, written], target[layer_idx, 1, :, :, written]

    # ----- committing ----------------------------------------------------------------------------------
    def compact(self, path: torch.Tensor, num_kept: torch.Tensor) -> None:
        """Commit tree nodes: node `path[b, j]` of the last tree lands at slot `committed_len[b] + j`.

        All `P` entries are written (those past `num_kept[b]` land in uncommitted slots), so the caller
        keeps `committed_len + P` within the capacity; checking it here would make the host wait for the
        device every round. Nothing is written out of bounds either way (the Triton kernel drops such
        entries, the torch reference raises).

        Args:
            path: `(B, P)` scratch indices (root first), padded arbitrarily past `num_kept[b]`.
            num_kept: `(B,)` how many entries of each row's path become committed.
        """
        kernels.compact_kv(self.kv, self.kv_tree, path, self.committed_len)
        self.committed_len += num_kept

    def target_kv(self) -> TargetKV:
        """The last layer's committed K/V, as the draft's cross-attention reads it."""
        return TargetKV(key=self.kv[-1, 0], value=self.kv[-1, 1], start=self.pad_start, end=self.committed_len)

    # ----- transformers Cache API ------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.committed_len.max())

    def get_max_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.kv_tree.numel() * self.kv_tree.element_size()
