"""Sampling with a LongSpec draft draws from exactly the distribution of plain sampling.

The target has a 24-token vocabulary, so the exact joint distribution of the first three generated tokens
can be enumerated with the target itself: transformers' own `generate(..., output_scores=True)` on every
prefix gives the processed scores it samples from. LongSpec's empirical distribution over many batched
draws must pass a chi-square test and be close in total variation, for both verification rules and
for every warper/processor below. The same test must reject the naive `min(1, p/q)` rule on top-k
children (which is biased), so it is known to have the power to see a wrong rule.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from longspec_hf import LongSpecStats
from longspec_hf.generation import sampling
from longspec_hf.generation.sampling import SamplingRule
from longspec_hf.generation.tree import DraftTree, GreedyAcceptance, acceptance_from_deepest

from .conftest import make_draft, make_target

VOCAB = 16
NEW_TOKENS = 3
PROMPT = torch.tensor([[5, 9, 14, 7]])
ROWS_PER_CALL = 2000
CALLS = 10  # 20000 draws per case
TREE_WIDTHS = [2, 3]
MIN_P_VALUE = 1e-3
SEED, SHARPNESS = 4, 24.0
MAX_TOTAL_VARIATION = 0.02


class FavourNextToken(LogitsProcessor):
    """A path-dependent user processor: boosts token `(3 * last + 1) % V`."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        favoured = (3 * input_ids[:, -1] + 1) % scores.shape[-1]
        return scores.scatter_add(1, favoured[:, None], torch.full_like(scores[:, :1], 2.0))


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "custom_processor": dict(logits_processor=[FavourNextToken()]),
}


def generation_kwargs(case: str) -> dict:
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    for name, value in CASES[case].items():
        kwargs[name] = LogitsProcessorList(value) if name == "logits_processor" else value
    return kwargs


def make_pair():
    target = make_target(vocab_size=VOCAB, seed=SEED, eos_token_id=None, num_hidden_layers=1)
    with torch.no_grad():
        # Sharper than make_target's default: few enough likely sequences for 20000 draws to resolve.
        target.get_output_embeddings().weight.mul_(SHARPNESS / 8.0)
    return target, make_draft(target, seed=4)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def exact_distribution(target, kwargs: dict, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """`(V,) * NEW_TOKENS` probabilities of the first generated tokens, by enumerating every prefix."""
    joint = torch.ones(())
    for step in range(NEW_TOKENS):
        continuations = torch.tensor(list(itertools.product(range(VOCAB), repeat=step)), dtype=torch.long)
        continuations = continuations.reshape(VOCAB**step, step)
        prefixes = torch.cat([prompt.expand(VOCAB**step, -1), continuations], dim=1)
        # An explicit mask: token 0 is also the pad id, which generate would otherwise mask out.
        out = target.generate(
            prefixes, attention_mask=torch.ones_like(prefixes), max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **kwargs
        )
        probs = torch.softmax(out.scores[0].double(), dim=-1).view(*([VOCAB] * step), VOCAB)
        joint = joint[..., None] * probs
    return joint / joint.sum()


def sampled_distribution(
    target,
    draft,
    kwargs: dict,
    rule: str,
    prompt: torch.Tensor = PROMPT,
    tree_widths: list[int] = TREE_WIDTHS,
    **longspec_kwargs,
) -> torch.Tensor:
    counts = torch.zeros(VOCAB**NEW_TOKENS, dtype=torch.float64)
    prompts = prompt.expand(ROWS_PER_CALL, -1)
    for _ in range(CALLS):
        out = target.generate(
            prompts, attention_mask=torch.ones_like(prompts), assistant_model=draft, tree_widths=tree_widths, sampling_rule=rule,
            max_new_tokens=NEW_TOKENS, **kwargs, **longspec_kwargs,
        )
        new = out[:, prompt.shape[1] :]
        index = sum(new[:, i] * VOCAB ** (NEW_TOKENS - 1 - i) for i in range(NEW_TOKENS))
        counts += torch.bincount(index, minlength=VOCAB**NEW_TOKENS).double()
    return counts


def pooled_chi_square(exact: torch.Tensor, counts: torch.Tensor) -> float:
    """Chi-square p-value; cells expected below 5 draws are pooled into one."""
    expected = exact * (counts.sum() / exact.sum())
    if bool((counts[expected == 0] > 0).any()):
        return 0.0  # a sequence the target can never produce
    big = expected >= 5
    observed_cells, expected_cells = counts[big], expected[big]
    if float(expected[~big].sum()) > 0:
        observed_cells = torch.cat([observed_cells, counts[~big].sum()[None]])
        expected_cells = torch.cat([expected_cells, expected[~big].sum()[None]])
    return float(chisquare(observed_cells.numpy(), expected_cells.numpy()).pvalue)


def compare(exact: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Chi-square p-values and total variation of the first two tokens' joint, and chi-square of all three.

    The two-token joint has few enough cells for total variation to resolve 0.02 at 20000 draws; the
    three-token chi-square covers depth 2 of the first tree.
    """
    exact_two = exact.sum(dim=-1).reshape(-1)
    counts_two = counts.view(VOCAB, VOCAB, VOCAB).sum(dim=-1).reshape(-1)
    return {
        "p_value": pooled_chi_square(exact_two, counts_two),
        "total_variation": 0.5 * float((counts_two / counts_two.sum() - exact_two).abs().sum()),
        "p_value_three": pooled_chi_square(exact.reshape(-1), counts),
    }


def matches(result: dict[str, float]) -> bool:
    return (
        result["p_value"] > MIN_P_VALUE
        and result["total_variation"] < MAX_TOTAL_VARIATION
        and result["p_value_three"] > MIN_P_VALUE
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule", ["point_mass", "recursive_rejection"])
def test_sampled_tokens_follow_the_target_distribution(pair, case, rule):
    target, draft = pair
    kwargs = generation_kwargs(case)
    exact = exact_distribution(target, kwargs)
    torch.manual_seed(0)
    result = compare(exact, sampled_distribution(target, draft, kwargs, rule))
    assert matches(result), result


@pytest.mark.parametrize("case", ["temperature", "top_k"])
@pytest.mark.parametrize("rule", ["point_mass", "recursive_rejection"])
def test_sampling_over_a_draft_vocabulary_follows_the_target_distribution(case, rule):
    """The draft scores half of the vocabulary (q is zero on the rest, likely tokens included), which the
    target's distribution must not notice."""
    target, draft = make_pair()
    draft.set_draft_vocabulary(range(0, VOCAB, 2))
    kwargs = generation_kwargs(case)
    exact = exact_distribution(target, kwargs)
    torch.manual_seed(0)
    result = compare(exact, sampled_distribution(target, draft, kwargs, rule))
    assert matches(result), result


# A repetitive prompt: its suffix "7 5 9" occurred before, so prompt-lookup chains are found in every
# round (the draws continue it in many different ways, so rows find different numbers of chains).
REPEATING_PROMPT = torch.tensor([[5, 9, 14, 7, 5, 9, 14, 7, 5, 9, 3, 7, 5, 9]])


@pytest.mark.parametrize("case", ["temperature", "repetition_penalty"])
@pytest.mark.parametrize("rule", ["point_mass", "recursive_rejection"])
def test_sampling_with_prompt_lookup_chains_follows_the_target_distribution(pair, case, rule):
    target, draft = pair
    kwargs = generation_kwargs(case)
    exact = exact_distribution(target, kwargs, REPEATING_PROMPT)
    torch.manual_seed(0)
    stats = LongSpecStats()
    counts = sampled_distribution(
        target, draft, kwargs, rule, REPEATING_PROMPT, prompt_lookup_branches=3, longspec_stats=stats
    )
    result = compare(exact, counts)
    assert matches(result), result
    assert stats.mean_retrieval_accepted > 0.02, stats.mean_retrieval_accepted  # the chains were exercised


@pytest.mark.parametrize("rule", ["point_mass", "recursive_rejection"])
def test_sampling_with_a_chain_under_the_draft_follows_the_target_distribution(rule):
    """`prompt_lookup_under_draft=True`: a chain under the draft's best leaf is a fixed proposal below a
    drafted node. A target whose next token depends on the current token only (attention and MLP outputs
    zeroed), a draft that agrees with it and a prompt that is the target's own greedy walk: the draft's
    node is often accepted and the chain's token after it too, so the third token often comes from it."""
    target, _ = make_pair()
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    draft = make_draft(target, seed=4)
    with torch.no_grad():
        for projection in (draft.self_attn.o_proj, draft.cross_attn.o_proj, draft.mlp.down_proj):
            projection.weight.normal_(std=1e-3)
    prompt = target.generate(torch.tensor([[5]]), max_new_tokens=15, do_sample=False)
    kwargs = generation_kwargs("temperature")
    exact = exact_distribution(target, kwargs, prompt)
    torch.manual_seed(0)
    stats = LongSpecStats()
    # One drafted level and chains of one token: a round gains 3 tokens only through the leaf's chain.
    counts = sampled_distribution(
        target, draft, kwargs, rule, prompt, tree_widths=[1], prompt_lookup_branches=1, prompt_lookup_length=1,
        prompt_lookup_under_draft=True, longspec_stats=stats,
    )
    result = compare(exact, counts)
    assert matches(result), result
    through_leaf_chain = sum(n == 3 for n in stats.accepted_lengths) / len(stats.accepted_lengths)
    assert through_leaf_chain > 0.05, through_leaf_chain  # thousands of the 20000 draws


def verify_naive_top_k(tree: DraftTree, scores: torch.Tensor) -> GreedyAcceptance:
    """The BIASED rule: min(1, r/q) with residual norm(max(r - q, 0)) on deterministic top-k children."""
    batch = scores.shape[0]
    rows = torch.arange(batch)
    target_probs = torch.softmax(scores.float(), dim=-1)
    current = torch.zeros(batch, dtype=torch.long)
    num_accepted = torch.zeros(batch, dtype=torch.long)
    residual = target_probs[:, 0].clone()
    for level in range(1, tree.max_depth + 1):
        walking = num_accepted == level - 1
        local = (current - tree.level_slice(level - 1).start).clamp(min=0)
        draft_probs = tree.draft_log_probs[level - 1][rows, local].exp()
        moved = torch.zeros(batch, dtype=torch.bool)
        nodes = tree.level_slice(level)
        for child in range(nodes.start, nodes.stop):
            token = tree.tokens[:, child]
            trying = walking & ~moved & (tree.parents[:, child] == current)
            accept = trying & (torch.rand(batch) * draft_probs[rows, token] < residual[rows, token])
            reject = trying & ~accept
            current = torch.where(accept, child, current)
            moved |= accept
            leftover = (residual - draft_probs).clamp(min=0)
            leftover = leftover / leftover.sum(dim=-1, keepdim=True).clamp(min=1e-30)
            residual = torch.where(reject[:, None], leftover, residual)
        residual = torch.where(moved[:, None], target_probs[rows, current], residual)
        num_accepted += moved.long()
    bonus = torch.multinomial(residual, 1)[:, 0]
    return acceptance_from_deepest(tree, current, num_accepted, bonus)


@pytest.mark.parametrize("case", ["temperature", "top_p"])
def test_naive_rule_on_top_k_children_is_detected(pair, case, monkeypatch):
    monkeypatch.setitem(
        sampling.SAMPLING_RULES, "naive_top_k", SamplingRule("naive_top_k", sample_children=False, verify=verify_naive_top_k)
    )
    target, draft = pair
    kwargs = generation_kwargs(case)
    exact = exact_distribution(target, kwargs)
    torch.manual_seed(0)
    result = compare(exact, sampled_distribution(target, draft, kwargs, "naive_top_k"))
    # Detected on the first two tokens alone, with the very criteria the correct rules pass.
    assert result["p_value"] < MIN_P_VALUE or result["total_variation"] > MAX_TOTAL_VARIATION, result


@pytest.mark.parametrize("rule", ["point_mass", "recursive_rejection"])
def test_same_seed_same_output(pair, rule):
    target, draft = pair
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(assistant_model=draft, do_sample=True, temperature=0.9, top_k=8, max_new_tokens=20, sampling_rule=rule)
    torch.manual_seed(123)
    first = target.generate(ids, **kwargs)
    torch.manual_seed(123)
    second = target.generate(ids, **kwargs)
    torch.manual_seed(124)
    other = target.generate(ids, **kwargs)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_output_scores_are_the_processed_scores_at_the_chosen_tokens(pair):
    target, draft = pair
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(do_sample=True, temperature=0.8, top_k=6, repetition_penalty=1.2)
    torch.manual_seed(5)
    out = target.generate(
        ids, assistant_model=draft, max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    assert len(out.scores) == 8
    for step, step_scores in enumerate(out.scores):
        prefix = out.sequences[:, : ids.shape[1] + step]
        reference = target.generate(
            prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **kwargs
        ).scores[0]
        torch.testing.assert_close(step_scores, reference)
        chosen = out.sequences[:, ids.shape[1] + step]
        assert bool((step_scores.gather(1, chosen[:, None]) > float("-inf")).all())


def test_unknown_sampling_rule_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="sampling_rule"):
        target.generate(PROMPT, assistant_model=draft, do_sample=True, max_new_tokens=2, sampling_rule="nope")
