"""Clear errors for corrupt or incomplete draft checkpoints (native and published layout)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel
from longspec_hf.modeling.conversion import convert_checkpoint

from .conftest import make_draft, make_target
from .test_conversion import write_old_layout


@pytest.fixture
def native(tmp_path):
    target = make_target("llama")
    make_draft(target).save_pretrained(tmp_path / "native")
    return tmp_path / "native"


def rewrite(folder, edit):
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_native_missing_weights_file(native):
    (native / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        LongSpecDraftModel.from_pretrained(native)


def test_native_missing_tensor(native):
    rewrite(native, lambda w: w.pop("cross_attn.o_proj.weight"))
    with pytest.raises(ValueError, match="incomplete.*cross_attn.o_proj.weight"):
        LongSpecDraftModel.from_pretrained(native)


def test_native_wrong_shape(native):
    rewrite(native, lambda w: w.__setitem__("mlp.up_proj.weight", torch.zeros(5, 7)))
    with pytest.raises(ValueError, match="wrong shape.*mlp.up_proj.weight"):
        LongSpecDraftModel.from_pretrained(native)


def test_missing_config(native):
    (native / "config.json").unlink()
    with pytest.raises(OSError, match="config.json"):
        LongSpecDraftModel.from_pretrained(native)


def test_config_of_another_model_type(native):
    GPT2Config(n_embd=32, n_layer=1, n_head=4).save_pretrained(native)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*longspec_draft"):
        LongSpecDraftModel.from_pretrained(native)
    with pytest.raises(ValueError, match="gpt2"):
        convert_checkpoint(LongSpecDraftModel, native, native.parent / "out")


def test_old_layout_missing_weights(tmp_path):
    write_old_layout(tmp_path / "old", make_target("llama"))
    (tmp_path / "old" / "model.safetensors").unlink()
    with pytest.raises(OSError, match="holds no weights"):
        LongSpecDraftModel.from_pretrained(tmp_path / "old")


def test_old_layout_missing_tensor(tmp_path):
    write_old_layout(tmp_path / "old", make_target("llama"))
    rewrite(tmp_path / "old", lambda w: w.pop("model.layers.0.post_cross_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="lacks.*post_cross_attention_layernorm.weight"):
        LongSpecDraftModel.from_pretrained(tmp_path / "old")


def test_old_layout_wrong_shape(tmp_path):
    write_old_layout(tmp_path / "old", make_target("llama"))
    rewrite(tmp_path / "old", lambda w: w.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(32, 16)))
    with pytest.raises(ValueError, match="wrong shape.*self_attn.o_proj.weight"):
        convert_checkpoint(LongSpecDraftModel, tmp_path / "old", tmp_path / "new")


def test_old_layout_config_for_other_target(tmp_path):
    # Weights of a 32-wide block beside the config of a 64-wide target.
    write_old_layout(tmp_path / "old", make_target("llama"))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["hidden_size"] = 64
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shape"):
        LongSpecDraftModel.from_pretrained(tmp_path / "old")


def test_plain_target_is_not_a_draft(tmp_path):
    target = make_target("llama", num_hidden_layers=1)
    target.save_pretrained(tmp_path / "target")
    with pytest.raises(ValueError, match="lacks|no LongSpec draft weights"):
        LongSpecDraftModel.from_pretrained(tmp_path / "target")
    target2 = make_target("llama", num_hidden_layers=2)
    target2.save_pretrained(tmp_path / "target2")
    with pytest.raises(ValueError, match="more than one block|lacks"):
        LongSpecDraftModel.from_pretrained(tmp_path / "target2")


def test_truncated_weights_file(tmp_path):
    write_old_layout(tmp_path / "old", make_target("llama"))
    data = (tmp_path / "old" / "model.safetensors").read_bytes()
    (tmp_path / "old" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="corrupt or incomplete"):
        LongSpecDraftModel.from_pretrained(tmp_path / "old")


def test_sharded_index_with_missing_shard(tmp_path):
    write_old_layout(tmp_path / "old", make_target("llama"))
    weights = load_file(str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in weights}}
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    save_file(weights, str(tmp_path / "old" / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    (tmp_path / "old" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OSError, match="missing"):
        LongSpecDraftModel.from_pretrained(tmp_path / "old")


def test_truncated_weights_of_a_saved_draft_name_the_folder(tmp_path):
    target = make_target("llama")
    LongSpecDraftModel(LongSpecDraftConfig.from_target_config(target.config)).save_pretrained(tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="corrupt or incomplete") as error:
        LongSpecDraftModel.from_pretrained(tmp_path / "draft")
    assert str(tmp_path / "draft") in str(error.value)
