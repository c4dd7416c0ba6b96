"""Published-layout (old) LongSpec checkpoints: conversion, direct loading, and an independent reference block."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel
from longspec_hf.modeling.conversion import convert_checkpoint, convert_state_dict

from .conftest import make_target

WINDOW = 4


def old_layout_weights(config, prefix: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random weights of one draft block as the published checkpoints store it."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    block = {
        "input_layernorm.weight": 1 + rand(hidden),
        "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "self_attn.q_proj.bias": rand(heads * head_dim),
        "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "self_attn.k_proj.bias": rand(kv_heads * head_dim),
        "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "self_attn.v_proj.bias": rand(kv_heads * head_dim),
        "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "post_self_attention_layernorm.weight": 1 + rand(hidden),
        "cross_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "cross_attn.q_proj.bias": rand(heads * head_dim),
        "cross_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "cross_attn.k_proj.bias": rand(kv_heads * head_dim),
        "cross_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "cross_attn.v_proj.bias": rand(kv_heads * head_dim),
        "cross_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "post_cross_attention_layernorm.weight": 1 + rand(hidden),
        "mlp.gate_proj.weight": rand(inter, hidden),
        "mlp.up_proj.weight": rand(inter, hidden),
        "mlp.down_proj.weight": rand(hidden, inter),
    }
    weights = {prefix + key: value for key, value in block.items()}
    # Target parts some published checkpoints carry along; the draft must drop them.
    weights["model.embed_tokens.weight"] = rand(config.vocab_size, hidden)
    weights["lm_head.weight"] = rand(config.vocab_size, hidden)
    return weights


def write_old_layout(folder, target, prefix="model.layers.0.", fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    target.config.save_pretrained(folder)
    weights = old_layout_weights(target.config, prefix)
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return weights


def block_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip any prefix in front of the block names (independently of the library's mapping)."""
    out = {}
    for key, value in weights.items():
        for name in ("input_layernorm", "self_attn", "post_self_attention_layernorm", "cross_attn",
                     "post_cross_attention_layernorm", "mlp"):
            marker = name + "."
            if key.startswith(marker) or ("." + marker) in key:
                out[key[key.index(marker):] if key.startswith(marker) else key[key.index("." + marker) + 1:]] = value
                break
    return out


# ----- an independent implementation of the block --------------------------------------------------------
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(q, k, v, allowed):
    """q (B,H,T,D), k/v (B,Hkv,S,D), allowed (T,S) or (B,T,S); rows with nothing allowed give zeros."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if allowed.dim() == 2:
        allowed = allowed[None]
    allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def reference_logits(w, embed, lm_head, input_ids, positions, target_key, target_value, heads, kv_heads, window, eps, theta):
    batch, length = input_ids.shape
    head_dim = embed.shape[1] // heads

    def split(x, n):
        return x.view(batch, length, n, head_dim).transpose(1, 2)

    def merge(x):
        return x.transpose(1, 2).reshape(batch, length, -1)

    idx = torch.arange(length)
    h = embed[input_ids]
    x = rms(h, w["input_layernorm.weight"], eps)
    q = rope(split(F.linear(x, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"]), heads), positions, theta)
    k = rope(split(F.linear(x, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"]), kv_heads), positions, theta)
    v = split(F.linear(x, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"]), kv_heads)
    causal_window = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)
    h = h + F.linear(merge(attend(q, k, v, causal_window)), w["self_attn.o_proj.weight"])

    x = rms(h, w["post_self_attention_layernorm.weight"], eps)
    q = rope(split(F.linear(x, w["cross_attn.q_proj.weight"], w["cross_attn.q_proj.bias"]), heads), positions, theta)
    lag_one = idx[None, :] <= idx[:, None] - 1
    h = h + F.linear(merge(attend(q, target_key, target_value, lag_one)), w["cross_attn.o_proj.weight"])

    x = rms(h, w["post_cross_attention_layernorm.weight"], eps)
    gate = F.linear(x, w["mlp.gate_proj.weight"])
    up = F.linear(x, w["mlp.up_proj.weight"])
    h = h + F.linear(F.silu(gate) * up, w["mlp.down_proj.weight"])
    return h @ lm_head.T  # no final norm


@pytest.mark.parametrize(
    "prefix,fmt", [("model.layers.0.", "safetensors"), ("", "bin"), ("model.", "safetensors"), ("layers.0.", "bin")]
)
def test_old_layout_converts_and_matches_reference(tmp_path, prefix, fmt, caplog):
    target = make_target("llama")
    src = tmp_path / "old"
    weights = write_old_layout(src, target, prefix=prefix, fmt=fmt)

    with caplog.at_level(logging.INFO):
        draft = LongSpecDraftModel.from_pretrained(src, sliding_window=WINDOW)
    assert "published LongSpec layout" in caplog.text
    assert isinstance(draft.config, LongSpecDraftConfig)
    assert draft.config.sliding_window == WINDOW and draft.config.attention_bias

    # Every weight lands where it belongs; unused cross K/V and target parts are gone.
    block = block_weights(weights)
    state = draft.state_dict()
    for key, value in block.items():
        if key.startswith(("cross_attn.k_proj", "cross_attn.v_proj")):
            assert key not in state
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert set(state) == {k for k in block if not k.startswith(("cross_attn.k_proj", "cross_attn.v_proj"))}

    # Logits equal an independent implementation of the block.
    draft.attach_target(target)
    cfg = target.config
    batch, length = 2, 10
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, cfg.vocab_size, (batch, length), generator=gen)
    positions = torch.arange(length)[None].repeat(batch, 1) + torch.tensor([[0], [37]])
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    target_key = torch.randn(batch, cfg.num_key_value_heads, length, head_dim, generator=gen)
    target_value = torch.randn(batch, cfg.num_key_value_heads, length, head_dim, generator=gen)
    with torch.no_grad():
        got = draft(input_ids, positions, target_key, target_value, cross_lag=1)
        expected = reference_logits(
            block, target.get_input_embeddings().weight, target.get_output_embeddings().weight, input_ids, positions,
            target_key, target_value, cfg.num_attention_heads, cfg.num_key_value_heads, WINDOW, cfg.rms_norm_eps,
            cfg.rope_parameters["rope_theta"],
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_convert_checkpoint_writes_native_folder(tmp_path):
    target = make_target("qwen2")
    src, dst = tmp_path / "old", tmp_path / "new"
    write_old_layout(src, target)
    convert_checkpoint(LongSpecDraftModel, src, dst, sliding_window=8)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "longspec_draft" and config["sliding_window"] == 8
    assert config["target_model_type"] == "qwen2"
    assert json.loads((dst / "generation_config.json").read_text())["tree_widths"] == [4, 16, 16, 16, 16]
    reloaded = LongSpecDraftModel.from_pretrained(dst)
    direct = LongSpecDraftModel.from_pretrained(src, sliding_window=8)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    assert not any("k_proj" in key for key in reloaded.state_dict() if key.startswith("cross_attn"))


def test_converted_draft_decodes(tmp_path):
    target = make_target("llama")
    write_old_layout(tmp_path / "old", target)
    draft = LongSpecDraftModel.from_pretrained(tmp_path / "old", sliding_window=16)
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7]])
    plain = target.generate(ids, max_new_tokens=12, do_sample=False)
    spec = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, spec)


def test_convert_state_dict_rejects_several_blocks():
    weights = {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(2, 2),
    }
    with pytest.raises(ValueError, match="more than one block"):
        convert_state_dict(weights)


def test_conversion_never_imports_the_model_module():
    """modeling_longspec uses conversion (the published layout, the model card); conversion takes the model
    class as an argument instead of importing it back, so the two modules form no import cycle."""
    import ast
    from pathlib import Path

    import longspec_hf.modeling.conversion as conversion

    tree = ast.parse(Path(conversion.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    assert not [name for name in names if "modeling_longspec" in name or name == "LongSpecDraftModel"]
