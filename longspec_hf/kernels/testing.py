"""Helpers for testing the kernels: random trees, ragged rows of a preallocated cache, and running
test cases under the Triton interpreter on CPU.

Nothing here runs on the inference path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def random_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    """A random tree in topological order: node 0 is the root (parent -1), node i > 0 has a parent < i."""
    return [-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, num_nodes)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Boolean `(T, T)`: entry `(i, j)` is True iff node `j` is node `i` or one of its ancestors."""
    num_nodes = len(parents)
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for node in range(num_nodes):
        walker = node
        while walker >= 0:
            mask[node, walker] = True
            walker = parents[walker]
    return mask


def random_tree_masks(batch: int, num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """`(batch, T, T)` ancestor masks of independent random trees."""
    return torch.stack([ancestor_mask(random_parents(num_nodes, generator)) for _ in range(batch)])


def ragged_bounds(lengths: list[int], capacity: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_start`, `prefix_end` for rows of the given lengths placed at random left-pad offsets of
    a cache with `capacity` slots."""
    starts = [int(torch.randint(0, capacity - length + 1, (), generator=generator)) for length in lengths]
    return torch.tensor(starts), torch.tensor([s + n for s, n in zip(starts, lengths)])


_RESULT_MARKER = "@@kernel-case-results@@"
_CHILD_SCRIPT = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_kernel_cases", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print({_RESULT_MARKER!r} + json.dumps(getattr(module, sys.argv[2])()))
"""


def run_in_triton_interpreter(module_path: str, function_name: str, timeout: float = 300.0):
    """Call `function_name()` of the Python file `module_path` in a child process whose Triton runs in
    the interpreter, and return its JSON-able result.

    The interpreter is chosen when Triton itself is imported (its own library functions are decorated
    then), so it cannot be switched on inside a process that has already imported Triton for the GPU;
    a child process keeps it away from every other test.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, module_path, function_name],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(child.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    raise RuntimeError(f"interpreter child failed (exit {child.returncode}):\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}")
