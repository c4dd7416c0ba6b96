"""`torch.compile` for the fixed-shape steps of LongSpec's rounds, with compiled code kept across processes.

The draft's root and level steps and the target's verify forward are compiled with static shapes: one
specialisation per tree level, tree shape and batch size a process decodes with. Dynamo counts them per
function, and past its default limit (8, `torch._dynamo.config.recompile_limit`) it runs the function
eagerly for every further shape: the deeper levels of a deep tree, or the plans an adaptive call tries
after its first few. These steps get more room; the global setting is left alone.

Compiling a small target's steps takes tens of seconds, most of it in Inductor (code generation, C++ and
Triton builds, autotuning). Torch keeps all of that in on-disk caches (the FX graph cache, the AOTAutograd
cache, Triton's kernel cache, Inductor's autotuning results), by default under the system's temporary
folder, which a reboot or a fresh machine image empties. While a compiled step runs (and so while it
compiles), [`persistent_compile_caches`] points them at a folder under the user's cache directory, one
per combination of torch, transformers, longspec-hf and Triton versions and device
([`compile_cache_key`]): a later process finds the compiled code there and only retraces the Python
(dynamo), which a cache cannot skip. Outside those calls torch's own settings are in effect again.

`LONGSPEC_HF_COMPILE_CACHE` chooses the root folder (default `$XDG_CACHE_HOME/longspec_hf/compile`, or
`~/.cache/longspec_hf/compile`); `LONGSPEC_HF_COMPILE_CACHE=off` leaves torch's cache locations as they are
(`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers.utils import logging

from .cuda_graphs import collect_garbage

logger = logging.get_logger(__name__)

Output = TypeVar("Output")

# How many shapes each compiled step may be specialised for in one process.
SPECIALISATIONS = 64

ENVIRONMENT_VARIABLE = "LONGSPEC_HF_COMPILE_CACHE"
DISABLED = "off"
# What torch reads, when it compiles, to place its caches: Inductor's (FX graphs, AOTAutograd entries,
# generated code, autotuning results) and Triton's compiled kernels.
_TORCH_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def compile_fixed_shapes(fn: Callable[..., Output], graph_pass: CustomGraphPass | None = None) -> Callable[..., Output]:
    """`torch.compile(fn, dynamic=False)`, called with dynamo allowed `SPECIALISATIONS` specialisations of
    it and torch's compile caches in the persistent folder of the device it runs on (see the module's
    description). (Under a CUDA graph only the capture calls it, so the wrapper costs nothing per round.)
    `graph_pass` runs on Inductor's post-grad graphs of `fn` (its `uuid` keys the cached code)."""
    options = None if graph_pass is None else {"post_grad_custom_post_pass": graph_pass}
    compiled = torch.compile(fn, dynamic=False, options=options)

    def call(*args, **kwargs) -> Output:
        limit = max(torch._dynamo.config.recompile_limit, SPECIALISATIONS)
        with persistent_compile_caches(_device_of(args, kwargs)), torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return call


@contextlib.contextmanager
def collect_after_compiling() -> Iterator[None]:
    """A full garbage collection at the end of the block if anything was compiled inside it.

    Dynamo's tracing state is a web of reference cycles that holds the traced call's inputs (a whole KV
    cache, the target) until a full collection, which may come much later: collected at the end of the
    call that compiled, a workspace dropped after it frees its memory at once. Once per call, not per
    compiled step: a collection in a process that has loaded Inductor takes about 0.3 s.
    """
    frames = counters["frames"]["total"]
    try:
        yield
    finally:
        if counters["frames"]["total"] != frames:
            collect_garbage()


def call_model(model: torch.nn.Module, **inputs):
    """`model(**inputs)`. Compiled instead of the model itself, so that the compiled function holds no
    reference to the model (kept buffers must not keep a target alive); dynamo guards on the argument."""
    return model(**inputs)


# ----- persistent caches ------------------------------------------------------------------------------------
def _package_version() -> str:
    """The installed longspec-hf version (read from its metadata: this module does not import the package's
    root, and runs also in exported folders where no package is installed)."""
    try:
        return importlib.metadata.version("longspec-hf")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compile_cache_key(device: torch.device | str) -> dict[str, str]:
    """What compiled code depends on beyond its own source: every version that could change it and the
    device it was built for. A new version of any of them gets a new cache folder."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import transformers

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        device_name = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        # Inductor's CPU kernels are built for the instruction set it detects (AVX2, AVX512, ...).
        device_name = f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "longspec_hf": _package_version(),
        "triton": triton_version,
        "python": platform.python_version(),
        "device": device_name,
    }


def compile_cache_root() -> Path | None:
    """The folder holding one cache folder per key: `LONGSPEC_HF_COMPILE_CACHE`, else the user's cache
    directory's `longspec_hf/compile`; None when the variable is `off`."""
    chosen = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if chosen.lower() == DISABLED:
        return None
    if chosen:
        return Path(chosen).expanduser()
    from ..assets import cache_dir

    return cache_dir() / "compile"


def compile_cache_dir(device: torch.device | str) -> Path | None:
    """The cache folder of `device` in this environment (see [`compile_cache_key`]), or None when the
    persistent caches are off."""
    root = compile_cache_root()
    return None if root is None else root / _folder_name(_cached_key(torch.device(device)))


@contextlib.contextmanager
def persistent_compile_caches(device: torch.device | str) -> Iterator[Path | None]:
    """Inside the block, torch's compile caches live in [`compile_cache_dir`]`(device)` (created on first
    use, with a `key.json` naming its versions); afterwards the environment is as it was. Yields the
    folder, or None when the persistent caches are off or the folder cannot be created (torch's own
    locations then stay in effect).

    Concurrent blocks (threads) share one setting: the first to enter sets it, the last to leave restores
    the environment. Cached code is found by its content, so a block of another device key that overlaps
    them stores its code in their folder without harm.
    """
    root = compile_cache_root()
    key = _cached_key(torch.device(device))
    directory = None if root is None else root / _folder_name(key)
    if directory is None or not _prepared(directory, key):
        yield None
        return
    _CACHE_SCOPE.enter(directory)
    try:
        yield directory
    finally:
        _CACHE_SCOPE.leave()


class _CacheScope:
    """Points torch's cache variables at one folder while at least one block is inside it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.outside: dict[str, str | None] = {}

    def enter(self, directory: Path) -> None:
        with self.lock:
            if self.depth == 0:
                self.outside = {name: os.environ.get(name) for name in _TORCH_CACHE_VARIABLES}
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
                os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
            self.depth += 1

    def leave(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for name, value in self.outside.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


_CACHE_SCOPE = _CacheScope()


@functools.cache
def _cached_key(device: torch.device) -> tuple[tuple[str, str], ...]:
    return tuple(compile_cache_key(device).items())


def _folder_name(key: tuple[tuple[str, str], ...]) -> str:
    """A readable folder name for a key: `torch-2.13.0_transformers-5.24.0_..._device-nvidia-h200-sm90`."""

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-")

    return "_".join(f"{slug(name)}-{slug(value)}" for name, value in key)


@functools.cache
def _prepared(directory: Path, key: tuple[tuple[str, str], ...]) -> bool:
    """Create `directory` with its `key.json` (once per process); False, with a warning, if it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / "key.json"
        if not manifest.exists():
            manifest.write_text(json.dumps(dict(key), indent=2) + "\n")
        return True
    except OSError as error:
        logger.warning(
            f"Cannot use {directory} for compiled code ({error}): torch.compile keeps it in its default, temporary "
            f"location. Set {ENVIRONMENT_VARIABLE} to a writable folder, or to '{DISABLED}'."
        )
        return False


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    """The device of the first tensor among a call's arguments (the CPU if there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
