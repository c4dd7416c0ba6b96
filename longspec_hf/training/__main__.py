"""`python -m longspec_hf.training --target ... --data ...` (also under `accelerate launch -m`)."""

import argparse

from .cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m longspec_hf.training", description="Train a LongSpec draft by distillation from its target.")
add_arguments(parser)
main(parser.parse_args())
