"""The target's preallocated KV cache for LongSpec decoding.

The layers of one device live in one tensor `kv` of shape `(num_layers, 2, B, Hkv, capacity, D)`, so that
an accepted path is compacted into place in every layer with one gather/scatter. Row `b` holds its left
padding in slots `[0, pad_start[b])` and its committed tokens in `[pad_start[b], committed_len[b])`; token
slot `s` has position `s - pad_start[b]`. A tree forward writes its K/V into the separate `kv_tree` scratch.

A target whose layers run on several devices (accelerate's `device_map`) gets one such segment per run of
consecutive layers on one device, each with its own copy of `pad_start` and `committed_len`. The draft
reads the last layer's K/V on the cache's own device (the draft's): when that layer runs elsewhere, a
mirror of it is kept there, written by the same forwards and compacted with the rest.

A tensor-parallel target (its key/value heads split over the processes of a group) keeps only this
process's heads, `Hkv` being the local head count; the draft, which runs whole on every process, reads a
mirror of the last layer with every head (`Hkv_all`), gathered over the group as the layer writes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import kernels
from ..modeling import TargetKV
from .placement import same_device


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


@dataclass
class _Segment:
    """Consecutive layers `layers` whose K/V live on one device, with that device's copy of the lengths."""

    layers: range
    kv: torch.Tensor  # (len(layers), 2, B, Hkv, capacity, D); the mirror of a sharded target: Hkv_all heads
    kv_tree: torch.Tensor  # (len(layers), 2, B, Hkv, max_tree_nodes, D); likewise
    pad_start: torch.Tensor  # (B,)
    committed_len: torch.Tensor  # (B,)


class LayerKV(NamedTuple):
    """One layer's K/V as its attention reads them, all on the layer's device."""

    kv: torch.Tensor  # (2, B, Hkv, capacity, D)
    kv_tree: torch.Tensor  # (2, B, Hkv, max_tree_nodes, D)
    pad_start: torch.Tensor  # (B,)
    committed_len: torch.Tensor  # (B,)


class LongSpecCache(Cache):
    """Preallocated target cache with per-row committed lengths, tree scratch slots and `compact`.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the target's cache layout (`num_kv_heads`: the heads
            this process's attention sees).
        capacity: slots per row (prompt with its padding + every token that can be committed).
        max_tree_nodes: scratch slots for one verification tree (root included).
        pad_start: `(B,)` left-padding length of every row.
        device, dtype: of the K/V tensors, and the device of `pad_start` / `committed_len` / `target_kv`.
        layer_devices: the device each layer's attention runs on (default: all on `device`).
        head_group: for a tensor-parallel target, the process group over which its key/value heads are
            split (each process holding `num_kv_heads` consecutive heads, in the group's rank order): the
            draft's mirror of the last layer then holds every head, gathered over the group.

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
        layer_devices: Sequence[torch.device] | None = None,
        head_group: "torch.distributed.ProcessGroup | None" = None,
    ):
        super().__init__(layers=[_LayerView(self, i) for i in range(num_layers)])
        layer_devices = list(layer_devices) if layer_devices is not None else [device] * num_layers
        if len(layer_devices) != num_layers:
            raise ValueError(f"{len(layer_devices)} layer devices for {num_layers} layers")
        self.pad_start = pad_start.to(device=device, dtype=torch.long)
        self.committed_len = torch.zeros(batch_size, device=device, dtype=torch.long)

        def segment(layers: range, on: torch.device, heads: int = num_kv_heads) -> _Segment:
            shape = (len(layers), 2, batch_size, heads)
            on_main = same_device(on, device)
            return _Segment(
                layers,
                torch.zeros(*shape, capacity, head_dim, device=on, dtype=dtype),
                torch.zeros(*shape, max_tree_nodes, head_dim, device=on, dtype=dtype),
                self.pad_start if on_main else self.pad_start.to(on),
                self.committed_len if on_main else self.committed_len.to(on),
            )

        starts = [i for i in range(num_layers) if i == 0 or not same_device(layer_devices[i], layer_devices[i - 1])]
        self.segments = [
            segment(range(start, end), layer_devices[start]) for start, end in zip(starts, [*starts[1:], num_layers])
        ]
        self._segment_of = [seg for seg in self.segments for _ in seg.layers]
        # The draft's copy of the last layer, when that layer runs on another device or holds some heads only.
        last = num_layers - 1
        self.head_group = head_group
        self.mirror = None
        if head_group is not None:
            all_heads = num_kv_heads * torch.distributed.get_world_size(head_group)
            self.mirror = segment(range(last, last + 1), device, all_heads)
        elif not same_device(layer_devices[last], device):
            self.mirror = segment(range(last, last + 1), device)
        # Passed as a LongSpec forward's `attention_mask`: transformers hands a 4D mask to the attention
        # as it is instead of building one (the LongSpec attention reads positions from the cache).
        self.mask_placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        self._write_tree = False
        self._write_start = self._write_len = 0

    @property
    def kv(self) -> torch.Tensor:
        """All layers' K/V `(num_layers, 2, B, Hkv, capacity, D)`, for a cache on one device (this process's
        heads, for a target whose heads are split over processes)."""
        if len(self.segments) > 1:
            raise RuntimeError("the cache's layers live on several devices: read them with layer_kv(layer)")
        return self.segments[0].kv

    @property
    def capacity(self) -> int:
        return self.segments[0].kv.shape[4]

    @property
    def max_tree_nodes(self) -> int:
        return self.segments[0].kv_tree.shape[4]

    def layer_kv(self, layer_idx: int) -> LayerKV:
        segment = self._segment_of[layer_idx]
        index = layer_idx - segment.layers.start
        return LayerKV(segment.kv[index], segment.kv_tree[index], segment.pad_start, segment.committed_len)

    def _all_segments(self) -> list[_Segment]:
        return self.segments if self.mirror is None else [*self.segments, self.mirror]

    def _publish_lengths(self, pad_start: bool = False) -> None:
        """Copy `committed_len` (and with `pad_start`, which changes only when a call starts, `pad_start`)
        to the segments on other devices."""
        for segment in self._all_segments():
            if segment.committed_len is not self.committed_len:
                segment.committed_len.copy_(self.committed_len)
                if pad_start:
                    segment.pad_start.copy_(self.pad_start)

    # ----- write plans ---------------------------------------------------------------------------------
    def start(self, pad_start: torch.Tensor) -> None:
        """A new call: rows are left-padded by `pad_start` `(B,)`; nothing is committed."""
        self.pad_start.copy_(pad_start)
        self.committed_len.zero_()
        self._publish_lengths(pad_start=True)

    def begin_prefill(self, start: int, end: int) -> None:
        """The next forward writes prompt slots `[start, end)` of every row (a chunk of the prompt); the
        slots before `start` are committed (`committed_len` = `start`). [`end_prefill`] commits the rest."""
        if end > self.capacity:
            raise ValueError(f"prompt of {end} slots exceeds the cache capacity {self.capacity}")
        self._write_tree, self._write_start, self._write_len = False, start, end - start
        self.committed_len.fill_(start)
        self._publish_lengths()

    def end_prefill(self, num_tokens: int) -> None:
        """The prompt's `num_tokens` slots are written: commit them."""
        self.committed_len.fill_(num_tokens)
        self._publish_lengths()

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
        are the prompt chunk (prefill) or the tree nodes (tree forward). With a `head_group`, the last
        layer's call is a collective: every process of the group makes it, in the same forward.
        """
        length = key_states.shape[2]
        # (Not under torch.compile: comparing the traced length with the plan would pin it to one prompt length.)
        if not torch.compiler.is_compiling() and length != self._write_len:
            raise RuntimeError(f"forward of {length} tokens does not match the cache's write plan ({self._write_len})")
        segment = self._segment_of[layer_idx]
        written = self._write(segment, layer_idx - segment.layers.start, key_states, value_states)
        if self.mirror is not None and layer_idx == self.mirror.layers.start:
            device = self.mirror.kv.device
            if self.head_group is not None:
                key_states, value_states = self._all_heads(key_states, value_states)
            self._write(self.mirror, 0, key_states.to(device), value_states.to(device))
        return written

    def _all_heads(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's `(B, Hkv, T, D)` keys/values of the head group, as `(B, Hkv_all, T, D)` (one
        all-gather of keys and values together; a list of tensors, which every backend gathers into)."""
        local = torch.stack((key_states, value_states))
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(self.head_group))]
        torch.distributed.all_gather(parts, local, group=self.head_group)
        gathered = torch.cat(parts, dim=2)
        return gathered[0], gathered[1]

    def _write(self, segment: _Segment, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        target = segment.kv_tree if self._write_tree else segment.kv
        start = 0 if self._write_tree else self._write_start
        written = slice(start, start + key_states.shape[2])
        target[index, 0, :, :, written] = key_states
        target[index, 1, :, :, written] = value_states
        return target[index, 0, :, :, written], target[index, 1, :, :, written]

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
        for segment in self._all_segments():
            kernels.compact_kv(segment.kv, segment.kv_tree, path.to(segment.kv.device), segment.committed_len)
        self.committed_len += num_kept
        self._publish_lengths()

    def target_kv(self) -> TargetKV:
        """The last layer's committed K/V, as the draft's cross-attention reads it (on the cache's device;
        every head, also for a target whose heads are split over processes)."""
        last = self.mirror if self.mirror is not None else self.segments[-1]
        return TargetKV(key=last.kv[-1, 0], value=last.kv[-1, 1], start=self.pad_start, end=self.committed_len)

    # ----- transformers Cache API ------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.committed_len.max())

    def get_max_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        tensors = [t for segment in self._all_segments() for t in (segment.kv, segment.kv_tree)]
        return sum(t.numel() * t.element_size() for t in tensors)
