"""The target's verification forward of a round: prompt-lookup chains merged into the tree, node
positions, logits at every node and optionally greedy acceptance, run eagerly or replayed from one CUDA
graph per tree shape."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers import PreTrainedModel

from ..modeling import cache_keyword
from .attention import LongSpecAttentionInputs
from .cache import LongSpecCache
from .compiling import call_model, compile_fixed_shapes
from .cuda_graphs import GraphedCall, StaticInputs
from .retrieval import best_leaf_suffix, latest_continuation
from .tree import ChainLayout, DraftTree, GreedyAcceptance, accept_greedy


def merge_positions_verify(
    target: PreTrainedModel,
    cache: LongSpecCache,
    seq_len: torch.Tensor,
    pad_start: torch.Tensor,
    tree: DraftTree,
    chains: torch.Tensor | None,
    layout: ChainLayout | None,
    accept: bool,
    forward: Callable[..., Any] | None = None,
    tokens: torch.Tensor | None = None,
    acceptance: Callable[[DraftTree, torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[DraftTree, torch.Tensor, GreedyAcceptance | None]:
    """Hang the prompt-lookup `chains` under the root (when given) and run the target over the tree.

    With a `layout` that has a leaf chain, one more chain continues the path of the draft's most likely
    deepest node where that path's tail last occurred in the row's text (`tokens`, the `(B, S)` token
    buffer), found on the device. The nodes' K/V land in the cache's tree scratch. Returns the verified
    tree, the `(B, 1 + N, V)` logits at every node and, when `accept`, the greedy acceptance of the raw
    logits. `forward` runs the target's forward instead of `target` itself (its compiled version), and
    `acceptance` computes the acceptance instead of [`greedy_acceptance`] (its compiled version).
    """
    if chains is not None:
        leaf = leaf_chain = None
        if layout.leaf_length:
            leaf, suffix = best_leaf_suffix(tree)
            leaf_chain, _ = latest_continuation(tokens, seq_len, pad_start, suffix, layout.leaf_length)
        tree = layout.merge(tree, chains, leaf, leaf_chain)
    # The root is each row's last token.
    positions = (seq_len - 1 - pad_start)[:, None] + tree.depths[None, :]
    logits = (forward or call_model)(
        target,
        input_ids=tree.tokens,
        position_ids=positions,
        attention_mask=cache.mask_placeholder,
        **{cache_keyword(target): cache},
        use_cache=True,
        logits_to_keep=0,
        longspec=LongSpecAttentionInputs(cache, tree_mask=tree.ancestors),
    ).logits
    if not accept:
        return tree, logits, None
    return tree, logits, GreedyAcceptance(*(acceptance or greedy_acceptance)(tree, logits))


def _verify_target_of(target_ref: weakref.ref, *args, **kwargs):
    """[`merge_positions_verify`] of the target behind `target_ref` (a graph's step holds the target
    weakly, so that kept buffers never keep it alive)."""
    target = target_ref()
    if target is None:
        raise ReferenceError("the target these buffers were made for has been deleted")
    return merge_positions_verify(target, *args, **kwargs)


def greedy_acceptance(tree: DraftTree, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`accept_greedy`] of the target's raw `logits` `(B, 1 + N, V)`, as the tuple `(path, num_accepted,
    new_tokens)`: compiled, its per-level gathers and comparisons fuse into a few kernels.

    The argmax of the logits is the argmax of the float32 scores the eager path takes (the cast is exact).
    """
    result = accept_greedy(tree, logits.argmax(dim=-1))
    return result.path, result.num_accepted, result.new_tokens


class GraphedVerify:
    """[`merge_positions_verify`] replayed from one CUDA graph per tree shape (adaptive drafting uses two).

    Each graph reads the tree from static buffers. A tree whose tensors already are those buffers (the
    output of the draft's own graph, which a graph made for it adopts) costs no copy; other trees and
    the lookup chains are copied in.

    Args:
        target, cache: the model being decoded and its LongSpec cache.
        seq_len, pad_start: `(B,)` the decoding loop's row lengths and left padding (read in place).
        tokens: `(B, S)` the decoding loop's token buffer (read in place by leaf chains).
        accept: also run greedy acceptance in the graph (greedy decoding without logits processors).
        capture: capture CUDA graphs (False: run the same steps eagerly).
        compiled: run the target's forward through `torch.compile` (one specialisation per tree shape;
            the cache capacity is a dynamic dimension, so a new prompt length compiles nothing).
        graph_pass: a post-grad pass for the compiled forward ([`fused_projections.projection_pass`]).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        cache: LongSpecCache,
        seq_len: torch.Tensor,
        pad_start: torch.Tensor,
        tokens: torch.Tensor,
        accept: bool,
        capture: bool = True,
        compiled: bool = False,
        graph_pass: CustomGraphPass | None = None,
    ):
        self.target = weakref.ref(target)
        self.cache = cache
        self.seq_len = seq_len
        self.pad_start = pad_start
        self.tokens = tokens
        self.accept = accept
        self.capture = capture
        # Inductor fuses each layer's norms, rotary embedding and residual adds into a few kernels (a
        # small target's forward otherwise launches dozens of tiny kernels per layer); the attention
        # enters as the opaque operator `longspec::prefix_tree_attention`.
        self.forward = compile_fixed_shapes(call_model, graph_pass) if compiled else None
        self.acceptance = compile_fixed_shapes(greedy_acceptance) if compiled else None
        if compiled:
            # The capacity differs between prompt lengths; the forward reads only the committed slots
            # (through the attention kernel), so one compiled graph serves every capacity.
            torch._dynamo.maybe_mark_dynamic(cache.kv, 4)
        self.graphs: dict[tuple, tuple[StaticInputs, GraphedCall]] = {}

    def __call__(
        self,
        tree: DraftTree,
        chains: torch.Tensor | None = None,
        layout: ChainLayout | None = None,
        adopt: bool = False,
    ) -> tuple[DraftTree, torch.Tensor, GreedyAcceptance | None]:
        """Verify `tree` (with `chains` `(B, K, L)` merged in by `layout`, when given).

        `adopt`: `tree` keeps its tensors' addresses from call to call (a graph's output), so a new
        graph reads them in place instead of copying them.
        """
        inputs_now = dict(tokens=tree.tokens, parents=tree.parents, depths=tree.depths, ancestors=tree.ancestors)
        if chains is not None:
            inputs_now["chains"] = chains
        shape = (
            tree.num_nodes,
            *tree.level_sizes,
            None if chains is None else (tuple(chains.shape), layout.leaf_length),
        )
        if shape not in self.graphs:
            inputs = StaticInputs(adopt=adopt, **inputs_now)
            static_tree = DraftTree(
                tokens=inputs["tokens"],
                parents=inputs["parents"],
                depths=inputs["depths"],
                log_probs=torch.zeros_like(tree.log_probs),  # verification does not read them
                ancestors=inputs["ancestors"],
                level_sizes=list(tree.level_sizes),
            )
            call = GraphedCall(
                functools.partial(
                    _verify_target_of,
                    self.target,
                    self.cache,
                    self.seq_len,
                    self.pad_start,
                    static_tree,
                    inputs["chains"] if chains is not None else None,
                    layout,
                    self.accept,
                    self.forward,
                    self.tokens,
                    self.acceptance,
                ),
                self.capture,
            )
            self.graphs[shape] = (inputs, call)
        inputs, call = self.graphs[shape]
        inputs.update(**inputs_now)
        return call()
