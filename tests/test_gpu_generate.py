"""Greedy LongSpec decoding on CUDA (Triton kernels in the loop) equals plain generate in fp32."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats

from .conftest import make_draft, make_target
from .test_equality import TREE_SHAPES, random_batch

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
