"""Build data/tasks/ from ../shared/data/t0-tasks: the post-training data of the built-in family.

    python scripts/make_tasks.py [--source ../shared/data/t0-tasks] [--out data/tasks]

Each t0 file holds one prompt template applied to the same ~200 underlying examples, in the same order, so
row i of every template of a task is example i. For each task this writes:
- train.jsonl: the training templates on the training examples,
- heldout_example.jsonl: the training templates on held-out examples (split by example),
- heldout_template.jsonl: a template never trained on, on training examples (split by template).
Rows are {"prompt", "response", "task", "template", "example"}; classification rows also carry
"choices" (the template's verbalised labels) and "label" (index of the right one).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
SPEC = {
    "ag_news": {
        "kind": "classification",
        "train": ["classify", "classify_question_first", "classify_with_choices", "which_section_choices"],
        "heldout": "which_section",
    },
    "amazon_polarity": {
        "kind": "classification",
        "train": ["Is_this_product_review_positive", "Is_this_review", "User_recommend_this_product",
                  "convey_negative_or_positive_sentiment", "flattering_or_not", "user_satisfied"],
        "heldout": "negative_or_positive_tone",
    },
    "sciq": {
        "kind": "qa",
        "train": ["Direct_Question_Closed_Book_", "Multiple_Choice", "Multiple_Choice_Closed_Book_",
                  "Multiple_Choice_Question_First"],
        "heldout": "Direct_Question",
    },
    "common_gen": {
        "kind": "generation",
        "train": ["Put_together", "Given_concepts_type_1", "Example_prompt", "random_task_template_prompt",
                  "topic_to_sentence"],
        "heldout": "Given_concepts_type_2",
        # rows sharing a concept set are one example: group them by this template's completion (the concepts)
        "group_by": "sentence_to_concepts",
    },
}
HELDOUT_FRACTION = 0.2
MAX_PROMPT_CHARS = 900


def read_template(source: Path, task: str, template: str) -> list[dict]:
    path = source / f"{task}_{template}.jsonl"
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        rows.append({"prompt": row["prompt"], "response": row["completion"].removesuffix(EOT).strip()})
    return rows


def build_task(source: Path, task: str, spec: dict, seed: int) -> dict[str, list[dict]]:
    templates = {t: read_template(source, task, t) for t in [*spec["train"], spec["heldout"]]}
    n = min(len(rows) for rows in templates.values())
    groups = (
        [r["response"] for r in read_template(source, task, spec["group_by"])[:n]]
        if "group_by" in spec else list(range(n))
    )
    keys = sorted(set(groups), key=str)
    random.Random(seed).shuffle(keys)
    held = set(keys[: round(len(keys) * HELDOUT_FRACTION)])
    splits: dict[str, list[dict]] = {"train": [], "heldout_example": [], "heldout_template": []}
    for template, rows in templates.items():
        choices = sorted({r["response"] for r in rows}) if spec["kind"] == "classification" else None
        for i, row in enumerate(rows[:n]):
            if len(row["prompt"]) > MAX_PROMPT_CHARS:
                continue
            record = {**row, "task": task, "template": template, "example": i}
            if choices:
                record["choices"] = choices
                record["label"] = choices.index(row["response"])
            if template == spec["heldout"]:
                if groups[i] not in held:
                    splits["heldout_template"].append(record)
            else:
                splits["heldout_example" if groups[i] in held else "train"].append(record)
    for name, rows in splits.items():
        random.Random(f"{seed}-{task}-{name}").shuffle(rows)
    return splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "t0-tasks")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "tasks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    summary = {}
    for task, spec in SPEC.items():
        splits = build_task(args.source, task, spec, args.seed)
        (args.out / task).mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            with (args.out / task / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        summary[task] = {"kind": spec["kind"], "sizes": {k: len(v) for k, v in splits.items()},
                         "train_templates": spec["train"], "heldout_template": spec["heldout"]}
        print(task, {k: len(v) for k, v in splits.items()})
    (args.out / "tasks.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
