"""Every name of transformers that longspec-hf uses beyond its documented API, in one place.

Each entry says what it relies on. The CPU suite runs on the lowest supported transformers (5.17) and
on the newest, so a release that changes one of these fails there first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

# `GenerationMixin.generate` is public, but replacing it on the class is how `generate(...,
# assistant_model=<LongSpecDraftModel>)` reaches LongSpec: kept here to call it and to restore it.
ORIGINAL_GENERATE = GenerationMixin.generate


def install_generate(generate: Callable) -> None:
    """Make `generate` every model's `generate` (it hands calls without a LongSpec draft to
    `ORIGINAL_GENERATE` unchanged)."""
    GenerationMixin.generate = generate


def eos_token_ids(generation_config: GenerationConfig) -> set[int]:
    """The EOS ids of a generation config prepared by `generate` (`_prepare_special_tokens` stores them
    as the private tensor `_eos_token_tensor`, one or several ids, or None)."""
    eos = getattr(generation_config, "_eos_token_tensor", None)
    return set(eos.reshape(-1).tolist()) if eos is not None else set()


def pad_token_id(generation_config: GenerationConfig) -> int | None:
    """The pad id of a prepared generation config (`_pad_token_tensor`, which `generate` sets to the EOS
    id when the config has no pad id)."""
    pad = getattr(generation_config, "_pad_token_tensor", None)
    return int(pad) if pad is not None else None


def attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation the model's layers look up in `ALL_ATTENTION_FUNCTIONS`
    (`config._attn_implementation`; None before one is chosen, which means sdpa)."""
    return model.config._attn_implementation or "sdpa"


def eager_attention(module: torch.nn.Module) -> Callable:
    """The eager attention of `module`'s model family: transformers registers no "eager" function; each
    modeling file defines `eager_attention_forward`, which its attention modules use by default."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"{type(module).__module__} defines no eager_attention_forward to fall back on")
    return function


def dynamic_cache_holding(config, keys_values: list[tuple[torch.Tensor, torch.Tensor]], length: int):
    """A `DynamicCache` for `config` (its layer types, as `generate` builds it) whose layer `i` holds
    `keys_values[i]`, `(B, Hkv, length, D)` each, without copying them.

    `DynamicCache(ddp_cache_data=...)` would copy every layer (its layers grow by concatenation), so each
    layer is initialised by an `update` with no positions (which sets up its device and dtype in whatever
    way the installed version does) and then given its tensors directly: `DynamicLayer.keys` / `.values`
    and, for sliding-window layers, `cumulative_length`, with only the last `sliding_window - 1` positions
    kept, as their `update` keeps them.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(keys_values):
        raise RuntimeError(f"DynamicCache(config) has {len(cache.layers)} layers, the target cache {len(keys_values)}")
    for layer, (keys, values) in zip(cache.layers, keys_values):
        if type(layer) is DynamicSlidingWindowLayer:
            start = max(length - (layer.sliding_window - 1), 0)
            keys, values = keys[:, :, start:], values[:, :, start:]
        elif type(layer) is not DynamicLayer:
            raise NotImplementedError(f"returning LongSpec's cache as a {type(layer).__name__} is not supported")
        layer.update(keys[:, :, :0], values[:, :, :0])
        layer.keys, layer.values = keys, values
        if type(layer) is DynamicSlidingWindowLayer:
            layer.cumulative_length = length
    return cache


def cache_output_field() -> str:
    """The field of `GenerateDecoderOnlyOutput` that holds the call's cache: `past_key_values` in older
    releases (5.17), `cache` in newer ones (5.24, where `past_key_values` is a deprecated alias of it)."""
    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"
