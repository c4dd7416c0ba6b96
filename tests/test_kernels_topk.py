"""Fused top-k of the log-softmax against the torch reference.

CPU: the cases run in one child process whose Triton runs in the interpreter (fp32, fp16); GPU
(`-m gpu`): SmolLM2's vocabulary in bf16 and the draft's tree-level shapes.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from longspec_hf import kernels
from longspec_hf.kernels import reference

# name -> (rows, vocab, k, chunk size)
CPU_CASES = {
    "one_chunk": (3, 50, 4, 64),
    "many_chunks_ragged_tail": (5, 1000, 16, 128),
    "k_is_the_vocab": (2, 40, 40, 16),
    "single_row": (1, 300, 8, 64),
}
CPU_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def random_logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(device)


def compare(values, indices, logits, k) -> dict:
    """The values equal the reference's top-k values, sit at the returned indices, the indices are
    distinct, and equal values come lowest index first (fp16 logits tie often; torch's order of ties is
    unspecified, so indices are not compared with torch's directly)."""
    values, indices, logits = values.cpu(), indices.cpu(), logits.cpu()
    expected_values, _ = reference.topk_log_softmax(logits, k)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    tie_order = all(
        a < b for row_v, row_i in zip(values.tolist(), indices.tolist())
        for (va, a), (vb, b) in zip(zip(row_v, row_i), zip(row_v[1:], row_i[1:])) if va == vb
    )
    return dict(
        max_error=float((values - expected_values).abs().max()),
        at_indices_error=float((log_probs.gather(1, indices) - values).abs().max()),
        distinct=all(len(set(row)) == k for row in indices.tolist()),
        tie_order=tie_order,
        dtypes=[str(values.dtype), str(indices.dtype)],
    )


def interpreter_cases() -> dict:
    """Run in the interpreter child: every CPU case through the Triton path, plus ties and -inf."""
    from longspec_hf.kernels import topk

    results = {}
    for seed, (name, (rows, vocab, k, chunk)) in enumerate(CPU_CASES.items()):
        for dtype_name, dtype in CPU_DTYPES.items():
            try:
                logits = random_logits(rows, vocab, dtype, "cpu", seed)
                values, indices = topk.topk_log_softmax(logits, k, chunk_size=chunk)
                results[f"{name}-{dtype_name}"] = compare(values, indices, logits, k)
            except Exception:
                results[f"{name}-{dtype_name}"] = dict(error=traceback.format_exc())
    inf = float("inf")
    ties = torch.tensor([[1.0, 3.0, 3.0, -inf, 3.0, 0.0], [-inf, -inf, -inf, 0.0, -inf, -inf]])
    values, indices = topk.topk_log_softmax(ties, 4, chunk_size=16)
    results["ties"] = dict(values=values.tolist(), indices=indices.tolist())
    # -0.0 equals 0.0; a row whose only finite entry sits in the ragged last chunk.
    edge = torch.full((2, 20), -inf)
    edge[0, :6] = torch.tensor([0.0, -0.0, 0.0, -1.0, -0.0, 2.0])
    edge[1, 17] = 1.0
    values, indices = topk.topk_log_softmax(edge, 8, chunk_size=16)
    results["edges"] = dict(values=values.tolist(), indices=indices.tolist())
    for name, (batch, parents, children, width, seed) in BEAM_CASES.items():
        try:
            inputs = beam_inputs(batch, parents, children, seed)
            results[f"beam-{name}"] = compare_beam(*topk.beam_select(*inputs, width), *inputs, width)
        except Exception:
            results[f"beam-{name}"] = dict(error=traceback.format_exc())
    return results


# name -> (batch, parents, children per parent, width, seed)
BEAM_CASES = {
    "root": (2, 1, 4, 4, 0),
    "tree_level": (3, 16, 16, 16, 1),
    "ragged_pairs": (2, 5, 3, 7, 2),
    "ties": (2, 6, 4, 10, 3),
    "parents_sliced_from_the_tree": (2, 16, 16, 16, 5),
}


def beam_inputs(batch: int, parents: int, children: int, seed: int):
    """Each parent's children sorted best first (as `topk_log_softmax` gives them), distinct tokens per
    row; the "ties" seed rounds the scores to quarters so that many cumulative scores are equal, and
    seed 5 gives the parents' scores as a column slice of a wider tensor (as the tree's scores are)."""
    gen = torch.Generator().manual_seed(seed)
    child_scores = -torch.rand(batch, parents, children, generator=gen).mul(6)
    parent_scores = -torch.rand(batch, parents, generator=gen).mul(6)
    if seed == 3:
        child_scores, parent_scores = (child_scores * 4).round() / 4, (parent_scores * 4).round() / 4
    if seed == 5:
        parent_scores = torch.cat([torch.zeros(batch, 3), parent_scores, torch.zeros(batch, 2)], dim=1)[:, 3:-2]
    child_scores = child_scores.sort(dim=-1, descending=True).values
    child_tokens = torch.stack([torch.randperm(1000, generator=gen)[: parents * children] for _ in range(batch)])
    return child_scores, child_tokens.view(batch, parents, children), parent_scores


def compare_beam(tokens, parent_local, scores, child_scores, child_tokens, parent_scores, width) -> dict:
    """Every selected pair is a real (parent, child) pair with its cumulative score, the pairs are distinct,
    the scores are the reference's top `width`, and equal scores come in pair order (parent-major)."""
    expected_scores = reference.beam_select(child_scores, child_tokens, parent_scores, width)[2]
    batch, parents, children = child_scores.shape
    pair_of_token = [{int(t): i for i, t in enumerate(row.reshape(-1))} for row in child_tokens]
    pairs = [[pair_of_token[b][int(t)] for t in tokens[b]] for b in range(batch)]
    consistent = all(
        pair // children == int(parent_local[b, j])
        and float(scores[b, j]) == float(parent_scores[b, pair // children] + child_scores[b, pair // children, pair % children])
        for b in range(batch) for j, pair in enumerate(pairs[b])
    )
    tie_order = all(
        pairs[b][j] < pairs[b][j + 1] for b in range(batch) for j in range(width - 1)
        if float(scores[b, j]) == float(scores[b, j + 1])
    )
    return dict(
        max_error=float((scores - expected_scores).abs().max()),
        consistent=consistent,
        distinct=all(len(set(row)) == width for row in pairs),
        tie_order=tie_order,
        dtypes=[str(tokens.dtype), str(parent_local.dtype), str(scores.dtype)],
    )


@pytest.mark.parametrize("key", [f"{name}-{d}" for name in CPU_CASES for d in CPU_DTYPES])
def test_kernel_matches_reference_in_interpreter(interpreter_results, key):
    result = interpreter_results[key]
    assert "error" not in result, result.get("error")
    assert result["max_error"] < 1e-5 and result["at_indices_error"] < 1e-5
    assert result["distinct"] and result["tie_order"]
    assert result["dtypes"] == ["torch.float32", "torch.int64"]


def test_ties_go_to_the_lower_index_and_minus_infinity_stays_last(interpreter_results):
    result = interpreter_results["ties"]
    # log-softmax of [1, 3, 3, -inf, 3, 0]: the three 3s first (lowest index first), then the 1.
    assert result["indices"][0] == [1, 2, 4, 0]
    assert result["values"][0][:3] == pytest.approx([result["values"][0][0]] * 3)
    # One finite entry: it comes first with log-probability 0, then distinct -inf entries.
    assert result["indices"][1][0] == 3 and result["values"][1][0] == 0.0
    assert len(set(result["indices"][1])) == 4 and result["values"][1][1:] == [-float("inf")] * 3


def test_signed_zeros_tie_and_the_ragged_chunk_pads_never_win(interpreter_results):
    result = interpreter_results["edges"]
    assert result["indices"][0][:6] == [5, 0, 1, 2, 4, 3]
    assert result["indices"][1] == [17, 0, 1, 2, 3, 4, 5, 6]
    assert result["values"][1][0] == 0.0 and result["values"][1][1:] == [-float("inf")] * 7


@pytest.mark.parametrize("name", list(BEAM_CASES))
def test_beam_select_matches_reference_in_interpreter(interpreter_results, name):
    result = interpreter_results[f"beam-{name}"]
    assert "error" not in result, result.get("error")
    assert result["max_error"] == 0.0
    assert result["consistent"] and result["distinct"] and result["tie_order"]
    assert result["dtypes"] == ["torch.int64", "torch.int64", "torch.float32"]


def test_beam_select_reference_is_the_best_pairs():
    child_scores, child_tokens, parent_scores = beam_inputs(2, 5, 3, seed=4)
    tokens, parent_local, scores = kernels.beam_select(child_scores, child_tokens, parent_scores, 7)
    # Brute force: every (parent, child) pair's cumulative score, the 7 best.
    for b in range(2):
        every = sorted(
            ((float(parent_scores[b, p] + child_scores[b, p, c]), int(child_tokens[b, p, c]), p) for p in range(5) for c in range(3)),
            reverse=True,
        )[:7]
        assert [(s, t, p) for s, t, p in every] == list(zip(scores[b].tolist(), tokens[b].tolist(), parent_local[b].tolist()))


def test_dispatch_on_cpu_is_the_reference():
    logits = random_logits(4, 200, torch.float32, "cpu", seed=3)
    for backend in (None, "torch"):
        values, indices = kernels.topk_log_softmax(logits, 8, backend=backend)
        expected_values, expected_indices = reference.topk_log_softmax(logits, 8)
        assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


def test_unsupported_inputs_are_named():
    from longspec_hf.kernels import topk

    pytest.importorskip("triton")
    assert "k=" in topk.unsupported_reason(torch.zeros(2, 10), 11)
    assert "rows, vocab" in topk.unsupported_reason(torch.zeros(2, 3, 10), 2)
    assert "width=" in topk.beam_select_unsupported_reason(torch.zeros(1, 2, 3), 7)
    assert "pairs" in topk.beam_select_unsupported_reason(torch.zeros(1, 100, 64), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", [(1, 4), (4, 16), (16, 16), (64, 32)])
def test_kernel_matches_reference_on_gpu(rows, k):
    from longspec_hf.kernels import topk

    logits = random_logits(rows, 49152, torch.bfloat16, "cuda", seed=rows)
    values, indices = topk.topk_log_softmax(logits, k)
    expected_values, expected_indices = reference.topk_log_softmax(logits, k)
    # bf16 logits tie often: compare the values exactly-ish and the indices as the values' positions.
    assert (values - expected_values).abs().max() < 1e-5
    picked = torch.log_softmax(logits.float(), dim=-1).gather(1, indices)
    assert torch.allclose(picked, values, atol=1e-5)
    assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BEAM_CASES))
def test_beam_select_matches_reference_on_gpu(name):
    from longspec_hf.kernels import topk

    batch, parents, children, width, seed = BEAM_CASES[name]
    inputs = [t.cuda() for t in beam_inputs(batch, parents, children, seed)]
    result = compare_beam(*[t.cpu() for t in topk.beam_select(*inputs, width)], *[t.cpu() for t in inputs], width)
    assert result["max_error"] == 0.0 and result["consistent"] and result["distinct"] and result["tie_order"]
