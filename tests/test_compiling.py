"""Compiled fixed-shape steps keep compiling new shapes past dynamo's default limit."""

from __future__ import annotations

import torch

from longspec_hf.generation.compiling import compile_fixed_shapes


def test_more_shapes_than_dynamos_default_limit_all_compile():
    from torch._dynamo.utils import counters

    def step(x: torch.Tensor) -> torch.Tensor:
        return (x * 2 + 1).sum(dim=-1)

    compiled = compile_fixed_shapes(step)
    frames = dict(counters["frames"])
    default_limit = torch._dynamo.config.recompile_limit
    shapes = range(1, default_limit + 5)
    for width in shapes:
        x = torch.arange(3 * width, dtype=torch.float32).reshape(3, width)
        assert torch.equal(compiled(x), step(x))
    compiled_frames = counters["frames"]["ok"] - frames.get("ok", 0)
    assert compiled_frames == counters["frames"]["total"] - frames.get("total", 0) == len(shapes)
    assert torch._dynamo.config.recompile_limit == default_limit
