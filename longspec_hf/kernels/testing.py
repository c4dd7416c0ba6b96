"""Helpers for testing the kernels: interpreted copies of the Triton modules, random trees, ragged rows.

Nothing here runs on the inference path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch


def load_interpreted(module_name: str) -> ModuleType:
    """A private copy of `longspec_hf.kernels.<module_name>` whose kernels run in the Triton interpreter.

    `triton.jit` picks the interpreter when it decorates a function, if TRITON_INTERPRET=1 at that
    moment. The variable is set only while this copy is executed and restored right after, and the
    copy has its own module name, so the regular module (and every other Triton kernel in the process)
    keeps compiling for the GPU.
    """
    path = Path(__file__).with_name(f"{module_name}.py")
    spec = importlib.util.spec_from_file_location(f"{__package__}._interpreted_{module_name}", path)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if not module.INTERPRETED:
        raise RuntimeError(f"{module_name}: this Triton version ignored TRITON_INTERPRET at decoration time")
    return module


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
