"""Compiled code persists across processes, in one folder per version set and device."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import transformers

import longspec_hf
from longspec_hf.generation import compiling
from longspec_hf.generation.compiling import (
    ENVIRONMENT_VARIABLE,
    compile_cache_dir,
    compile_cache_key,
    persistent_compile_caches,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCH_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@pytest.fixture
def fresh_keys():
    """Keys are computed once per device and process; these tests change what they are made of."""
    compiling._cached_key.cache_clear()
    yield
    compiling._cached_key.cache_clear()


def test_every_version_and_the_device_select_their_own_folder(monkeypatch, tmp_path, fresh_keys):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(tmp_path))
    folders = {compile_cache_dir("cpu")}
    assert compile_cache_key("cpu")["longspec_hf"] == importlib.metadata.version("longspec-hf") == longspec_hf.__version__

    def changed(module, attribute: str = "__version__") -> None:
        monkeypatch.setattr(module, attribute, "9.9.9-changed")
        compiling._cached_key.cache_clear()
        folders.add(compile_cache_dir("cpu"))

    changed(torch)
    changed(transformers)
    monkeypatch.setattr(compiling, "_package_version", lambda: "9.9.9-changed")
    compiling._cached_key.cache_clear()
    folders.add(compile_cache_dir("cpu"))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="0.0.1"))
    compiling._cached_key.cache_clear()
    folders.add(compile_cache_dir("cpu"))
    changed(sys.modules["triton"])
    # Another instruction set than this machine's (whatever it has).
    other_capability = "SVE256" if torch.backends.cpu.get_cpu_capability() != "SVE256" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other_capability)
    compiling._cached_key.cache_clear()
    folders.add(compile_cache_dir("cpu"))
    folders.add(compile_cache_dir("meta"))  # another device type
    assert len(folders) == 8
    assert all(folder.parent == tmp_path for folder in folders)


def test_the_folder_follows_the_environment_variable_and_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir("cpu").parent == tmp_path / "xdg" / "longspec_hf" / "compile"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(tmp_path / "chosen"))
    assert compile_cache_dir("cpu").parent == tmp_path / "chosen"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "off")
    assert compile_cache_dir("cpu") is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch's own"))
    with persistent_compile_caches("cpu") as folder:
        assert folder is None
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch's own")


def test_torchs_cache_variables_point_at_the_folder_inside_the_block_only(monkeypatch, tmp_path):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with persistent_compile_caches("cpu") as folder:
        assert folder == compile_cache_dir("cpu") and folder.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
        assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
        with persistent_compile_caches("cpu"):  # nested (or another thread's) block
            pass
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    assert "TRITON_CACHE_DIR" not in os.environ
    assert json.loads((folder / "key.json").read_text()) == compile_cache_key("cpu")


def test_an_unwritable_root_leaves_torchs_locations_in_effect(monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(blocker))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch's own"))
    with persistent_compile_caches("cpu") as folder:
        assert folder is None
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch's own")


# One compiled step (the draft's root step of a one-level tree) in a fresh process; the counters say
# whether Inductor and AOTAutograd compiled it or found it in their caches.
PROCESS = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import make_draft, make_target
    from torch._dynamo.utils import counters
    from longspec_hf.generation.compiling import compile_cache_dir

    target = make_target("llama", seed=5)
    draft = make_draft(target, seed=6)
    ids = torch.randint(3, target.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=False)
    out = target.generate(ids, assistant_model=draft, tree_widths=[1], compile_draft=True, **kwargs)
    print(json.dumps(dict(
        equal=torch.equal(out, target.generate(ids, **kwargs)),
        inductor=dict(counters["inductor"]),
        aot=dict(counters["aot_autograd"]),
        folder=str(compile_cache_dir("cpu")),
        inductor_dir_after=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    )))
    """
)


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = {name: value for name, value in os.environ.items() if name not in TORCH_VARIABLES}
    env[ENVIRONMENT_VARIABLE] = str(tmp_path / "compile")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))

    def run() -> dict:
        result = subprocess.run(
            [sys.executable, "-c", PROCESS], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = run()
    folder = Path(first["folder"])
    assert folder.parent == tmp_path / "compile"
    assert first["equal"]
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1 and first["aot"].get("autograd_cache_saved", 0) >= 1
    written = {path for path in folder.rglob("*") if path.is_file()}
    assert len(written) > 1  # the compiled code beside key.json
    assert first["inductor_dir_after"] != str(folder)  # torch's setting is back after the call

    second = run()
    assert second["equal"] and second["folder"] == first["folder"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and second["aot"].get("autograd_cache_miss", 0) == 0
