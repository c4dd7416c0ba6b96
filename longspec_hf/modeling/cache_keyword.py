"""The name of a transformers model's cache argument and output across transformers 5.x releases.

Releases up to 5.2x call it `past_key_values`; later ones call it `cache` (the old name still works
there for a while, with a deprecation warning on every forward).
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_keyword(model: torch.nn.Module) -> str:
    """`"cache"` or `"past_key_values"`: the keyword under which `model(...)` takes its cache."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def output_cache(output):
    """The cache of a model output (`output.cache` or, on older releases, `output.past_key_values`)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")
