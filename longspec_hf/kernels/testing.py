"""Helpers for testing the kernels: random trees, ragged rows of a preallocated cache, running test cases
under the Triton interpreter on CPU, and compiling a kernel's launches for a GPU without one (to check
that they compile, and what registers and shared memory they take).

Nothing here runs on the inference path.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def random_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    """A random tree in topological order: node 0 is the root (parent -1), node i > 0 has a parent < i."""
    return [-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, num_nodes)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Boolean `(T, T)`: entry `(i, j)` is True iff node `j` is node `i` or one of its ancestors."""
    num_nodes = len(parents)
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for node in range(num_nodes):
        walker = node
        while walker >= 0:
            mask[node, walker] = True
            walker = parents[walker]
    return mask


def random_tree_masks(batch: int, num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """`(batch, T, T)` ancestor masks of independent random trees."""
    return torch.stack([ancestor_mask(random_parents(num_nodes, generator)) for _ in range(batch)])


def ragged_bounds(lengths: list[int], capacity: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_start`, `prefix_end` for rows of the given lengths placed at random left-pad offsets of
    a cache with `capacity` slots."""
    starts = [int(torch.randint(0, capacity - length + 1, (), generator=generator)) for length in lengths]
    return torch.tensor(starts), torch.tensor([s + n for s, n in zip(starts, lengths)])


_RESULT_MARKER = "@@kernel-case-results@@"
_CHILD_SCRIPT = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_kernel_cases", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print({_RESULT_MARKER!r} + json.dumps(getattr(module, sys.argv[2])()))
"""


def run_in_triton_interpreter(module_path: str, function_name: str, timeout: float = 300.0):
    """Call `function_name()` of the Python file `module_path` in a child process whose Triton runs in
    the interpreter, and return its JSON-able result.

    The interpreter is chosen when Triton itself is imported (its own library functions are decorated
    then), so it cannot be switched on inside a process that has already imported Triton for the GPU;
    a child process keeps it away from every other test.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, module_path, function_name],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(child.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    raise RuntimeError(f"interpreter child failed (exit {child.returncode}):\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}")


# ----- compiling for a GPU without one ------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_launches(module):
    """Inside the block, the launches of `module`'s Triton kernels (module attributes) are recorded, not
    run: yields the list of `(kernel, args, launch keywords)` they append to. The module's `INTERPRETED`
    flag is set, so that its entry points accept CPU tensors (which are never read). Compile the launches
    after the block: inside it the module's `@triton.jit` helpers are recorders too."""
    import triton

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernels = {name: value for name, value in vars(module).items() if isinstance(value, triton.runtime.jit.JITFunction)}
    interpreted = module.INTERPRETED
    try:
        module.INTERPRETED = True
        for name, kernel in kernels.items():
            setattr(module, name, Recorder(kernel))
        yield launches
    finally:
        module.INTERPRETED = interpreted
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def compile_for_gpu(kernel, args: tuple, launch: dict, capability: int = 90) -> dict:
    """Compile one recorded launch of `kernel` (see [`recorded_launches`]) for an NVIDIA GPU of compute
    `capability` with Triton's own ptxas, no GPU needed, specialised as a launch on 16-byte aligned CUDA
    tensors would be. Returns what the kernel uses per program: `registers` (per thread), `spilled_bytes`
    (per thread: stores of registers that did not fit) and `shared_bytes`."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    launch = dict(launch)
    options = {name: launch.pop(name) for name in ("num_warps", "num_stages") if name in launch}
    values = dict(zip(kernel.arg_names, args)) | launch
    signature, constexprs, attributes = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        # What a launch specialises on, by Triton's own rules: integers equal to 1 become constants,
        # multiples of 16 and 16-byte aligned tensors are marked divisible.
        kind, key = native_specialize_impl(
            BaseBackend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = key
        elif key == "D":
            attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    usage = _ptxas_report(compiled.asm["ptx"], capability)
    return {**usage, "shared_bytes": compiled.metadata.shared}


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    """Registers per thread and spilled bytes (stores) that ptxas reports for `ptx`: the ptxas Triton
    itself compiles with (it ships one with its NVIDIA backend)."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        command = [get_ptxas(capability).path, f"-arch={arch}", "-v", str(path), "-o", str(Path(folder) / "kernel.cubin")]
        report = subprocess.run(command, capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    return {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
            "spilled_bytes": int(re.search(r"(\d+) bytes spill stores", text).group(1))}
