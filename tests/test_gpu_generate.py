"""Greedy LongSpec decoding on CUDA (Triton kernels in the loop) equals plain generate in fp32."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats
from longspec_hf.modeling import DEFAULT_TREE_WIDTHS

from .conftest import make_draft, make_target
from .test_equality import TREE_SHAPES, random_batch

# The tree these tests were written for: a tiny target's automatic tree is no tree at all (a draft level
# costs more than its whole forward), which would leave the compiled draft untested.
DEFAULT_TREE = list(DEFAULT_TREE_WIDTHS)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_random_cases_on_cuda_match_plain_generate():
    rng = random.Random("gpu-equality")
    target = make_target("llama", seed=5, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=6).cuda()
    mismatches = []
    for case in range(40):
        batch_size = rng.choice([1, 2, 3])
        prompt_len = rng.randrange(1, 300)
        ids, mask = random_batch(rng, target.config.vocab_size, batch_size, prompt_len)
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([1, 7, 40, 120]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        output = target.generate(ids, assistant_model=draft, tree_widths=rng.choice(TREE_SHAPES), **kwargs)
        if not torch.equal(reference, output):
            mismatches.append(case)
    assert not mismatches


def test_smollm2_fp32_on_cuda():
    path = os.environ.get("SMOLLM2_GGUF")
    if path is None:
        pytest.skip("set SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file")
    from transformers import AutoModelForCausalLM

    gguf = Path(path)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).cuda().eval()
    torch.manual_seed(0)
    draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(model.config)).cuda().eval()
    ids = torch.randint(100, 20000, (1, 3000), device="cuda")
    reference = model.generate(ids, max_new_tokens=64, do_sample=False)
    stats = LongSpecStats()
    output = model.generate(ids, assistant_model=draft, max_new_tokens=64, do_sample=False, longspec_stats=stats)
    assert torch.equal(reference, output)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_cuda_graphs_match_plain_generate(arch):
    """The graphed draft and verify forwards give what plain generate gives, for every supported
    architecture, with prompt-lookup chains (under the draft too: the device lookup inside the verify
    graph) and adaptive drafting (two verify graphs) too."""
    rng = random.Random(f"cuda-graphs-{arch}")
    target = make_target(arch, seed=7, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=8).cuda()
    mismatches = []
    for case in range(12):
        batch_size = rng.choice([1, 2, 3])
        ids, mask = random_batch(rng, target.config.vocab_size, batch_size, rng.randrange(1, 200))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([1, 9, 60]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        extra = rng.choice(
            [{}, dict(prompt_lookup_branches=2), dict(adaptive=True), dict(prompt_lookup_branches=1, prompt_lookup_under_draft=True)]
        )
        for cuda_graphs in (True, False):
            output = target.generate(
                ids, assistant_model=draft, tree_widths=rng.choice(TREE_SHAPES), cuda_graphs=cuda_graphs,
                **extra, **kwargs
            )
            if not torch.equal(reference, output):
                mismatches.append((case, cuda_graphs, extra))
    assert not mismatches


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_chunked_prefill_on_cuda_matches_plain_generate(arch):
    """Later prefill chunks go through the Triton tree kernel with a causal mask (sliding windows
    included); with compile_target the chunks of a long prompt run eagerly beside the compiled verify."""
    overrides = dict(sliding_window=24) if arch == "mistral" else {}
    target = make_target(arch, seed=11, num_key_value_heads=2, hidden_size=64, num_attention_heads=4, **overrides).cuda()
    draft = make_draft(target, seed=12).cuda()
    rng = random.Random(f"chunked-prefill-{arch}")
    mismatches = []
    for case in range(8):
        ids, mask = random_batch(rng, target.config.vocab_size, rng.choice([1, 3]), rng.randrange(50, 400))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([9, 40]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        extra = dict(compile_target=True) if case == 0 else {}
        output = target.generate(
            ids, assistant_model=draft, prefill_chunk_size=rng.choice([16, 37, 128]), **extra, **kwargs
        )
        if not torch.equal(reference, output):
            mismatches.append(case)
    assert not mismatches



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_later_prefill_chunk_in_16_bits_runs_on_flash_attention(dtype):
    """An unpadded later chunk of a 16-bit target goes to FlashAttention (the path is taken on the GPU), and
    what it computes is the chunk's causal attention over the committed slots: within 16-bit rounding of
    float32 attention with the mask written out, as close as the tree kernel it replaces."""
    from longspec_hf import kernels
    from longspec_hf.generation import attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, q_heads, kv_heads, head_dim, start, length, capacity = 2, 8, 2, 128, 300, 77, 512

    def normal(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype)

    query, cache = normal(batch, q_heads, length, head_dim), normal(2, batch, kv_heads, capacity, head_dim)
    key, value = cache[0][:, :, :start + length], cache[1][:, :, :start + length]
    scale = head_dim**-0.5
    assert attention._flash_takes(query, key, value)
    flash = attention._later_chunk_attention(query, key, value, scale)

    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    tree_kernel, _ = kernels.prefix_tree_attention(
        query, cache[0], cache[1], torch.zeros(batch, dtype=torch.long, device="cuda"),
        torch.full((batch,), start, device="cuda"), cache[0][:, :, start:start + length],
        cache[1][:, :, start:start + length], causal[None].expand(batch, -1, -1).contiguous(), scale,
    )
    visible = torch.ones(length, start + length, dtype=torch.bool, device="cuda").tril(diagonal=start)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=visible, scale=scale, enable_gqa=True
    )
    flash_error = (flash.float() - expected).abs().max().item()
    kernel_error = (tree_kernel.float() - expected).abs().max().item()
    assert flash_error <= max(2 * kernel_error, 1e-2), (flash_error, kernel_error)


def test_cuda_graphs_sampling_is_reproducible():
    target = make_target("llama", seed=9, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=10).cuda()
    ids = torch.randint(0, target.config.vocab_size, (2, 50), device="cuda")
    outputs = []
    for cuda_graphs in (True, True, False):
        torch.manual_seed(123)
        outputs.append(target.generate(
            ids, assistant_model=draft, do_sample=True, temperature=0.8, max_new_tokens=40, cuda_graphs=cuda_graphs
        ))
    assert torch.equal(outputs[0], outputs[1])
    # The graphs replay the same kernels and draw nothing: the eager loop draws the same tokens.
    assert torch.equal(outputs[0], outputs[2])


def test_cuda_graphs_kept_between_calls_match_plain_generate():
    """Calls that reuse the workspace (and its graphs) kept on the draft give plain generate's tokens
    and draft exactly as a fresh workspace does."""
    from longspec_hf import release_workspace
    from longspec_hf.generation.workspace import ATTRIBUTE

    rng = random.Random("cuda-graphs-kept")
    target = make_target("llama", seed=21, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=22).cuda()
    longest = torch.randint(3, target.config.vocab_size, (2, 300), device="cuda")
    target.generate(longest, assistant_model=draft, max_new_tokens=80, do_sample=False, prompt_lookup_branches=2)
    workspace = draft.__dict__[ATTRIBUTE]
    for case in range(10):
        ids, mask = random_batch(rng, target.config.vocab_size, 2, rng.randrange(100, 300))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([9, 40, 80]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        stats = LongSpecStats()
        output = target.generate(ids, assistant_model=draft, prompt_lookup_branches=2, longspec_stats=stats, **kwargs)
        assert torch.equal(reference, output), case
        assert draft.__dict__[ATTRIBUTE] is workspace, case
        release_workspace(draft)
        fresh = LongSpecStats()
        target.generate(ids, assistant_model=draft, prompt_lookup_branches=2, longspec_stats=fresh, **kwargs)
        assert stats.accepted_lengths == fresh.accepted_lengths, case
        release_workspace(draft)
        target.generate(longest, assistant_model=draft, max_new_tokens=80, do_sample=False, prompt_lookup_branches=2)
        workspace = draft.__dict__[ATTRIBUTE]


def test_the_rounds_host_copy_does_not_wait_for_work_queued_after_it():
    """The round's wait returns once its copy has landed, while work queued after the copy (the next
    round's draft) still runs: `tolist()` there would wait for that work too."""
    from longspec_hf.generation.decoding import _copy_to_host

    expected = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    values = torch.tensor(expected, device="cuda")
    wait = _copy_to_host(values)
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued behind the copy
    later = torch.cuda.Event()
    later.record()
    assert wait() == expected
    assert not later.query()
    torch.cuda.synchronize()


def test_compiled_draft_on_cuda_matches_plain_generate():
    """`compile_draft=True`: the draft block runs through torch.compile inside the draft's CUDA graph (the
    target-KV attention as an opaque custom op); outputs stay those of plain generate, also when the
    second half of the calls drafts over a draft vocabulary (the LM head's rows read by the graph)."""
    rng = random.Random("compiled-draft")
    target = make_target("llama", seed=9, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=10).cuda()
    mismatches, accepted = [], []
    for case in range(8):
        if case == 4:
            draft.set_draft_vocabulary(random.Random(case).sample(range(target.config.vocab_size), 60))
        ids, mask = random_batch(rng, target.config.vocab_size, rng.choice([1, 2]), rng.randrange(1, 200))
        kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=rng.choice([9, 60]), do_sample=False)
        reference = target.generate(ids.cuda(), **kwargs)
        stats = LongSpecStats()
        output = target.generate(
            ids.cuda(), assistant_model=draft, tree_widths=DEFAULT_TREE, compile_draft=True, longspec_stats=stats, **kwargs
        )
        accepted.extend(stats.accepted_lengths)
        if not torch.equal(reference, output):
            mismatches.append(case)
    assert not mismatches
    assert sum(accepted) / len(accepted) > 1


def test_compiled_draft_with_a_deep_adaptive_tree_on_cuda_matches_plain_generate():
    """A ten-level tree with `compile_draft=True` and `adaptive=True`: every level's step compiles (past
    dynamo's default limit of eight specialisations) and each plan the planner tries gets its own graphs;
    outputs stay those of plain generate."""
    from torch._dynamo.utils import counters

    rng = random.Random("deep-adaptive")
    target = make_target("llama", seed=13, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=14).cuda()
    frames = dict(counters["frames"])
    for case in range(4):
        ids, mask = random_batch(rng, target.config.vocab_size, rng.choice([1, 2]), rng.randrange(1, 200))
        kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=60, do_sample=False)
        reference = target.generate(ids.cuda(), **kwargs)
        output = target.generate(
            ids.cuda(), assistant_model=draft, tree_widths=[2] + [4] * 9, compile_draft=True, adaptive=True, **kwargs
        )
        assert torch.equal(reference, output), case
    compiled = counters["frames"]["ok"] - frames.get("ok", 0)
    assert compiled == counters["frames"]["total"] - frames.get("total", 0) >= 10


def first_divergence_margin(target, reference, output, mask) -> float | None:
    """Where `output` first leaves `reference` (plain generate's tokens): how far the token it took is
    below the best logit of the target there (eager forward over the reference); None when equal."""
    differ = (reference != output).nonzero()
    if not len(differ):
        return None
    row, position = (int(x) for x in differ[0])
    full_mask = torch.cat([mask, torch.ones_like(reference[:, mask.shape[1]:])], dim=1)
    with torch.no_grad():
        logits = target(reference, attention_mask=full_mask).logits[row, position - 1].float()
    return float(logits.max() - logits[output[row, position]])


@pytest.mark.parametrize("fused", [False, True], ids=["cublas", "fused_projections"])
@pytest.mark.parametrize("lookup", [0, 2])
def test_compiled_target_on_cuda_matches_plain_generate(lookup, fused, monkeypatch):
    """`compile_target=True` (with `compile_draft=True`): the target's verify forward runs through
    torch.compile inside its CUDA graph (the tree attention as an opaque custom op), across prompt lengths
    (cache capacities), with and without prompt-lookup chains, and with the projections of one input
    grouped into one kernel (`LONGSPEC_HF_FUSED_PROJECTIONS=1`). Inductor's kernels round differently from
    eager ones, so in fp32 an output may leave plain generate's only where the target's two best logits
    tie within rounding (a margin below 1e-3); every other token is the same."""
    from longspec_hf.generation.fused_projections import ENVIRONMENT_VARIABLE

    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1" if fused else "0")
    rng = random.Random(f"compiled-target-{lookup}")
    target = make_target("llama", seed=11, num_key_value_heads=2, hidden_size=64, num_attention_heads=4).cuda()
    draft = make_draft(target, seed=12).cuda()
    margins = []
    for case in range(8):
        ids, mask = random_batch(rng, target.config.vocab_size, rng.choice([1, 2]), rng.randrange(1, 600))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([9, 60]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        stats = LongSpecStats()
        output = target.generate(
            ids,
            assistant_model=draft,
            tree_widths=DEFAULT_TREE,
            compile_draft=True,
            compile_target=True,
            prompt_lookup_branches=lookup,
            longspec_stats=stats,
            **kwargs,
        )
        margins.append(first_divergence_margin(target, reference, output, mask))
    assert all(margin is None or margin < 1e-3 for margin in margins), margins
    assert margins.count(None) >= 6
    assert stats.mean_accepted_length > 1
