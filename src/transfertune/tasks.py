"""The built-in post-training tasks (data/tasks/, built by scripts/make_tasks.py from real t0 NLP tasks).

Splits: `train`, `heldout_example` (unseen examples, seen templates), `heldout_template` (a template never
trained on); `people_qa` adds `heldout_new` (people only the -v2 bases saw in pretraining). Kinds: `classification` rows carry "choices" and "label"; `qa` rows have a short exact answer;
`generation` rows are scored by response NLL.
"""
from __future__ import annotations

import json
import os
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .data import read_jsonl
from .loading import REPO_ROOT

SPLITS = ("train", "heldout_example", "heldout_template", "heldout_new")


def tasks_dir() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_TASKS", REPO_ROOT / "data" / "tasks"))


@lru_cache(maxsize=None)
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
