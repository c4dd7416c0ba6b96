"""The target's cache after a LongSpec call, returned as `past_key_values` the way `generate` returns its own.

With `return_dict_in_generate=True`, transformers returns the cache of the call beside the sequences, so
that `generate(out.sequences, past_key_values=out.past_key_values, ...)` continues without recomputing
them. LongSpec decodes in its own preallocated [`LongSpecCache`]; [`committed_cache`] hands its committed
K/V over as a `DynamicCache`, the cache `generate` makes for these models, without copying it.

What it holds, per layer: the K/V of each row's first `prompt_len + n - 1` positions (left padding
included), `n` the fewest tokens any row generated. Plain decoding's cache holds the same for every row
(all tokens but the last, whose K/V the next step computes), except that a row which ended early (EOS,
a stopping criterion) also has the K/V of the padding tokens it was fed afterwards. LongSpec never
computes those, so the returned cache stops where the shortest row ends; `generate` given it and the
sequences runs the rest of the sequences through the target in its first forward, which computes them as
plain decoding did. Rows of equal lengths (batch size 1, no early end) get exactly plain decoding's
cache length. Every returned entry is one that was verified and committed, which LongSpec computes as a
one-token step would (exact in fp32; in bf16 up to the rounding of batched verification).

Memory: the layers are views into the call's target cache buffer (tens of GB at long contexts are not
copied). That buffer becomes the returned cache's: the call's workspace is no longer kept for later calls
(which allocate buffers and capture graphs of their own), so nothing writes into it again, and it is freed
when the returned cache and every view of it are dropped. The views hold the whole buffer, its spare slots
and shorter rows' tails included.
"""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedModel

from ..modeling import LongSpecDraftModel
from . import _compat
from .output import OutputCollector
from .workspace import DecodingWorkspace, stop_keeping


def returned_past_key_values(
    target: PreTrainedModel,
    draft: LongSpecDraftModel,
    workspace: DecodingWorkspace,
    prompt_len: int,
    output: OutputCollector,
    generation_config: GenerationConfig,
):
    """The `past_key_values` a finished call returns: [`committed_cache`] when it returns a dict (and, as
    `generate` does, when `use_cache` is on), else None."""
    if not generation_config.return_dict_in_generate or generation_config.use_cache is False:
        return None
    return committed_cache(target, draft, workspace, prompt_len, [len(tokens) for tokens in output.tokens])


def committed_cache(
    target: PreTrainedModel,
    draft: LongSpecDraftModel,
    workspace: DecodingWorkspace,
    prompt_len: int,
    generated: list[int],
):
    """The committed K/V of `workspace`'s cache as a `DynamicCache` of `target` (see the module's
    description); `generated` holds how many tokens each row kept. Call it while the workspace is still
    claimed: `draft` stops keeping it before another call could take it."""
    length = prompt_len + min(generated) - 1
    cache = workspace.cache
    committed = int(cache.committed_len.min())
    if committed < length:
        raise RuntimeError(f"the target cache committed {committed} positions, fewer than the {length} generated before the last token")
    stop_keeping(draft, workspace)
    # Each layer's K/V on its own device (a target spread over devices keeps them where its layers run).
    layers = (cache.layer_kv(index).kv for index in range(len(cache.layers)))
    keys_values = [(kv[0, :, :, :length], kv[1, :, :, :length]) for kv in layers]
    return _compat.dynamic_cache_holding(target.config, keys_values, length)
