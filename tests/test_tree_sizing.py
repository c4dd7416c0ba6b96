"""The automatic tree (`generation/tree_sizing.py`): its cost model reproduces what was measured, its
choice follows the context, and `generate` uses it unless the call or its generation config names a
tree.

The cost model is checked on meta-device models of real layouts (no memory, no weights): the Llama-3.1-8B
layout's measured round costs on an H200 (BENCHMARKS.md, "At users' scale") and SmolLM2-135M's."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats
from longspec_hf.generation import tree_sizing
from longspec_hf.generation.options import AUTO, LongSpecOptions
from longspec_hf.modeling import DEFAULT_TREE_WIDTHS

from .conftest import make_draft, make_target

LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072,
)
SMOLLM2 = LlamaConfig(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True,
)


def meta_pair(config: LlamaConfig, draft_vocab_size: int | None = None):
    with torch.device("meta"):
        target = LlamaForCausalLM(config).to(torch.bfloat16)
        draft_config = LongSpecDraftConfig.from_target_config(config, draft_vocab_size=draft_vocab_size)
        draft = LongSpecDraftModel(draft_config).to(torch.bfloat16)
    return target, draft


@pytest.fixture(scope="module")
def llama_8b():
    return meta_pair(LLAMA_8B)


def nodes(widths) -> int:
    return 1 + sum(widths)


# ----- the cost model against measurements -----------------------------------------------------------
# ms per step / round of the 8B layout, compiled, H200 (BENCHMARKS.md): context -> (step, default tree, [2,4,4,4]).
MEASURED_8B_MS = {4096: (5.92, 9.53, 7.98), 32768: (6.85, 12.82, 8.88), 131072: (9.82, 24.24, 12.34)}


@pytest.mark.parametrize("context", sorted(MEASURED_8B_MS))
def test_the_cost_model_reproduces_the_measured_round_costs_of_an_8b_layout(llama_8b, context):
    cost = tree_sizing.round_cost(*llama_8b, batch_size=1, context=context, hardware=tree_sizing.CUDA)
    step, default, small = MEASURED_8B_MS[context]
    modelled = [cost.round(()), cost.round(DEFAULT_TREE_WIDTHS), cost.round((2, 4, 4, 4))]
    for measured_ms, seconds in zip((step, default, small), modelled):
        assert seconds * 1e3 == pytest.approx(measured_ms, rel=0.15)


def test_a_round_costs_more_with_more_nodes_a_longer_context_and_a_larger_batch(llama_8b):
    short = tree_sizing.round_cost(*llama_8b, batch_size=1, context=4096, hardware=tree_sizing.CUDA)
    long = tree_sizing.round_cost(*llama_8b, batch_size=1, context=131072, hardware=tree_sizing.CUDA)
    batch = tree_sizing.round_cost(*llama_8b, batch_size=4, context=131072, hardware=tree_sizing.CUDA)
    for cost in (short, long, batch):
        assert cost.round(()) < cost.round((2, 4, 4, 4)) < cost.round(DEFAULT_TREE_WIDTHS)
    assert short.round(DEFAULT_TREE_WIDTHS) < long.round(DEFAULT_TREE_WIDTHS) < batch.round(DEFAULT_TREE_WIDTHS)
    # At 128k the default tree's 69 nodes x 4 grouped heads are three attention tiles, 32 nodes one.
    assert long.forward(69) - long.forward(32) > 2 * (long.forward(32) - long.forward(1))


# ----- the choice ------------------------------------------------------------------------------------
def test_the_8b_layout_gets_the_full_tree_at_4k_and_a_tree_of_one_attention_tile_at_128k(llama_8b):
    chosen = {}
    for context in (4096, 131072):
        cost = tree_sizing.round_cost(*llama_8b, batch_size=1, context=context, hardware=tree_sizing.CUDA)
        chosen[context] = widths = tree_sizing.choose_round_shape(cost).tree_widths
        assert widths, "a draft that pays must be used"
        step = cost.round(())
        # The choice is the best of the ladder under the model, not just a smaller tree.
        rate = lambda w: tree_sizing.expected_tokens(w, 0.58, 0.4) / cost.round(w)
        assert all(rate(widths) >= rate(other) for other in tree_sizing.candidate_trees(DEFAULT_TREE_WIDTHS))
        assert cost.round(widths) <= (1.6 if context == 4096 else 1.35) * step
    assert chosen[4096] == DEFAULT_TREE_WIDTHS
    assert nodes(chosen[131072]) * 4 <= tree_sizing.CUDA.attention_rows < nodes(DEFAULT_TREE_WIDTHS) * 4


def test_a_small_target_on_a_gpu_keeps_the_full_tree_at_the_test_beds_contexts():
    target, draft = meta_pair(SMOLLM2, draft_vocab_size=16384)
    for context in (1024, 4096, 8192):
        cost = tree_sizing.round_cost(target, draft, batch_size=1, context=context, hardware=tree_sizing.CUDA)
        assert tree_sizing.choose_round_shape(cost).tree_widths == DEFAULT_TREE_WIDTHS


def test_the_choice_stays_within_the_largest_tree_and_drafts_nothing_when_no_tree_pays(llama_8b):
    cost = tree_sizing.round_cost(*llama_8b, batch_size=1, context=4096, hardware=tree_sizing.CUDA)
    largest = (2, 4, 4)
    widths = tree_sizing.choose_round_shape(cost, largest=largest).tree_widths
    assert len(widths) <= len(largest) and all(w <= cap for w, cap in zip(widths, largest))
    assert all(
        len(tree) <= len(largest) and all(w <= cap for w, cap in zip(tree, largest))
        for tree in tree_sizing.candidate_trees(largest)
    )
    # A draft level dearer than a whole step: one-token steps are faster.
    slow_draft = tree_sizing.Hardware(**{**tree_sizing.CUDA.__dict__, "level_seconds": 1.0})
    slow = tree_sizing.round_cost(*llama_8b, batch_size=1, context=4096, hardware=slow_draft)
    assert tree_sizing.choose_round_shape(slow).tree_widths == ()
    # Lookup-chain nodes count in the verify cost: many of them push the choice to a smaller tree.
    long = tree_sizing.round_cost(*llama_8b, batch_size=1, context=131072, hardware=tree_sizing.CUDA)
    alone = tree_sizing.choose_round_shape(long).tree_widths
    with_chains = tree_sizing.choose_round_shape(long, lambda widths: 64).tree_widths
    assert sum(with_chains) <= sum(alone)


def test_expected_tokens_grow_with_depth_and_width_and_match_a_chain_in_closed_form():
    top1, exponent = 0.6, 0.5
    assert tree_sizing.expected_tokens((1, 1, 1), top1, exponent) == pytest.approx(1 + 0.6 + 0.36 + 0.216)
    assert tree_sizing.expected_tokens((2, 2), top1, exponent) > tree_sizing.expected_tokens((1, 1), top1, exponent)
    assert tree_sizing.expected_tokens((4, 4, 4), top1, exponent) > tree_sizing.expected_tokens((4, 4), top1, exponent)
    assert tree_sizing.expected_tokens((), top1, exponent) == 1.0


def test_contexts_are_bucketed_to_powers_of_two():
    assert tree_sizing.context_bucket(100) == 1024
    assert tree_sizing.context_bucket(30000) == 32768
    assert tree_sizing.context_bucket(131072 + 1024) == 131072


# ----- resolution --------------------------------------------------------------------------------------
def recording_sizer(answer, lookup=(0, None)):
    calls = []

    def size_tree(largest, lookup_nodes, choose_lookup):
        calls.append((largest, lookup_nodes(answer)))
        return tree_sizing.RoundShape(answer, *lookup) if choose_lookup else tree_sizing.RoundShape(answer)

    return size_tree, calls


def test_auto_is_the_default_and_is_bounded_by_the_drafts_generation_config():
    size_tree, calls = recording_sizer((2, 2))
    draft_config = GenerationConfig(tree_widths=[3, 5, 5])
    options = LongSpecOptions.resolve({}, generation_config=GenerationConfig(), draft_generation_config=draft_config,
                                      size_tree=size_tree)
    assert options.tree_widths == (2, 2) and options.auto_tree
    assert calls == [((3, 5, 5), 0)]
    # Lookup chains are counted for the tree being sized: two chains of the default length.
    size_tree, calls = recording_sizer((2, 2))
    options = LongSpecOptions.resolve({"prompt_lookup_branches": 2}, generation_config=GenerationConfig(),
                                      size_tree=size_tree)
    assert calls == [(DEFAULT_TREE_WIDTHS, 2 * 16)] and options.chain_length == 16


@pytest.mark.parametrize("where", ["keyword", "generation_config"])
def test_a_named_tree_is_used_as_given(where):
    size_tree, calls = recording_sizer((2, 2))
    keywords = {"tree_widths": [1, 3]} if where == "keyword" else {}
    generation_config = GenerationConfig(tree_widths=[1, 3]) if where == "generation_config" else GenerationConfig()
    options = LongSpecOptions.resolve(keywords, generation_config=generation_config, size_tree=size_tree)
    assert options.tree_widths == (1, 3) and not options.auto_tree and calls == []
    options = LongSpecOptions.resolve({"tree_widths": AUTO}, generation_config=GenerationConfig(), size_tree=size_tree)
    assert options.tree_widths == (2, 2) and options.auto_tree


def test_generate_without_a_tree_decodes_with_the_automatic_one_and_equals_plain_generate():
    target = make_target("llama", seed=3)
    draft = make_draft(target)
    prompt = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    stats = LongSpecStats()
    out = target.generate(prompt, assistant_model=draft, max_new_tokens=24, do_sample=False, longspec_stats=stats)
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, plain)
    cost = tree_sizing.round_cost(target, draft, 1, tree_sizing.context_bucket(64))
    assert stats.tree_widths == tree_sizing.choose_round_shape(cost, largest=tuple(draft.generation_config.tree_widths)).tree_widths


def test_a_malformed_acceptance_prior_is_refused_before_any_forward():
    target = make_target("llama", seed=3)
    draft = make_draft(target)
    draft.generation_config.acceptance_prior = {"top_one": 0.7}
    forwards = []
    handle = target.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match="acceptance_prior"):
            target.generate(torch.tensor([[5, 6, 7]]), assistant_model=draft, max_new_tokens=4)
    finally:
        handle.remove()
    assert forwards == []


# ----- lookup chains chosen from the prompt ----------------------------------------------------------------
def test_a_prompt_that_repeats_itself_gets_a_lookup_chain_and_one_that_does_not_gets_none(llama_8b):
    cost = tree_sizing.round_cost(*llama_8b, batch_size=1, context=32768, hardware=tree_sizing.CUDA)
    assert tree_sizing.choose_round_shape(cost, lookup_matches=[0] * 500).lookup_branches == 0
    repeating = tree_sizing.choose_round_shape(cost, lookup_matches=[16] * 500)
    assert repeating.lookup_branches == 1 and repeating.lookup_length == 16
    # Where chains always match in full, a draft tree adds cost and no tokens.
    assert repeating.tree_widths == ()
    # One position in five repeats: the tree serves the others, beside the chain.
    mixed = tree_sizing.choose_round_shape(cost, lookup_matches=[0, 0, 0, 0, 16] * 100)
    assert mixed.lookup_branches == 1 and mixed.tree_widths


def test_the_prompts_lookup_matches_are_what_a_chain_would_have_matched():
    from longspec_hf.generation.retrieval import LOOKUP_ESTIMATE_POSITIONS, prompt_lookup_matches

    segment = list(range(10, 40))
    matches = prompt_lookup_matches(segment * 4, length=8)
    assert len(matches) == len(segment) * 4 - 8 - 1
    assert all(m == 8 for m in matches[len(segment):])  # from the second repeat on, every chain matches
    assert prompt_lookup_matches(list(range(100, 200)), length=8) == [0] * (100 - 8 - 1)
    # A long prompt: only its last positions are measured (the estimate runs before every call's first
    # forward), each against the bounded history before it.
    long_row = list(range(100, 9000))
    assert prompt_lookup_matches(long_row, length=8) == [0] * LOOKUP_ESTIMATE_POSITIONS
    repeating = (segment * 400)[:9000]
    assert prompt_lookup_matches(repeating, length=8) == [8] * LOOKUP_ESTIMATE_POSITIONS


def _lookup_matches_one_position_at_a_time(row, length, positions, history):
    """What `prompt_lookup_matches` computes, by its definition: an `NgramIndex` extended one token at a
    time, its first continuation at every measured position scored with `chain_match`."""
    from longspec_hf.generation.retrieval import NgramIndex, chain_match

    first = max(1, len(row) - length - positions)
    index = NgramIndex([row[max(0, first - history) : first]])
    matches = []
    for i in range(first, len(row) - length):
        index.extend(0, [row[i]])
        matches.append(chain_match(index.continuations(0, 1, length), row[i + 1 : i + 1 + length]))
    return matches


def test_lookup_match_estimate_equals_the_index_it_stands_for():
    from longspec_hf.generation.retrieval import prompt_lookup_matches

    rng = random.Random(11)
    for _ in range(300):
        size = rng.randrange(0, 120)
        vocab = rng.choice([2, 3, 20, 50_000])
        row = [rng.randrange(vocab) for _ in range(size)]
        if size > 10 and rng.random() < 0.5:  # a repeating text with a few changed tokens
            row = (row[: rng.randrange(3, 10)] * 60)[:size]
            for _ in range(rng.randrange(4)):
                row[rng.randrange(size)] = rng.randrange(vocab)
        length, positions, history = rng.choice([1, 4, 16]), rng.choice([5, 30, 256]), rng.choice([0, 1, 3, 10, 4096])
        expected = _lookup_matches_one_position_at_a_time(row, length, positions, history)
        assert prompt_lookup_matches(row, length, positions, history) == expected, (row, length, positions, history)


def test_automatic_lookup_chains_decode_exactly_and_only_when_not_given():
    target = make_target("llama", seed=3)
    draft = make_draft(target)
    segment = torch.randint(3, 96, (25,), generator=torch.Generator().manual_seed(5))
    prompt = segment.repeat(6)[None]
    plain = target.generate(prompt, max_new_tokens=40, do_sample=False)
    stats = LongSpecStats()
    out = target.generate(prompt, assistant_model=draft, max_new_tokens=40, do_sample=False, longspec_stats=stats)
    assert torch.equal(out, plain)
    assert stats.mean_retrieval_accepted > 0  # the chain the call chose itself was accepted
    stats = LongSpecStats()
    out = target.generate(
        prompt, assistant_model=draft, max_new_tokens=40, do_sample=False, prompt_lookup_branches=0, longspec_stats=stats
    )
    assert torch.equal(out, plain) and stats.mean_retrieval_accepted == 0
