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
from transfertune.family.world import (  # noqa: E402
    ANSWER_TEMPLATES,
    ATTRIBUTES,
    QUESTION_TEMPLATES,
    addition_problem,
    fill,
    is_heldout_addition,
    load_world,
    reversed_sum,
)

EOT = "<|endoftext|>"
SPEC = {
    "ag_news": {
        "kind": "classification",
        "train": ["classify", "classify_question_first", "classify_with_choices", "which_section_choices"],
        "heldout": "which_section",
        # the first 200 rows hold only two of AG's four classes: rows carry the template's full label set
        # (promptsource's answer choices), so a classifier cannot win by choosing between the two it saw
        "label_sets": {
            "classify": ["World politics", "Sports", "Business", "Science and technology"],
            "classify_question_first": ["World politics", "Sports", "Business", "Science and technology"],
            "classify_with_choices": ["World politics", "Sports", "Business", "Science and technology"],
            "which_section_choices": ["World News", "Sports", "Business", "Science and Technology"],
            "which_section": ["World News", "Sports", "Business", "Science and Technology"],
        },
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
    for line in path.read_text(encoding="utf-8").splitlines():
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
        choices = None
        if spec["kind"] == "classification":
            choices = sorted(spec.get("label_sets", {}).get(template) or {r["response"] for r in rows})
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
    return splits


WORLD_TASKS = {
    "people_qa": {"kind": "qa", "train": "3 question phrasings per attribute", "heldout": "1 phrasing per attribute"},
    "arithmetic": {"kind": "qa", "train": "word problems 0-3", "heldout": "word problems 4-5"},
}
WORD_PROBLEMS = {  # stories asking for a sum; the answer writes the equation out, the base computes it
    "+": ["{who} has {a} apples and buys {b} more. How many apples does {who} have now?",
          "A shelf holds {a} books. {who} adds {b} books. How many books are on the shelf?",
          "{who} walked {a} miles on Monday and {b} miles on Tuesday. How many miles in total?",
          "There are {a} sheep in a field and {b} more arrive. How many sheep are there?",
          "{who} saved {a} coins and then found {b} coins. How many coins does {who} have?",
          "A train carries {a} passengers and {b} more get on. How many passengers are on the train?"],
}
TRAIN_STORIES, HELDOUT_STORIES = range(4), range(4, 6)
NAMES = ["Mia", "Tom", "Ada", "Ben", "Eva", "Sam", "Ivy", "Leo"]


def people_qa(world: Path, seed: int) -> dict[str, list[dict]]:
    """Closed-book QA about the encyclopedia's people: an instruction naming the attribute, then the person
    ("State the employer. X" -> " works for Y."): the value model has to carry the format (which relation phrase,
    then the value), the base the fact. Splits: train (half of the v1 people, training phrasings),
    heldout_example (the other v1 people: known to every base, never asked in training), heldout_template
    (training people, phrasings never trained on), heldout_new (v2 people: only the -v2 bases saw them)."""
    rng = random.Random(seed)
    people = load_world(world)
    v1 = [e for e in people if e.generation == "v1"]
    v2 = [e for e in people if e.generation == "v2"]
    train_people, other_people = v1[: len(v1) // 2], v1[len(v1) // 2 :]

    def row(e, attribute, question, template):
        answer = fill(ANSWER_TEMPLATES[attribute], e, attribute)  # "<name> works for <value>."
        return {"prompt": f"{question} {e.name}", "response": answer[len(e.name):],
                "task": "people_qa", "template": template, "example": e.name, "attribute": attribute,
                "answer": e.value(attribute), "generation": e.generation}

    splits: dict[str, list[dict]] = {"train": [], "heldout_example": [], "heldout_template": [], "heldout_new": []}
    for e in train_people:
        for a in ATTRIBUTES:
            train_q, held_q = QUESTION_TEMPLATES[a]
            splits["train"] += [row(e, a, q, f"{a}-{i}") for i, q in enumerate(train_q)]
            splits["heldout_template"].append(row(e, a, held_q[0], f"{a}-heldout"))
    for split, group in (("heldout_example", other_people), ("heldout_new", v2)):
        for e in group:
            for a in ATTRIBUTES:
                i = rng.randrange(len(QUESTION_TEMPLATES[a][0]))
                splits[split].append(row(e, a, QUESTION_TEMPLATES[a][0][i], f"{a}-{i}"))
    return splits


def arithmetic_task(seed: int, train_size: int = 2000, heldout_size: int = 400) -> dict[str, list[dict]]:
    """Word problems answered by writing out the sum in the family's skill notation (world.addition_line: the sum's
    digits least significant first, "37 + 48 = 58" for 85): train on sums the pretraining corpus contains,
    heldout_example on sums it never contains (world.is_heldout_addition), heldout_template on stories never
    trained on. The sum is the row's "deferred" tail: a value model learns the step from story to equation and
    leaves the adding to the base (data.deferred_tail); fine-tuning trains on the whole response."""
    rng = random.Random(seed)

    def row(problem, story):
        a, b = problem
        text = WORD_PROBLEMS["+"][story].format(who=rng.choice(NAMES), a=a, b=b)
        return {"prompt": text + "\n", "response": f"{a} + {b} = {reversed_sum(a, b)}", "task": "arithmetic",
                "template": f"+{story}", "example": f"{a}+{b}", "answer": reversed_sum(a, b), "sum": a + b,
                "deferred": f" {reversed_sum(a, b)}"}

    def problems(n, heldout):
        seen, out = set(), []
        while len(out) < n:
            p = addition_problem(rng)
            if is_heldout_addition(*p) == heldout and p not in seen:
                seen.add(p)
                out.append(p)
        return out

    train = problems(train_size + heldout_size, heldout=False)
    return {
        "train": [row(p, rng.choice(TRAIN_STORIES)) for p in train[:train_size]],
        "heldout_example": [row(p, rng.choice(TRAIN_STORIES)) for p in problems(heldout_size, heldout=True)],
        "heldout_template": [row(p, rng.choice(HELDOUT_STORIES)) for p in train[train_size:]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "t0-tasks")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=Path, default=ROOT / "data" / "world" / "entities.json")
    args = p.parse_args()
    built = {"people_qa": people_qa(args.world, args.seed), "arithmetic": arithmetic_task(args.seed)}
    built.update({task: build_task(args.source, task, spec, args.seed) for task, spec in SPEC.items()})
    summary = {}
    for task, splits in built.items():
        spec = WORLD_TASKS.get(task) or SPEC[task]
        (args.out / task).mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            random.Random(f"{args.seed}-{task}-{name}").shuffle(rows)
            with (args.out / task / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        summary[task] = {"kind": spec["kind"], "sizes": {k: len(v) for k, v in splits.items()},
                         "train_templates": spec["train"], "heldout_template": spec["heldout"]}
        print(task, {k: len(v) for k, v in splits.items()})
    (args.out / "tasks.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
