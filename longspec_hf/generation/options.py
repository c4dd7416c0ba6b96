"""Every LongSpec setting of one `generate` call, validated once, in one frozen object.

[`LongSpecOptions.resolve`] turns the LongSpec keywords of a `generate` call (None: not given) into
the call's settings, taking what is not given from the generation config, then from the draft's
generation config, then from the defaults written in the fields below: this is the only place that
holds a default. It raises a ValueError that says what is wrong and how to fix it before any work.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..modeling import DEFAULT_TREE_WIDTHS
from .retrieval import branch_length
from .tree_sizing import RoundShape
from .sampling import DEFAULT_SAMPLING_RULE, SAMPLING_RULES
from .stats import LongSpecStats

# One target forward verifies every node of a round's tree: its ancestor mask grows with the square of
# the node count, and past a few hundred nodes a round costs more than the tokens it can gain.
MAX_TREE_NODES = 1024

class _NotGiven:
    """The default of every LongSpec keyword of `generate`: the call did not pass it."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN = _NotGiven()

# `tree_widths="auto"` (the default): the tree is chosen per call from the context length and the
# models' shapes (`tree_sizing.py`), within the draft's generation config's tree.
AUTO = "auto"

# Chooses the automatic round: (the largest tree allowed, lookup-chain nodes the call fixed for a tree,
# whether it may choose lookup chains too) -> the round's shape.
TreeSizer = Callable[[tuple[int, ...], Callable[[tuple[int, ...]], int], bool], RoundShape]

# The keywords of `generate` that a LongSpec call takes (their meaning: the fields below).
KEYWORDS = (
    "tree_widths",
    "sampling_rule",
    "prompt_lookup_branches",
    "prompt_lookup_length",
    "prompt_lookup_under_draft",
    "adaptive",
    "cuda_graphs",
    "compile_draft",
    "compile_target",
    "longspec_stats",
)
# Keywords for which None also means "not given" (the others must be a value of their type).
NONE_IS_DEFAULT = ("tree_widths", "sampling_rule", "prompt_lookup_length", "longspec_stats")


@dataclass(frozen=True)
class LongSpecOptions:
    """The LongSpec settings of one `generate` call.

    Attributes:
        tree_widths: nodes per level of the draft's tree, e.g. `(4, 16, 16, 16, 16)`; `()` drafts
            nothing (one token per target forward, through LongSpec's cache). `"auto"` (the default)
            is resolved per call to the tree with the most expected tokens per second at the call's
            context length, no larger than the draft generation config's `tree_widths`; with
            `prompt_lookup_branches` not given it may add a lookup chain, when the prompt repeats itself.
        auto_tree: whether `tree_widths` was chosen automatically.
        sampling_rule: with `do_sample=True`, how trees are drawn and verified (`sampling.py`).
        prompt_lookup_branches: chains found by n-gram lookup in the prompt and the output, hung under
            the root of every tree (0: off).
        prompt_lookup_length: tokens per chain (default: 16, or two past the tree's depth); a longer
            one is cut to the tokens the call generates.
        prompt_lookup_under_draft: one more chain under the draft's most likely deepest node.
        adaptive: plan every round (tree depth, chains or not) from measured speed and acceptance.
        cuda_graphs: replay the fixed-shape steps from CUDA graphs on a CUDA target (elsewhere the same
            steps run eagerly); False runs the plain eager loop.
        compile_draft: run the draft's graphed steps through `torch.compile` (greedy).
        compile_target: run the target's verify forward through `torch.compile` (the prefill stays eager).
        stats: a [`LongSpecStats`] the call fills in (keyword `longspec_stats`).
    """

    tree_widths: tuple[int, ...] = AUTO  # always a tuple once resolved
    auto_tree: bool = False
    sampling_rule: str = DEFAULT_SAMPLING_RULE
    prompt_lookup_branches: int = 0
    prompt_lookup_length: int | None = None
    prompt_lookup_under_draft: bool = False
    adaptive: bool = False
    cuda_graphs: bool = True
    compile_draft: bool = False
    compile_target: bool = False
    stats: LongSpecStats | None = field(default=None, compare=False)

    # ----- derived sizes -------------------------------------------------------------------------------
    @property
    def chain_length(self) -> int:
        """Tokens per prompt-lookup chain (0 when lookup is off)."""
        if self.prompt_lookup_branches == 0:
            return 0
        return self.prompt_lookup_length or branch_length(len(self.tree_widths))

    @property
    def leaf_length(self) -> int:
        """Tokens of the chain under the draft's deepest node (0 when there is none)."""
        return self.chain_length if self.prompt_lookup_under_draft and self.tree_widths else 0

    @property
    def max_tree_nodes(self) -> int:
        """Nodes of the largest tree a round verifies, the root included."""
        return 1 + sum(self.tree_widths) + self.prompt_lookup_branches * self.chain_length + self.leaf_length

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node of a round's tree."""
        return max(len(self.tree_widths) + self.leaf_length, self.chain_length)

    # ----- building ------------------------------------------------------------------------------------
    @classmethod
    def resolve(
        cls,
        keywords: dict[str, Any],
        *,
        generation_config: Any,
        draft_generation_config: Any = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        size_tree: TreeSizer | None = None,
    ) -> "LongSpecOptions":
        """The options of a call from its LongSpec `keywords` (names of `KEYWORDS`; `NOT_GIVEN`, or None for
        those of `NONE_IS_DEFAULT`: not given).

        `tree_widths` not given comes from `generation_config.tree_widths`, else it is `"auto"`: chosen by
        `size_tree` within the draft generation config's `tree_widths` (without `size_tree`: that tree).
        Chains longer than both `max_new_tokens` and the default are cut to the larger of the two.
        """
        unknown = set(keywords) - set(KEYWORDS)
        if unknown:
            raise TypeError(f"unknown LongSpec keywords {sorted(unknown)}; the keywords are {list(KEYWORDS)}")
        given = {
            name: value
            for name, value in keywords.items()
            if value is not NOT_GIVEN and not (value is None and name in NONE_IS_DEFAULT)
        }
        if "longspec_stats" in given:
            given["stats"] = given.pop("longspec_stats")
        if "tree_widths" not in given and getattr(generation_config, "tree_widths", None) is not None:
            given["tree_widths"] = generation_config.tree_widths
        options = cls(**{name: _checked(name, value) for name, value in given.items()})
        if options.tree_widths == AUTO:
            options = options._sized(draft_generation_config, size_tree, "prompt_lookup_branches" not in given)
        if options.prompt_lookup_branches == 0:
            for name in ("prompt_lookup_length", "prompt_lookup_under_draft"):
                if name in given and given[name] not in (False,):
                    raise ValueError(f"{name} shapes the prompt-lookup chains: pass prompt_lookup_branches > 0 too.")
        for name in ("compile_draft", "compile_target"):
            if getattr(options, name) and not options.cuda_graphs:
                raise ValueError(
                    f"{name}=True compiles the fixed-shape steps that cuda_graphs=True runs; with cuda_graphs=False "
                    "the loop runs eagerly. Drop one of the two."
                )
        # A chain never gains more than the call generates: a longer given length is cut, but not below
        # the default, so that calls of different lengths share one tree shape (and its CUDA graphs).
        default_length = branch_length(len(options.tree_widths))
        if max_new_tokens is not None and options.chain_length > max(max_new_tokens, default_length):
            options = dataclasses.replace(options, prompt_lookup_length=max(max_new_tokens, default_length))
        if options.max_tree_nodes > MAX_TREE_NODES:
            raise ValueError(
                f"A round would verify {options.max_tree_nodes} tree nodes (1 + sum(tree_widths) "
                f"{sum(options.tree_widths)} + prompt_lookup_branches {options.prompt_lookup_branches} x "
                f"{options.chain_length} chain tokens" + (" + a leaf chain" if options.leaf_length else "")
                + f"), more than the {MAX_TREE_NODES} one target forward verifies. Use fewer or narrower tree "
                "levels, fewer prompt-lookup branches or a shorter prompt_lookup_length."
            )
        return options


    def _sized(self, draft_generation_config: Any, size_tree: TreeSizer | None, choose_lookup: bool) -> "LongSpecOptions":
        """These options with the automatic tree (and, with `choose_lookup`, lookup chains) of `size_tree`."""
        largest = getattr(draft_generation_config, "tree_widths", None)
        largest = _tree_widths(largest) if largest is not None and largest != AUTO else DEFAULT_TREE_WIDTHS

        def lookup_nodes(widths: tuple[int, ...]) -> int:
            with_widths = dataclasses.replace(self, tree_widths=widths)
            return with_widths.max_tree_nodes - 1 - sum(widths)

        shape = size_tree(largest, lookup_nodes, choose_lookup) if size_tree is not None else RoundShape(largest)
        lookup = {}
        if shape.lookup_branches:
            lookup = dict(prompt_lookup_branches=shape.lookup_branches, prompt_lookup_length=shape.lookup_length)
        return dataclasses.replace(self, tree_widths=tuple(shape.tree_widths), auto_tree=True, **lookup)


def _checked(name: str, value: Any) -> Any:
    """`value` of keyword `name` in the field's type, or a ValueError saying what is accepted."""
    if name == "tree_widths":
        return _tree_widths(value)
    if name == "sampling_rule":
        if value not in SAMPLING_RULES:
            raise ValueError(f"sampling_rule must be one of {sorted(SAMPLING_RULES)}, got {value!r}")
        return value
    if name == "prompt_lookup_branches":
        return _integer(name, value, minimum=0)
    if name == "prompt_lookup_length":
        return _integer(name, value, minimum=1)
    if name == "stats":
        if not isinstance(value, LongSpecStats):
            raise ValueError(f"longspec_stats must be a longspec_hf.LongSpecStats, got {type(value).__name__}")
        return value
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return value


def _tree_widths(widths: Any) -> tuple[int, ...] | str:
    # An empty list is allowed: no drafting, one token per target forward (a baseline for benchmarks).
    if widths == AUTO:
        return AUTO
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(
            f'tree_widths must be a list of positive integers (nodes per tree level) or "auto", got {widths!r}'
        )
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(
                f"tree_widths must be a list of positive integers (nodes per tree level), got {list(widths)!r}: "
                f"{width!r} is not a positive integer"
            )
    return tuple(int(width) for width in widths)
