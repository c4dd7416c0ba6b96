"""The `longspec` console script.

Importing the `longspec_hf` package registers the draft with transformers' Auto classes and routes
`generate`, which loads torch and transformers: seconds that `longspec --help`, `longspec --version` or a
mistyped argument do not need. So this script runs `longspec_hf/cli.py`, which imports nothing but the
standard library when it is loaded, without importing the package first; a subcommand's own relative
imports import the package when it runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def main() -> int:
    cli = sys.modules.get("longspec_hf.cli")
    if cli is None:
        package = importlib.util.find_spec("longspec_hf")  # locates the package without importing it
        if package is None:
            raise SystemExit("longspec: the longspec_hf package is not installed in this environment")
        path = os.path.join(next(iter(package.submodule_search_locations)), "cli.py")
        spec = importlib.util.spec_from_file_location("longspec_hf.cli", path)
        cli = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = cli  # its relative imports resolve against the package "longspec_hf"
        spec.loader.exec_module(cli)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
