"""How a `generate` call reaches LongSpec decoding.

[`generate`] is a decoding method in transformers' `custom_generate=` form: transformers prepares the
generation config, logits processors and stopping criteria as for any other method, then calls it with
the prompt. It checks everything (the draft against the target, the generation arguments, the prompt,
the LongSpec keywords) before the first forward and runs [`decode`].

`import longspec_hf` makes `target.generate(..., assistant_model=<LongSpecDraftModel>)` call transformers'
`generate` with `custom_generate=generate` (and the draft bound to it, since transformers hands a
callable only its own keywords): [`route_generate`]. Every other call goes to transformers unchanged,
LongSpec keywords included (they then get transformers' own error).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import logging

from ..modeling import LongSpecDraftModel, check_supported_target, is_longspec_draft
from . import _compat
from .retrieval import prompt_lookup_matches, prompt_lookup_tokens_read
from .running_prior import acceptance_counts, draft_prior
from .tree_sizing import LOOKUP_LENGTHS, choose_round_shape, context_bucket, round_cost
from .decoding import decode
from .options import NOT_GIVEN, LongSpecOptions, TreeSizer
from .placement import head_sharding, input_device, layer_devices, on_one_device, same_device

logger = logging.get_logger(__name__)

_generate_signature = inspect.signature(_compat.ORIGINAL_GENERATE)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer=None,
    *,
    assistant_model: LongSpecDraftModel | None = None,
    tree_widths=NOT_GIVEN,
    sampling_rule=NOT_GIVEN,
    prompt_lookup_branches=NOT_GIVEN,
    prompt_lookup_length=NOT_GIVEN,
    prompt_lookup_under_draft=NOT_GIVEN,
    adaptive=NOT_GIVEN,
    cuda_graphs=NOT_GIVEN,
    compile_draft=NOT_GIVEN,
    compile_target=NOT_GIVEN,
    longspec_stats=NOT_GIVEN,
    **model_kwargs,
):
    """LongSpec decoding as a transformers decoding method (`custom_generate=`).

    Returns what `model.generate` returns without a draft: the same tokens when greedy, the same
    distribution when sampling. The LongSpec keywords are described by [`LongSpecOptions`] (not given:
    the generation config's value, else the draft's, else the default); `assistant_model` is the
    [`LongSpecDraftModel`].
    """
    draft = assistant_model
    if not is_longspec_draft(draft):
        raise ValueError(
            "longspec_hf.generate decodes with a LongSpec draft: pass assistant_model=<LongSpecDraftModel> "
            f"(got {type(draft).__name__})."
        )
    generation_config = generation_config if generation_config is not None else model.generation_config
    check_draft_matches_target(model, draft)
    _check_generation_config(generation_config)
    attention_mask = model_kwargs.get("attention_mask")
    _check_prompt(model, input_ids, attention_mask)
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    _check_length(model, input_ids.shape[1], generation_config.max_length)
    if model_kwargs.get("use_cache") is False:
        logger.warning_once("use_cache=False has no effect with a LongSpec draft: LongSpec decodes from its own cache.")
    keywords = dict(
        tree_widths=tree_widths,
        sampling_rule=sampling_rule,
        prompt_lookup_branches=prompt_lookup_branches,
        prompt_lookup_length=prompt_lookup_length,
        prompt_lookup_under_draft=prompt_lookup_under_draft,
        adaptive=adaptive,
        cuda_graphs=cuda_graphs,
        compile_draft=compile_draft,
        compile_target=compile_target,
        longspec_stats=longspec_stats,
    )
    options = LongSpecOptions.resolve(
        keywords,
        generation_config=generation_config,
        draft_generation_config=getattr(draft, "generation_config", None),
        max_new_tokens=max_new_tokens,
        size_tree=_tree_sizer(
            model, draft, input_ids, attention_mask, generation_config.max_length, bool(generation_config.do_sample)
        ),
    )
    _check_placement(model, input_ids, options)
    return decode(
        model,
        draft,
        input_ids,
        options,
        generation_config=generation_config,
        logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
        stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList(),
        streamer=streamer,
        attention_mask=attention_mask,
    )


def _tree_sizer(
    target: PreTrainedModel, draft: LongSpecDraftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    max_length: int, do_sample: bool,
) -> TreeSizer:
    """The automatic round of a call (`tree_sizing.py`): its cost model at the call's context length, the
    draft's acceptance (its generation config's `acceptance_prior`, else the default one; for a greedy
    call moved by the draft's earlier greedy calls, `running_prior.py`) and, when it may add lookup
    chains, what they would have matched along the prompt itself."""

    top1, width_exponent = draft_prior(draft)  # a malformed prior is refused before any work
    counts = acceptance_counts(draft)
    if not do_sample and counts is not None:
        top1 = counts.top1(top1)

    def size_tree(largest, lookup_nodes, choose_lookup):
        cost = round_cost(target, draft, input_ids.shape[0], context_bucket(max_length))
        matches = None
        if choose_lookup:
            # Only the rows' tails are read (left padding keeps every row's tokens at the end).
            tail = prompt_lookup_tokens_read(max(LOOKUP_LENGTHS))
            ids = input_ids[:, -tail:].tolist()
            rows = ids if attention_mask is None else [
                [token for token, kept in zip(row, mask) if kept] for row, mask in zip(ids, attention_mask[:, -tail:].tolist())
            ]
            matches = [match for row in rows for match in prompt_lookup_matches(row, max(LOOKUP_LENGTHS))]
        return choose_round_shape(
            cost, lookup_nodes, largest=largest, lookup_matches=matches, top1=top1, width_exponent=width_exponent
        )

    return size_tree


@functools.wraps(_compat.ORIGINAL_GENERATE)
def route_generate(self: PreTrainedModel, *args, **kwargs):
    """transformers' `generate`, with a LongSpec draft decoded by [`generate`]."""
    bound = _generate_signature.bind_partial(self, *args, **kwargs)
    arguments = bound.arguments
    draft = arguments.get("assistant_model")
    custom = arguments.get("custom_generate")
    if not is_longspec_draft(draft) or isinstance(custom, str):  # a folder or repo's custom_generate: transformers loads it
        return _compat.ORIGINAL_GENERATE(self, *args, **kwargs)
    if custom is not None and custom is not generate:
        raise ValueError(
            "custom_generate cannot be combined with a LongSpec draft (LongSpec is itself the decoding method). "
            "Drop one of the two."
        )
    extra = arguments.get("kwargs", {})
    _check_call_keywords(extra, arguments.get("inputs"))
    arguments["custom_generate"] = functools.partial(generate, assistant_model=draft, streamer=arguments.get("streamer"))
    arguments["assistant_model"] = None
    return _compat.ORIGINAL_GENERATE(*bound.args, **bound.kwargs)


def install() -> None:
    """Route `generate(..., assistant_model=<LongSpecDraftModel>)` to LongSpec (idempotent)."""
    _compat.install_generate(route_generate)


# ----- checks, all before the first forward ------------------------------------------------------------------
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
    made_for = f" (it was made for {config.target_name_or_path!r})" if config.target_name_or_path else ""
    for what, (wanted, actual) in expected.items():
        if wanted is not None and wanted != actual:
            raise ValueError(
                f"This LongSpec draft was made for a target with {what} {wanted}, but the target has {actual}. "
                f"Use the draft trained for this target{made_for}, or build a new one with "
                "LongSpecDraftConfig.from_target_config(target.config)."
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
    target_device = input_device(target)
    if torch.is_autocast_enabled(target_device.type):
        raise ValueError(
            "generate() with a LongSpec draft does not run under torch.autocast: its caches and CUDA graphs "
            "hold one dtype. Cast both models instead, e.g. target.to(torch.bfloat16) and draft.to(torch.bfloat16)."
        )
    if not same_device(draft.device, target_device):
        raise ValueError(
            f"The draft is on {draft.device} and the target's input embedding on {target_device}: move the draft "
            "with draft.to(...) (for a target spread over devices, to the device of its input embedding)."
        )


def _check_placement(target: PreTrainedModel, input_ids: torch.Tensor, options: LongSpecOptions) -> None:
    """A target spread over devices (device_map) or over processes (tensor parallelism) decodes eagerly: say so
    before any work if asked to compile (and refuse a head split LongSpec does not serve)."""
    embedding_device = input_device(target)
    if not same_device(input_ids.device, embedding_device):
        raise ValueError(
            f"input_ids are on {input_ids.device} but the target's input embedding on {embedding_device}: "
            "move the inputs there, e.g. inputs.to(target.device)."
        )
    if (options.compile_draft or options.compile_target) and not on_one_device(target, input_ids.device):
        devices = sorted({str(device) for device in layer_devices(target, input_ids.device)})
        raise ValueError(
            f"compile_draft/compile_target need a target on one device; this one runs its layers on {devices} "
            "(device_map). Drop compile_draft and compile_target: such a target decodes without compiling."
        )
    sharding = head_sharding(target)
    if sharding is not None and (options.compile_draft or options.compile_target):
        size = torch.distributed.get_world_size(sharding.group)
        raise ValueError(
            f"compile_draft/compile_target are not supported for a tensor-parallel target (its {sharding.num_heads} "
            f"key/value heads are split over {size} processes). Drop compile_draft and compile_target: such a "
            "target decodes without compiling (and without CUDA graphs)."
        )


def _check_call_keywords(kwargs: dict, inputs) -> None:
    """What a LongSpec call cannot take, seen in the call's own keywords (before transformers fills in
    defaults such as its own cache)."""
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "generate() with a LongSpec draft needs input_ids: the draft drafts from tokens, and inputs_embeds "
            "cannot be turned back into them. Pass input_ids (the tokenizer's output) instead of inputs_embeds."
        )
    for name in ("past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{name}= cannot be continued by a LongSpec call: LongSpec decodes from its own preallocated cache, "
                f"built from the prompt. Drop {name} and pass the whole sequence as input_ids."
            )
    mask = kwargs.get("attention_mask")
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: a LongSpec call needs "
            "one 0/1 entry per token (batch size and length equal). Pass the tokenizer's attention_mask for these ids."
        )


def _check_generation_config(generation_config: GenerationConfig) -> None:
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(
            "Beam search (num_beams > 1) cannot be combined with a LongSpec draft: speculative decoding "
            "verifies one sequence per row. Drop assistant_model or set num_beams=1."
        )
    if (generation_config.num_return_sequences or 1) > 1:
        raise ValueError(
            "num_return_sequences > 1 cannot be combined with a LongSpec draft. Repeat the prompt in the batch "
            "instead, or drop assistant_model."
        )
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, name, False):
            raise ValueError(f"{name}=True is not supported with a LongSpec draft.")
    chunk = getattr(generation_config, "prefill_chunk_size", None)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill_chunk_size must be a positive integer (prompt tokens per prefill forward), got {chunk!r}")


def _check_prompt(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)}: a LongSpec call needs at least one prompt token per row "
            "(batch, length >= 1). Start the prompt with the tokenizer's BOS token if there is no text."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}: "
            "pass the tokenizer's attention_mask for these ids."
        )
    vocab_size = model.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds the token id {bad}, outside the target's vocabulary [0, {vocab_size}). Tokenize "
            "with the target's own tokenizer."
        )


def _check_length(target: PreTrainedModel, prompt_len: int, max_length: int) -> None:
    limit = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_length - prompt_len}) is {max_length} "
            f"tokens, past the target's max_position_embeddings ({limit}). Shorten the prompt or lower max_new_tokens."
        )
