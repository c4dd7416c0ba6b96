"""The target's verification forward of a round: logits at every tree node, optionally with greedy
acceptance, run eagerly or replayed from one CUDA graph per tree shape."""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedModel

from .attention import LongSpecAttentionInputs
from .cache import LongSpecCache
from .cuda_graphs import GraphedCall, StaticInputs
from .tree import DraftTree, GreedyAcceptance, accept_greedy


def verify_logits(
    target: PreTrainedModel,
    cache: LongSpecCache,
    tree_tokens: torch.Tensor,
    positions: torch.Tensor,
    tree_mask: torch.Tensor,
) -> torch.Tensor:
    """`(B, 1 + N, V)` target logits at every node; the nodes' K/V land in the cache's tree scratch."""
    return target(
        input_ids=tree_tokens,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=0,
        longspec=LongSpecAttentionInputs(cache, tree_mask=tree_mask),
    ).logits


def verify_and_accept(
    target: PreTrainedModel, cache: LongSpecCache, tree: DraftTree, positions: torch.Tensor, accept: bool
) -> tuple[torch.Tensor, GreedyAcceptance | None]:
    """The target's logits at every node and, when `accept`, the greedy acceptance of the raw logits."""
    logits = verify_logits(target, cache, tree.tokens, positions, tree.ancestors)
    # argmax of the logits is the argmax of the float32 scores the eager path takes (the cast is exact).
    return logits, accept_greedy(tree, logits.argmax(dim=-1)) if accept else None


class GraphedVerify:
    """[`verify_and_accept`] replayed from one CUDA graph per tree shape (adaptive drafting uses two).

    Args:
        target, cache: the model being decoded and its LongSpec cache.
        accept: also run greedy acceptance in the graph (greedy decoding without logits processors).
        capture: capture CUDA graphs (False: run the same steps eagerly).
    """

    def __init__(self, target: PreTrainedModel, cache: LongSpecCache, accept: bool, capture: bool = True):
        self.target = target
        self.cache = cache
        self.accept = accept
        self.capture = capture
        self.graphs: dict[tuple[int, ...], tuple[StaticInputs, GraphedCall]] = {}

    def __call__(self, tree: DraftTree, positions: torch.Tensor) -> tuple[torch.Tensor, GreedyAcceptance | None]:
        inputs_now = dict(
            tokens=tree.tokens, parents=tree.parents, depths=tree.depths, ancestors=tree.ancestors, positions=positions
        )
        shape = (tree.num_nodes, *tree.level_sizes)
        if shape not in self.graphs:
            inputs = StaticInputs(**inputs_now)
            static_tree = DraftTree(
                tokens=inputs["tokens"],
                parents=inputs["parents"],
                depths=inputs["depths"],
                log_probs=tree.log_probs,  # not read by verification
                ancestors=inputs["ancestors"],
                level_sizes=list(tree.level_sizes),
            )
            call = GraphedCall(
                functools.partial(
                    verify_and_accept, self.target, self.cache, static_tree, inputs["positions"], self.accept
                ),
                self.capture,
            )
            self.graphs[shape] = (inputs, call)
        inputs, call = self.graphs[shape]
        inputs.update(**inputs_now)
        return call()
