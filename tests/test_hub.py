"""hub_configs/ folders, push_to_hub (offline), and loading "org/name" from a local Hugging Face cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoConfig

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel
from longspec_hf.export import AUTO_MAP

from .conftest import make_draft, make_target

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIGS = REPO_ROOT / "hub_configs"


def load_build_module():
    spec = importlib.util.spec_from_file_location("hub_configs_build", HUB_CONFIGS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build_module()
# The draft's code that goes with its weights (`trust_remote_code=True`), as longspec_hf.export writes it.
PUBLISHED_CODE = [
    "assets.py", "configuration_longspec.py", "conversion.py", "export.py", "kernels.py", "kernels_reference.py",
    "modeling_longspec.py",
]
# Everything push_to_hub uploads for a draft without a training log.
PUBLISHED_FILES = sorted(
    ["README.md", "config.json", "custom_generate", "generation_config.json", "model.safetensors", *PUBLISHED_CODE]
)
FOLDERS = sorted(p for p in HUB_CONFIGS.iterdir() if p.is_dir() and (p / "config.json").exists())


def test_every_target_has_a_folder():
    assert {p.name for p in FOLDERS} == {build.folder_name(name) for name in build.TARGETS}
    assert "longspec-smollm2-135m-instruct" in {p.name for p in FOLDERS}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_hub_config_matches_base_model(folder):
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, LongSpecDraftConfig)
    assert LongSpecDraftConfig.from_pretrained(folder).to_diff_dict() == config.to_diff_dict()
    card = ModelCard.load(folder / "README.md")
    base_model = card.data.base_model
    spec = build.TARGETS[base_model]
    assert config.target_name_or_path == base_model and config.target_model_type == spec["model_type"]
    # The block is laid out like its target, and records the target it drafts for.
    assert config.hidden_size == config.target_hidden_size == spec["hidden_size"]
    assert config.intermediate_size == spec["intermediate_size"]
    assert config.num_attention_heads == spec["num_attention_heads"]
    assert config.num_key_value_heads == config.target_num_key_value_heads == spec["num_key_value_heads"]
    assert config.head_dim == config.target_head_dim == spec["head_dim"] == spec["hidden_size"] // spec["num_attention_heads"]
    assert config.target_vocab_size == config.vocab_size == spec["vocab_size"]
    assert config.target_max_position_embeddings == spec["max_position_embeddings"]
    assert config.target_rope_parameters == spec["rope_parameters"]
    assert config.rms_norm_eps == spec["rms_norm_eps"] and config.attention_bias
    # The draft config is exactly what from_target_config gives for the base model's config.
    expected = LongSpecDraftConfig.from_target_config(
        build.target_config(base_model), sliding_window=512, tree_widths=[4, 16, 16, 16, 16]
    )
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "target_vocab_size", "target_rope_parameters", "target_max_position_embeddings", "sliding_window"):
        assert getattr(config, key) == getattr(expected, key), key
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["tree_widths"] == config.tree_widths == [4, 16, 16, 16, 16]
    # Hub metadata and a usage snippet.
    assert card.data.library_name == "longspec-hf" and card.data.pipeline_tag == "text-generation"
    assert card.data.license and "longspec" in card.data.tags and "speculative-decoding" in card.data.tags
    assert "assistant_model=draft" in card.text and "import longspec_hf" in card.text
    assert 'custom_generate="{{ repo_id }}", trust_remote_code=True' in card.text
    assert 'AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True' in card.text
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_hub_configs_are_reproducible(tmp_path):
    build.build(tmp_path)
    for folder in FOLDERS:
        for name in ("config.json", "generation_config.json", "README.md"):
            assert (tmp_path / folder.name / name).read_text() == (folder / name).read_text(), f"{folder.name}/{name}"
        # The code for transformers alone is written beside them, from the package's sources (not tracked).
        assert sorted(p.name for p in (tmp_path / folder.name).glob("*.py")) == PUBLISHED_CODE
        assert (tmp_path / folder.name / "custom_generate" / "generate.py").is_file()


def test_smollm2_config_fits_real_layout():
    config = LongSpecDraftConfig.from_pretrained(HUB_CONFIGS / "longspec-smollm2-135m-instruct")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (576, 9, 3, 64)
    assert (config.intermediate_size, config.target_vocab_size, config.target_max_position_embeddings) == (1536, 49152, 8192)
    assert config.target_rope_parameters["rope_theta"] == 100000.0


# ----- push_to_hub -----------------------------------------------------------------------------------------
METRICS = {"mean_accepted_length": 3.41, "speedup": "2.05x", "hardware": "H100, bf16", "benchmark": "GovReport", "draft_ms": 9.1}


def test_push_to_hub_dry_run_writes_card_with_numbers(tmp_path):
    target = make_target("llama")
    draft = make_draft(target)
    out = draft.push_to_hub(
        "someone/longspec-smollm2-135m-instruct", metrics=METRICS, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        save_to=tmp_path / "upload",
    )
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == PUBLISHED_FILES
    assert json.loads((Path(out) / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (Path(out) / "custom_generate" / "generate.py").is_file()
    card = ModelCard.load(Path(out) / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "longspec-hf" and card.data.pipeline_tag == "text-generation"
    assert "| mean accepted length (tokens per target forward) | 3.41 |" in card.text
    assert "| speedup over autoregressive decoding | 2.05x |" in card.text
    assert "| draft_ms | 9.1 |" in card.text
    assert 'AutoModel.from_pretrained("someone/longspec-smollm2-135m-instruct"' in card.text
    assert "{{" not in card.text
    # Both ways to use it: with the package, and with transformers alone (remote code + custom_generate).
    assert "import longspec_hf" in card.text and "assistant_model=draft" in card.text
    assert 'custom_generate="someone/longspec-smollm2-135m-instruct", trust_remote_code=True' in card.text
    reloaded = LongSpecDraftModel.from_pretrained(out)
    for key, value in draft.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_push_to_hub_uploads_folder(monkeypatch):
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()), (folder / "README.md").read_text(), kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    target = make_target("llama")
    draft = make_draft(target)
    assert draft.push_to_hub(
        "org/tiny-draft", metrics={"mean_accepted_length": 2.5}, private=True, base_model="org/tiny-target"
    ) == "commit-info"
    assert calls["create_repo"][0] == "org/tiny-draft" and calls["create_repo"][1]["private"] is True
    repo_id, files, readme, _ = calls["upload"]
    assert repo_id == "org/tiny-draft"
    assert files == PUBLISHED_FILES
    assert "| mean_accepted_length | 2.5 |" in readme and "library_name: longspec-hf" in readme


def test_push_to_hub_refuses_a_local_base_model_before_creating_the_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("the repository was created"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("files were uploaded"))
    target = make_target("llama")
    draft = make_draft(target)
    draft.config.target_name_or_path = str(tmp_path)  # trained from a local folder
    with pytest.raises(ValueError, match="local path.*base_model='org/name'"):
        draft.push_to_hub("org/tiny-draft")
    draft.config.target_name_or_path = "../models/x.gguf"  # no Hub id at all
    with pytest.raises(ValueError, match="local path"):
        draft.push_to_hub("org/tiny-draft")


def test_find_card_template_reads_the_installed_hub_configs():
    from longspec_hf.assets import hub_configs_dir
    from longspec_hf.modeling.conversion import GENERIC_CARD_TEMPLATE, find_card_template

    bundled = (hub_configs_dir() / "longspec-smollm2-135m-instruct" / "README.md").read_text()
    assert find_card_template("me/longspec-smollm2-135m-instruct") == bundled
    assert find_card_template("me/other", base_model="HuggingFaceTB/SmolLM2-135M-Instruct") == bundled
    assert find_card_template("me/other", base_model="org/unknown") == GENERIC_CARD_TEMPLATE


# ----- offline loading from a local Hugging Face cache -----------------------------------------------------
def write_hub_cache(cache: Path, repo_id: str, files_from: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay `files_from` out as huggingface_hub's cache does: blobs, snapshots/<sha>/ (links), refs/main."""
    import hashlib

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for file in files_from.iterdir():
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)


def test_from_pretrained_repo_id_offline_from_cache(tmp_path):
    from .test_conversion import write_old_layout

    target = make_target("llama")
    draft = make_draft(target)
    draft.save_pretrained(tmp_path / "native")
    write_old_layout(tmp_path / "old", target)
    cache = tmp_path / "hub"
    write_hub_cache(cache, "org/longspec-tiny", tmp_path / "native")
    write_hub_cache(cache, "org/longspec-tiny-old", tmp_path / "old")
    expected = {k: float(v.double().sum()) for k, v in draft.state_dict().items()}
    script = textwrap.dedent(
        """
        import json, sys
        import longspec_hf
        from transformers import AutoModel
        from longspec_hf import LongSpecDraftModel
        native = AutoModel.from_pretrained("org/longspec-tiny")
        direct = LongSpecDraftModel.from_pretrained("org/longspec-tiny")
        old = LongSpecDraftModel.from_pretrained("org/longspec-tiny-old", sliding_window=8)
        try:
            LongSpecDraftModel.from_pretrained("org/not-in-cache")
            missing = "loaded"
        except OSError as error:
            missing = str(error)
        print(json.dumps({
            "type": type(native).__name__,
            "tree_widths": direct.generation_config.tree_widths,
            "sums": {k: float(v.double().sum()) for k, v in direct.state_dict().items()},
            "same": all(bool((native.state_dict()[k] == v).all()) for k, v in direct.state_dict().items()),
            "old_type": type(old).__name__, "old_window": old.config.sliding_window,
            "missing": missing,
        }))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRANSFORMERS_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["type"] == "LongSpecDraftModel" and report["same"]
    assert report["tree_widths"] == [4, 16, 16, 16, 16]
    assert report["sums"] == pytest.approx(expected)
    assert report["old_type"] == "LongSpecDraftModel" and report["old_window"] == 8
    assert "org/not-in-cache" in report["missing"]
