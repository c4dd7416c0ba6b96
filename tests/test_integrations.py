"""LongSpec drafts inside other Hugging Face entry points: text-generation pipelines and PEFT-wrapped targets."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, pipeline

from .conftest import make_draft, make_target

VOCAB_SIZE = 96


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary matches the tiny targets' (ids 0-2 are pad/bos/eos)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


PROMPTS = ["w5 w9 w14 w3 w22 w7", "w40 w41 w90 w12"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_text_generation_pipeline_with_draft(arch):
    target = make_target(arch, vocab_size=VOCAB_SIZE)
    draft = make_draft(target)
    tokenizer = tiny_tokenizer()
    generator = pipeline("text-generation", model=target, tokenizer=tokenizer)
    plain = generator(PROMPTS, max_new_tokens=12, do_sample=False)
    spec = generator(PROMPTS, max_new_tokens=12, do_sample=False, assistant_model=draft)
    for prompt, plain_out, spec_out in zip(PROMPTS, plain, spec):
        assert spec_out[0]["generated_text"] == plain_out[0]["generated_text"]
        assert len(plain_out[0]["generated_text"].split()) > len(prompt.split())
    # The pipeline's new text is what generate() itself produces with the draft.
    new_text = generator(PROMPTS[0], max_new_tokens=12, do_sample=False, assistant_model=draft, return_full_text=False)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    direct = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert new_text[0]["generated_text"].strip() == tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True).strip()


def lora_target(seed: int = 0):
    peft = pytest.importorskip("peft")
    base = make_target("llama", seed=seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA B starts at zero; make the adapter change the outputs
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def test_peft_target_with_draft_matches_plain_generate():
    model = lora_target()
    draft = make_draft(model.get_base_model())
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 41, 12]])
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits
        lora_logits = model(ids).logits
    assert not torch.allclose(base_logits, lora_logits, atol=1e-3)  # the adapter matters

    plain = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    spec = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, spec)
    with model.disable_adapter():
        base_out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    assert not torch.equal(base_out, plain)


def test_peft_target_batched_with_attention_mask():
    model = lora_target(seed=2)
    draft = make_draft(model.get_base_model())
    ids = torch.tensor([[0, 0, 1, 5, 9, 14], [1, 30, 31, 32, 33, 34]])
    mask = (ids != 0).long()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    spec = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, assistant_model=draft
    )
    assert torch.equal(plain, spec)


def test_a_target_offloaded_by_accelerate_matches_plain_generate(tmp_path):
    """`from_pretrained(..., device_map=...)` with a layer offloaded to disk (accelerate loads its weights
    at each forward through hooks): LongSpec's cache and forwards run through the same hooks."""
    from transformers import AutoModelForCausalLM

    make_target("llama", seed=3).save_pretrained(tmp_path / "target")
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.norm": "cpu", "lm_head": "cpu",
    }
    target = AutoModelForCausalLM.from_pretrained(
        tmp_path / "target", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert target.hf_device_map["model.layers.1"] == "disk"
    draft = make_draft(target)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    reference = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    output = target.generate(
        ids, attention_mask=mask, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=20, do_sample=False
    )
    assert torch.equal(output, reference)
