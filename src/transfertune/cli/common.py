"""What several commands share: flag types, the compose / device flags, flags made from ValueRecipe, prompt
reading, and loading the composed model the flags describe."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from transfertune.io.placement import DTYPE_CHOICES
from transfertune.io.validate import InputError, flag_type

NUMBER = flag_type()
POSITIVE = flag_type(gt=0)
NON_NEGATIVE = flag_type(ge=0)
MAX_COUNT = 2**31 - 1  # counts past it are typos, and overflow the int32 of torch and tokenizers
COUNT = flag_type(integer=True, ge=1, le=MAX_COUNT)
SEED = flag_type(integer=True, ge=0, le=2**32 - 1)  # what numpy (and so `train`'s set_seed) accepts


def add_compose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: built-in short name (e.g. mini-l), local dir or HF id")
    p.add_argument("--value", action="append", default=[], metavar="DIR",
                   help="value directory to compose with the base (repeat for several)")
    p.add_argument("--weight", action="append", type=NUMBER, default=None, metavar="W",
                   help="weight of each --value, in order (default 1 each)")
    p.add_argument("--beta", type=POSITIVE, default=None,
                   help="divide value logits by beta (default: the beta stored in the value directory); "
                        "smaller beta = stronger post-training effect")
    p.add_argument("--proxy-tuned", metavar="MODEL", help="proxy-tuning: the small fine-tuned model")
    p.add_argument("--proxy-untuned", metavar="MODEL", help="proxy-tuning: the small model before fine-tuning")
    p.add_argument("--alpha", type=NUMBER, default=1.0, help="proxy-tuning strength (default 1)")
    p.add_argument("--vocab-map", choices=["none", "auto", "exact", "align"], default="none",
                   help="compose a value model trained on another vocabulary through a token map: auto = a map "
                        "saved in the value directory, else exact string matching (default none: refuse)")
    add_device_args(p)
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto = spread the base (and proxy models) over the visible GPUs with accelerate, for a base "
                        "larger than one device; value models go to --value-device, logits are composed on the "
                        "base's device")
    p.add_argument("--value-device", default=None, metavar="DEV",
                   help="device of the value models (default: --device)")
    p.add_argument("--overlap", action="store_true",
                   help="decoding: run value (and proxy) models in threads of their own, beside the base, the cores "
                        "split between them; meant for models on different devices (--value-device): on one CPU "
                        "it was slower than the default (docs/performance.md#base-and-value-overlapped)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repos to run their own code (off by default)")


def add_base_weights_flag(p: argparse.ArgumentParser) -> None:
    """For commands that load base models (cli/main.py applies it to the whole command)."""
    p.add_argument("--allow-unmatched-base-weights", action="store_true",
                   help="load base models whose checkpoint lacks weights their config.json describes (initialised "
                        "at random) or holds tensors it does not describe (unused); refused by default, naming "
                        "them. Value directories are never loaded so")


def add_device_args(p: argparse.ArgumentParser, what: str = "models",
                    default: str = "cpu; with --device-map auto, the first GPU") -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help=f"weights of the {what}: auto (default) = the checkpoint's torch_dtype on a GPU or other "
                        f"accelerator, fp32 on CPU; bf16, fp16 or fp32 = that type (logits are composed in fp32)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help=f"torch device: cpu, cuda, cuda:1, mps, ... (default {default})")


def placement(args) -> dict:
    """device, value_device, device_map and dtype for ComposedModel.from_pretrained, checked."""
    from transfertune.io.placement import inference_placement

    return inference_placement(args.device, args.dtype, getattr(args, "value_device", None),
                               getattr(args, "device_map", None),
                               flags={"device": "--device", "value_device": "--value-device"})


def load_composed(args):
    from transfertune.inference.composed_model import ComposedModel

    proxy = None
    if bool(args.proxy_tuned) != bool(args.proxy_untuned):
        raise ValueError("proxy-tuning needs both --proxy-tuned and --proxy-untuned")
    if args.proxy_tuned:
        proxy = (args.proxy_tuned, args.proxy_untuned)
    if args.weight is not None and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    return ComposedModel.from_pretrained(
        args.base, args.value, proxy=proxy, weights=args.weight, beta=args.beta, alpha=args.alpha,
        trust_remote_code=args.trust_remote_code, vocab_map=None if args.vocab_map == "none" else args.vocab_map,
        overlap=args.overlap, **placement(args),
    )


# -- flags made from ValueRecipe -----------------------------------------------------------------------------
def recipe_flag(f, prefix: str = "") -> tuple[str, list[str]]:
    """(dest, option strings) of a ValueRecipe field: --FLAG (train) or --PREFIX-FLAG (eval's --value-lr, ...);
    a field that is on by default is turned off with --no-FLAG / --no-PREFIX-FLAG."""
    meta = f.metadata
    name = (meta.get("flag") or f.name).replace("_", "-")
    spelt = f"{prefix}{name}"
    if f.type in ("bool", bool) and f.default is True:
        return f"{prefix.replace('-', '_')}{f.name}", [f"--no-{spelt}"]
    return f"{prefix.replace('-', '_')}{f.name}", [f"--{spelt}"]


def add_recipe_flags(p: argparse.ArgumentParser, defaults=None, prefix: str = "", only_eval: bool = False,
                     skip: tuple[str, ...] = ()) -> None:
    """One flag per ValueRecipe field (its help, choices and bounds), defaults from `defaults` (a ValueRecipe)."""
    from transfertune.training.recipe import ValueRecipe

    defaults = defaults or ValueRecipe()
    for f in fields(ValueRecipe):
        meta = f.metadata
        if f.name in skip or (only_eval and not meta.get("eval")):
            continue
        dest, options = recipe_flag(f, prefix)
        options += list(meta.get("aliases", ())) if prefix else []  # eval's older spellings
        default = getattr(defaults, f.name)
        help_ = meta["help"]
        if f.type in ("bool", bool):
            action = "store_false" if f.default is True else "store_true"
            p.add_argument(*options, dest=dest, action=action, default=default, help=help_)
            continue
        kwargs = {"default": default, "help": help_, "dest": dest}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        elif meta.get("bounds"):
            kwargs["type"] = flag_type(**meta["bounds"])
        kwargs["metavar"] = meta.get("metavar") or (meta.get("flag") or f.name).upper()
        p.add_argument(*options, **kwargs)


def recipe_from_args(args, prefix: str = "", base=None):
    """The ValueRecipe the flags added by add_recipe_flags describe (fields without a flag from `base`)."""
    from dataclasses import replace

    from transfertune.training.recipe import ValueRecipe

    base = base or ValueRecipe()
    changes = {}
    for f in fields(ValueRecipe):
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if hasattr(args, dest):
            changes[f.name] = getattr(args, dest)
    return replace(base, **changes)


# -- prompts ---------------------------------------------------------------------------------------------------
def read_prompts(args) -> list[str | list[dict]]:
    """Prompt texts, or chats (lists of messages) from a `messages` JSONL."""
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            from transfertune.io.data import read_prompts as read_prompt_rows

            prompts = read_prompt_rows(path)
        else:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in text_lines(path) if line.strip()]
        if not prompts:
            raise InputError(f"--prompt-file {path} holds no prompts")
        return prompts
    if sys.stdin is None or sys.stdin.closed:
        raise InputError("no prompt: give one as an argument or with --prompt-file (standard input is closed)")
    if sys.stdin.isatty():
        raise InputError("give a prompt as an argument, with --prompt-file, or on standard input")
    text = read_stdin()
    if not text.strip():
        raise InputError("standard input is empty: no prompt to generate from")
    return [text]


def read_stdin() -> str:
    """Standard input as UTF-8 text (a leading byte-order mark dropped), read as bytes: a text stream would
    turn undecodable bytes into lone surrogates under a C locale, which no tokenizer takes."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text stream (tests, embedding)
        return sys.stdin.read().removeprefix("\ufeff")
    data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"standard input is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
                         ) from None


def text_lines(path: Path) -> list[str]:
    from transfertune.io.data import DataFormatError

    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: line {n} is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    return lines


def render_chats(cm, items: list, choice: str = "trained") -> tuple[list[str], list[str] | None]:
    """(prompt texts, the value models' prompt texts or None when they read the same): chats rendered as
    `choice` says (ComposedModel.chat_templates; its notes go to stderr, one line each), other prompts as they
    are."""
    if all(isinstance(item, str) for item in items):
        return list(items), None
    from transfertune.io.data import render_chat_prompt

    template, value_template, notes = cm.chat_templates(choice)
    for note in notes:
        print(note, file=sys.stderr)

    def rendered(with_template):
        return [item if isinstance(item, str) else render_chat_prompt(cm.tokenizer, item, with_template)
                for item in items]

    return rendered(template), None if value_template is None else rendered(value_template)


__all__ = ["COUNT", "InputError", "MAX_COUNT", "NON_NEGATIVE", "NUMBER", "POSITIVE", "SEED", "add_base_weights_flag",
           "add_compose_args", "add_device_args", "add_recipe_flags", "flag_type", "load_composed", "placement",
           "read_prompts", "read_stdin", "recipe_from_args", "render_chats", "text_lines"]
