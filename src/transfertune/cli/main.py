"""`transfertune` command line: train, generate, score, classify, serve, export, eval, info, vocab-map, convert, models.

Each command lives in its own module (cli/<command>.py: DESCRIPTION, add_arguments, run); only the chosen one
is imported, so `transfertune --help` and each command start without loading the others."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS = {  # name -> (module, one-line help)
    "train": ("train", "train a value model against a frozen base"),
    "generate": ("generate", "generate with a base composed with value models"),
    "score": ("score", "per-token log-probs of responses under the composed model"),
    "classify": ("classify", "classify rows over a label set, zero-shot or with label rewards"),
    "eval": ("eval", "compare transfer with every baseline on built-in tasks or your JSONL data"),
    "info": ("info", "describe a value directory"),
    "vocab-map": ("vocab_map", "build and save a token map from a base's vocabulary to a value model's"),
    "serve": ("serve", "serve the composed model over an OpenAI-compatible HTTP API"),
    "export": ("export", "write a composed model as a directory vLLM opens"),
    "convert": ("convert", "write a GGUF model as a safetensors model directory (loads in a second)"),
    "models": ("models", "list the built-in models"),
}

LOADS_BASES = ("train", "generate", "score", "classify", "eval", "serve")  # take --allow-unmatched-base-weights

# messages written for the Python API, in the words of the CLI
PYTHON_SPELLINGS = [("vocab_map='auto'", "--vocab-map auto"),
                    ("pass allow_unmatched_weights=True (or load within "
                     "transfertune.io.loading.allowing_unmatched_weights())", "pass --allow-unmatched-base-weights")]


def chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (from its module), the others are listed by name."""
    parser = argparse.ArgumentParser(prog="transfertune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_)
            continue
        module = import_module(f"transfertune.cli.{module_name}")
        p = sub.add_parser(name, help=help_, description=module.DESCRIPTION or help_)
        module.add_arguments(p)
        if name in LOADS_BASES:
            from transfertune.cli.common import add_base_weights_flag

            add_base_weights_flag(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = build_parser(command).parse_args(argv)
    from transfertune.core.compose import VocabularyMismatchError
    from transfertune.io.data import DataFormatError

    try:
        if getattr(args, "allow_unmatched_base_weights", False):
            from transfertune.io.loading import allowing_unmatched_weights

            with allowing_unmatched_weights():
                args.func(args)
        else:
            args.func(args)
    except (DataFormatError, VocabularyMismatchError, ValueError, OSError) as err:
        from transfertune.io.validate import printable

        message = "\n".join(printable(line) for line in str(err).splitlines())
        for python, flag in PYTHON_SPELLINGS:
            message = message.replace(python, flag)
        print(f"transfertune {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
