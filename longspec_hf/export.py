"""Self-contained copies of the package's code for folders that transformers loads as remote code.

transformers runs code that ships with a model folder or Hub repository in two places: a model class
named by `auto_map` in config.json (`AutoModel.from_pretrained(..., trust_remote_code=True)`), and a
decoding method in `custom_generate/generate.py` (`generate(..., custom_generate=..., trust_remote_code=True)`).
Its loader copies the named file and, recursively, the files it imports through single-level relative
imports (`from .name import x`) into one flat module folder; it follows no other form of import.

This package is nested (`longspec_hf.modeling`, `.kernels`, `.generation`), so the files are written from
its own sources by rewriting each package-relative import to name a flattened module:

- `longspec_hf/modeling/<name>.py` becomes `<name>.py` (the model's own files keep their transformers
  names: `configuration_longspec.py`, `modeling_longspec.py`);
- `longspec_hf/<subpackage>/<name>.py` becomes `<subpackage>_<name>.py` (`kernels_reference.py`), a
  subpackage's `__init__.py` becomes `<subpackage>.py` and a top-level module keeps its name;
- `from ..kernels import reference` becomes `from . import kernels_reference as reference`, and
  `from ..kernels.reference import f` becomes `from .kernels_reference import f`.

The Triton kernels are left out: the kernels module imports them inside `try: ... except ImportError`,
so the exported code runs the pure-torch reference kernels (installing longspec-hf gives the fast ones).
After writing, the files the loader will fetch are worked out with transformers' own
`get_relative_import_files`, and a module it would not find is an error here rather than on load.

[`write_remote_code`] writes a draft's code (called by `LongSpecDraftModel.save_pretrained(remote_code=True)`
and by `push_to_hub` / `longspec push`); [`write_custom_generate`] writes `custom_generate/`
(`longspec export-generate DIR`). This module imports nothing of the package: it reads its sources as text.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "longspec_hf"
PACKAGE_DIR = Path(__file__).resolve().parent

# Modules named by a config's `auto_map`, and the classes it names.
CONFIGURATION_MODULE = "modeling.configuration_longspec"
MODELING_MODULE = "modeling.modeling_longspec"
AUTO_MAP = {
    "AutoConfig": "configuration_longspec.LongSpecDraftConfig",
    "AutoModel": "modeling_longspec.LongSpecDraftModel",
}
# The decoding method transformers calls for `custom_generate=<folder or repo>`, and where it looks for it.
CUSTOM_GENERATE_MODULE = "generation.custom_generate"
CUSTOM_GENERATE_DIR = "custom_generate"
# What `custom_generate/requirements.txt` asks for (transformers checks it before running the method):
# the lower ends of the package's own dependencies.
CUSTOM_GENERATE_REQUIREMENTS = ("transformers>=5.17", "torch>=2.11")
# Modules that need Triton: left out of every export (imported only under `except ImportError`).
TRITON_KERNELS = frozenset({"kernels.compaction", "kernels.projections", "kernels.topk", "kernels.tree_attention"})

_IMPORT_HEAD = re.compile(rb"from\s+\.+[\w.]*\s+import\b")
_HEADER_START = "# Generated from "


class ExportError(RuntimeError):
    """The package's sources cannot be written as flat remote code (raised before anything is loaded)."""


@dataclass(frozen=True)
class FlatExport:
    """A set of package modules written as one flat folder.

    Attributes:
        entries: the modules transformers loads by name (dotted, relative to `longspec_hf`); every other
            module written is one they import, directly or not.
        renames: file names (without `.py`) that differ from the flattening rule, e.g. `generate` for the
            module that must be `custom_generate/generate.py`.
        without: modules left out; their imports must sit in a `try:` that catches ImportError.
    """

    entries: tuple[str, ...]
    renames: Mapping[str, str] = field(default_factory=dict)
    without: frozenset[str] = TRITON_KERNELS

    def flat_name(self, module: str) -> str:
        """The file name (without `.py`) of `module` in the flat folder."""
        if module in self.renames:
            return self.renames[module]
        parts = module.split(".")
        if parts[0] == "modeling" and len(parts) == 2:
            return parts[1]
        return "_".join(part.lstrip("_") for part in parts)


REMOTE_CODE = FlatExport(entries=(CONFIGURATION_MODULE, MODELING_MODULE))
CUSTOM_GENERATE = FlatExport(entries=(CUSTOM_GENERATE_MODULE,), renames={CUSTOM_GENERATE_MODULE: "generate"})


# ----- reading the package ----------------------------------------------------------------------------------
def _source_file(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py")


def _is_package(module: str) -> bool:
    return PACKAGE_DIR.joinpath(*module.split(".")).is_dir()


def _is_module(module: str) -> bool:
    return module != "" and _source_file(module).is_file()


def _names_bound_in(package: str) -> set[str]:
    """Top-level names that `package`'s `__init__.py` binds to something else than its own submodule of that
    name (by import, definition or assignment; `from . import name` binds the submodule)."""
    tree = ast.parse(_source_file(package).read_bytes())
    names: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            statements += node.body + node.orelse + getattr(node, "finalbody", [])
            statements += [inner for handler in getattr(node, "handlers", []) for inner in handler.body]
    return names


def _imports_submodule(base: str, name: str) -> bool:
    """Whether `from <base> import <name>` gives the submodule `<base>.<name>`: Python looks the name up on
    the package first, so a name its `__init__.py` binds (a function re-exported over its module's name,
    say) is that attribute."""
    full = f"{base}.{name}" if base else name
    if not _is_module(full):
        return False
    return base == "" or not _is_package(base) or name not in _names_bound_in(base)


def _check_sources_present() -> None:
    if not _source_file(MODELING_MODULE).is_file():
        raise ExportError(
            f"Remote code is written from the longspec-hf package's sources, and {PACKAGE_DIR} holds none (this is "
            "itself an exported copy). Install the package (pip install longspec-hf) and save or push from there."
        )


def _resolve(importer: str, level: int, target: str | None) -> str:
    """The module (dotted, relative to the package; "" for the package itself) that `from <level dots><target>`
    names inside `importer`."""
    parts = importer.split(".") if importer else []
    base = parts if _is_package(importer) else parts[:-1]
    if level - 1 > len(base):
        raise ExportError(f"{PACKAGE}.{importer} has a relative import that leaves the package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + (target.split(".") if target else []))


def _guarded_imports(tree: ast.AST) -> set[ast.ImportFrom]:
    """The `from ... import` statements inside a `try:` whose handlers catch ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {getattr(name, "id", None) for name in names}
        if caught & {"ImportError", "ModuleNotFoundError", "Exception", None}:
            guarded |= {inner for statement in node.body for inner in ast.walk(statement) if isinstance(inner, ast.ImportFrom)}
    return guarded


@dataclass
class _FlatModule:
    text: str
    imports: set[str]  # package modules it imports (those left out included)


def _flatten(module: str, export: FlatExport) -> _FlatModule:
    """`module`'s source with every package-relative import naming a flat module of `export`."""
    path = _source_file(module)
    source = path.read_bytes()
    tree = ast.parse(source, filename=str(path))
    guarded = _guarded_imports(tree)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(line: int, column: int) -> int:  # ast columns are UTF-8 byte offsets
        return line_starts[line - 1] + column

    edits: list[tuple[int, int, bytes]] = []
    imports: set[str] = set()
    left_out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == PACKAGE for alias in node.names) or (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE
        ):
            raise ExportError(f"{path}:{node.lineno} imports {PACKAGE} by name; the package imports itself relatively only")
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = _resolve(module, node.level, node.module)
        submodules = [alias for alias in node.names if _imports_submodule(base, alias.name)]
        attributes = [alias for alias in node.names if alias not in submodules]
        named = [f"{base}.{alias.name}" if base else alias.name for alias in submodules]
        if attributes and not _is_module(base):
            raise ExportError(f"{path}:{node.lineno} imports from {PACKAGE}'s root package, which is not exported")
        needed = named + ([base] if attributes else [])
        for name in needed:
            if name in export.without:
                if node not in guarded:
                    raise ExportError(
                        f"{path}:{node.lineno} imports {PACKAGE}.{name}, which the exported code leaves out, outside a "
                        "`try: ... except ImportError:`: the exported copy would fail to import."
                    )
                left_out.add(name)
        imports.update(needed)
        start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        statement = source[start:end]
        if not submodules:  # `from ..x import a, b`: only the module's name changes
            head = _IMPORT_HEAD.match(statement)
            replacement = f"from .{export.flat_name(base)} import".encode() + statement[head.end():]
        else:  # module objects (not followed by the loader by themselves): one statement per name
            statements = [f"from .{export.flat_name(base)} import " + ", ".join(_alias(a) for a in attributes)] if attributes else []
            for alias, name in zip(submodules, named):
                bound = alias.asname or alias.name
                flat = export.flat_name(name)
                statements.append(f"from . import {flat}" + (f" as {bound}" if bound != flat else ""))
            replacement = "; ".join(statements).encode()
        edits.append((start, end, replacement))
    for start, end, replacement in sorted(edits, reverse=True):
        source = source[:start] + replacement + source[end:]
    header = f"{_HEADER_START}{PACKAGE}/{path.relative_to(PACKAGE_DIR).as_posix()} by {PACKAGE}.export: edit the package, not this file.\n"
    if left_out:
        header += (
            f"# Exported without {', '.join(sorted(f'{PACKAGE}.{name}' for name in left_out))} (Triton kernels): their "
            "imports below fail, and the pure-torch reference runs instead.\n"
        )
    return _FlatModule(text=header + source.decode("utf-8"), imports=imports)


def _alias(alias: ast.alias) -> str:
    return alias.name + (f" as {alias.asname}" if alias.asname else "")


def flattened_sources(export: FlatExport) -> dict[str, str]:
    """File name -> text of every module `export` writes: its entries and, transitively, what they import."""
    _check_sources_present()
    files: dict[str, str] = {}
    pending, seen = list(export.entries), set()
    while pending:
        module = pending.pop()
        if module in seen or module in export.without:
            continue
        seen.add(module)
        flat = _flatten(module, export)
        name = export.flat_name(module) + ".py"
        if name in files:
            raise ExportError(f"two modules of {PACKAGE} would both be written as {name}; add a rename to the export")
        files[name] = flat.text
        pending.extend(sorted(flat.imports - seen))
    return files


# ----- writing folders --------------------------------------------------------------------------------------
def write_flat_export(export: FlatExport, folder: str | os.PathLike) -> list[Path]:
    """Write `export`'s files into `folder` and check that transformers' loader finds all of them from the
    entries. Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = flattened_sources(export)
    for stale in folder.glob("*.py"):  # written by an earlier export of other sources
        if stale.name not in sources and stale.read_text(encoding="utf-8").startswith(_HEADER_START):
            stale.unlink()
    written = []
    for name, text in sorted(sources.items()):
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    _check_loader_finds(folder, [folder / f"{export.flat_name(entry)}.py" for entry in export.entries], written)
    return written


def _check_loader_finds(folder: Path, entries: Iterable[Path], written: Iterable[Path]) -> None:
    from transformers.dynamic_module_utils import get_relative_import_files

    found = {Path(entry).resolve() for entry in entries}
    for entry in entries:
        found |= {Path(file).resolve() for file in get_relative_import_files(entry)}
    missing = sorted(path.name for path in written if path.resolve() not in found)
    if missing:
        raise ExportError(
            f"transformers' loader would not fetch {', '.join(missing)} from {folder}: a module imported only as "
            "`from . import name` is not followed. Import something from it (`from .name import x`) in the package."
        )


def write_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Write a draft's configuration and modeling code into `folder` as self-contained files
    (`configuration_longspec.py`, `modeling_longspec.py` and the flat modules they import), so that
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads the draft where longspec-hf is not
    installed. The config needs [`AUTO_MAP`] (`LongSpecDraftModel.save_pretrained(remote_code=True)` writes
    both). Returns the paths written."""
    return write_flat_export(REMOTE_CODE, folder)


def write_custom_generate(folder: str | os.PathLike) -> Path:
    """Write `folder/custom_generate/` (`generate.py`, the flat modules it imports, `requirements.txt`), so
    that `target.generate(**inputs, custom_generate=folder, trust_remote_code=True, assistant_model=draft)`
    decodes with LongSpec where longspec-hf is not installed (`draft` loaded with `trust_remote_code=True`
    from a folder written by [`write_remote_code`]). `folder` may be a draft's folder: one Hub repository
    then serves both. Returns the `custom_generate` folder."""
    target = Path(folder) / CUSTOM_GENERATE_DIR
    write_flat_export(CUSTOM_GENERATE, target)
    (target / "requirements.txt").write_text("\n".join(CUSTOM_GENERATE_REQUIREMENTS) + "\n")
    return target
