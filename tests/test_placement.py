"""Targets whose layers run on several devices (accelerate's `device_map`): each layer's K/V on its layer's
device, the draft's copy of the last layer on the draft's, and what cannot be served refused up front."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module

from longspec_hf.generation import placement
from longspec_hf.generation._compat import cache_output_field

from .conftest import make_draft, make_target


def test_layer_devices_are_the_hooks_execution_devices():
    target = make_target("llama", num_hidden_layers=3)
    add_hook_to_module(target.model.layers[1], AlignDevicesHook(execution_device=torch.device("meta")))
    assert placement.layer_devices(target, torch.device("cpu")) == [torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    assert not placement.on_one_device(target, torch.device("cpu"))
    # A hook on the whole model places every layer that has none of its own.
    other = make_target("llama", num_hidden_layers=2)
    add_hook_to_module(other, AlignDevicesHook(execution_device=torch.device("meta")))
    assert placement.layer_devices(other, torch.device("cpu")) == [torch.device("meta")] * 2
    assert placement.input_device(other) == torch.device("meta")


@pytest.mark.parametrize("keyword", ["compile_draft", "compile_target"])
def test_compiling_a_target_spread_over_devices_is_refused_before_any_forward(keyword, monkeypatch):
    target = make_target("llama")
    draft = make_draft(target)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    forwards = []
    target.register_forward_hook(lambda *args: forwards.append(1))
    monkeypatch.setattr(placement, "layer_devices", lambda model, default: [torch.device("cpu"), torch.device("meta")])
    with pytest.raises(ValueError, match="compile_draft/compile_target need a target on one device.*device_map"):
        target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False, **{keyword: True})
    assert forwards == []


def test_a_draft_vocabulary_over_an_offloaded_head_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    make_target("llama", seed=3).save_pretrained(tmp_path / "target")
    device_map = {"model": "cpu", "lm_head": "disk"}
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "target", device_map=device_map, offload_folder=tmp_path / "off")
    draft = make_draft(target)
    draft.set_draft_vocabulary(torch.arange(3, 60))
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="LM head is offloaded.*set_draft_vocabulary\\(None\\)"):
        target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False)
    draft.set_draft_vocabulary(None)
    reference = target.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(target.generate(ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=12, do_sample=False), reference)


# Layers alternate between the GPU and the CPU (accelerate computes a "cpu" entry on the CPU when the main
# device is the CPU): the first map keeps the last layer on the draft's device, the second does not, so the
# draft reads its mirror of the last layer.
PLACEMENTS = {
    "last-layer-on-gpu": {"model.layers.0": "cpu", "model.layers.1": 0, "model.layers.2": "cpu", "model.layers.3": 0,
                          "model.norm": "cpu", "lm_head": "cpu"},
    "last-layer-on-cpu": {"model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0, "model.layers.3": "cpu",
                          "model.norm": 0, "lm_head": 0},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_a_target_over_the_gpu_and_the_cpu_matches_plain_generate(name):
    from accelerate import dispatch_model

    target = make_target("llama", seed=7, num_hidden_layers=4, hidden_size=64)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, **PLACEMENTS[name]}
    target = dispatch_model(target, device_map, main_device="cpu")
    assert {str(device) for device in placement.layer_devices(target, torch.device("cuda"))} == {"cpu", "cuda:0"}
    draft = make_draft(target, seed=8).cuda()
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    ids, mask = ids.cuda(), mask.cuda()
    reference = target.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    for keywords in (dict(tree_widths=[2, 2]), dict(tree_widths=[3, 2, 2], prefill_chunk_size=32)):
        output = target.generate(ids, attention_mask=mask, assistant_model=draft, max_new_tokens=40, do_sample=False, **keywords)
        assert torch.equal(output, reference), keywords
    # The returned cache holds each layer's K/V where that layer runs.
    returned = target.generate(
        ids, attention_mask=mask, assistant_model=draft, max_new_tokens=40, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(returned.sequences, reference)
    cache = getattr(returned, cache_output_field())
    devices = placement.layer_devices(target, torch.device("cuda"))
    assert [layer.keys.device for layer in cache.layers] == devices


def test_a_cache_over_two_devices_keeps_each_layers_kv_like_one_device():
    """The segments' bookkeeping on the CPU: a layer on "meta" stands for another device (shapes only; the
    draft's mirror of a last layer elsewhere is covered by the GPU test below)."""
    from longspec_hf.generation.cache import LongSpecCache

    batch, heads, dim, capacity, nodes = 2, 2, 4, 12, 5
    pad_start = torch.tensor([0, 2])
    cpu, meta = torch.device("cpu"), torch.device("meta")
    kwargs = dict(num_layers=3, batch_size=batch, num_kv_heads=heads, head_dim=dim, capacity=capacity,
                  max_tree_nodes=nodes, pad_start=pad_start, device=cpu, dtype=torch.float32)
    spread = LongSpecCache(**kwargs, layer_devices=[meta, meta, cpu])
    single = LongSpecCache(**kwargs)
    assert [s.layers for s in spread.segments] == [range(0, 2), range(2, 3)] and spread.mirror is None
    assert spread.layer_kv(1).kv.device == meta and spread.layer_kv(1).committed_len.device == meta
    assert spread.nbytes() == single.nbytes()
    with pytest.raises(RuntimeError, match="layer_kv"):
        spread.kv
    generator = torch.Generator().manual_seed(0)

    def forward(cache, length):  # what a target forward writes, layer by layer
        for layer in range(3):
            key = torch.randn(batch, heads, length, dim, generator=generator)
            value = torch.randn(batch, heads, length, dim, generator=generator)
            for each in cache:
                each.update(key.to(each.layer_kv(layer).kv.device), value.to(each.layer_kv(layer).kv.device), layer)

    for cache in (spread, single):
        cache.start(pad_start)
        cache.begin_prefill(0, 6)
    forward((spread, single), 6)
    for cache in (spread, single):
        cache.end_prefill(6)
        cache.begin_tree(nodes)
    forward((spread, single), nodes)
    path, kept = torch.tensor([[0, 2, 4], [0, 1, 3]]), torch.tensor([3, 2])
    for cache in (spread, single):
        cache.compact(path, kept)
    assert torch.equal(spread.committed_len, single.committed_len) and spread.layer_kv(0).committed_len.device == meta
    draft_view, reference = spread.target_kv(), single.target_kv()
    assert torch.equal(draft_view.key, reference.key) and torch.equal(draft_view.value, reference.value)
    assert torch.equal(spread.layer_kv(2).kv, single.layer_kv(2).kv)
    assert torch.equal(spread.layer_kv(2).kv_tree, single.layer_kv(2).kv_tree)
