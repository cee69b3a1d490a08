"""The composed model the serving benchmarks (serve.py, vllm_engine.py) measure: its flags and its value directories."""
from __future__ import annotations

import argparse
from pathlib import Path

from transfertune.core.value_model import ValueModel


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="mini-l", help="base model (default mini-l)")
    p.add_argument("--value", action="append", default=[], metavar="DIR",
                   help="value directory (repeatable); default: an untrained value model from --value-init")
    p.add_argument("--value-init", default="mini-s", help="weights of the untrained value model (default mini-s)")


def value_dirs(args, tokenizer, tmp: Path) -> tuple[list[str], str]:
    """--value as given, or an untrained value model from --value-init saved under `tmp`; and how to name it.
    Its output layer is kept (not zeroed), so it costs what a trained value model of that size costs."""
    if args.value:
        return args.value, ", ".join(args.value)
    value = ValueModel.create(args.value_init, tokenizer=tokenizer, zero_init_head=False,
                              training_base=args.value_init)
    value.save(tmp / "value")
    return [str(tmp / "value")], f"untrained ({args.value_init} weights, output layer kept)"
