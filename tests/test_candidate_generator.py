"""LongSpecCandidateGenerator is a drop-in candidate generator for transformers' own assisted loop."""

from __future__ import annotations

import torch

from longspec_hf import LongSpecCandidateGenerator
from longspec_hf.generation import target_kv_from_cache
from longspec_hf.modeling import cache_keyword, output_cache

from .conftest import make_draft, make_target


def test_transformers_assisted_loop_with_a_longspec_chain_matches_plain_generate():
    target = make_target(seed=21)
    draft = make_draft(target, seed=22)
    built = []

    def candidate_generator(*, generation_config, model_kwargs, **unused):
        cache = model_kwargs[cache_keyword(target)]
        generator = LongSpecCandidateGenerator(
            draft,
            target,
            tree_widths=[1] * 4,
            batch_size=1,
            target_kv=lambda: target_kv_from_cache(cache),
            max_length=generation_config.max_length,
        )
        built.append(generator)
        assert generator.num_drafting_tokens == 4
        return generator

    for seed in range(5):
        ids = torch.randint(3, 96, (1, 5 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        reference = target.generate(ids, max_new_tokens=40, do_sample=False)
        # prompt_lookup_num_tokens selects transformers' assisted loop; its candidate generator is ours.
        target._get_candidate_generator = candidate_generator
        try:
            output = target.generate(ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=4)
        finally:
            del target._get_candidate_generator
        assert torch.equal(reference, output)
    assert len(built) == 5


def test_get_candidates_proposes_the_chain():
    target = make_target()
    draft = make_draft(target)
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        out = target(ids, use_cache=True)
    cache = output_cache(out)
    generator = LongSpecCandidateGenerator(draft, target, [1, 1, 1], 1, lambda: target_kv_from_cache(cache))
    # The cache holds the prompt: the root (last token) is committed already, as in a chain extension.
    candidates, logits = generator.get_candidates(torch.cat([ids, ids[:, -1:]], dim=1))
    assert candidates.shape == (1, 16) and logits is None
    assert torch.equal(candidates[:, :13], torch.cat([ids, ids[:, -1:]], dim=1))
