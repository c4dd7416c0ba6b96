"""The benchmark harness's report: what each method is compared with (on CPU, tiny models); and the pieces
of `bench/scale.py` (the benchmark at users' scale) that run without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from longspec_hf.benchmarking import (
    ALL_METHODS,
    Measurement,
    describe_device,
    fresh_static_cache,
    markdown_table,
    method_kwargs,
    no_draft_baseline,
    plot_caption,
    report_meta,
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
    assert "equal to longspec_no_draft" in table and "| 64 | longspec_tree_compiled_all | 550.0 | - | - | - | 2.50x |" in table


def test_speedups_over_transformers_static_cache():
    results = [measurement("hf_autoregressive", 50.0), measurement("hf_static_compiled", 200.0),
               measurement("longspec_tree", 600.0)]
    rows = {row["method"]: row for row in summary_rows(results)}
    assert rows["longspec_tree"]["vs_hf_static_compiled"] == pytest.approx(3.0)
    assert rows["hf_static_compiled"]["vs_hf_autoregressive"] == pytest.approx(4.0)
    assert "| 64 | longspec_tree | 600.0 | 12.00x | 3.00x | - |" in markdown_table(list(rows.values()))


def test_static_cache_method_and_fresh_cache_per_call():
    target = make_target("llama")
    draft = make_draft(target)
    assert "hf_static_compiled" in ALL_METHODS
    assert method_kwargs("hf_static_compiled", draft) == {"cache_implementation": "static"}
    target._previous_max_cache_length = 4096
    target._cache = object()
    fresh_static_cache(target)
    assert not hasattr(target, "_previous_max_cache_length") and not hasattr(target, "_cache")
    fresh_static_cache(target)  # nothing to forget: no error


def test_report_says_device_dtype_and_tokens(tmp_path):
    assert describe_device("cpu").startswith("CPU: ") and len(describe_device("cpu")) > len("CPU: ")
    results = [measurement("longspec_no_draft", 100.0, new_tokens=24), measurement("longspec_tree", 300.0, new_tokens=24)]
    # `platform.processor()` is "" on many Linux systems: the report names the CPU instead.
    meta = report_meta(results, {"device": "", "dtype": "torch.float32"})
    assert meta["device"] == describe_device("cpu") and meta["new_tokens"] == 24
    assert report_meta(results, {"device": "NVIDIA H200"})["device"] == "NVIDIA H200"
    assert report_meta(results, {}, device="cpu")["device"] == describe_device("cpu")
    caption = plot_caption(meta)
    assert meta["device"] in caption and "torch.float32" in caption and "24 new tokens per prompt" in caption
    files = write_report(results, tmp_path, {"device": "", "dtype": "torch.float32", "new_tokens": 24})
    assert json.loads(files["json"].read_text())["meta"]["device"] == describe_device("cpu")


def test_run_benchmark_compares_every_output_with_autoregressive_generate(tmp_path):
    target = make_target("llama", seed=3)
    draft = make_draft(target, seed=4)
    torch.manual_seed(0)
    prompts = {24: [torch.randint(3, 96, (1, 24))]}
    methods = ("longspec_no_draft", "longspec_tree", "hf_autoregressive", "hf_static_compiled")
    results = run_benchmark(target, draft, prompts, new_tokens=12, methods=methods, progress=lambda line: None)
    # The reference runs first whatever the order asked for; LongSpec is lossless in fp32.
    assert [r.method for r in results] == ["hf_autoregressive", "longspec_no_draft", "longspec_tree", "hf_static_compiled"]
    assert all(r.reference == "hf_autoregressive" and r.equal_to_reference and r.common_prefix == 12 for r in results)
    assert results[2].tau is not None and results[2].tau >= 1.0
    files = write_report(results, tmp_path)
    payload = json.loads(files["markdown"].with_suffix(".json").read_text())
    tree_row = next(row for row in payload["summary"] if row["method"] == "longspec_tree")
    assert tree_row["reference"] == "hf_autoregressive" and tree_row["equal"] == 1
    assert tree_row["vs_longspec_no_draft"] == pytest.approx(results[2].tokens_per_s / results[1].tokens_per_s)


# ----- bench/scale.py ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scale():
    path = Path(__file__).resolve().parent.parent / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_scale_floor_counts_weights_read_and_the_kv_cache(scale):
    config_class, _, fields = scale.LAYOUTS["llama-3.1-8b"]
    config = config_class(**fields)
    assert scale.kv_bytes_per_token(config, 2) == 128 * 1024  # 128 KiB per token: 16 GiB at 128k
    qwen_class, _, qwen_fields = scale.LAYOUTS["qwen2.5-7b"]
    assert scale.kv_bytes_per_token(qwen_class(**qwen_fields), 2) == 2 * 28 * 4 * 128 * 2
    # 16 GB of weights and 16 GiB of KV over 4.27 TB/s.
    assert scale.floor_ms(16 * 10**9, 128 * 1024, 1, 131072, 4.27e12) == pytest.approx(1e3 * (16e9 + 2**34) / 4.27e12)
    assert scale.floor_ms(10**9, 1000, 4, 1000, 1e12) == pytest.approx(1.004)
    untied = make_target("llama", tie_word_embeddings=False)
    embedding = untied.get_input_embeddings().weight
    assert scale.weight_bytes_read_per_step(untied) == scale.weight_bytes(untied) - embedding.numel() * 4
    tied = make_target("llama", tie_word_embeddings=True)
    assert scale.weight_bytes_read_per_step(tied) == scale.weight_bytes(tied)
    assert scale.copy_bandwidth(torch.device("cpu"), 1 << 20, repeats=2) > 0


def test_scale_methods_are_a_table_of_generate_arguments(scale):
    target = make_target("llama")
    draft = make_draft(target)
    for name in scale.METHODS:
        kwargs = scale.generate_kwargs(name, draft)
        assert scale.DRAFT not in kwargs.values()
        assert (kwargs.get("assistant_model") is draft) == scale.is_longspec(name) == (not name.startswith("hf_"))
        assert bool(kwargs.get("compile_target")) == (scale.is_longspec(name) and name.endswith("_compiled"))
        assert scale.compiles(name) == name.endswith("_compiled")
    assert scale.tree_of("tree_compiled") == (4, 16, 16, 16, 16) and scale.tree_of("small_tree_graphs") == (2, 4, 4, 4)
    assert scale.tree_of("no_draft_compiled") == () and scale.tree_of("hf_eager") == ()
    assert scale.generate_kwargs("hf_static_compiled", draft) == {"cache_implementation": "static"}
    # The widths are copied: a call cannot change the table.
    scale.generate_kwargs("tree_graphs", draft)["tree_widths"].append(99)
    assert scale.METHODS["tree_graphs"]["tree_widths"] == [4, 16, 16, 16, 16]
    # One more method is one entry, e.g. a tree that generate chooses itself.
    name = scale.add_longspec_method('auto_tree_test={"compile_target": true}')
    try:
        assert scale.generate_kwargs(name, draft) == {"assistant_model": draft, "compile_target": True}
        assert scale.tree_of(name) is None and scale.tau_for(name, {}) is None
    finally:
        del scale.METHODS[name]
    with pytest.raises(SystemExit):
        scale.add_longspec_method("tree_graphs={}")
    # A method's environment is set around its calls only, and is no generate argument.
    assert scale.ENVIRONMENT not in scale.generate_kwargs("no_draft_fused_compiled", draft)
    variables = scale.METHODS["no_draft_fused_compiled"][scale.ENVIRONMENT]
    assert variables == {"LONGSPEC_HF_FUSED_PROJECTIONS": "1"} and "LONGSPEC_HF_FUSED_PROJECTIONS" not in os.environ
    with scale.environment(variables):
        assert os.environ["LONGSPEC_HF_FUSED_PROJECTIONS"] == "1"
    assert "LONGSPEC_HF_FUSED_PROJECTIONS" not in os.environ
    assert scale.Budget.compile_key(None, "m", 1, "no_draft_fused_compiled", 4096) != scale.Budget.compile_key(
        None, "m", 1, "no_draft_compiled", 4096)


def test_scale_tau_file_and_projection(scale, tmp_path):
    rows = [
        {"draft": "bundled", "tree": "default", "mode": "greedy", "context": 1024, "tau": 3.0},
        {"draft": "bundled", "tree": "default", "tree_widths": [4, 16, 16, 16, 16], "mode": "greedy", "context": 7680,
         "tau": 4.5},
        {"draft": "bundled", "tree": "2,4,4,4", "mode": "greedy", "context": 7680, "tau": 3.2},
        {"draft": "bundled", "tree": "2,4,4,4", "mode": "recursive_rejection@0.7", "context": 8000, "tau": 9.0},
    ]
    path = tmp_path / "draft_tau.json"
    path.write_text(json.dumps(rows))
    taus = scale.load_tau(path)
    assert taus[(4, 16, 16, 16, 16)] == {"tau": 4.5, "context": 7680, "draft": "bundled"}  # the longest context
    assert taus[(2, 4, 4, 4)]["tau"] == 3.2  # greedy rows only
    assert scale.tau_for("tree_compiled", taus) == 4.5 and scale.tau_for("small_tree_graphs", taus) == 3.2
    assert scale.tau_for("no_draft_graphs", taus) == 1.0 and scale.tau_for("hf_eager", {}) == 1.0
    assert scale.projected_tokens_per_s(4, 4.5, 20.0) == pytest.approx(900.0)
    assert scale.projected_tokens_per_s(1, None, 20.0) is None and scale.load_tau(None) == {}


def test_scale_rounds_from_the_streamer_clock(scale):
    # The prompt's put at 0.5, the first token at 1.0, then five rounds of 10 ms after a first of 110 ms.
    ends = [1.0, 1.11, 1.12, 1.13, 1.14, 1.15, 1.16, 1.17, 1.18]
    call = scale.analyse_call(0.0, [0.5] + ends, 1.185, rounds=8, new_tokens=9, skip=2)
    assert call.prefill_s == pytest.approx(1.0)
    assert call.ms_per_round == pytest.approx(10.0) and call.ms_per_round_median == pytest.approx(10.0)
    assert call.ms_per_round_mean == pytest.approx(1e3 * 0.185 / 8)
    assert call.first_rounds_extra_s == pytest.approx(0.1)
    # A batch's columns of one round arrive in a burst: one round.
    assert scale.round_ends([0.0, 1.0, 1.00001, 1.01, 1.01001]) == [1.00001, 1.01001]
    # Puts that do not match the rounds: the mean over all rounds.
    odd = scale.analyse_call(0.0, [0.5, 1.0, 1.2], 1.4, rounds=4, new_tokens=5, skip=2)
    assert odd.ms_per_round == odd.ms_per_round_mean == pytest.approx(100.0) and odd.ms_per_round_median is None


def test_scale_report_lists_skipped_and_failed_cases(scale):
    def case(method, context, **fields):
        values = dict(floor_ms=4.0, tau=None, ms_per_round=None, projected_tokens_per_s=None, prefill_s=None,
                      prefill_includes_first_use=False, first_use_s=None, memory={}, skipped=None, error=None)
        values.update(fields)
        return dict(model="llama-3.1-8b", batch=1, context=context, method=method, **values)

    memory = dict(peak_gib=16.5, resident_gib=16.1, reserved_gib=17.0, device_used_gib=40.0)
    report = {
        "meta": dict(device="NVIDIA H200", dtype="bfloat16", new_tokens=32, commit="abc1234",
                     copy_bandwidth_bytes_per_s=4.27e12, tau={"4,16,16,16,16": {"tau": 4.5, "draft": "bundled", "context": 7680}}),
        "cases": [
            case("no_draft_compiled", 131072, ms_per_round=10.0, tau=1.0, projected_tokens_per_s=100.0, prefill_s=11.6,
                 first_use_s=2.0, memory=memory),
            case("tree_compiled", 131072, ms_per_round=20.0, tau=4.5, projected_tokens_per_s=225.0, prefill_s=11.6,
                 first_use_s=30.0, prefill_includes_first_use=True, memory=memory),
            case("hf_eager", 131072, error="OutOfMemoryError: CUDA out of memory"),
            case("hf_static_compiled", 131072, skipped="time budget: 90 s predicted, 20 s of --budget-s left"),
        ],
    }
    table = scale.markdown(report)
    assert "| context | floor | hf_eager | hf_static_compiled | no_draft_compiled | tree_compiled |" in table
    assert "| 131072 | 4.00 | failed | - | 10.00 | 20.00 |" in table
    assert "| 131072 | - | - | 100 | 225 |" in table  # projected tokens/s
    assert "| 131072 | tree_compiled | 20.00 | 5.00 | 2.00 | 11.60 (with first use) | 30.0 | 16.5 | 16.1 | 40.0 |" in table
    assert "skipped: time budget" in table and "failed: OutOfMemoryError" in table
    assert "[4,16,16,16,16] 4.50 (bundled, 7680 tokens)" in table


def test_scale_runs_end_to_end_on_a_tiny_model(scale, tmp_path, capsys):
    tau = tmp_path / "tau.json"
    tau.write_text(json.dumps([{"draft": "bundled", "tree": "2,4,4,4", "tree_widths": [2, 4, 4, 4], "mode": "greedy",
                                "context": 7680, "tau": 3.0}]))
    out = tmp_path / "out"
    report = scale.main(["--device", "cpu", "--tiny", "--contexts", "24", "--batches", "1", "2", "--new-tokens", "5",
                         "--calls", "2", "--methods", "hf_eager", "no_draft_graphs", "small_tree_graphs",
                         "--skip", "small_tree_graphs@24@2", "--tau-file", str(tau), "--out-dir", str(out),
                         "--commit", "test"])
    saved = json.loads((out / "scale.json").read_text())
    assert saved["meta"]["commit"] == "test" and saved["meta"]["device"].startswith("CPU")
    cases = {(c["batch"], c["method"]): c for c in saved["cases"]}
    assert len(cases) == 6 and cases[(2, "small_tree_graphs")]["skipped"] == "--skip"
    for key, case in cases.items():
        if key == (2, "small_tree_graphs"):
            continue
        assert case["error"] is None, case["error"]
        assert case["ms_per_round"] > 0 and case["prefill_s"] > 0 and len(case["calls"]) == 2
        assert case["floor_ms"] > 0 and case["projected_tokens_per_s"] > 0
    assert cases[(1, "small_tree_graphs")]["tau"] == 3.0 and cases[(1, "no_draft_graphs")]["tau"] == 1.0
    # LongSpec: rounds from its statistics; transformers: one step per token after the first.
    assert cases[(1, "hf_eager")]["calls"][0]["rounds"] == 4
    assert cases[(1, "no_draft_graphs")]["calls"][0]["rounds"] == 4
    assert (out / "scale.md").read_text().strip() in capsys.readouterr().out
    assert report["cases"] == saved["cases"]


def test_scale_merges_runs_and_rescores_projections(scale, tmp_path):
    def case(method, context, ms=None, **fields):
        values = dict(model="m", batch=1, context=context, method=method, floor_ms=2.0, tau=None, ms_per_round=ms,
                      projected_tokens_per_s=None, prefill_s=None if ms is None else 1.0,
                      prefill_includes_first_use=False, first_use_s=None if ms is None else 0.1, memory={},
                      skipped=None if ms is not None else "time budget", error=None)
        values.update(fields)
        return values

    meta = dict(device="GPU", dtype="bfloat16", new_tokens=32, commit="c", copy_bandwidth_bytes_per_s=1e12, tau={})
    first = {"meta": dict(meta, command="run 1"), "models": {"m": {}}, "cases": [
        case("tree_graphs", 4096, 10.0, prefill_s=1.0),
        case("tree_compiled", 4096),
    ]}
    second = {"meta": dict(meta, command="run 2"), "models": {"m": {}}, "cases": [
        case("tree_compiled", 1024, 5.0, prefill_includes_first_use=True, prefill_s=30.0, first_use_s=2.0),
        # Compiled in this run already (at 1024): its one call's prefill compiled nothing.
        case("tree_compiled", 4096, 8.0, prefill_includes_first_use=True, prefill_s=1.1),
        case("tree_graphs", 4096, 99.0),
    ]}
    merged = scale.merge([first, second])
    cases = {(c["context"], c["method"]): c for c in merged["cases"]}
    assert [r["command"] for r in merged["meta"]["runs"]] == ["run 1", "run 2"]
    assert cases[(4096, "tree_graphs")]["ms_per_round"] == 10.0  # the first measurement stays
    assert cases[(4096, "tree_compiled")]["ms_per_round"] == 8.0  # measured later replaces skipped
    assert cases[(4096, "tree_compiled")]["prefill_includes_first_use"] is False
    assert cases[(4096, "tree_compiled")]["prefill_s"] == 1.1
    # The first compiled call's prefill has no graphs-only sibling at 1024: it stays marked.
    assert cases[(1024, "tree_compiled")]["prefill_includes_first_use"] is True
    tau = tmp_path / "tau.json"
    tau.write_text(json.dumps([{"draft": "bundled", "tree": "default", "tree_widths": [4, 16, 16, 16, 16],
                                "mode": "greedy", "context": 7680, "tau": 4.0}]))
    rescored = scale.rescore(merged, str(tau))
    cases = {(c["context"], c["method"]): c for c in rescored["cases"]}
    assert cases[(4096, "tree_compiled")]["projected_tokens_per_s"] == pytest.approx(500.0)
    assert rescored["meta"]["tau"]["4,16,16,16,16"]["tau"] == 4.0
    # Siblings: a compiled method's first call with the graphs-only prefill beside it.
    single = [case("no_draft_graphs", 131072, 10.0, prefill_s=11.8),
              case("no_draft_compiled", 131072, 9.0, prefill_s=110.0, first_use_s=20.0, prefill_includes_first_use=True)]
    scale.fill_first_use(single)
    assert single[1]["prefill_s"] == 11.8 and single[1]["first_use_s"] == pytest.approx(20.0 + 110.0 - 11.8)
