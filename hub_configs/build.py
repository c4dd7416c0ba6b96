"""Generate hub_configs/<draft>/ for every draft we publish or support.

Run from the repository root:  python hub_configs/build.py  [--out DIR]

Each folder gets config.json, generation_config.json and README.md (tracked in git), and the code that lets
it load without longspec-hf: the draft's remote code (`configuration_longspec.py`, `modeling_longspec.py` and
the flat modules they import; config.json names them in `auto_map`) and `custom_generate/` (LongSpec
decoding for `generate(..., custom_generate=<repo>)`). The code files are written from the package's
sources by `longspec_hf.export` and not tracked: `longspec push` writes them afresh.

Each draft's layout is derived from its target's configuration (listed in TARGETS below) with
`LongSpecDraftConfig.from_target_config`, so the block always matches the target it drafts for. The
README.md files are model-card templates: `{{ name }}` placeholders are filled by
`draft.push_to_hub(...)` / `longspec push` with the repository id and the measured numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from longspec_hf.export import AUTO_MAP, write_custom_generate, write_remote_code
from longspec_hf.modeling import LongSpecDraftConfig

HERE = Path(__file__).resolve().parent
SLIDING_WINDOW = 512
TREE_WIDTHS = [4, 16, 16, 16, 16]

# The target models' layouts as their config.json on the Hub gives them.
TARGETS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        license="apache-2.0", context="8k", published=True, draft_vocab_size=16384,
        training=(
            'Trained with `bench/train_smollm2.py` of longspec-hf on an H100 (stage 3 on an H200), the target frozen\n'
            "in bf16, KL loss to the target's distribution, cross-attention lag drawn from 1-4 per sequence, AdamW with warm-up and\n"
            'cosine decay (`train_log.jsonl`, one line per log step with its stage):\n'
            '\n'
            '1. 2000 steps of batch 8 x 2048 tokens (33M tokens) at learning rate 1e-3, Anchor-Offset position ids\n'
            '   over 8192 positions;\n'
            '2. 300 steps of batch 2 x 8192 tokens at 3e-4, starting from stage 1;\n'
            '3. 2200 steps of batch 8 x 2048 tokens (12k sequences, the files shuffled with another seed) at 5e-4,\n'
            '   starting from stage 2.\n'
            '\n'
            'Training text: whole Python source files of transformers, torch, numpy, sympy, networkx, accelerate,\n'
            'peft, huggingface_hub, triton, jinja2, safetensors, tokenizers and gguf. Held-out text (never trained\n'
            "on): the Python standard library. There the draft agrees with the target's next token 46% of the time\n"
            '(lag 1; 43% after stage 2), and greedy decoding with the default tree, 256 new tokens, bf16, accepts on\n'
            'average 4.67, 4.58 and 4.22 tokens per target forward at 1k, 4k and 7.5k prompt tokens (three prompts\n'
            'each; 4.57, 4.20 and 4.31 after stage 2 in the same run). Speed figures: BENCHMARKS.md of longspec-hf.'
        ),
    ),
    "lmsys/vicuna-7b-v1.5-16k": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        head_dim=128, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        license="llama2", context="16k",
    ),
    "lmsys/vicuna-13b-v1.5-16k": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
        head_dim=128, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        license="llama2", context="16k",
    ),
    "lmsys/longchat-7b-v1.5-32k": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        head_dim=128, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
        license="llama2", context="32k",
    ),
    "lmsys/longchat-13b-16k": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
        head_dim=128, vocab_size=32000, max_position_embeddings=16384, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
        license="other", context="16k",
    ),
    "gradientai/Llama-3-8B-Instruct-262k": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=128256, max_position_embeddings=262144, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 207112184.0},
        license="llama3", context="262k",
    ),
    "Qwen/QwQ-32B-Preview": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        license="apache-2.0", context="32k",
    ),
}

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}
_LAYOUT_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "rms_norm_eps", "rope_parameters",
)


def folder_name(base_model: str) -> str:
    return "longspec-" + base_model.split("/")[-1].lower()


def target_config(base_model: str):
    """A config object of the target (no weights), from the TARGETS table."""
    spec = TARGETS[base_model]
    fields = {k: spec[k] for k in _LAYOUT_KEYS}
    config = _CONFIG_CLASSES[spec["model_type"]](**fields)
    config._name_or_path = base_model
    return config


def draft_config(base_model: str) -> LongSpecDraftConfig:
    return LongSpecDraftConfig.from_target_config(
        target_config(base_model), sliding_window=SLIDING_WINDOW, tree_widths=TREE_WIDTHS, attention_bias=True,
        draft_vocab_size=TARGETS[base_model].get("draft_vocab_size"),
    )


CARD = """---
base_model: {base_model}
library_name: longspec-hf
pipeline_tag: text-generation
license: {license}
tags:
- longspec
- speculative-decoding
- draft-model
- long-context
- {model_type}
---

# {name}

A [LongSpec](https://arxiv.org/abs/2502.17421) draft for lossless long-context speculative decoding of
[{base_model}](https://huggingface.co/{base_model}) ({context} context) with `longspec-hf`.

The draft is one transformer block ({hidden_size} wide, {num_attention_heads} heads, SwiGLU MLP of
{intermediate_size}) on top of the target's own embedding and LM head: a sliding-window self-attention over
its last {sliding_window} tokens and a cross-attention that reads the target's last-layer KV cache. Its
cache has a constant size, however long the context. Decoding with it gives the same tokens as decoding the
target alone; only the speed changes.
{status}
## Usage

With [longspec-hf](https://github.com/longspec-hf/longspec-hf) installed (`pip install longspec-hf`; on CUDA
it brings its Triton kernels):

```python
import longspec_hf  # registers the draft with the Auto classes and routes generate(assistant_model=draft)
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{base_model}")
target = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="auto", device_map="auto")
draft = AutoModel.from_pretrained("{{{{ repo_id }}}}", dtype=target.dtype).to(target.device)

inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Summarize this report: ..."}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(target.device)
out = target.generate(**inputs, assistant_model=draft, max_new_tokens=512)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With transformers alone, without longspec-hf: this repository also holds the draft's code and LongSpec
decoding as a `custom_generate` method, written from the package's own code (with its pure-torch attention:
on CUDA the package's Triton kernels are faster). Drop `import longspec_hf`, load the draft with
`trust_remote_code=True` and name this repository as `custom_generate`:

```python
draft = AutoModel.from_pretrained("{{{{ repo_id }}}}", trust_remote_code=True, dtype=target.dtype).to(target.device)
out = target.generate(
    **inputs, assistant_model=draft, custom_generate="{{{{ repo_id }}}}", trust_remote_code=True, max_new_tokens=512
)
```

The default tree widths ({tree_widths}) come from `generation_config.json`; pass `tree_widths=[...]`
to `generate` to change them.{vocabulary}

## Measured results

| | value |
|---|---|
| mean accepted length (tokens per target forward) | {{{{ mean_accepted_length }}}} |
| speedup over autoregressive decoding | {{{{ speedup }}}} |
| hardware / dtype | {{{{ hardware }}}} |
| benchmark | {{{{ benchmark }}}} |
{{{{ results_table }}}}

## Training

{training}
"""

DEFAULT_TRAINING = (
    "Distilled from {base_model} with Anchor-Offset position indices and noisy cross-attention lag\n"
    "(`longspec train`); see the longspec-hf documentation."
)


def render_card(base_model: str, config: LongSpecDraftConfig) -> str:
    spec = TARGETS[base_model]
    status = (
        "" if spec.get("published") else
        "\nThis folder is the configuration template for this target; the weights are trained with `longspec train` "
        "or converted from a published LongSpec checkpoint with `longspec convert`.\n"
    )
    vocabulary = "" if config.draft_vocab_size is None else "\n" + textwrap.fill(
        f"The draft scores only {config.draft_vocab_size} of the target's {config.target_vocab_size} tokens "
        "(`draft_vocab_ids`, the most frequent ones in text like the draft's training text), so a tree level "
        "reads only their rows of the LM head; outputs do not change. `draft.set_draft_vocabulary(None)` "
        "drafts over the whole vocabulary.",
        width=104,
    )
    return CARD.format(
        vocabulary=vocabulary,
        base_model=base_model, license=spec["license"], model_type=spec["model_type"], name=folder_name(base_model),
        context=spec["context"], hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, sliding_window=config.sliding_window,
        tree_widths=config.tree_widths, status=status,
        training=spec.get("training", DEFAULT_TRAINING.format(base_model=base_model)),
    )


def config_json(config: LongSpecDraftConfig) -> str:
    data = config.to_dict()
    data.pop("transformers_version", None)  # keep the files independent of the installed version
    # Leave out generic PretrainedConfig fields still at their defaults (labels, output flags, ...).
    generic = PretrainedConfig().to_dict()
    own = set(inspect.signature(LongSpecDraftConfig.__init__).parameters) | {"model_type", "vocab_size", "tie_word_embeddings"}
    data = {k: v for k, v in data.items() if k in own or k not in generic or generic[k] != v}
    data.pop("_name_or_path", None)
    data["architectures"] = ["LongSpecDraftModel"]
    data["auto_map"] = dict(AUTO_MAP)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def generation_config_json(config: LongSpecDraftConfig) -> str:
    return json.dumps({"tree_widths": list(config.tree_widths)}, indent=2) + "\n"


def build(out: Path = HERE) -> list[Path]:
    written = []
    for base_model in TARGETS:
        config = draft_config(base_model)
        folder = out / folder_name(base_model)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config_json(config))
        (folder / "generation_config.json").write_text(generation_config_json(config))
        (folder / "README.md").write_text(render_card(base_model, config))
        write_remote_code(folder)
        write_custom_generate(folder)
        written.append(folder)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the folders (default: hub_configs/)")
    args = parser.parse_args()
    for folder in build(args.out):
        print(folder)


if __name__ == "__main__":
    main()
