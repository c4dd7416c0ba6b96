"""What a captured CUDA graph is made of: node types, root nodes and kernel launch attributes.

The CUDA runtime's graph API through ctypes (torch ships the runtime library, cuda-python is not
needed). A graph can only be read while torch keeps its `cudaGraph_t`, so the graphs must be captured
inside `KeptGraphs()`. Used by `bench/round_cost.py --graph-nodes`.
"""

from __future__ import annotations

import ctypes
from collections import Counter

import torch

NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "child_graph", 5: "empty", 6: "wait_event",
              7: "event_record", 8: "semaphore_signal", 9: "semaphore_wait", 10: "mem_alloc", 11: "mem_free",
              12: "batch_mem_op", 13: "conditional"}
# cudaLaunchAttributeID values of the attributes that change how a kernel node launches.
COOPERATIVE, CLUSTER_DIMENSION = 2, 4


class KeptGraphs:
    """Inside this context every `torch.cuda.CUDAGraph()` keeps its `cudaGraph_t` after instantiation."""

    def __enter__(self):
        self.original = torch.cuda.CUDAGraph
        original = self.original
        torch.cuda.CUDAGraph = lambda: original(keep_graph=True)
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph = self.original


def _cudart() -> ctypes.CDLL:
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if not paths:
        raise RuntimeError("the CUDA runtime library is not loaded in this process")
    return ctypes.CDLL(sorted(paths)[0])


def _nodes(cudart: ctypes.CDLL, getter, handle) -> list[int]:
    count = ctypes.c_size_t(0)
    _check(getter(handle, None, ctypes.byref(count)))
    nodes = (ctypes.c_void_p * count.value)()
    _check(getter(handle, nodes, ctypes.byref(count)))
    return list(nodes)


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"CUDA runtime error {status}")


def describe(graph: torch.cuda.CUDAGraph, dot_path: str | None = None) -> dict:
    """Node type counts, root count and kernel nodes launched with clusters or cooperatively; with `dot_path`, also the verbose DOT dump of the graph."""
    cudart = _cudart()
    handle = ctypes.c_void_p(graph.raw_cuda_graph())
    nodes = _nodes(cudart, cudart.cudaGraphGetNodes, handle)
    roots = _nodes(cudart, cudart.cudaGraphGetRootNodes, handle)
    types, attributes = Counter(), Counter()
    value = (ctypes.c_uint * 16)()  # cudaLaunchAttributeValue is a 64-byte union
    for node in nodes:
        node_type = ctypes.c_int()
        _check(cudart.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(node_type)))
        types[NODE_TYPES.get(node_type.value, str(node_type.value))] += 1
        if node_type.value != 0:
            continue
        for name, attribute in [("cooperative", COOPERATIVE), ("cluster", CLUSTER_DIMENSION)]:
            ctypes.memset(value, 0, ctypes.sizeof(value))
            if cudart.cudaGraphKernelNodeGetAttribute(ctypes.c_void_p(node), attribute, value) != 0:
                attributes[f"{name}_unreadable"] += 1
            elif attribute == CLUSTER_DIMENSION and value[0] * max(1, value[1]) * max(1, value[2]) > 1:
                attributes[f"cluster_{value[0]}x{value[1]}x{value[2]}"] += 1
            elif attribute != CLUSTER_DIMENSION and value[0]:
                attributes[name] += 1
    cudart.cudaGetLastError()  # an unreadable attribute leaves an error that torch's next check would raise
    if dot_path is not None:
        _check(cudart.cudaGraphDebugDotPrint(handle, dot_path.encode(), 1))
    return dict(nodes=len(nodes), roots=len(roots), types=dict(types), kernel_attributes=dict(attributes))
