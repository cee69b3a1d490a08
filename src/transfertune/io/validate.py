"""Checks on what a user hands transfertune, in one place: numbers, prompt files, weight files, JSON files.

A failed check raises `InputError` (a ValueError) whose message names the parameter, flag or file (and line).
The command line prints it and exits with status 2; argparse flags use `flag_type`, so a bad flag value is
refused before anything runs.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

MAX_JSON_BYTES = 1 << 20  # transfertune.json and run records are a few hundred bytes


class InputError(ValueError):
    """An input transfertune refuses: a bad number, file or name. The message says which and why."""


class ContextLengthError(InputError):
    """A prompt or response longer than a model can attend over; `index` is the example it is about."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _problem(value, *, integer: bool, gt=None, ge=None, le=None, lt=None) -> str | None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if gt is not None and not value > gt:
        return f"must be > {gt}, got {value!r}"
    if ge is not None and not value >= ge:
        return f"must be >= {ge}, got {value!r}"
    if le is not None and not value <= le:
        return f"must be <= {le}, got {value!r}"
    if lt is not None and not value < lt:
        return f"must be < {lt}, got {value!r}"
    return None


def check_number(value, name: str, *, integer: bool = False, gt=None, ge=None, le=None, lt=None):
    """`value` if it is a finite number (an int when `integer`) within the bounds, else an InputError."""
    problem = _problem(value, integer=integer, gt=gt, ge=ge, le=le, lt=lt)
    if problem:
        raise InputError(f"{name} {problem}")
    return value


def check_optional(value, name: str, **bounds):
    return None if value is None else check_number(value, name, **bounds)


def flag_type(*, integer: bool = False, **bounds):
    """An argparse `type=`: parses the text and applies `check_number`; argparse adds the flag's name."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
        problem = _problem(value, integer=integer, **bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def check_label_row(record: dict, labels: list[str] | None) -> dict:
    """A classification row completed: "choices" (its own, else `labels`), "label" as an index into them, and a
    "response" (by default the labelled choice). The label may be an index, one of the choices, or only the
    response. The message of a refused row names the field; the caller adds the file and line."""
    choices = record.get("choices", labels)
    if choices is None:
        raise InputError('no label set: give "choices" in every row, or --labels')
    if (not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices)
            or len(set(choices)) < len(choices)):
        raise InputError(f'"choices" must be a list of at least 2 different strings, got {printable(choices)[:80]}')
    label = record.get("label", record.get("response", record.get("completion")))
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(choices):
            raise InputError(f'"label" {label} is not an index into the {len(choices)} choices')
        index = label
    elif isinstance(label, str):
        if label not in choices:
            raise InputError(f"label {printable(label)!r} is not one of the choices ({', '.join(choices)})")
        index = choices.index(label)
    else:
        got = "none" if label is None else f"got {type(label).__name__}"
        raise InputError(f'needs a "label" (an index into the choices, or one of them) or a "response" ({got})')
    response = record.get("response", record.get("completion", choices[index]))
    return {**record, "choices": choices, "label": index, "response": response}


def read_json_file(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a small file; a missing, huge, non-UTF-8, malformed or too deeply nested file, or one
    with a lone surrogate escape, is an InputError."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{path} is {size:,} bytes: too large to be a {what} (at most {max_bytes:,})")
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte {err.start}): not a {what}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        line, depth = deepest_nesting(text)
        raise InputError(f"{path}: line {line} is nested {depth:,} levels deep, too deep to read: "
                         f"not a {what}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    bad = lone_surrogate(data) if "\\u" in text else None
    if bad is not None:
        raise InputError(f"{path}: line {line_of_escape(text, bad)} {surrogate_problem(bad)}")
    return data


_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}\n]')


def deepest_nesting(text: str) -> tuple[int, int]:
    """(line, depth) where the brackets of a JSON text first reach their deepest nesting (strings skipped)."""
    line, depth, best = 1, 0, (1, 0)
    for match in _JSON_NESTING.finditer(text):
        token = match.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > best[1]:
                best = (line, depth)
        elif token in "]}":
            depth -= 1
    return best


def lone_surrogate(value) -> str | None:
    """A lone surrogate in a string (key or value) of decoded JSON, if there is one. No text encoding can write
    it: json decodes "\\ud800" without complaint, and tokenizers then fail with a TypeError."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def surrogate_problem(char: str) -> str:
    return (f"holds a lone surrogate (\\u{ord(char):04x}): not valid Unicode text (an escape in \\ud800-\\udfff "
            f"must be half of a pair)")


def line_of_escape(text: str, char: str) -> int:
    """The line of `text` (JSON) whose escapes spell the lone surrogate `char`: 1 if it cannot be found."""
    match = re.search(re.escape(f"\\u{ord(char):04x}"), text, re.IGNORECASE)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def check_safetensors(path: str | Path) -> None:
    """Open a safetensors file's header: a truncated or corrupt file is named instead of failing deep in a load."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
        raise InputError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt") from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def pickled_weights(directory: str | Path) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*") if p.suffix in PICKLE_SUFFIXES and "model" in p.name)


def check_weight_files(directory: str | Path, what: str) -> None:
    """`directory` must hold readable safetensors weights: pickles are never loaded (they can run code)."""
    directory = Path(directory)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and pickled_weights(directory):
        raise InputError(f"{directory} holds only pickled weights ({', '.join(pickled_weights(directory))}): "
                         f"transfertune loads {what} from safetensors only; convert them to .safetensors")
    for path in weights:
        check_safetensors(path)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """`text` on one line, with control characters (escape sequences, newlines, bidi overrides) shown as escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        str(text))
