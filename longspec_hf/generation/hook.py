"""How `target.generate(..., assistant_model=draft)` reaches the LongSpec loop.

Two class-level wrappers on `GenerationMixin`, installed once by `install()`:

- `generate`: when the assistant is a [`LongSpecDraftModel`], checks the target, the draft and the
  generation arguments before any forward pass and takes the LongSpec-only keywords (`tree_widths`,
  `longspec_stats`, `sampling_rule`, `prompt_lookup_branches` (default 0: off), `prompt_lookup_length`,
  `prompt_lookup_under_draft`, `adaptive`, `cuda_graphs`, `compile_draft`, `compile_target`; defaults
  in `SWITCHES`); then transformers' own `generate` prepares the generation config, logits processors
  and stopping criteria as usual.
- `_assisted_decoding`: where transformers would run its assisted loop, runs `longspec_decode` instead
  for a LongSpec draft.

Calls without a LongSpec draft go straight to transformers' functions.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerationMixin

from ..modeling import LongSpecDraftModel, check_supported_target
from .decoding import LongSpecStats, longspec_decode
from .sampling import resolve_sampling_rule

DEFAULT_TREE_WIDTHS = (4, 16, 16, 16, 16)
# generate() keywords that only mean something with a LongSpec draft.
LONGSPEC_KEYWORDS = (
    "tree_widths",
    "longspec_stats",
    "sampling_rule",
    "prompt_lookup_branches",
    "prompt_lookup_length",
    "prompt_lookup_under_draft",
    "adaptive",
    "cuda_graphs",
    "compile_draft",
    "compile_target",
)
# The True/False keywords among them, with their defaults.
SWITCHES = {
    "prompt_lookup_under_draft": False,
    "adaptive": False,
    "cuda_graphs": True,
    "compile_draft": False,
    "compile_target": False,
}


@dataclass
class LongSpecRequest:
    """The LongSpec-specific part of one `generate` call."""

    tree_widths: list[int]
    stats: LongSpecStats | None
    sampling_rule: str | None = None
    prompt_lookup_branches: int = 0
    prompt_lookup_length: int | None = None
    prompt_lookup_under_draft: bool = False
    adaptive: bool = False
    cuda_graphs: bool = True
    compile_draft: bool = False
    compile_target: bool = False


# Carries the request of the `generate` call being run from the `generate` wrapper to the decoding
# method transformers dispatches to; set and reset around that one call.
_current_request: contextvars.ContextVar[LongSpecRequest | None] = contextvars.ContextVar(
    "longspec_request", default=None
)

_original_generate = GenerationMixin.generate
_original_assisted_decoding = GenerationMixin._assisted_decoding
_generate_signature = inspect.signature(_original_generate)


def check_draft_matches_target(target: PreTrainedModel, draft: LongSpecDraftModel) -> None:
    """Raise a ValueError naming the first mismatch between `draft` and what `target` needs."""
    text_config = target.config.get_text_config()
    check_supported_target(text_config)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    config = draft.config
    expected = {
        "vocab size": (config.target_vocab_size, text_config.vocab_size),
        "hidden size": (config.target_hidden_size, text_config.hidden_size),
        "number of key/value heads": (config.target_num_key_value_heads, num_kv_heads),
        "head dim": (config.target_head_dim, head_dim),
    }
    for what, (made_for, actual) in expected.items():
        if made_for is not None and made_for != actual:
            raise ValueError(
                f"This LongSpec draft was made for a target with {what} {made_for}, but the target has {actual}. "
                f"Use the draft trained for this target (draft made for {config.target_name_or_path!r}), or build "
                "a new one with LongSpecDraftConfig.from_target_config(target.config)."
            )
    if config.hidden_size != text_config.hidden_size or config.head_dim != head_dim:
        raise ValueError(
            f"The draft block has hidden size {config.hidden_size} / head dim {config.head_dim}, the target "
            f"{text_config.hidden_size} / {head_dim}: the draft reads the target's embeddings and KV cache, so they must match."
        )
    if config.num_attention_heads % num_kv_heads != 0:
        raise ValueError(
            f"The draft's {config.num_attention_heads} query heads cannot be grouped over the target's "
            f"{num_kv_heads} key/value heads."
        )
    if getattr(text_config, "use_sliding_window", False) and getattr(text_config, "sliding_window", None):
        raise ValueError("LongSpec does not support targets with sliding-window attention layers enabled.")
    target_device = target.get_input_embeddings().weight.device
    if torch.is_autocast_enabled(target_device.type):
        raise ValueError(
            "generate() with a LongSpec draft does not run under torch.autocast: its caches and CUDA graphs "
            "hold one dtype. Cast both models instead, e.g. target.to(torch.bfloat16) and draft.to(torch.bfloat16)."
        )
    if draft.device != target_device:
        raise ValueError(
            f"The draft is on {draft.device} and the target on {target_device}: move the draft with draft.to(...)."
        )


def _resolve_tree_widths(
    target: PreTrainedModel, draft: LongSpecDraftModel, tree_widths: Sequence[int] | None, generation_config
) -> list[int]:
    """Per-call widths, else the generation config's, else the draft's generation config, else the default."""
    candidates = (
        tree_widths,
        getattr(generation_config, "tree_widths", None),
        getattr(target.generation_config, "tree_widths", None),
        getattr(getattr(draft, "generation_config", None), "tree_widths", None),
        getattr(draft.config, "tree_widths", None),
        DEFAULT_TREE_WIDTHS,
    )
    widths = next(c for c in candidates if c is not None)
    # An empty list is allowed: no drafting, one token per target forward (a baseline for benchmarks).
    if isinstance(widths, int) or any(int(w) < 1 or int(w) != w for w in widths):
        raise ValueError(f"tree_widths must be a list of positive integers, got {widths!r}")
    return [int(w) for w in widths]


def _check_generation_arguments(target: PreTrainedModel, generation_config, kwargs: dict) -> None:
    config = generation_config if generation_config is not None else target.generation_config

    def setting(name: str, default=None):
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)

    if (setting("num_beams", 1) or 1) > 1:
        raise ValueError(
            "Beam search (num_beams > 1) cannot be combined with a LongSpec draft: speculative decoding "
            "verifies one sequence per row. Drop assistant_model or set num_beams=1."
        )
    if (setting("num_return_sequences", 1) or 1) > 1:
        raise ValueError(
            "num_return_sequences > 1 cannot be combined with a LongSpec draft. Repeat the prompt in the batch "
            "instead, or drop assistant_model."
        )
    for name in ("output_attentions", "output_hidden_states"):
        if setting(name, False):
            raise ValueError(f"{name}=True is not supported with a LongSpec draft.")
    if kwargs.get("custom_generate") is not None:
        raise ValueError("custom_generate cannot be combined with a LongSpec draft.")


def _check_length(target: PreTrainedModel, prompt_len: int, max_length: int) -> None:
    limit = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_length - prompt_len}) is {max_length} "
            f"tokens, past the target's max_position_embeddings ({limit}). Shorten the prompt or lower max_new_tokens."
        )


def _check_integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")


@functools.wraps(_original_generate)
def generate(self: PreTrainedModel, *args, **kwargs):
    bound = _generate_signature.bind_partial(self, *args, **kwargs)
    draft = bound.arguments.get("assistant_model")
    if not isinstance(draft, LongSpecDraftModel):
        for name in LONGSPEC_KEYWORDS:
            if name in kwargs:
                raise ValueError(f"{name} is only accepted together with a LongSpec assistant_model.")
        return _original_generate(self, *args, **kwargs)
    tree_widths = kwargs.pop("tree_widths", None)
    stats = kwargs.pop("longspec_stats", None)
    sampling_rule = kwargs.pop("sampling_rule", None)
    resolve_sampling_rule(sampling_rule)  # fail before any forward pass on an unknown name
    prompt_lookup_branches = kwargs.pop("prompt_lookup_branches", 0)
    _check_integer("prompt_lookup_branches", prompt_lookup_branches, minimum=0)
    prompt_lookup_length = kwargs.pop("prompt_lookup_length", None)
    if prompt_lookup_length is not None:
        _check_integer("prompt_lookup_length", prompt_lookup_length, minimum=1)
    switches = {name: kwargs.pop(name, default) for name, default in SWITCHES.items()}
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    lookup_options = {"prompt_lookup_length": prompt_lookup_length is not None}
    lookup_options["prompt_lookup_under_draft"] = switches["prompt_lookup_under_draft"]
    for name, given in lookup_options.items():
        if given and prompt_lookup_branches == 0:
            raise ValueError(f"{name} shapes the prompt-lookup chains: pass prompt_lookup_branches > 0 too.")
    for name in ("compile_draft", "compile_target"):
        if switches[name] and not switches["cuda_graphs"]:
            raise ValueError(
                f"{name}=True compiles the fixed-shape steps that cuda_graphs=True runs; with cuda_graphs=False "
                "the loop runs eagerly. Drop one of the two."
            )
    generation_config = bound.arguments.get("generation_config")
    check_draft_matches_target(self, draft)
    _check_generation_arguments(self, generation_config, kwargs)
    request = LongSpecRequest(
        _resolve_tree_widths(self, draft, tree_widths, generation_config),
        stats,
        sampling_rule,
        prompt_lookup_branches,
        prompt_lookup_length,
        **switches,
    )
    token = _current_request.set(request)
    try:
        return _original_generate(self, *args, **kwargs)
    finally:
        _current_request.reset(token)


@functools.wraps(_original_assisted_decoding)
def _assisted_decoding(self: PreTrainedModel, input_ids, *args, **kwargs):
    draft = kwargs.get("assistant_model")
    if not isinstance(draft, LongSpecDraftModel):
        return _original_assisted_decoding(self, input_ids, *args, **kwargs)
    request = _current_request.get() or LongSpecRequest(_resolve_tree_widths(self, draft, None, None), None)
    generation_config: GenerationConfig = kwargs["generation_config"]
    _check_length(self, input_ids.shape[1], generation_config.max_length)
    return longspec_decode(
        self,
        input_ids,
        draft,
        tree_widths=request.tree_widths,
        generation_config=generation_config,
        logits_processor=kwargs["logits_processor"],
        stopping_criteria=kwargs["stopping_criteria"],
        streamer=kwargs.get("streamer"),
        attention_mask=kwargs.get("attention_mask"),
        stats=request.stats,
        sampling_rule=request.sampling_rule,
        prompt_lookup_branches=request.prompt_lookup_branches,
        prompt_lookup_length=request.prompt_lookup_length,
        prompt_lookup_under_draft=request.prompt_lookup_under_draft,
        adaptive=request.adaptive,
        cuda_graphs=request.cuda_graphs,
        compile_draft=request.compile_draft,
        compile_target=request.compile_target,
    )


def install() -> None:
    """Route LongSpec drafts through `longspec_decode` (idempotent)."""
    GenerationMixin.generate = generate
    GenerationMixin._assisted_decoding = _assisted_decoding
