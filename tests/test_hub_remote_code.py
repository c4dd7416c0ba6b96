"""Drafts with remote code and the `custom_generate/` folder: LongSpec where longspec_hf cannot be imported.

The exported files are loaded by transformers itself (`trust_remote_code=True`) in a subprocess in which
importing `longspec_hf` fails, and compared with the installed package on the same inputs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import longspec_hf
from longspec_hf import LongSpecDraftModel, assets, export
from longspec_hf.cli import main as cli_main
from longspec_hf.generation import custom_generate

from .test_acceptance import agreeing_pair

# Makes `import longspec_hf` fail in the subprocess (the package is also installed in editable mode, which
# `python -I` does not switch off), so that only the exported files can provide LongSpec there.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys

    class BlockLongSpec:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "longspec_hf":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockLongSpec())
    """
)


def run_without_package(script: str, tmp_path: Path) -> dict:
    """Run `script` with `python -I`, longspec_hf blocked, offline; returns the JSON of its last output line."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules")
    )
    env.pop("PYTHONPATH", None)
    code = BLOCK_PACKAGE + textwrap.dedent(script) + textwrap.dedent(
        """
        assert not any(name.split(".")[0] == "longspec_hf" for name in sys.modules), "longspec_hf was imported"
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----- the exported files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("write", [export.write_remote_code, export.write_custom_generate], ids=["remote_code", "custom_generate"])
def test_exported_files_import_each_other_only_through_flat_relative_imports(tmp_path, write):
    written = write(tmp_path)
    folder = tmp_path / export.CUSTOM_GENERATE_DIR if write is export.write_custom_generate else tmp_path
    files = {path.stem for path in folder.glob("*.py")}
    assert ({"generate", "generation_entry", "generation_decoding"} if folder != tmp_path else
            {"configuration_longspec", "modeling_longspec", "kernels", "kernels_reference"}) <= files
    left_out = {export.CUSTOM_GENERATE.flat_name(name) for name in export.TRITON_KERNELS}
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert text.startswith("# Generated from longspec_hf/"), path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "longspec_hf" for alias in node.names), path.name
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name}:{node.lineno}"
                named = [node.module] if node.module else [alias.name for alias in node.names]
                assert all(name in files or name in left_out for name in named), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "longspec_hf", path.name
    if write is export.write_custom_generate:
        assert written == folder
        requirements = (folder / "requirements.txt").read_text().split()
        assert requirements == ["transformers>=5.17", "torch>=2.11"]
        pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        assert '"transformers>=5.17,<6"' in pyproject and '"torch>=2.11"' in pyproject


def test_export_again_replaces_what_an_earlier_export_wrote(tmp_path):
    (tmp_path / "kernels_gone.py").write_text("# Generated from longspec_hf/kernels/gone.py by longspec_hf.export\n")
    (tmp_path / "mine.py").write_text("VALUE = 1\n")
    (tmp_path / "kernels.py").write_text("# Generated from an older package\n")
    export.write_remote_code(tmp_path)
    assert not (tmp_path / "kernels_gone.py").exists() and (tmp_path / "mine.py").read_text() == "VALUE = 1\n"
    assert (tmp_path / "kernels.py").read_text().startswith("# Generated from longspec_hf/kernels/__init__.py")


def test_export_refuses_what_the_loader_could_not_run(tmp_path, monkeypatch):
    # A left-out module imported outside `try: ... except ImportError` would break the exported copy.
    unguarded = export.FlatExport(entries=(export.MODELING_MODULE,), without=frozenset({"kernels.reference"}))
    with pytest.raises(export.ExportError, match="longspec_hf.kernels.reference.*except ImportError"):
        export.write_flat_export(unguarded, tmp_path / "unguarded")
    # An exported copy has no package sources to export again.
    monkeypatch.setattr(export, "PACKAGE_DIR", tmp_path / "exported_copy")
    with pytest.raises(export.ExportError, match="pip install longspec-hf"):
        export.write_remote_code(tmp_path / "again")


# ----- a draft with remote code ---------------------------------------------------------------------------
def draft_and_target_for_remote_code():
    """The bundled SmolLM2 draft with a one-layer random target of SmolLM2's layout, else a tiny pair."""
    try:
        draft = LongSpecDraftModel.from_pretrained(assets.bundled_draft_dir()).eval()
    except FileNotFoundError:
        target, draft = agreeing_pair()
        return draft, target
    config = draft.config
    torch.manual_seed(0)
    target = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=config.target_hidden_size, intermediate_size=config.intermediate_size, num_hidden_layers=1,
            num_attention_heads=config.target_num_attention_heads, num_key_value_heads=config.target_num_key_value_heads,
            head_dim=config.target_head_dim, vocab_size=config.target_vocab_size, tie_word_embeddings=True,
            max_position_embeddings=config.target_max_position_embeddings, rope_parameters=config.target_rope_parameters,
        )
    ).eval()
    return draft, target


def test_remote_code_draft_matches_the_installed_class(tmp_path):
    draft, target = draft_and_target_for_remote_code()
    auto_map_before = draft.config.to_dict().get("auto_map")
    draft.save_pretrained(tmp_path / "draft", remote_code=True)
    target.save_pretrained(tmp_path / "target")
    saved = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert saved["auto_map"] == export.AUTO_MAP
    assert draft.config.to_dict().get("auto_map") == auto_map_before  # the draft in memory is left as it was

    torch.manual_seed(3)
    batch, length = 2, 24
    text_config = target.config
    inputs = {
        "input_ids": torch.randint(3, text_config.vocab_size, (batch, length)),
        "position_ids": torch.arange(length).expand(batch, -1) + torch.tensor([[0], [700]]),  # as Anchor-Offset gives
        "target_key": torch.randn(batch, text_config.num_key_value_heads, length, text_config.head_dim),
        "target_value": torch.randn(batch, text_config.num_key_value_heads, length, text_config.head_dim),
        "cross_lag": torch.tensor([1, 3]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    draft.attach_target(target)
    with torch.no_grad():
        expected = draft(**inputs)

    report = run_without_package(
        """
        import json, torch
        from transformers import AutoModel, AutoModelForCausalLM

        draft = AutoModel.from_pretrained("draft", trust_remote_code=True).eval()
        target = AutoModelForCausalLM.from_pretrained("target").eval()
        draft.attach_target(target)
        with torch.no_grad():
            torch.save(draft(**torch.load("inputs.pt")), "remote_logits.pt")
        print(json.dumps({
            "module": type(draft).__module__, "config_module": type(draft.config).__module__,
            "tree_widths": draft.generation_config.tree_widths, "draft_vocab_size": draft.config.draft_vocab_size,
        }))
        """,
        tmp_path,
    )
    assert report["module"].startswith("transformers_modules.") and report["module"].endswith(".modeling_longspec")
    assert report["config_module"].endswith(".configuration_longspec")
    assert report["tree_widths"] == draft.generation_config.tree_widths
    assert report["draft_vocab_size"] == draft.config.draft_vocab_size
    remote = torch.load(tmp_path / "remote_logits.pt")
    assert remote.shape == expected.shape == (batch, length, text_config.vocab_size)
    torch.testing.assert_close(remote, expected, rtol=0, atol=0)


def test_a_draft_loaded_with_remote_code_is_a_draft_for_the_package(tmp_path):
    """Where longspec_hf is imported, AutoModel keeps the package's registered class even with
    trust_remote_code=True; a remote-code class loaded anyway is still a LongSpec draft for `generate`,
    recognised by its config."""
    from transformers import AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    target, draft = agreeing_pair()
    draft.save_pretrained(tmp_path / "draft", remote_code=True)
    assert type(AutoModel.from_pretrained(tmp_path / "draft", trust_remote_code=True)) is LongSpecDraftModel
    remote_class = get_class_from_dynamic_module(export.AUTO_MAP["AutoModel"], tmp_path / "draft")
    remote = remote_class.from_pretrained(tmp_path / "draft").eval()
    assert remote_class is not LongSpecDraftModel and longspec_hf.modeling.is_longspec_draft(remote)
    ids = torch.randint(3, 256, (1, 10))
    expected = target.generate(ids, max_new_tokens=30, do_sample=False)
    stats = longspec_hf.LongSpecStats()
    output = target.generate(ids, assistant_model=remote, max_new_tokens=30, do_sample=False, longspec_stats=stats)
    assert torch.equal(output, expected) and stats.mean_accepted_length > 2.0


# ----- custom_generate ---------------------------------------------------------------------------------------
def write_pair_with_custom_generate(tmp_path: Path) -> Path:
    """An agreeing tiny pair: the target in tmp_path/target, the draft with remote code and custom_generate/
    (from `longspec export-generate`) in tmp_path/draft, which thus serves as both."""
    target, draft = agreeing_pair()
    target.save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft", remote_code=True)
    assert cli_main(["export-generate", str(tmp_path / "draft")]) == 0
    assert (tmp_path / "draft" / "custom_generate" / "generate.py").is_file()
    return tmp_path / "draft"


def test_custom_generate_without_the_package_matches_generate(tmp_path):
    write_pair_with_custom_generate(tmp_path)
    report = run_without_package(
        """
        import json, torch
        from transformers import AutoModel, AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained("target", dtype=torch.float32).eval()
        draft = AutoModel.from_pretrained("draft", trust_remote_code=True, dtype=torch.float32).eval()
        forwards = []
        target.register_forward_hook(lambda module, args, output: forwards.append(1))

        def both(new_tokens, **inputs):
            forwards.clear()
            plain = target.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            plain_forwards = len(forwards)
            forwards.clear()
            longspec = target.generate(
                **inputs, custom_generate="draft", trust_remote_code=True, assistant_model=draft,
                max_new_tokens=new_tokens, do_sample=False,
            )
            return {"plain": plain.tolist(), "longspec": longspec.tolist(), "plain_forwards": plain_forwards,
                    "longspec_forwards": len(forwards)}

        torch.manual_seed(0)
        single = both(40, input_ids=torch.randint(3, 256, (1, 12)))
        ids = torch.randint(3, 256, (2, 14))
        mask = torch.ones_like(ids)
        ids[1, :5], mask[1, :5] = 0, 0  # the second row is left-padded
        batch = both(33, input_ids=ids, attention_mask=mask)
        try:
            target.generate(torch.tensor([[5, 6]]), custom_generate="draft", trust_remote_code=True, max_new_tokens=2)
            refused = ""
        except ValueError as error:
            refused = str(error)
        print(json.dumps({"single": single, "batch": batch, "refused": refused, "draft": type(draft).__module__}))
        """,
        tmp_path,
    )
    assert report["draft"].startswith("transformers_modules.")
    for case, new_tokens in (("single", 40), ("batch", 33)):
        run = report[case]
        assert run["longspec"] == run["plain"], case
        assert len(run["plain"][0]) == len(run["plain"][-1]) and run["plain_forwards"] == new_tokens
        # Drafted tokens were accepted: far fewer target forwards (prefill + one per round) than tokens.
        assert run["longspec_forwards"] < new_tokens / 2, case
    assert "assistant_model=<a LongSpec draft>" in report["refused"]


def test_custom_generate_folder_with_the_package_imported(tmp_path):
    """Where longspec_hf is imported (and routes generate), a custom_generate folder still runs its own copy."""
    folder = write_pair_with_custom_generate(tmp_path)
    target, draft = agreeing_pair()
    ids = torch.randint(3, 256, (1, 9))
    expected = target.generate(ids, max_new_tokens=25, do_sample=False)
    output = target.generate(
        ids, custom_generate=str(folder), trust_remote_code=True, assistant_model=draft, max_new_tokens=25, do_sample=False
    )
    assert torch.equal(output, expected)


def test_custom_generate_names_what_it_needs():
    target, _ = agreeing_pair()
    with pytest.raises(ValueError, match="pass assistant_model=<a LongSpec draft>.*got NoneType"):
        custom_generate.generate(target, torch.tensor([[5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="got LlamaForCausalLM"):
        custom_generate.generate(target, torch.tensor([[5, 6]]), assistant_model=target, max_new_tokens=2)


def test_make_draft_round_trips_with_remote_code(tmp_path):
    """Saving with remote_code=True keeps the draft loadable by the package class, weights and all."""
    _, draft = agreeing_pair()
    draft.save_pretrained(tmp_path, remote_code=True)
    reloaded = LongSpecDraftModel.from_pretrained(tmp_path)
    for key, value in draft.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
