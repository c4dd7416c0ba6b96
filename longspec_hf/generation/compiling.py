"""`torch.compile` for the fixed-shape steps of LongSpec's rounds.

The draft's root and level steps and the target's verify forward are compiled with static shapes: one
specialisation per tree level, tree shape and batch size a process decodes with. Dynamo counts them per
function, and past its default limit (8, `torch._dynamo.config.recompile_limit`) it runs the function
eagerly for every further shape: the deeper levels of a deep tree, or the plans an adaptive call tries
after its first few. These steps get more room; the global setting is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output")

# How many shapes each compiled step may be specialised for in one process.
SPECIALISATIONS = 64


def compile_fixed_shapes(fn: Callable[..., Output]) -> Callable[..., Output]:
    """`torch.compile(fn, dynamic=False)`, called with dynamo allowed `SPECIALISATIONS` specialisations of
    it. (Under a CUDA graph only the capture calls it, so the wrapper costs nothing per round.)"""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args, **kwargs) -> Output:
        limit = max(torch._dynamo.config.recompile_limit, SPECIALISATIONS)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return call


def call_model(model: torch.nn.Module, **inputs):
    """`model(**inputs)`. Compiled instead of the model itself, so that the compiled function holds no
    reference to the model (kept buffers must not keep a target alive); dynamo guards on the argument."""
    return model(**inputs)
