"""CUDA graphs for the fixed-shape parts of a LongSpec round.

A small target spends most of a round in Python and kernel launches, not on the GPU: a 30-layer model
issues about a thousand launches per forward. Two parts of a round have shapes that stay fixed for a
whole `generate` call, read every per-row length from device tensors and never wait for the device, so
they are captured once and replayed:

- the draft's tree proposal (greedy mode), which reads the token buffer and the lengths in place, and
- the target's verify forward for a given tree shape (`verify.GraphedVerify`): lookup chains merged in,
  node positions, logits and greedy acceptance; it reads the draft graph's tree in place and copies
  other inputs into static buffers.

The graphs live in the call's `workspace.DecodingWorkspace`, which later calls of the same shape reuse.
The rest of a round (commit, output) stays eager: a dozen small launches and the host's bookkeeping,
which overlaps with the next round's draft graph.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Output = TypeVar("Output")

# One capture at a time in the process (see GraphedCall), and no `collect_garbage` during one.
_CAPTURING = threading.Lock()


def collect_garbage() -> None:
    """A full garbage collection, made while no other thread captures a graph (one caught in a reference
    cycle and destroyed in the middle of a capture would make that capture fail)."""
    with _CAPTURING:
        gc.collect()


class GraphedCall(Generic[Output]):
    """`fn()` captured in a CUDA graph on its first call and replayed on every call.

    `fn` takes no arguments: it reads and writes tensors whose addresses never change (callers copy new
    inputs into them before calling). It must also be idempotent for equal inputs, because the first
    call runs it twice (a warm-up outside the capture, which initialises cuBLAS and compiles Triton
    kernels, then the replay). Its return value may be any object holding tensors: the object made
    during the capture is returned by every call, its tensors refreshed in place by the replay, so a
    result is valid until the next call.

    With `capture=False` (tensors not on a CUDA device) every call simply runs `fn`: the fixed-shape
    steps then run eagerly, which keeps that code path testable on CPU.

    The garbage collector is off during a capture: a graph caught in an unreachable reference cycle
    could otherwise be destroyed in the middle of another capture, which then fails. Captures are made
    one at a time in the process and in thread-local mode, so that calls decoding on other threads
    meanwhile (launching kernels, allocating, waiting for the device) neither break the capture nor
    are refused by it.
    """

    def __init__(self, fn: Callable[[], Output], capture: bool = True):
        self.fn = fn
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Output | None = None

    def __call__(self) -> Output:
        if not self.capture:
            return self.fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output

    def _capture(self) -> None:
        # Capture happens on a side stream, after the device is idle (pending frees of the caching
        # allocator would otherwise be queried during the capture). `torch.cuda.graph(...)` would also
        # collect garbage and empty the allocator's cache, which on a busy Python heap costs more than a
        # whole short `generate` call and is not needed here.
        with _CAPTURING:
            torch.cuda.synchronize()
            collecting = gc.isenabled()
            gc.disable()
            try:
                self._capture_on_side_stream()
            finally:
                if collecting:
                    gc.enable()

    def _capture_on_side_stream(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self.fn()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.output = self.fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = graph


class StaticInputs:
    """Named tensors at fixed addresses; `update(name=tensor, ...)` copies new values in.

    With `adopt=True` the given tensors themselves become the static buffers (they must keep their
    addresses, e.g. another graph's outputs); `update` skips a copy whose source is the buffer itself.
    """

    def __init__(self, adopt: bool = False, **tensors: torch.Tensor):
        self.tensors = {name: tensor if adopt else tensor.clone() for name, tensor in tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def update(self, **tensors: torch.Tensor) -> None:
        for name, tensor in tensors.items():
            static = self.tensors[name]
            if tensor.data_ptr() != static.data_ptr() or tensor.stride() != static.stride():
                static.copy_(tensor)
