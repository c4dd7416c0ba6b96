"""A graph pass of compiled steps: projections that read one input run as one grouped launch.

A decoding step multiplies a few rows by each layer's weights. Where several weights read the same rows
(the query, key and value projections of the normed hidden states; gate and up of the MLP), the pass
replaces their matrix products in Inductor's post-grad graph by one `longspec::grouped_linear` call
(`kernels.grouped_linear`): one Triton launch that reads every weight once, in place (nothing is
concatenated or copied), where each alone is a cuBLAS call too small to fill the GPU.

It matches what `nn.Linear` lowers to, `mm(x, permute(w, [1, 0]))` or `addmm(b, x, permute(w, [1, 0]))`,
grouping products whose `x` is the same tensor seen with the same 2-D shape; it leaves alone everything
else (a product whose weight is computed inside the graph after the first of its group, a 2-D bias,
scaled `addmm`s). The values are those of the separate products up to the order of float32 sums.

It runs on the compiled target's verify forward and the compiled draft's steps (whose block has the same
projections), where it wins. Measured on an H200 (bf16, `bench/grouped_linear.py`): one launch for the
query/key/value products of the 8B layouts takes 0.016-0.020 ms against 0.028 ms for cuBLAS's three at 1 to
26 rows, whose key and value products are each too small to fill the GPU; gate/up, two 14336- or
18944-row weights that cuBLAS reads at 85-88% of the copy bandwidth, ties or wins at 1-4 rows (0.063 against
0.062-0.065 ms, 0.066 against 0.075) and loses at 26 (0.071 against 0.062); at 64 rows every group loses.
Hence `worth_grouping`: up to `MAX_SMALL_GROUPED_ROWS` rows every group, up to `MAX_GROUPED_ROWS` only
groups of weights of at most `MAX_WEIGHT_ROWS_AT_MORE_ROWS` rows each.

On by default on CUDA devices (`LONGSPEC_HF_FUSED_PROJECTIONS=1`); `0` leaves the compiled graphs Inductor's own; `all`
also gives the kernel the products that share their input with no other (the output and down projections,
the LM head; under the same row rule), slower than cuBLAS for the output and down projections and kept
for measuring. Read when a workspace's steps are made, so a kept workspace keeps the setting it was made
with.
"""

from __future__ import annotations

import operator
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .. import kernels

ENVIRONMENT_VARIABLE = "LONGSPEC_HF_FUSED_PROJECTIONS"
SETTINGS = ("0", "1", "all")  # off, groups of one input (the default), every projection
# Where the grouped kernel runs, and was measured faster than the separate products.
DEVICE_TYPES = ("cuda",)
# Which groups the kernel runs faster than cuBLAS (measured; see the module's description).
MAX_SMALL_GROUPED_ROWS = 16
MAX_GROUPED_ROWS = 32
MAX_WEIGHT_ROWS_AT_MORE_ROWS = 4096

_aten = torch.ops.aten
_RESHAPES = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)


def fused_projections_setting() -> str:
    """`LONGSPEC_HF_FUSED_PROJECTIONS` (unset: "1"), checked against `SETTINGS`."""
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() or "1"
    if setting not in SETTINGS:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={setting!r} is not a setting: use 0 (off), 1 (one launch for the projections "
            "of one input: query/key/value, gate/up) or all (every projection through that kernel)."
        )
    return setting


def projection_pass(device: torch.device) -> "FusedProjections | None":
    """The pass for compiled steps made now on `device`: None where it is switched off, or where the grouped
    kernel does not run (elsewhere the grouped operator is the same products, only hidden from Inductor).
    The setting is checked either way."""
    setting = fused_projections_setting()
    if setting == "0" or torch.device(device).type not in DEVICE_TYPES:
        return None
    return FusedProjections(singles=setting == "all")


@dataclass
class _Projection:
    """One matrix product `x @ weight.T (+ bias)` of the graph."""

    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None


def _as_projection(node: torch.fx.Node) -> _Projection | None:
    """`node` as a linear layer's product, or None if it is not one the grouped kernel computes alike."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is _aten.mm.default:
        (x, transposed), bias = node.args, None
    elif node.target is _aten.addmm.default and len(node.args) == 3:
        bias, x, transposed = node.args
    else:
        return None
    if not (isinstance(transposed, torch.fx.Node) and transposed.op == "call_function"):
        return None
    if transposed.target is _aten.permute.default and list(transposed.args[1]) == [1, 0]:
        weight = transposed.args[0]
    elif transposed.target is _aten.t.default:
        weight = transposed.args[0]
    else:
        return None
    values = [_value(n) for n in (x, weight, bias) if n is not None]
    if any(v is None for v in values) or len({(v.dtype, v.device) for v in values}) != 1:
        return None
    if bias is not None and _value(bias).dim() != 1:
        return None
    if not isinstance(_value(x).shape[0], int):  # a symbolic number of rows may be any
        return None
    return _Projection(node, x, weight, bias)


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _input_key(x: torch.fx.Node) -> tuple:
    """The same rows under per-layer views: each `nn.Linear` reshapes its input to 2-D on its own."""
    shape = tuple(_value(x).shape)
    while x.op == "call_function" and x.target in _RESHAPES:
        x = x.args[0]
    return x, shape


class FusedProjections(CustomGraphPass):
    """Post-grad pass of compiled steps (see the module's description); `singles`: also the products that
    share their input with no other."""

    def __init__(self, singles: bool = False):
        self.singles = singles

    def __call__(self, graph: torch.fx.Graph) -> None:
        groups: dict[tuple, list[_Projection]] = defaultdict(list)
        for node in graph.nodes:
            projection = _as_projection(node)
            if projection is not None:
                groups[_input_key(projection.x), projection.bias is None].append(projection)
        order = {node: index for index, node in enumerate(graph.nodes)}
        for members in groups.values():
            if (len(members) > (0 if self.singles else 1) and worth_grouping(members[0].x, [p.weight for p in members])
                    and _inputs_precede(members, order)):
                _group(graph, members)
        graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        # Compiled graphs are cached by this: it changes with the pass or the kernel's entry points.
        return get_hash_for_files((__file__, str(Path(kernels.__file__))), extra=f"singles={self.singles}")


def worth_grouping(x: torch.fx.Node, weights: list[torch.fx.Node]) -> bool:
    """Whether one grouped launch beats cuBLAS's products for `x` `(M, K)` and these weights `(N_i, K)`."""
    rows = _value(x).shape[0]
    if rows <= MAX_SMALL_GROUPED_ROWS:
        return True
    return rows <= MAX_GROUPED_ROWS and all(_value(w).shape[0] <= MAX_WEIGHT_ROWS_AT_MORE_ROWS for w in weights)


def _inputs_precede(members: list[_Projection], order: dict) -> bool:
    """Whether every weight and bias exists where the grouped call goes: before the first product."""
    first = order[members[0].node]
    return all(order[n] < first for p in members for n in (p.weight, p.bias) if n is not None)


def _group(graph: torch.fx.Graph, members: list[_Projection]) -> None:
    first = members[0]
    with graph.inserting_before(first.node):
        grouped = graph.call_function(
            torch.ops.longspec.grouped_linear.default,
            (first.x, [p.weight for p in members], [p.bias for p in members]),
        )
        grouped.meta["val"] = [p.node.meta["val"] for p in members]
        outputs = [graph.call_function(operator.getitem, (grouped, index)) for index in range(len(members))]
    # Erased only now: the nodes above are inserted before the first product.
    for projection, output in zip(members, outputs):
        output.meta["val"] = projection.node.meta["val"]
        projection.node.replace_all_uses_with(output)
        graph.erase_node(projection.node)
