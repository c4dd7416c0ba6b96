"""The automatic tree: the level widths that promise the most tokens per second at a call's context.

A round's tree of `N` nodes gains `E(widths)` tokens (expected) and costs one target forward over `N`
nodes plus one draft pass per level. Both depend on the shapes: at 4k tokens a 69-node tree costs an
8B target 1.6x a one-token step, at 128k 2.5x (its verify attention reads the long prefix once per
128 query rows, and 69 nodes x 4 grouped heads are three such tiles), while a 135M target's round
costs the same with 15 nodes or 69, kernel launches being most of it. [`choose_round_shape`] scores
a ladder of trees by `E / cost` and takes the best:

- `E(widths) = 1 + sum_d prod_{k <= d} a(w_k)`, where `a(w) = 1 - (1 - top1) * w ** -width_exponent`
  is the chance that level `k`'s `w` beams hold the target's token once its parent was accepted (a
  prior fitted to the bundled SmolLM2 draft on held-out code: `[4, 16, 16, 16, 16]` 3.81 tokens per
  round, `[2, 4, 4, 4]` 3.03; a draft's generation config may give its own as `acceptance_prior`; greedy
  calls move `top1` toward what the draft's earlier greedy calls recorded, `running_prior.py`).
- `cost` from a roofline of the target's and the draft's shapes ([`RoundCost`]): bytes read over the
  memory bandwidth or matrix FLOPs over the matmul rate, whichever is larger, per GEMM and per
  attention tile, plus a fixed cost per layer and per draft level; the constants of [`CUDA`] and
  [`CPU`] reproduce the measured round costs of an 8B layout at 4k-128k on an H200 within ~10%
  (BENCHMARKS.md) and SmolLM2's on a two-core CPU.

The choice depends only on shapes, the context length (rounded to a power of two) and the acceptance
estimate, never on timing, so calls of similar length share one tree shape and its CUDA graphs. The tree never changes
what is emitted: every verification rule is exact for any tree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modeling import DEFAULT_TREE_WIDTHS

# The prior of `a(w)` (see the module docstring) when the draft's generation config gives none.
DEFAULT_TOP1_ACCEPTANCE = 0.58
DEFAULT_WIDTH_EXPONENT = 0.4


@dataclass(frozen=True)
class Hardware:
    """Roofline constants of a device kind.

    Attributes:
        bandwidth: bytes per second a forward reads its weights and K/V at.
        matmul_flops: FLOP per second of the GEMMs.
        attention_flops: FLOP per second of the tree attention kernel once it is bound by its products.
        attention_rows: query rows (nodes x grouped heads) one attention tile holds; the prefix is read
            once per tile. 0: no tiling (the torch reference).
        gemm_rows: the GEMMs' row tile (a forward of `N` rows costs as many FLOPs as the next multiple).
        multi_row_read_factor: how much slower a GEMM of several rows reads its weights than a GEMV.
        overlapped: whether a GEMM's reads and products overlap (GPU: its time is the larger of the two;
            CPU: their sum).
        layer_seconds: fixed cost of one layer of a forward (kernel launches).
        level_seconds: fixed cost of one draft level.
    """

    bandwidth: float
    matmul_flops: float
    attention_flops: float
    attention_rows: int
    gemm_rows: int
    multi_row_read_factor: float
    overlapped: bool
    layer_seconds: float
    level_seconds: float


CUDA = Hardware(3.5e12, 600e12, 450e12, attention_rows=128, gemm_rows=64, multi_row_read_factor=1.0,
                overlapped=True, layer_seconds=45e-6, level_seconds=100e-6)
CPU = Hardware(8e9, 110e9, 110e9, attention_rows=0, gemm_rows=1, multi_row_read_factor=1.6,
               overlapped=False, layer_seconds=100e-6, level_seconds=3e-3)


@dataclass(frozen=True)
class RoundCost:
    """Seconds of a target forward over `N` nodes and of a draft level, from the models' shapes.

    Attributes:
        hardware: the device's roofline constants.
        batch_size: rows decoded together.
        target_params: parameters a target forward multiplies by (embedding lookup excluded).
        element_size: bytes per parameter and per cached K/V element.
        num_layers: target layers.
        kv_heads, head_dim, group: the target's K/V heads, head dim, query heads per K/V head.
        layer_contexts: keys each layer attends to (the window for windowed layers).
        draft_params: parameters a draft level multiplies by (its block and the LM head rows it scores).
    """

    hardware: Hardware
    batch_size: int
    target_params: int
    element_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    group: int
    layer_contexts: tuple[int, ...]
    draft_params: int

    def forward(self, num_nodes: int) -> float:
        """Seconds of one target forward verifying `num_nodes` nodes per row."""
        hw, rows = self.hardware, self.batch_size * num_nodes
        read = self.target_params * self.element_size / hw.bandwidth
        if num_nodes > 1:
            read *= hw.multi_row_read_factor
        gemm_rows = math.ceil(rows / hw.gemm_rows) * hw.gemm_rows
        seconds = _combine(hw, read, 2 * self.target_params * gemm_rows / hw.matmul_flops)
        return seconds + sum(self._attention(num_nodes, context) for context in self.layer_contexts) + (
            self.num_layers * hw.layer_seconds
        )

    def _attention(self, num_nodes: int, context: int) -> float:
        hw = self.hardware
        kv_bytes = self.batch_size * self.kv_heads * context * self.head_dim * 2 * self.element_size
        query_rows = num_nodes * self.group
        if hw.attention_rows:  # the prefix is read once per tile of query rows, each tile computed whole
            tiles, tile_rows = math.ceil(query_rows / hw.attention_rows), min(query_rows, hw.attention_rows)
        else:
            tiles, tile_rows = 1, query_rows
        flops = 4 * self.batch_size * self.kv_heads * tile_rows * self.head_dim * context
        return tiles * _combine(hw, kv_bytes / hw.bandwidth, flops / hw.attention_flops)

    def draft_level(self, num_parents: int) -> float:
        """Seconds of one draft level expanding `num_parents` nodes per row (its block, the LM head rows
        it scores, and its cross-attention's read of the target's last-layer K/V)."""
        hw = self.hardware
        kv_bytes = self.batch_size * self.kv_heads * self.layer_contexts[-1] * self.head_dim * 2 * self.element_size
        read = (self.draft_params * self.element_size + kv_bytes) / hw.bandwidth
        flops = 2 * self.draft_params * self.batch_size * num_parents / hw.matmul_flops
        return hw.level_seconds + _combine(hw, read, flops)

    def round(self, widths: tuple[int, ...], extra_nodes: int = 0) -> float:
        """Seconds of a round drafting `widths` and verifying them with `extra_nodes` more nodes."""
        parents = (1, *widths[:-1]) if widths else ()
        return self.forward(1 + sum(widths) + extra_nodes) + sum(self.draft_level(p) for p in parents)


def _combine(hardware: Hardware, read_seconds: float, compute_seconds: float) -> float:
    if hardware.overlapped:
        return max(read_seconds, compute_seconds)
    return read_seconds + compute_seconds


def round_cost(
    target: torch.nn.Module, draft: torch.nn.Module, batch_size: int, context: int, hardware: Hardware | None = None
) -> RoundCost:
    """The [`RoundCost`] of decoding with `target` and `draft` at `context` tokens per row, on `hardware`
    (default: [`CUDA`] for a CUDA target, else [`CPU`])."""
    config = target.config.get_text_config()
    parameter = next(target.parameters())
    embedding = target.get_input_embeddings().weight
    output = target.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    target_params = sum(p.numel() for p in target.parameters()) - (0 if tied else embedding.numel())
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layer_contexts = tuple(min(context, window or context) for window in _layer_windows(config))
    draft_config = draft.config
    head_rows = draft_config.draft_vocab_size or draft_config.target_vocab_size or config.vocab_size
    draft_params = sum(p.numel() for name, p in draft.named_parameters() if "embed" not in name)
    return RoundCost(
        hardware=hardware or (CUDA if parameter.device.type == "cuda" else CPU),
        batch_size=batch_size,
        target_params=target_params,
        element_size=parameter.element_size(),
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        group=num_heads // kv_heads,
        layer_contexts=layer_contexts,
        draft_params=draft_params + head_rows * config.hidden_size,
    )


def _layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model family declares it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


def expected_tokens(widths: tuple[int, ...], top1: float, width_exponent: float) -> float:
    """Tokens a round of this tree gains on average under the prior (see the module docstring)."""
    tokens, survive = 1.0, 1.0
    for width in widths:
        survive *= 1.0 - (1.0 - top1) * width ** -width_exponent
        tokens += survive
    return tokens


def candidate_trees(largest: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The ladder of trees the choice is made from, none deeper or wider per level than `largest`: a
    first level of up to 4 nodes, then levels of one width, 1 to 16 nodes, 2 levels to `len(largest)`."""
    trees = {tuple(largest)}
    for depth in range(2, len(largest) + 1):
        for width in (1, 2, 4, 6, 8, 12, 16):
            tree = (min(4, width), *[width] * (depth - 1))
            if all(w <= cap for w, cap in zip(tree, largest)):
                trees.add(tree)
    return sorted(trees, key=lambda tree: (len(tree), tree))


def context_bucket(num_tokens: int) -> int:
    """`num_tokens` rounded to the nearest power of two (at least 1024): calls of similar lengths get
    one tree shape."""
    return max(1024, 2 ** round(math.log2(max(1, num_tokens))))


@dataclass(frozen=True)
class RoundShape:
    """What a round verifies: the draft tree's level widths and the prompt-lookup chains under its root."""

    tree_widths: tuple[int, ...]
    lookup_branches: int = 0
    lookup_length: int | None = None


# Lookup chains the automatic choice considers: one chain of one of these lengths, or none.
LOOKUP_LENGTHS = (5, 8, 16)


def choose_round_shape(
    cost: RoundCost,
    extra_nodes: Callable[[tuple[int, ...]], int] = lambda widths: 0,
    *,
    largest: tuple[int, ...] = DEFAULT_TREE_WIDTHS,
    top1: float = DEFAULT_TOP1_ACCEPTANCE,
    width_exponent: float = DEFAULT_WIDTH_EXPONENT,
    lookup_matches: list[int] | None = None,
) -> RoundShape:
    """The round with the most expected tokens per second: a tree of [`candidate_trees`]`(largest)` or
    `()` (no draft), and, when `lookup_matches` is given, one lookup chain of `LOOKUP_LENGTHS` or none.

    `extra_nodes(widths)` counts lookup-chain nodes the call fixed itself. `lookup_matches` are the
    prompt's own chain matches ([`retrieval.prompt_lookup_matches`]): at a position where a chain
    matches `c` tokens, the round gains the longer of the chain's `min(c, L)` and the tree's expected
    gain `t`, so a chain adds `mean(max(t, min(c, L))) - t` tokens (the tree serves where the chain
    fails, the chain where the text repeats itself).
    """
    shapes = [RoundShape(())] + [RoundShape(widths) for widths in candidate_trees(largest)]
    if lookup_matches:
        shapes += [RoundShape(s.tree_widths, 1, length) for s in list(shapes) for length in LOOKUP_LENGTHS]
        # How often each match length occurs: a shape's gain is then a sum over a few distinct values
        # (this runs before every call's first forward, for a hundred shapes).
        match_counts = Counter(lookup_matches)

    def tokens_per_second(shape: RoundShape) -> float:
        gain = expected_tokens(shape.tree_widths, top1, width_exponent) - 1.0
        if shape.lookup_branches:
            gained = sum(count * max(gain, min(c, shape.lookup_length)) for c, count in match_counts.items())
            gain = gained / len(lookup_matches)
        nodes = extra_nodes(shape.tree_widths) + shape.lookup_branches * (shape.lookup_length or 0)
        return (1.0 + gain) / cost.round(shape.tree_widths, nodes)

    return max(shapes, key=tokens_per_second)  # the first of equals: no draft before any tree
