"""Checkpoint conversion and Hub publishing helpers for LongSpec drafts.

The published LongSpec checkpoints store the draft block as a standalone model: `config.json` is the
target's own `LlamaConfig`/`Qwen2Config` (model_type `llama`/`qwen2`) and the weights carry keys such
as `model.layers.0.self_attn.q_proj.weight` (or the same without the prefix), unused cross-attention
`k_proj`/`v_proj` weights and sometimes the target's embedding / LM head. [`convert_checkpoint`] turns
such a folder into a [`LongSpecDraftModel`] folder; `LongSpecDraftModel.from_pretrained` calls
[`load_old_layout`] when it meets one.

The model-card helpers render `hub_configs/<name>/README.md` templates with measured numbers filled in.

This module never imports `modeling_longspec` (which imports it): functions that build a model take the
model class as an argument.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.utils import logging

from ..assets import hub_configs_dir, readable_by_all
from .configuration_longspec import SUPPORTED_TARGET_TYPES, LongSpecDraftConfig

logger = logging.get_logger(__name__)

# model_type values of configs that may hold a draft in the published (old) layout.
OLD_LAYOUT_MODEL_TYPES = SUPPORTED_TARGET_TYPES
DEFAULT_SLIDING_WINDOW = 512

# Top-level submodules of LongSpecDraftModel; a checkpoint key is mapped from the first of these segments on.
BLOCK_MODULES = (
    "input_layernorm",
    "self_attn",
    "post_self_attention_layernorm",
    "cross_attn",
    "post_cross_attention_layernorm",
    "mlp",
)
# Keys of the old layout that the draft does not store (the target's parts, the unused cross K/V).
_TARGET_PART = re.compile(r"(^|\.)(embed_tokens|lm_head|rotary_emb|norm)\.")
_UNUSED_CROSS_KV = re.compile(r"^cross_attn\.(k_proj|v_proj)\.")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")


# ----- reading checkpoints ------------------------------------------------------------------------------
def resolve_checkpoint_dir(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder for `path_or_repo`: the folder itself, or the (cached) snapshot of a Hub repo."""
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    local = Path(path_or_repo)
    if local.is_dir():
        return local / subfolder if subfolder else local
    from huggingface_hub import snapshot_download

    allowed = ["*.json", "*.safetensors", "*.bin"]
    if subfolder:
        allowed = [f"{subfolder}/{pattern}" for pattern in allowed]
    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision", "token", "local_files_only", "force_download")}
    folder = Path(snapshot_download(str(path_or_repo), allow_patterns=allowed, **kwargs))
    return folder / subfolder if subfolder else folder


def read_config_dict(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise OSError(
            f"{folder} has no config.json. A LongSpec draft folder needs config.json (a LongSpecDraftConfig, or the "
            "target's Llama/Qwen2 config in the published LongSpec layout) beside its weights."
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise OSError(f"{config_file} is not valid JSON ({error}); re-download or re-save the checkpoint.") from error


def is_old_layout(config_dict: Mapping[str, Any]) -> bool:
    """True for a config of the published LongSpec layout (the target's own config type)."""
    return config_dict.get("model_type") in OLD_LAYOUT_MODEL_TYPES


def load_weight_files(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors or PyTorch checkpoint in `folder` (single file or sharded)."""
    files: list[Path] = []
    for index_name in WEIGHT_INDEX_FILES:
        index_file = folder / index_name
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text()).get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise OSError(f"{index_file} lists shards that are missing: {', '.join(missing)}. Download the complete checkpoint.")
            break
    else:
        files = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()][:1]
    if not files:
        raise OSError(
            f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES + WEIGHT_INDEX_FILES)}. "
            "Download the complete checkpoint or save the model again."
        )
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state_dict.update(load_file(str(file)))
            else:
                state_dict.update(torch.load(str(file), map_location="cpu", weights_only=True))
        except Exception as error:  # corrupt or truncated file
            raise OSError(f"Could not read the weights file {file} ({error}); it is corrupt or incomplete, download it again.") from error
    return state_dict


# ----- mapping keys ---------------------------------------------------------------------------------------
def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map old-layout keys to LongSpecDraftModel keys.

    Any prefix before the block's submodule names is removed (`model.layers.0.`, `layers.0.`, `model.`,
    none). Target parts (embedding, LM head, final norm, rotary buffers) and the unused cross-attention
    K/V projections are dropped.

    Returns:
        The converted state dict and the list of dropped keys.
    """
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    prefixes: set[str] = set()
    for key, tensor in state_dict.items():
        parts = key.split(".")
        start = next((i for i, part in enumerate(parts) if part in BLOCK_MODULES), None)
        if start is None:
            dropped.append(key)
            if not _TARGET_PART.search(key + "."):
                logger.warning(f"Dropping checkpoint key {key!r}, which is not part of a LongSpec draft block.")
            continue
        prefixes.add(".".join(parts[:start]))
        new_key = ".".join(parts[start:])
        if _UNUSED_CROSS_KV.match(new_key) or new_key.endswith("rotary_emb.inv_freq"):
            dropped.append(key)
            continue
        converted[new_key] = tensor
    if len(prefixes) > 1:
        raise ValueError(
            f"The checkpoint holds more than one block (key prefixes {sorted(prefixes)}); a LongSpec draft is a "
            "single block. Pass a checkpoint of one draft block."
        )
    return converted, dropped


def draft_config_from_old(
    config_dict: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    sliding_window: int | None = None,
    tree_widths: list[int] | None = None,
) -> LongSpecDraftConfig:
    """The LongSpecDraftConfig of an old-layout draft whose (converted) weights are `state_dict`."""
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version", "architectures", "_name_or_path")}
    target_config = AutoConfig.for_model(config_dict["model_type"], **fields)
    bias = "self_attn.q_proj.bias" in state_dict
    overrides: dict[str, Any] = {
        "sliding_window": sliding_window or DEFAULT_SLIDING_WINDOW,
        "attention_bias": bias,
        "target_name_or_path": config_dict.get("_name_or_path") or None,
    }
    if "mlp.gate_proj.weight" in state_dict:
        overrides["intermediate_size"] = state_dict["mlp.gate_proj.weight"].shape[0]
    if tree_widths is not None:
        overrides["tree_widths"] = list(tree_widths)
    return LongSpecDraftConfig.from_target_config(target_config, **overrides)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError when `state_dict` lacks weights of `model` or has weights of the wrong shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"The checkpoint {source} is incomplete: it lacks the draft weights {', '.join(missing)}. "
            "Use a complete LongSpec draft checkpoint (re-download it, or convert it again with `longspec convert`)."
        )
    wrong = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if tuple(state_dict[key].shape) != tuple(tensor.shape)
    ]
    if wrong:
        raise ValueError(
            f"The checkpoint {source} has weights of the wrong shape for its config ({'; '.join(wrong)}). "
            "The config.json does not describe these weights: fix config.json or use the checkpoint it belongs to."
        )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        logger.warning(f"Ignoring checkpoint weights the draft does not use: {', '.join(unexpected)}")


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def load_old_layout(
    pretrained_model_name_or_path: str | os.PathLike,
    model_class: type,
    sliding_window: int | None = None,
    dtype: Any = None,
    **hub_kwargs: Any,
):
    """Load a draft saved in the published LongSpec layout as a `model_class` (a `LongSpecDraftModel`)."""
    folder = resolve_checkpoint_dir(pretrained_model_name_or_path, **hub_kwargs)
    config_dict = read_config_dict(folder)
    if not is_old_layout(config_dict):
        raise ValueError(
            f"{pretrained_model_name_or_path} has a config of model_type {config_dict.get('model_type')!r}, which is "
            f"neither a LongSpec draft ('longspec_draft') nor the published LongSpec layout ({', '.join(OLD_LAYOUT_MODEL_TYPES)})."
        )
    state_dict, dropped = convert_state_dict(load_weight_files(folder))
    if not state_dict:
        raise ValueError(
            f"{pretrained_model_name_or_path} has a {config_dict['model_type']} config but no LongSpec draft weights "
            "(no keys under self_attn / cross_attn / mlp / *_layernorm). It looks like a plain target model, not a draft."
        )
    tree_widths = None
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():
        tree_widths = json.loads(generation_file.read_text()).get("tree_widths")
    config = draft_config_from_old(config_dict, state_dict, sliding_window=sliding_window, tree_widths=tree_widths)
    model = model_class(config)
    check_state_dict(model, state_dict, str(pretrained_model_name_or_path))
    model.load_state_dict(state_dict, strict=False)
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = next(iter(state_dict.values())).dtype if state_dict else None
    if torch_dtype is not None and torch_dtype.is_floating_point:
        model.to(torch_dtype)
    model.eval()
    logger.warning(
        f"Converted {pretrained_model_name_or_path} from the published LongSpec layout ({config_dict['model_type']} "
        f"config, {len(dropped)} unused keys dropped) to a LongSpecDraftModel with sliding window {config.sliding_window}. "
        "Run `longspec convert SRC DST` once to save it in the native layout."
    )
    return model


def convert_checkpoint(
    model_class: type,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    sliding_window: int | None = None,
    dtype: Any = None,
    **hub_kwargs: Any,
):
    """Read a draft checkpoint (a folder or a Hub repo; the published layout is converted) as a `model_class`
    (a `LongSpecDraftModel`) and save it to `dst` in the native layout. Returns the model."""
    kwargs = {"sliding_window": sliding_window, **hub_kwargs}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = model_class.from_pretrained(src, **kwargs)
    save_draft(model, dst)
    return model


def save_draft(model, folder: str | os.PathLike, **save_kwargs: Any) -> Path:
    """`model.save_pretrained(folder, **save_kwargs)` with the weights files readable by all (see
    [`assets.readable_by_all`]), as every file this package writes for a draft."""
    model.save_pretrained(folder, **save_kwargs)
    readable_by_all(folder)
    return Path(folder)


# ----- model cards ----------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

GENERIC_CARD_TEMPLATE = """---
library_name: longspec-hf
pipeline_tag: text-generation
tags:
- longspec
- speculative-decoding
- draft-model
---

# {{ repo_name }}

A LongSpec draft (one transformer block with a constant-size cache) for lossless long-context
speculative decoding of [{{ base_model }}](https://huggingface.co/{{ base_model }}) with
[longspec-hf](https://github.com/longspec-hf/longspec-hf).

## Usage

With longspec-hf installed (`pip install longspec-hf`; on CUDA it brings its Triton kernels):

```python
import longspec_hf  # registers the draft with the Auto classes and routes generate(assistant_model=draft)
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ base_model }}")
target = AutoModelForCausalLM.from_pretrained("{{ base_model }}", dtype="auto", device_map="auto")
draft = AutoModel.from_pretrained("{{ repo_id }}", dtype="auto").to(target.device)
inputs = tokenizer("...", return_tensors="pt").to(target.device)
out = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)
```

With transformers alone, without longspec-hf: this repository also holds the draft's code and LongSpec
decoding as a `custom_generate` method, written from the package's own code (with its pure-torch attention:
on CUDA the package's Triton kernels are faster). Drop `import longspec_hf`, load the draft with
`trust_remote_code=True` and name this repository as `custom_generate`:

```python
draft = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True, dtype="auto").to(target.device)
out = target.generate(**inputs, assistant_model=draft, custom_generate="{{ repo_id }}", trust_remote_code=True,
                      max_new_tokens=256)
```

## Measured results

{{ results_table }}
"""


def find_card_template(repo_id: str | None = None, base_model: str | None = None) -> str:
    """The model-card template for a draft: `hub_configs/<repo name>/README.md` when there is one."""
    candidates = []
    if repo_id:
        candidates.append(hub_configs_dir() / repo_id.split("/")[-1] / "README.md")
    if base_model:
        candidates.append(hub_configs_dir() / ("longspec-" + base_model.split("/")[-1].lower()) / "README.md")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text()
    return GENERIC_CARD_TEMPLATE


def results_table(metrics: Mapping[str, Any] | None, header: bool = True) -> str:
    """A Markdown table of measured numbers (rows only with `header=False`)."""
    if not metrics:
        return "Not measured yet." if header else ""
    rows = ["| metric | value |", "|---|---|"] if header else []
    rows += [f"| {name} | {value} |" for name, value in metrics.items()]
    return "\n".join(rows)


def render_model_card(
    template: str,
    repo_id: str,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str | None = None,
    extra_tags: list[str] | None = None,
):
    """A `huggingface_hub.ModelCard` from `template` with `{{ name }}` placeholders filled in.

    Placeholders: `repo_id`, `repo_name`, `base_model`, `results_table` and every key of `metrics`;
    a metric placeholder that was not measured reads "n/a".
    """
    from huggingface_hub import ModelCard, ModelCardData

    values: dict[str, Any] = {"repo_id": repo_id, "repo_name": repo_id.split("/")[-1], "base_model": base_model or ""}
    used = set(_PLACEHOLDER.findall(template))
    named_rows = any(name in used for name in (metrics or {}))
    # Metrics without a placeholder of their own go to `{{ results_table }}` (as extra rows when the
    # template has its own table).
    rest = {k: v for k, v in (metrics or {}).items() if k not in used}
    values["results_table"] = results_table(rest, header=not named_rows and "mean_accepted_length" not in used)
    values.update({k: v for k, v in (metrics or {}).items()})
    text = _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), "n/a")), template)
    card = ModelCard(text)
    data = card.data if card.data is not None else ModelCardData()
    data.library_name = "longspec-hf"
    data.pipeline_tag = "text-generation"
    if base_model:
        data.base_model = base_model
    if license:
        data.license = license
    tags = list(data.tags or [])
    for tag in ["longspec", "speculative-decoding", *(extra_tags or [])]:
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    card.data = data
    return card


# Files beside a draft's weights that are published with it when they are there: the bundled card of a
# trained draft points to its training log.
PUBLISHED_EXTRA_FILES = ("train_log.jsonl",)


def card_base_model(model, base_model: str | None = None) -> str:
    """The target's Hub id for the card's `base_model`: `base_model`, else the target the draft's config
    names. Raises a ValueError when that is missing or a local path (a draft trained from a local or GGUF
    target), which would put a broken link on the Hub."""
    how_to = "Pass the target's Hub model id: base_model='org/name' (`longspec push --base-model org/name`)."
    named = base_model or model.config.target_name_or_path
    if not named:
        raise ValueError(f"The draft's config names no target model (target_name_or_path), so its card would have no base_model. {how_to}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(named)
        local = base_model is None and os.path.exists(os.path.expanduser(named))
    except HFValidationError:
        local = True
    if local:
        raise ValueError(
            f"The card's base_model would be {named!r}, a local path (a draft records the target it was trained or "
            f"converted from) and no Hub model id: its link on the Hub would be broken. {how_to}"
        )
    return named


def write_hub_folder(
    model,
    folder: str | os.PathLike,
    repo_id: str,
    card_template: str | os.PathLike | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> Path:
    """Write everything `push_to_hub` uploads into `folder`: weights, config (with `auto_map`), generation
    config, the draft's code for `trust_remote_code=True`, `custom_generate/` (LongSpec decoding for
    `generate(..., custom_generate=<repo>)`), README.md (the model card, see [`card_base_model`]) and the
    [`PUBLISHED_EXTRA_FILES`] found beside the weights the model was loaded from. The code files are written
    from the package's sources (`longspec_hf.export`), so the repository works without longspec-hf."""
    from ..export import write_custom_generate

    base_model = card_base_model(model, base_model)
    if card_template is not None:
        template = Path(card_template).read_text()
    else:
        template = find_card_template(repo_id, base_model)
    card = render_model_card(template, repo_id, base_model=base_model, metrics=metrics, license=license)
    if not card.data.license:
        logger.warning(
            f"The model card of {repo_id} has no license: pass license= (`longspec push --license`), e.g. the license "
            f"of {base_model}."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_draft(model, folder, remote_code=True)
    write_custom_generate(folder)
    card.save(folder / "README.md")
    source = Path(model.name_or_path) if model.name_or_path else None
    if source is not None and source.is_dir() and source.resolve() != folder.resolve():
        for name in PUBLISHED_EXTRA_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    return folder


def load_metrics(spec: str | None) -> dict[str, Any]:
    """Metrics from a JSON file path or an inline JSON object (for `longspec push --metrics`)."""
    if not spec:
        return {}
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--metrics must be a JSON object or a path to a JSON file, got {spec!r} ({error})") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"--metrics must describe a JSON object (name -> value), got {type(metrics).__name__}")
    return metrics

