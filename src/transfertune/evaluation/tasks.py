"""The built-in post-training tasks (data/tasks/, built by scripts/make_tasks.py from real t0 NLP tasks), and
tasks made from a user's own JSONL files (`load_user_task`).

Splits: `train`, `heldout_example` (unseen examples, seen templates), `heldout_template` (a template never
trained on); `people_qa` adds `heldout_new` (people only the -v2 bases saw in pretraining); `people_qa` and
`arithmetic` add `shifted_dev` and `shifted_test`, the heldout_example questions in phrasings and stories nothing
was trained or tuned on (builtin_tasks/SHIFTED.md; `shifted_test` is never used to choose a design).
Kinds: `classification` rows carry "choices" and "label"; `qa` rows have a short exact answer; `generation` rows
are scored by response NLL.
"""
from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transfertune.io.data import (
    DataFormatError,
    iter_jsonl,
    read_jsonl,
    to_prompt_response,
)
from transfertune.io.locations import builtin_tasks_dir

SPLITS = ("train", "heldout_example", "heldout_template", "heldout_new", "shifted_dev", "shifted_test")


def tasks_dir() -> Path:
    return builtin_tasks_dir()


@cache
def _registry(root: str) -> dict[str, dict]:
    path = Path(root) / "tasks.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


class _Tasks(dict):
    """TASKS[name] -> {"kind", split sizes, templates}; read lazily so TRANSFERTUNE_TASKS can point elsewhere."""

    def _data(self) -> dict:
        return _registry(str(tasks_dir()))

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())

    def __contains__(self, key):
        return key in self._data()

    def keys(self):
        return self._data().keys()

    def items(self):
        return self._data().items()


TASKS = _Tasks()


def list_tasks() -> list[str]:
    return list(TASKS)


def load_task(name: str, split: str = "train") -> list[dict]:
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}'; built-in tasks: {', '.join(TASKS) or f'none found in {tasks_dir()}'}")
    splits = list(TASKS[name]["sizes"])
    if split not in splits:
        raise KeyError(f"unknown split '{split}' of task '{name}'; splits: {', '.join(splits)}")
    return read_jsonl(tasks_dir() / name / f"{split}.jsonl")


ScoreFn = Callable[[list[str], list[str]], list[float]]


def label_accuracy(examples: list[dict], score_fn: ScoreFn) -> float:
    """Fraction of examples whose highest-scoring choice is the label. score_fn(prompts, responses) -> scores."""
    prompts = [e["prompt"] for e in examples for _ in e["choices"]]
    responses = [c for e in examples for c in e["choices"]]
    scores = score_fn(prompts, responses)
    correct, i = 0, 0
    for e in examples:
        k = len(e["choices"])
        row = scores[i : i + k]
        correct += int(max(range(k), key=row.__getitem__) == e["label"])
        i += k
    return correct / len(examples)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


# -- a user's own data -------------------------------------------------------------------------------------
KINDS = ("classification", "qa", "generation")
SPLIT_BY = ("example", "template")


@dataclass
class UserTask:
    """A task read from a user's JSONL files; its kind, labels and splits are fixed when it is read (before any
    model loads). `recipe` says how, and is part of every cache key with the files' bytes."""

    name: str
    kind: str
    files: list[Path]
    splits: dict[str, list[dict]]  # "train" and one held-out split
    where: dict[str, list[str]]  # "FILE: line N" of each row, per split
    recipe: dict
    labels: list[str] | None = None

    @property
    def heldout(self) -> str:
        return next(s for s in self.splits if s != "train")

    def summary(self) -> dict:
        return {"files": [str(f) for f in self.files], "kind": self.kind, "labels": self.labels,
                "sizes": {s: len(rows) for s, rows in self.splits.items()}, **self.recipe}


def is_user_task(arg: str) -> bool:
    """Whether a --tasks value names files rather than a built-in task: it ends in .jsonl, holds a path
    separator, or exists and is no built-in name (a directory named like a built-in task is given as ./NAME)."""
    return arg.endswith(".jsonl") or "/" in arg or os.sep in arg or (arg not in TASKS and Path(arg).exists())


def load_user_task(arg: str, *, split_by: str = "example", heldout_fraction: float = 0.2, seed: int = 0,
                   kind: str | None = None, labels: list[str] | None = None,
                   split: str = "heldout_example") -> UserTask:
    """A JSONL file, or a directory of them (read as one task), split by `split_by` with a seeded held-out
    fraction. A directory holding train.jsonl is already split: train.jsonl and `split`.jsonl are used as they
    are. Kind: `kind`, else classification when `labels` are given or rows carry "choices" / "label", else
    generation. Every row is checked; an error names the file and line."""
    path = Path(arg)
    if not path.exists():
        raise DataFormatError(f"task file not found: {arg}")
    if path.is_dir() and (path / "train.jsonl").is_file():
        if not (path / f"{split}.jsonl").is_file():
            raise DataFormatError(f"{path} holds train.jsonl but no {split}.jsonl (the --split to evaluate): add it, "
                                  f"or give the files to split instead")
        parts = {"train": read_rows([path / "train.jsonl"]), split: read_rows([path / f"{split}.jsonl"])}
        files, recipe = [path / "train.jsonl", path / f"{split}.jsonl"], {"presplit": True}
    else:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise DataFormatError(f"{path} holds no .jsonl files")
        parts = {"all": read_rows(files)}
        recipe = {"split_by": split_by, "heldout_fraction": heldout_fraction, "split_seed": seed}
    records = [record for rows in parts.values() for _, record in rows]
    kind = infer_kind(records, kind, labels)
    if kind == "classification" and labels is None:
        labels = labels_from_data(records)
        if labels is not None and len(labels) < 2:
            raise DataFormatError(f"{path}: a classification task needs at least 2 labels; the data has {labels}")
    recipe.update(kind=kind, labels=labels)
    parts = {name: [(w, normalise_row(w, r, kind, labels)) for w, r in rows] for name, rows in parts.items()}
    if "all" in parts:
        train, held = split_rows(parts.pop("all"), split_by, heldout_fraction, seed, str(path))
        parts = {"train": train, f"heldout_{split_by}": held}
    return UserTask(name=task_name(path), kind=kind, files=files, labels=labels, recipe=recipe,
                    splits={s: [r for _, r in rows] for s, rows in parts.items()},
                    where={s: [w for w, _ in rows] for s, rows in parts.items()})


def task_name(path: Path) -> str:
    """A file's stem or a directory's name, as a name safe in cache paths."""
    name = path.stem if path.is_file() else path.resolve().name
    return re.sub(r"[^\w.-]+", "_", name) or "task"


def read_rows(files: list[Path]) -> list[tuple[str, dict]]:
    """("FILE: line N", record) of every row; an empty file is an error."""
    rows = []
    for path in files:
        found = [(f"{path}: line {n}", record) for n, record in iter_jsonl(path)]
        if not found:
            raise DataFormatError(f"{path} has no examples")
        rows += found
    return rows


def infer_kind(records: list[dict], kind: str | None, labels: list[str] | None) -> str:
    if kind:
        return kind
    if labels or any("choices" in r or "label" in r for r in records):
        return "classification"
    return "generation"


def labels_from_data(records: list[dict]) -> list[str] | None:
    """The label set of rows that carry no "choices": their string labels (else responses), sorted. None when
    rows carry their own choices."""
    if any("choices" in r for r in records):
        return None
    found = set()
    for r in records:
        value = r.get("label", r.get("response", r.get("completion")))
        if isinstance(value, str):
            found.add(value)
    return sorted(found)


def normalise_row(where: str, record: dict, kind: str, labels: list[str] | None) -> dict:
    """{"prompt", "response", ...} (classification adds "choices" and "label"; qa may give the response as
    "answer"); an error is prefixed with the row's file and line."""
    from transfertune.io.validate import InputError, check_label_row

    try:
        if "messages" in record:
            raise DataFormatError('eval needs "prompt" and "response" fields; chat "messages" rows cannot be scored '
                                  'the same way for every target')
        if kind == "classification":
            record = check_label_row(record, labels)
        elif "response" not in record and "completion" not in record and "answer" in record:
            record = {**record, "response": record["answer"]}
        return to_prompt_response(record)
    except (DataFormatError, InputError) as err:
        raise DataFormatError(f"{where}: {err}") from None


def split_rows(rows: list[tuple], by: str, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """(train rows, held-out rows): a seeded `fraction` of the examples (rows sharing an "example" id stay
    together) or of the templates (the "template" field) is held out."""
    keys = [group_key(where, row, by, i) for i, (where, row) in enumerate(rows)]
    groups = sorted(set(keys))
    if len(groups) < 2:
        raise DataFormatError(f"{source}: --split-by {by} needs at least 2 {by}s to split, found {len(groups)}")
    held = heldout_groups(groups, fraction, seed)
    return [r for r, k in zip(rows, keys) if k not in held], [r for r, k in zip(rows, keys) if k in held]


def group_key(where: str, row: dict, by: str, index: int) -> str:
    if by == "template":
        if "template" not in row:
            raise DataFormatError(f'{where}: no "template" field: --split-by template needs one in every row')
        return json.dumps(row["template"], sort_keys=True)
    return json.dumps(row["example"], sort_keys=True) if "example" in row else f"#{index:09d}"


def heldout_groups(groups: list[str], fraction: float, seed: int) -> set[str]:
    """round(fraction x groups), at least 1 and leaving at least 1 to train on, drawn with `seed`."""
    n = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return set(order[:n])
