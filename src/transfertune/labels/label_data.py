"""Rows for classification over a label set, read from JSONL:

    {"text": "Great phone, lasts all day.", "label": "positive"}
    {"prompt": "Review: ...\\nIs this review positive?\\n", "choices": ["No", "Yes"], "label": "positive"}

- the input is "prompt" (or "text"): what a base reads before a label's verbaliser;
- "label": a label name, an index into the label set, or one of the row's own choices; optional when
  classifying;
- "choices" (optional): the row's verbalisers, one per label in label-set order (templates phrase the same
  label differently). Without them a label is verbalised as itself, after a space unless the prompt ends in one;
- "example" (optional): rows sharing it are one underlying example (held out together when fitting).
The label set comes from --labels, else from the rows' string labels (sorted).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transfertune.io.data import DataFormatError, iter_jsonl
from transfertune.io.validate import printable


@dataclass
class LabelRows:
    labels: list[str]
    prompts: list[str]
    choices: list[list[str]]
    targets: list[int | None]
    examples: list

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """Rows with the same verbalisers share a base prior (label_scores.calibrate)."""
        return [tuple(c) for c in self.choices]

    def labelled(self) -> bool:
        return all(t is not None for t in self.targets)


def check_label_set(labels: list[str], where: str = "--labels") -> list[str]:
    if not labels:
        raise DataFormatError(f"{where}: the label set is empty; name at least 2 labels")
    if len(labels) < 2:
        raise DataFormatError(f"{where}: a label set needs at least 2 labels, got {labels!r}")
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        raise DataFormatError(f"{where}: labels must be non-empty strings")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise DataFormatError(f"{where}: repeated label(s): {', '.join(dupes)}")
    return list(labels)


def read_label_rows(path: str | Path, labels: list[str] | None = None, *, need_labels: bool = False) -> LabelRows:
    """The rows of `path`, checked; errors name the file and line."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataFormatError(f"{path} has no rows")
    if labels is None or not labels:
        found = sorted({r["label"] for _, r in records if isinstance(r.get("label"), str)})
        labels = check_label_set(found, where=f"{path} (no --labels given: the label set is the rows' labels)")
        widths = {len(r["choices"]) for _, r in records if isinstance(r.get("choices"), list)}
        if widths and widths != {len(labels)}:
            raise DataFormatError(f"{path}: the rows' choices list {'/'.join(map(str, sorted(widths)))} verbalisers "
                                  f"but their labels name {len(labels)} ({', '.join(labels)}): give the whole label "
                                  f"set with --labels")
    else:
        labels = check_label_set(list(labels))
    rows = LabelRows(labels, [], [], [], [])
    for n, record in records:
        try:
            prompt, choices, target = _parse_row(record, labels, need_labels)
        except DataFormatError as err:
            raise DataFormatError(f"{path}: line {n}: {err}") from None
        rows.prompts.append(prompt)
        rows.choices.append(choices)
        rows.targets.append(target)
        rows.examples.append(printable(record["example"]) if "example" in record else f"line {n}")
    return rows


def _parse_row(record: dict, labels: list[str], need_labels: bool) -> tuple[str, list[str], int | None]:
    prompt = record.get("prompt", record.get("text"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataFormatError('no text: every row needs a non-empty "prompt" (or "text") string')
    choices = record.get("choices")
    if choices is None:
        space = "" if prompt[-1:].isspace() else " "
        choices = [space + label for label in labels]
    elif (not isinstance(choices, list) or len(choices) != len(labels) or not all(isinstance(c, str) and c
                                                                                   for c in choices)):
        raise DataFormatError(f'"choices" must list one non-empty verbaliser per label ({len(labels)}: '
                              f'{", ".join(labels)}), got {printable(choices)[:80]}')
    label = record.get("label")
    if label is None:
        if need_labels:
            raise DataFormatError('no "label": training needs one in every row')
        return prompt, choices, None
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataFormatError(f'"label" must be a label name or an index, got {type(label).__name__}')
    if isinstance(label, int):
        if not 0 <= label < len(labels):
            raise DataFormatError(f'"label" {label} is not an index into the {len(labels)} labels')
        return prompt, choices, label
    if label in labels:
        return prompt, choices, labels.index(label)
    if label in choices:
        return prompt, choices, choices.index(label)
    raise DataFormatError(f"unknown label {printable(label)!r}: the label set is {', '.join(labels)}")
