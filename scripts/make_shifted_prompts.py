"""Build the prompt-shift benchmark of the built-in tasks people_qa and arithmetic (issue #26): the held-out
questions of heldout_example, asked in phrasings and stories that nothing was trained or tuned on.

    python scripts/make_shifted_prompts.py [--tasks data/tasks] [--out data/tasks] [--seed 0]

Writes people_qa/shifted_{dev,test}.jsonl and arithmetic/shifted_{dev,test}.jsonl under --out and adds their
sizes to --out/tasks.json (read from --tasks; no other file changes). Deterministic for a seed. The *dev* part
may be used to choose designs; the *test* part is only reported, never used to choose anything (SHIFTED.md).

Rule for people_qa. PATTERNS is a list of phrasing patterns over the attribute noun ({noun}: "home town",
{Noun}: "Home town"), each tagged with one of six styles: imperative, question, fill-in-the-blank, lowercase
without punctuation, terse (one to three words) and polite-long. The person's name follows the phrasing after
one space and ends the prompt, since the response continues the name (" works for Y."). No phrasing equals,
ignoring case, punctuation and spacing, a training or heldout_template phrasing (world.QUESTION_TEMPLATES), a
candidate of the instruction sweep that chose them (models/instruction_sweep.json) or another pattern. The
patterns, not the rows, are split: within each style a seeded shuffle puts half in dev and half in test (an odd
style's extra pattern goes to dev and test in turn). Rows: the heldout_example people (the second half of the
v1 people: every base read about them, the QA training never asked) x 4 attributes, once per part; for each
attribute the part's patterns are dealt out evenly in a seeded order. Rows are those of make_tasks.people_qa
with "template": "<attribute>-shift-<k>" (k indexes PATTERNS) and "style".

Rule for arithmetic. STORIES are new word problems (none of make_tasks.WORD_PROBLEMS), each asking for the
sum of {a} and {b} ({who}: a name of make_tasks.NAMES), tagged with a style: plain (other objects),
question-first, long-narrative, distractor (a sentence that does not bear on the sum), no-question-mark and
terse. They are split like the patterns. Rows: the 400 held-out sums of arithmetic/heldout_example.jsonl, once
per part, each in a story of the part dealt out evenly in a seeded order; rows as make_tasks.arithmetic_task's,
with "template": "+shift-<k>" (k indexes STORIES) and "style".

Parts at seed 0 (people_qa: 15 patterns per attribute in each; arithmetic: 7 stories in each):

shifted_dev patterns
   0  imperative         Tell me the {noun} of
   2  imperative         Look up the {noun} of
   4  imperative         Find out the {noun} of
   5  question           What is the {noun} of
   8  question           Question: what is the {noun} of the following person?
  10  fill-in-the-blank  Fill in the {noun}:
  11  fill-in-the-blank  Fill in the blank: the {noun} of ___ is ... Person:
  12  fill-in-the-blank  Complete with the {noun}:
  17  lowercase          need the {noun} for
  19  lowercase          please list the {noun} of
  20  terse              {Noun}:
  21  terse              Which {noun}?
  24  terse              {Noun} for
  27  polite-long        For our records, please provide the {noun} of the individual listed here:
  28  polite-long        Hello! I am trying to remember the {noun} of someone. Their name is
shifted_test patterns
   1  imperative         Write the {noun} of this person:
   3  imperative         Identify the {noun} of the following person:
   6  question           Do you know the {noun} of
   7  question           What {noun} does this person have?
   9  question           Can you tell me the {noun} of
  13  fill-in-the-blank  {Noun}: ____ (fill it in). Person:
  14  fill-in-the-blank  Complete the sentence with the {noun} of
  15  lowercase          the {noun} of
  16  lowercase          give me the {noun} for
  18  lowercase          {noun} lookup for
  22  terse              {Noun} of
  23  terse              Q: {noun}?
  25  polite-long        Could you please let me know the {noun} of the person named
  26  polite-long        I would be grateful if you could tell me the {noun} of the following person.
  29  polite-long        Please answer with the {noun} of the person whose name follows.
shifted_dev stories: 1, 3, 5, 6, 8, 10, 12
shifted_test stories: 0, 2, 4, 7, 9, 11, 13
"""
from __future__ import annotations

import argparse
import json
import random
import re
import string
from pathlib import Path

import make_tasks

from transfertune.family.world import (
    ANSWER_TEMPLATES,
    ATTRIBUTE_NOUNS,
    ATTRIBUTES,
    QUESTION_TEMPLATES,
    fill,
    is_heldout_addition,
    load_world,
    reversed_sum,
)
from transfertune.io.locations import builtin_models_dir
from transfertune.io.validate import InputError

PARTS = ("shifted_dev", "shifted_test")
PATTERNS = [  # (style, phrasing over {noun} / {Noun}); the person's name follows after a space
    ("imperative", "Tell me the {noun} of"),
    ("imperative", "Write the {noun} of this person:"),
    ("imperative", "Look up the {noun} of"),
    ("imperative", "Identify the {noun} of the following person:"),
    ("imperative", "Find out the {noun} of"),
    ("question", "What is the {noun} of"),
    ("question", "Do you know the {noun} of"),
    ("question", "What {noun} does this person have?"),
    ("question", "Question: what is the {noun} of the following person?"),
    ("question", "Can you tell me the {noun} of"),
    ("fill-in-the-blank", "Fill in the {noun}:"),
    ("fill-in-the-blank", "Fill in the blank: the {noun} of ___ is ... Person:"),
    ("fill-in-the-blank", "Complete with the {noun}:"),
    ("fill-in-the-blank", "{Noun}: ____ (fill it in). Person:"),
    ("fill-in-the-blank", "Complete the sentence with the {noun} of"),
    ("lowercase", "the {noun} of"),
    ("lowercase", "give me the {noun} for"),
    ("lowercase", "need the {noun} for"),
    ("lowercase", "{noun} lookup for"),
    ("lowercase", "please list the {noun} of"),
    ("terse", "{Noun}:"),
    ("terse", "Which {noun}?"),
    ("terse", "{Noun} of"),
    ("terse", "Q: {noun}?"),
    ("terse", "{Noun} for"),
    ("polite-long", "Could you please let me know the {noun} of the person named"),
    ("polite-long", "I would be grateful if you could tell me the {noun} of the following person."),
    ("polite-long", "For our records, please provide the {noun} of the individual listed here:"),
    ("polite-long", "Hello! I am trying to remember the {noun} of someone. Their name is"),
    ("polite-long", "Please answer with the {noun} of the person whose name follows."),
]
STORIES = [  # (style, word problem asking for {a} + {b}); the prompt is the story and a newline
    ("plain", ("A baker made {a} loaves in the morning and {b} loaves in the afternoon. How many loaves did the "
               "baker make that day?")),
    ("plain", ("{who} counted {a} red cars and {b} blue cars on the way to school. What is the total number of "
               "cars {who} counted?")),
    ("plain", ("{who} is reading a long novel. Yesterday {who} read {a} pages, and today {who} read {b} pages. "
               "How many pages has {who} read so far?")),
    ("plain", "A garden has {a} tulips and {b} roses. How many flowers grow in the garden?"),
    ("question-first", "How many marbles are there in all if one jar holds {a} marbles and another holds {b}?"),
    ("question-first", ("Question: how many pumpkins does a farmer have after picking {a} pumpkins in one field "
                        "and {b} in another?")),
    ("long-narrative", ("On Saturday morning {who} went down to the harbour with an old basket. By noon {who} had "
                        "caught {a} fish, and in the quiet hours of the afternoon {who} caught {b} more. The basket "
                        "was heavy on the walk home. How many fish did {who} catch altogether?")),
    ("long-narrative", ("The school choir was preparing for the winter concert. In the first week {a} tickets "
                        "were sold to parents, and in the second week friends and neighbours bought {b} more. The "
                        "hall was decorated with paper stars. How many tickets were sold in the two weeks?")),
    ("distractor", ("A library lent out {a} books in May and {b} books in June. Its reading room has tall green "
                    "windows. How many books did the library lend out in the two months?")),
    ("distractor", ("{who} poured {a} litres of water into an empty tank and then another {b} litres. The sun was "
                    "setting over the hills. How many litres of water are in the tank?")),
    ("no-question-mark", ("Total the points: {who} scored {a} points in the first game and {b} points in the "
                          "second.")),
    ("no-question-mark", ("There were {a} birds on the roof. Then {b} more birds landed there. Count the birds on "
                          "the roof now.")),
    ("terse", "Stickers: {who} has {a}, a friend gives {b} more. Total?"),
    ("terse", "{a} cups of tea and {b} cups of coffee sold today. how many drinks in all"),
]


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: two phrasings are the same if this makes them equal."""
    return " ".join("".join(c for c in text.lower() if c not in string.punctuation).split())


def phrasing(pattern: str, noun: str) -> str:
    return pattern.format(noun=noun, Noun=noun[0].upper() + noun[1:])


def forbidden_phrasings() -> dict[str, str]:
    """normalised phrasing -> where it comes from: training and heldout_template phrasings, sweep candidates."""
    sweep = json.loads((builtin_models_dir() / "instruction_sweep.json").read_text())
    known = {}
    for attribute, noun in ATTRIBUTE_NOUNS.items():
        train, held = QUESTION_TEMPLATES[attribute]
        known.update({normalise(q): "a training phrasing" for q in train})
        known.update({normalise(q): "the heldout_template phrasing" for q in held})
        for candidates in sweep.values():
            known.update({normalise(c.format(n=noun)): "an instruction-sweep candidate" for c in candidates})
    return known


def check_patterns() -> None:
    known = forbidden_phrasings()
    for k, (_, pattern) in enumerate(PATTERNS):
        for noun in ATTRIBUTE_NOUNS.values():
            key = normalise(phrasing(pattern, noun))
            if key in known:
                raise InputError(f"PATTERNS[{k}] {pattern!r} with {noun!r} is the same phrasing as {known[key]}")
            known[key] = f"PATTERNS[{k}]"


def check_stories() -> None:
    existing = {normalise(s) for stories in make_tasks.WORD_PROBLEMS.values() for s in stories}
    for k, (_, story) in enumerate(STORIES):
        fields = set(re.findall(r"{(\w+)}", story))
        if not {"a", "b"} <= fields <= {"a", "b", "who"}:
            raise InputError(f"STORIES[{k}] must ask about {{a}} and {{b}} (and may name {{who}}); it has {fields}")
        if normalise(story) in existing:
            raise InputError(f"STORIES[{k}] is one of make_tasks.WORD_PROBLEMS")
    if len({normalise(s) for _, s in STORIES}) < len(STORIES):
        raise InputError("STORIES holds the same story twice")


def split_by_style(items: list[tuple[str, str]], seed: int, name: str) -> dict[str, list[int]]:
    """Indices of `items` in each part: per style (in order of first appearance) a seeded shuffle gives half to
    dev and half to test; an odd style's extra item goes to dev, then test, in turn."""
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    extra = 0
    for style in dict.fromkeys(s for s, _ in items):
        members = [k for k, (s, _) in enumerate(items) if s == style]
        random.Random(f"{seed}-{name}-{style}").shuffle(members)
        half = len(members) // 2
        if len(members) % 2:
            half += 1 - extra
            extra = 1 - extra
        parts["shifted_dev"] += members[:half]
        parts["shifted_test"] += members[half:]
    return {p: sorted(k) for p, k in parts.items()}


def deal(rng: random.Random, choices: list[int], n: int) -> list[int]:
    """n draws from `choices`, each used n // len(choices) or one more times, in a seeded order."""
    pool = choices * (n // len(choices)) + rng.sample(choices, n % len(choices))
    rng.shuffle(pool)
    return pool


def people_rows(world: Path, patterns: list[int], seed: int, part: str) -> list[dict]:
    v1 = [e for e in load_world(world) if e.generation == "v1"]
    people = v1[len(v1) // 2:]  # make_tasks.people_qa: the first half trains, the second is heldout_example
    rng = random.Random(f"{seed}-people_qa-{part}")
    drawn = {a: deal(rng, patterns, len(people)) for a in ATTRIBUTES}
    rows = []
    for i, e in enumerate(people):
        for a in ATTRIBUTES:
            k = drawn[a][i]
            style, pattern = PATTERNS[k]
            answer = fill(ANSWER_TEMPLATES[a], e, a)
            rows.append({"prompt": f"{phrasing(pattern, ATTRIBUTE_NOUNS[a])} {e.name}",
                         "response": answer[len(e.name):], "task": "people_qa", "template": f"{a}-shift-{k}",
                         "example": e.name, "attribute": a, "answer": e.value(a), "generation": e.generation,
                         "style": style})
    return rows


def heldout_sums(path: Path) -> list[tuple[int, int]]:
    """The sums of arithmetic/heldout_example.jsonl, in its order."""
    sums = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            example = str(json.loads(line).get("example", ""))
        except (json.JSONDecodeError, AttributeError):
            raise InputError(f"{path}: line {n}: not a JSON object") from None
        match = re.fullmatch(r"(\d+)\+(\d+)", example)
        if not match or not is_heldout_addition(*map(int, match.groups())):
            raise InputError(f"{path}: line {n}: example {example!r} is not a held-out sum 'a+b'")
        sums.append(tuple(map(int, match.groups())))
    if not sums:
        raise InputError(f"{path} holds no sums")
    return sums


def arithmetic_rows(sums: list[tuple[int, int]], stories: list[int], seed: int, part: str) -> list[dict]:
    rng = random.Random(f"{seed}-arithmetic-{part}")
    rows = []
    for (a, b), k in zip(sums, deal(rng, stories, len(sums))):
        style, story = STORIES[k]
        text = story.format(who=rng.choice(make_tasks.NAMES), a=a, b=b)
        rows.append({"prompt": text + "\n", "response": f"{a} + {b} = {reversed_sum(a, b)}", "task": "arithmetic",
                     "template": f"+shift-{k}", "example": f"{a}+{b}", "answer": reversed_sum(a, b), "sum": a + b,
                     "deferred": f" {reversed_sum(a, b)}", "style": style})
    return rows


def build(tasks: Path, world: Path, seed: int) -> dict[str, dict[str, list[dict]]]:
    check_patterns()
    check_stories()
    patterns = split_by_style(PATTERNS, seed, "patterns")
    stories = split_by_style(STORIES, seed, "stories")
    sums = heldout_sums(tasks / "arithmetic" / "heldout_example.jsonl")
    return {"people_qa": {p: people_rows(world, patterns[p], seed, p) for p in PARTS},
            "arithmetic": {p: arithmetic_rows(sums, stories[p], seed, p) for p in PARTS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=Path, default=make_tasks.ROOT / "data" / "tasks",
                   help="the built tasks: read arithmetic/heldout_example.jsonl and tasks.json from here")
    p.add_argument("--out", type=Path, default=make_tasks.ROOT / "data" / "tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=Path, default=make_tasks.ROOT / "data" / "world" / "entities.json")
    args = p.parse_args()
    registry_path = args.tasks / "tasks.json"
    if not registry_path.is_file():
        raise SystemExit(f"--tasks {args.tasks}: no tasks.json there (run scripts/make_tasks.py first)")
    registry = json.loads(registry_path.read_text())
    for task, parts in build(args.tasks, args.world, args.seed).items():
        (args.out / task).mkdir(parents=True, exist_ok=True)
        for part, rows in parts.items():
            random.Random(f"{args.seed}-{task}-{part}").shuffle(rows)
            with (args.out / task / f"{part}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            registry[task]["sizes"][part] = len(rows)
        print(task, {part: len(rows) for part, rows in parts.items()})
    (args.out / "tasks.json").write_text(json.dumps(registry, indent=2) + "\n")


if __name__ == "__main__":
    main()
