"""The benchmark harness's report: what each method is compared with (on CPU, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from longspec_hf.benchmarking import (
    ALL_METHODS,
    Measurement,
    markdown_table,
    method_kwargs,
    no_draft_baseline,
    run_benchmark,
    summary_rows,
    write_report,
)

from .conftest import make_draft, make_target


def measurement(method: str, tokens_per_s: float, context: int = 64, prompt: int = 0, **fields) -> Measurement:
    values = dict(seconds=1.0, new_tokens=8, reference="longspec_no_draft", equal_to_reference=True, common_prefix=8)
    values.update(fields)
    return Measurement(context=context, prompt=prompt, method=method, tokens_per_s=tokens_per_s, **values)


@pytest.mark.parametrize(
    "method, baseline",
    [
        ("longspec_tree", "longspec_no_draft"),
        ("longspec_tree_compiled", "longspec_no_draft"),
        ("longspec_tree_compiled_all", "longspec_no_draft_compiled_all"),
        ("longspec_hybrid_adaptive_compiled_all", "longspec_no_draft_compiled_all"),
        ("longspec_tree_eager", "longspec_no_draft_eager"),
        ("longspec_no_draft_compiled_all", "longspec_no_draft_compiled_all"),
    ],
)
def test_no_draft_baseline_matches_the_infrastructure(method, baseline):
    assert no_draft_baseline(method) == baseline


def test_every_listed_method_has_its_generate_arguments():
    target = make_target("llama")
    draft = make_draft(target)
    draft.set_draft_vocabulary(range(0, 96, 3))
    for name in ALL_METHODS:
        kwargs = method_kwargs(name, draft)
        if "whole_vocab" in name:
            whole = kwargs["assistant_model"]
            assert whole is not draft and whole is method_kwargs(name, draft)["assistant_model"]
            assert whole.draft_vocab_ids is None and whole.config.draft_vocab_size is None
            assert draft.config.draft_vocab_size == 32
            assert all(torch.equal(whole.state_dict()[k], v) for k, v in draft.state_dict().items() if k != "draft_vocab_ids")
        else:
            assert name.startswith("hf_") or kwargs["assistant_model"] is draft
        assert kwargs.get("compile_target", False) == name.endswith("_compiled_all")
        assert kwargs.get("cuda_graphs", True) == (not name.endswith("_eager"))
    assert method_kwargs("longspec_tree_deep_adaptive_compiled_all", draft)["adaptive"] is True


def test_speedups_use_the_matching_no_draft_loop_and_medians():
    results = [
        measurement("longspec_no_draft", 100.0),
        measurement("longspec_no_draft_compiled_all", 200.0),
        measurement("longspec_no_draft_compiled_all", 240.0, prompt=1),
        measurement("longspec_tree_compiled_all", 660.0),
        measurement("longspec_tree_compiled_all", 440.0, prompt=1),
        measurement("longspec_tree", 300.0),
        measurement("longspec_tree_eager", 50.0),
    ]
    rows = {row["method"]: row for row in summary_rows(results)}
    assert rows["longspec_tree_compiled_all"]["vs_longspec_no_draft"] == pytest.approx(550.0 / 220.0)
    assert rows["longspec_tree_compiled_all"]["no_draft_method"] == "longspec_no_draft_compiled_all"
    assert rows["longspec_tree"]["vs_longspec_no_draft"] == pytest.approx(3.0)
    # No eager no-draft loop ran: no ratio rather than one against another infrastructure.
    assert rows["longspec_tree_eager"]["vs_longspec_no_draft"] is None
    assert rows["longspec_tree"]["vs_hf_autoregressive"] is None
    table = markdown_table(list(rows.values()))
    assert "equal to longspec_no_draft" in table and "| 64 | longspec_tree_compiled_all | 550.0 | - | - | 2.50x |" in table


def test_run_benchmark_compares_every_output_with_autoregressive_generate(tmp_path):
    target = make_target("llama", seed=3)
    draft = make_draft(target, seed=4)
    torch.manual_seed(0)
    prompts = {24: [torch.randint(3, 96, (1, 24))]}
    methods = ("longspec_no_draft", "longspec_tree", "hf_autoregressive")
    results = run_benchmark(target, draft, prompts, new_tokens=12, methods=methods, progress=lambda line: None)
    # The reference runs first whatever the order asked for; LongSpec is lossless in fp32.
    assert [r.method for r in results] == ["hf_autoregressive", "longspec_no_draft", "longspec_tree"]
    assert all(r.reference == "hf_autoregressive" and r.equal_to_reference and r.common_prefix == 12 for r in results)
    assert results[2].tau is not None and results[2].tau >= 1.0
    files = write_report(results, tmp_path)
    payload = json.loads(files["markdown"].with_suffix(".json").read_text())
    tree_row = next(row for row in payload["summary"] if row["method"] == "longspec_tree")
    assert tree_row["reference"] == "hf_autoregressive" and tree_row["equal"] == 1
    assert tree_row["vs_longspec_no_draft"] == pytest.approx(results[2].tokens_per_s / results[1].tokens_per_s)
