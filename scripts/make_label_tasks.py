"""Build data/tasks/labels/: classification over a *label set* for `transfertune train --labels` / `classify`.

    python scripts/make_label_tasks.py

Rows are {"prompt", "choices", "label", "example", "template"}: "label" is a name from the task's label set and
"choices" the row's verbalisers in label-set order (templates word the same label differently: "Yes" /
"flattering" / "satisfied" all verbalise `positive`).
- birth_decade: the family's people, "<name> was born in" -> the decade (labels 1900s ... 1990s). `train`: the
  people of people_qa's training split; `heldout_example`: the other v1 people; `heldout_new`: the v2 people only
  the -v2 bases read about.
- amazon_polarity, ag_news: the built-in t0 tasks (data/tasks/<task>, from ../shared/data/t0-tasks; see its
  README for provenance and licences) mapped onto their label sets. `train` and `dev` split the built-in
  `train` by example (a fifth of its examples, seed 1, are `dev`: designs are chosen there); `heldout_example`
  and `heldout_template` are the built-in held-out splits, unchanged (the test splits). `labels.json` lists the
  label set (ag_news's rows hold only two of its four labels: pass it as --labels).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from transfertune.evaluation.tasks import load_task
from transfertune.family.label_demo import DECADES, birth_decade_records

OUT = Path(__file__).resolve().parents[1] / "data" / "tasks" / "labels"
LABEL_SETS = {
    "amazon_polarity": (["negative", "positive"], {
        "Negative": "negative", "No": "negative", "unflattering": "negative", "dissatisfied": "negative",
        "Positive": "positive", "Yes": "positive", "flattering": "positive", "satisfied": "positive"}),
    "ag_news": (["business", "science/tech", "sports", "world"], {
        "Business": "business", "Science and technology": "science/tech", "Science and Technology": "science/tech",
        "Sports": "sports", "World politics": "world", "World News": "world"}),
}


def t0_rows(task: str, split: str) -> list[dict]:
    labels, verbalised = LABEL_SETS[task]
    rows = []
    for r in load_task(task, split):
        by_label = {verbalised[c]: c for c in r["choices"]}
        rows.append({"prompt": r["prompt"], "choices": [by_label[x] for x in labels],
                     "label": verbalised[r["choices"][r["label"]]], "example": r["example"],
                     "template": r["template"]})
    return rows


def dev_examples(rows: list[dict], seed: int = 1) -> set:
    examples = sorted({r["example"] for r in rows})
    random.Random(seed).shuffle(examples)
    return set(examples[: len(examples) // 5])


def write(task: str, split: str, rows: list[dict]) -> None:
    path = OUT / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path.relative_to(OUT.parents[2])}: {len(rows)} rows")


def main() -> None:
    for split, (generation, people) in {"train": ("v1", "train"), "heldout_example": ("v1", "heldout"),
                                        "heldout_new": ("v2", "all")}.items():
        write("birth_decade", split, [{"prompt": r["prompt"], "label": DECADES[r["labels"]],
                                       "example": r["prompt"].removesuffix(" was born in")}
                                      for r in birth_decade_records(generation, people)])
    for task in LABEL_SETS:
        train = t0_rows(task, "train")
        dev = dev_examples(train)
        write(task, "train", [r for r in train if r["example"] not in dev])
        write(task, "dev", [r for r in train if r["example"] in dev])
        for split in ("heldout_example", "heldout_template"):
            write(task, split, t0_rows(task, split))
        (OUT / task / "labels.json").write_text(json.dumps(LABEL_SETS[task][0]) + "\n")


if __name__ == "__main__":
    main()
