"""The compiled target's graph pass that groups the projections of one input (`fused_projections.py`).

On CPU the grouped operator runs the torch reference, so these tests check the rewrite itself: which
products it groups, that the compiled forward still computes the model, and that LongSpec with the pass
equals plain generate. The kernel's own tests are in test_kernels_grouped_linear.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from longspec_hf.generation.compiling import compile_fixed_shapes
from longspec_hf.generation.fused_projections import (
    ENVIRONMENT_VARIABLE,
    MAX_GROUPED_ROWS,
    MAX_SMALL_GROUPED_ROWS,
    MAX_WEIGHT_ROWS_AT_MORE_ROWS,
    FusedProjections,
    projection_pass,
)

from .conftest import make_draft, make_target
from .test_equality import random_batch

GROUPED = torch.ops.longspec.grouped_linear.default
CUDA = torch.device("cuda")  # only named: nothing here runs on it


class RecordingPass(FusedProjections):
    """The pass, keeping what the last graph it ran on calls (and the groups of every graph in `history`)."""

    history: list

    def __call__(self, graph: torch.fx.Graph) -> None:
        super().__call__(graph)
        self.groups = [[arg.meta["val"].shape for arg in node.args[1]] for node in graph.nodes if node.target is GROUPED]
        self.products = [node.meta["val"].shape for node in graph.nodes
                         if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
        self.history = [*getattr(self, "history", []), self.groups]

    def uuid(self):
        return None  # a test's pass must run, not come from the cache


def compiled_logits(model, graph_pass, ids):
    compiled = compile_fixed_shapes(lambda **inputs: model(**inputs).logits, graph_pass)
    with torch.no_grad():
        return compiled(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_query_key_value_and_gate_up_become_one_grouped_call_each(arch):
    """Per layer: q/k/v (Qwen2's with biases) as one group, gate/up as another; the output and down
    projections (inputs of their own) and the LM head stay matrix products; the logits are the model's."""
    target = make_target(arch, seed=5, num_hidden_layers=3, hidden_size=32, intermediate_size=48)
    ids = torch.randint(3, target.config.vocab_size, (2, 7))
    graph_pass = RecordingPass()
    logits = compiled_logits(target, graph_pass, ids)
    with torch.no_grad():
        expected = target(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    head_dim, kv_width = 8, 2 * 8
    attention = [torch.Size([32, 32]), torch.Size([kv_width, 32]), torch.Size([kv_width, 32])]
    mlp = [torch.Size([48, 32]), torch.Size([48, 32])]
    assert head_dim * target.config.num_attention_heads == 32
    assert graph_pass.groups == [attention, mlp] * 3
    rows = ids.numel()
    assert graph_pass.products == [torch.Size([rows, 32]), torch.Size([rows, 32])] * 3 + [
        torch.Size([rows, target.config.vocab_size])
    ]


class TwoInputs(torch.nn.Module):
    """Three products of `x` (one with a bias, two without) and two of `y`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 8, bias=False)
        self.c = torch.nn.Linear(16, 16)
        self.d, self.e = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 32, bias=False)

    def forward(self, x, y):
        return torch.cat([self.a(x), self.b(x), self.c(x), self.d(y), self.e(y)], dim=-1)


def test_only_products_of_the_same_input_and_the_same_bias_kind_are_grouped():
    module = TwoInputs().eval()
    graph_pass = RecordingPass()
    compiled = compile_fixed_shapes(module, graph_pass)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), module(x, y), rtol=1e-6, atol=1e-6)
    assert sorted(graph_pass.groups) == sorted([[torch.Size([24, 16]), torch.Size([8, 16])],
                                                [torch.Size([16, 16]), torch.Size([32, 16])]])
    assert graph_pass.products == [torch.Size([3, 16])]  # c: the only product of x with a bias


def test_every_projection_goes_to_the_kernel_with_singles():
    """`LONGSPEC_HF_FUSED_PROJECTIONS=all`: the output and down projections and the LM head become
    one-weight calls; no matrix product is left."""
    target = make_target("llama", seed=6, num_hidden_layers=2, hidden_size=32, intermediate_size=48)
    ids = torch.randint(3, target.config.vocab_size, (1, 5))
    graph_pass = RecordingPass(singles=True)
    logits = compiled_logits(target, graph_pass, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, target(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert graph_pass.products == []
    assert sorted(len(group) for group in graph_pass.groups) == [1] * 5 + [2] * 2 + [3] * 2


class WideAndNarrow(torch.nn.Module):
    """Two products of `x`, one of a weight wider than `MAX_WEIGHT_ROWS_AT_MORE_ROWS`, and two narrow
    products of `y`."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Linear(16, MAX_WEIGHT_ROWS_AT_MORE_ROWS + 1, bias=False)
        self.a, self.b, self.c = (torch.nn.Linear(16, width, bias=False) for width in (8, 24, 8))

    def forward(self, x, y):
        return torch.cat([self.wide(x), self.a(x), self.b(y), self.c(y)], dim=-1)


@pytest.mark.parametrize("rows", [MAX_SMALL_GROUPED_ROWS, MAX_GROUPED_ROWS, MAX_GROUPED_ROWS + 1])
def test_groups_are_made_only_where_the_kernel_was_measured_faster(rows):
    """Up to `MAX_SMALL_GROUPED_ROWS` rows every group; up to `MAX_GROUPED_ROWS` only groups of narrow
    weights (query/key/value of a tree round, not gate/up); beyond, none (a prefill chunk)."""
    module = WideAndNarrow().eval()
    graph_pass = RecordingPass()
    compiled = compile_fixed_shapes(module, graph_pass)
    x, y = torch.randn(rows, 16), torch.randn(rows, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), module(x, y), rtol=1e-6, atol=1e-6)
    wide, a, b, c = (torch.Size([width, 16]) for width in (MAX_WEIGHT_ROWS_AT_MORE_ROWS + 1, 8, 24, 8))
    expected = {MAX_SMALL_GROUPED_ROWS: [[wide, a], [b, c]], MAX_GROUPED_ROWS: [[b, c]], MAX_GROUPED_ROWS + 1: []}
    assert graph_pass.groups == expected[rows]
    assert len(graph_pass.products) == 4 - sum(map(len, expected[rows]))


def test_the_switch(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert projection_pass(CUDA).singles is False  # on by default where the kernel runs
    assert projection_pass(torch.device("cpu")) is None  # and only there
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    assert projection_pass(CUDA) is None
    for setting, singles in (("1", False), ("all", True), (" ALL ", True)):
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, setting)
        assert projection_pass(CUDA).singles is singles
        assert projection_pass("cpu") is None
    assert FusedProjections(singles=True).uuid() != FusedProjections().uuid()  # compiled code is cached apart
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "yes")
    for device in (CUDA, "cpu"):  # a bad setting is refused on every device
        with pytest.raises(ValueError, match="LONGSPEC_HF_FUSED_PROJECTIONS='yes' is not a setting: use 0 \\(off\\), 1"):
            projection_pass(device)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_longspec_with_the_pass_equals_plain_generate(arch, monkeypatch):
    """`compile_target=True, compile_draft=True` with the pass switched on (on CPU too, where it is off by
    default): a padded batch, greedy, equals plain generate; the verify forward's graph holds a q/k/v and a
    gate/up group per target layer, and the draft's steps group their block's projections too."""
    from longspec_hf.generation import fused_projections

    created = []
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    monkeypatch.setattr(fused_projections, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_projections, "FusedProjections", lambda **kw: created.append(RecordingPass(**kw)) or created[-1])
    rng = random.Random(f"fused {arch}")
    target = make_target(arch, seed=41)
    draft = make_draft(target, seed=42)
    ids, mask = random_batch(rng, target.config.vocab_size, 2, 35)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    reference = target.generate(ids, **kwargs)
    output = target.generate(
        ids, assistant_model=draft, tree_widths=[2, 2, 2], compile_target=True, compile_draft=True, **kwargs
    )
    assert torch.equal(output, reference)
    assert len(created) == 1  # made once, with the workspace
    verify_graphs = [g for g in created[0].history if len(g) == 2 * target.config.num_hidden_layers]
    draft_graphs = [g for g in created[0].history if len(g) != 2 * target.config.num_hidden_layers]
    assert len(verify_graphs) == 1 and any(draft_graphs)  # some of the draft's graphs hold no projection
