"""The draft model: config, Auto classes, save/load, constant-size cache, inference == training forward."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, LongSpecStats
from longspec_hf.modeling import TargetKV

from .conftest import make_draft, make_target


def test_config_from_target_records_the_target():
    target = make_target("qwen2")
    config = LongSpecDraftConfig.from_target_config(target.config)
    assert config.model_type == "longspec_draft"
    assert config.target_vocab_size == target.config.vocab_size
    assert config.target_hidden_size == config.hidden_size == target.config.hidden_size
    assert config.target_num_key_value_heads == target.config.num_key_value_heads
    assert config.target_max_position_embeddings == target.config.max_position_embeddings
    assert config.target_model_type == "qwen2"
    assert config.target_rope_parameters["rope_theta"] == target.config.rope_parameters["rope_theta"]


def test_save_and_load_round_trip_through_auto_classes(tmp_path):
    target = make_target()
    draft = make_draft(target, tree_widths=[3, 5])
    draft.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "generation_config.json").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LongSpecDraftConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LongSpecDraftModel)
    assert loaded.generation_config.tree_widths == [3, 5]
    saved = draft.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # The target's embedding and head are borrowed, never stored.
    assert not any("embed" in name or "lm_head" in name for name in saved)
    ids = torch.randint(3, 96, (1, 10))
    assert torch.equal(
        target.generate(ids, max_new_tokens=12, do_sample=False),
        target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=loaded),
    )


def test_draft_cache_size_does_not_grow_with_the_context():
    target = make_target(max_position_embeddings=4200, vocab_size=64)
    draft = make_draft(target, sliding_window=32)
    sizes = []
    for prompt_len in (100, 4000):
        ids = torch.randint(3, 64, (1, prompt_len))
        stats = LongSpecStats()
        target.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False, longspec_stats=stats)
        sizes.append(stats.draft_cache_nbytes)
    assert sizes[0] == sizes[1] > 0


def test_inference_path_equals_the_training_forward():
    """The root's logits from the ring cache equal the full-sequence forward with cross-attention lag 1."""
    target = make_target()
    draft = make_draft(target, sliding_window=8)
    draft.attach_target(target)
    length = 20
    ids = torch.randint(3, 96, (2, length))
    positions = torch.arange(length).expand(2, -1)
    key = torch.randn(2, 2, length, 8)
    value = torch.randn(2, 2, length, 8)
    full = draft(ids, positions, key, value, cross_lag=1)
    for end in (3, 8, 13, 20):
        cache = draft.new_cache(2, max_tree_nodes=4)
        start = max(0, end - 8)
        root_logits = draft.append_and_query_root(
            ids[:, start:end],
            positions[:, start:end],
            torch.ones(2, end - start, dtype=torch.bool),
            cache,
            TargetKV(key, value, torch.zeros(2, dtype=torch.long), torch.full((2,), end - 1)),
        )
        torch.testing.assert_close(root_logits, full[:, end - 1], rtol=1e-5, atol=1e-5)
