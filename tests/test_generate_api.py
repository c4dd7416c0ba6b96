"""generate() with a LongSpec draft keeps every transformers argument's meaning."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from longspec_hf import LongSpecStats

from .conftest import make_draft, make_target


@pytest.fixture(scope="module")
def pair():
    target = make_target("llama", seed=3)
    return target, make_draft(target, seed=4)


def prompt(length: int = 12, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, length), generator=generator)


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_scores_and_logits_match_plain_generate(pair):
    target, draft = pair
    ids = prompt()
    kwargs = dict(max_new_tokens=30, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    reference = target.generate(ids, **kwargs)
    output = target.generate(ids, assistant_model=draft, **kwargs)
    assert torch.equal(reference.sequences, output.sequences)
    assert len(output.scores) == len(reference.scores) == 30
    assert len(output.logits) == len(reference.logits) == 30
    for ours, theirs in zip(output.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(output.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_streamer_gets_each_token_once_in_order(pair):
    target, draft = pair
    ids = prompt()
    reference = target.generate(ids, max_new_tokens=25, do_sample=False)
    streamer = RecordingStreamer()
    target.generate(ids, assistant_model=draft, max_new_tokens=25, do_sample=False, streamer=streamer)
    assert streamer.ended
    streamed = [token for put in streamer.puts[1:] for token in put]
    assert streamer.puts[0] == ids[0].tolist()  # transformers streams the prompt first
    assert streamed == reference[0, ids.shape[1] :].tolist()


def test_batched_streamer_gets_columns_like_plain_generate(pair):
    target, draft = pair
    ids = prompt(batch=2)
    reference, ours = RecordingStreamer(), RecordingStreamer()
    target.generate(ids, max_new_tokens=9, do_sample=False, streamer=reference)
    target.generate(ids, assistant_model=draft, max_new_tokens=9, do_sample=False, streamer=ours)
    assert ours.puts == reference.puts


def test_eos_list_and_padding(pair):
    target, draft = pair
    ids = prompt(batch=3, seed=5)
    plain = target.generate(ids, max_new_tokens=40, do_sample=False)
    eos = [int(plain[0, ids.shape[1] + 3]), int(plain[2, ids.shape[1] + 7])]
    reference = target.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    output = target.generate(ids, assistant_model=draft, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(reference, output)


class StopAfterToken(StoppingCriteria):
    """Stops a row right after it produced `token` for the second time (needs the whole sequence)."""

    def __init__(self, token: int, prompt_len: int):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_len :] == self.token).sum(dim=1) >= 2


def test_custom_stopping_criteria_stop_where_plain_decoding_stops(pair):
    target, draft = pair
    ids = prompt(seed=7)
    plain = target.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1] :].tolist()
    token = max(set(plain), key=plain.count)
    criteria = StoppingCriteriaList([StopAfterToken(token, ids.shape[1])])
    reference = target.generate(ids, max_new_tokens=60, do_sample=False, stopping_criteria=criteria)
    output = target.generate(ids, assistant_model=draft, max_new_tokens=60, do_sample=False, stopping_criteria=criteria)
    assert reference.shape[1] < ids.shape[1] + 60
    assert torch.equal(reference, output)


class PenalizeLastToken(LogitsProcessor):
    """A path-dependent user processor: forbids repeating the previous token."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


def test_path_dependent_processors(pair):
    target, draft = pair
    ids = prompt(batch=2, seed=9)
    kwargs = dict(
        max_new_tokens=40,
        do_sample=False,
        repetition_penalty=1.5,
        no_repeat_ngram_size=3,
        min_new_tokens=5,
        logits_processor=LogitsProcessorList([PenalizeLastToken()]),
    )
    reference = target.generate(ids, **kwargs)
    assert torch.equal(reference, target.generate(ids, assistant_model=draft, **kwargs))


def test_max_length_and_max_new_tokens_are_exact(pair):
    target, draft = pair
    ids = prompt()
    for max_new in (1, 2, 3, 7):
        output = target.generate(ids, assistant_model=draft, max_new_tokens=max_new, do_sample=False)
        assert output.shape[1] == ids.shape[1] + max_new
    output = target.generate(ids, assistant_model=draft, max_length=ids.shape[1] + 11, do_sample=False)
    assert torch.equal(output, target.generate(ids, max_length=ids.shape[1] + 11, do_sample=False))


def test_stats_report_rounds_and_accepted_lengths(pair):
    target, draft = pair
    stats = LongSpecStats()
    output = target.generate(prompt(), assistant_model=draft, max_new_tokens=50, do_sample=False, longspec_stats=stats)
    assert stats.rounds == len(stats.accepted_lengths) > 0
    # The prefill gives the first token; every round gives its accepted length (the last round may be cut).
    assert 1 + sum(stats.accepted_lengths) >= output.shape[1] - prompt().shape[1]
    assert stats.mean_accepted_length >= 1.0
    # The draft keeps nothing of the call: the statistics live in the object the caller passed.
    assert not any("stats" in name for name in vars(draft))


def test_attention_implementation_restored_after_an_exception(pair):
    target, draft = pair
    before = target.config._attn_implementation

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        target.generate(prompt(), assistant_model=draft, max_new_tokens=5, stopping_criteria=StoppingCriteriaList([Boom()]))
    assert target.config._attn_implementation == before
    assert torch.equal(
        target.generate(prompt(), max_new_tokens=5, do_sample=False),
        target.generate(prompt(), max_new_tokens=5, do_sample=False, assistant_model=draft),
    )


def test_other_assistants_and_prompt_lookup_are_untouched(pair):
    target, _ = pair
    ids = prompt(seed=11)
    reference = target.generate(ids, max_new_tokens=20, do_sample=False)
    assistant = make_target("llama", seed=12)
    assert torch.equal(reference, target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=assistant))
    assert torch.equal(reference, target.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3))


def test_tree_widths_from_generation_config(pair):
    target, draft = pair
    ids = prompt()
    stats_chain, stats_tree = LongSpecStats(), LongSpecStats()
    default = draft.generation_config.tree_widths
    draft.generation_config.tree_widths = [1, 1]
    try:
        target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False, longspec_stats=stats_chain)
    finally:
        draft.generation_config.tree_widths = default
    assert max(stats_chain.accepted_lengths) <= 3
    target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False, longspec_stats=stats_tree, tree_widths=[2])
    assert max(stats_tree.accepted_lengths) <= 2


def test_longspec_generate_is_a_custom_generate_method(pair):
    """`longspec_hf.generate` in transformers' public `custom_generate=` form: through the routed
    `generate`, and through transformers' own `generate` alone (the draft bound to the callable, since
    transformers hands a callable only the keywords of its own signature), LongSpec keywords included."""
    import functools

    import longspec_hf
    from longspec_hf.generation import _compat

    target, draft = pair
    ids = prompt(length=15, seed=7)
    reference = target.generate(ids, max_new_tokens=24, do_sample=False)
    stats = LongSpecStats()
    routed = target.generate(
        ids, custom_generate=longspec_hf.generate, assistant_model=draft, max_new_tokens=24, do_sample=False,
        tree_widths=[2, 2], longspec_stats=stats,
    )
    assert torch.equal(routed, reference) and stats.rounds > 0
    stats = LongSpecStats()
    direct = _compat.ORIGINAL_GENERATE(
        target, ids, custom_generate=functools.partial(longspec_hf.generate, assistant_model=draft),
        max_new_tokens=24, do_sample=False, tree_widths=[3], longspec_stats=stats,
    )
    assert torch.equal(direct, reference) and stats.rounds > 0
    assert max(stats.accepted_lengths) <= 2  # one level of three nodes: at most one drafted token a round


def test_another_custom_generate_with_a_longspec_draft_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="custom_generate cannot be combined"):
        target.generate(prompt(), custom_generate=lambda *a, **k: None, assistant_model=draft, max_new_tokens=4)


def test_a_target_with_eager_attention(pair):
    """attn_implementation="eager": LongSpec's forwards use its own attention, and any other forward
    while a call runs falls back to the model family's eager attention."""
    target = make_target("llama", seed=3, attn_implementation="eager")
    draft = make_draft(target, seed=4)
    ids = prompt(length=14, seed=9)
    reference = target.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False), reference)
    assert target.config._attn_implementation == "eager"
    from longspec_hf.generation.attention import longspec_attention

    with longspec_attention(target):
        assert torch.equal(target(ids).logits, make_target("llama", seed=3, attn_implementation="eager")(ids).logits)
