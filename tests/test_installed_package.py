"""The package as a wheel installs it: what an installed `longspec_hf` finds outside this repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from (pyproject.toml's packages, package-dir and py-modules).
SOURCES = ("pyproject.toml", "README.md", "longspec_launcher.py", "longspec_hf", "hub_configs")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding the package installed from a freshly built wheel (no dependencies: those of the
    running environment are used)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("longspec_hf-*.whl")
    run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)])
    return root / "site"


def run_installed(site: Path, cwd: Path, script: str) -> dict:
    """Run `script` where `longspec_hf` comes from `site` (not this checkout); its last line of output is JSON."""
    env = dict(os.environ, PYTHONPATH=str(site))
    result = run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_installed_package_publishes_the_bundled_card_and_training_log(installed, tmp_path):
    """`push_to_hub` of the bundled draft from an installed package writes the bundled model card (not the
    generic one) and the training log it mentions."""
    report = run_installed(installed, tmp_path, f"""
        import json
        import longspec_hf
        from longspec_hf.assets import bundled_draft_dir, hub_configs_dir

        draft = longspec_hf.LongSpecDraftModel.from_pretrained(bundled_draft_dir())
        out = draft.push_to_hub("someone/longspec-smollm2-135m-instruct", save_to={str(tmp_path / "upload")!r})
        print(json.dumps({{"package": longspec_hf.__file__, "hub_configs": str(hub_configs_dir())}}))
    """)
    assert Path(report["package"]).is_relative_to(installed)
    assert Path(report["hub_configs"]).is_relative_to(installed)
    upload = tmp_path / "upload"
    card = (upload / "README.md").read_text()
    assert "Training text: whole Python source files" in card  # only the bundled SmolLM2 card says this
    assert "license: apache-2.0" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "train_log.jsonl" in card
    bundled_log = REPO_ROOT / "hub_configs" / "longspec-smollm2-135m-instruct" / "train_log.jsonl"
    assert (upload / "train_log.jsonl").read_bytes() == bundled_log.read_bytes()
    # The code for transformers alone, written from the installed package's sources.
    assert (upload / "modeling_longspec.py").is_file() and (upload / "custom_generate" / "generate.py").is_file()
    assert 'custom_generate="someone/longspec-smollm2-135m-instruct"' in card


@pytest.mark.slow
def test_installed_console_script_answers_without_importing_torch(installed, tmp_path):
    report = run_installed(installed, tmp_path, """
        import contextlib, io, json, sys
        import longspec_launcher

        printed = {}
        for argv in (["--version"], ["--help"]):
            sys.argv = ["longspec", *argv]
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                longspec_launcher.main()
            printed[argv[0]] = out.getvalue()
        loaded = sorted(name for name in ("torch", "transformers", "longspec_hf") if name in sys.modules)
        print(json.dumps({"printed": printed, "loaded": loaded, "cli": sys.modules["longspec_hf.cli"].__file__}))
    """)
    import longspec_hf

    assert report["printed"]["--version"].strip() == f"longspec {longspec_hf.__version__}"
    assert "draft-vocab" in report["printed"]["--help"] and "train" in report["printed"]["--help"]
    assert report["loaded"] == []
    assert Path(report["cli"]).is_relative_to(installed)
