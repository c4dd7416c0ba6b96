"""README.md's two commands are what a new user runs first, and what CI (.ci/run) runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The command lines of the code block under "## Two commands" (comments left out)."""
    section = (REPO_ROOT / "README.md").read_text().split("## Two commands", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_commands_in_order():
    commands = readme_commands()
    assert len(commands) == 2 and "longspec demo" in commands[0] and commands[1] == "python -m pytest -q"
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(command) for command in commands]  # each one, verbatim
    assert positions == sorted(positions)
    assert "python3 -m venv" in "\n".join(ci[: positions[0]])  # in a fresh virtual environment


def test_the_first_command_installs_what_the_demo_and_the_tests_need():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', readme_commands()[0]).group(1).split(",")
    installed = {re.split(r"[<>=!~ ]", requirement)[0] for extra in extras for requirement in project["optional-dependencies"][extra]}
    assert {"gguf", "accelerate"} <= set(project["optional-dependencies"]["demo"])  # transformers reads GGUF with both
    assert {"gguf", "accelerate", "pytest", "hypothesis", "scipy"} <= installed
