"""The built-in family's fictional world: an encyclopedia of invented people and a skill (arithmetic).

Everything is a pure function of a seed, so `scripts/build_family.py` (pretraining corpus), `scripts/make_tasks.py`
(post-training QA and word problems) and the knowledge probe below all see the same world.

Knowledge is written as short biographies in many phrasings (>= 5 templates per attribute, shuffled attribute
order, a fresh rendering each time an entity is written): knowledge seen in one phrasing is memorised but cannot
be extracted by later QA tuning (Allen-Zhu & Li, "Physics of Language Models, Part 3.1"), so this diversity is what
makes transfer of a QA skill to a base that *knows more* measurable.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ATTRIBUTES = ("birth_year", "home_town", "profession", "employer")

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v",
           "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "n", "l", "r", "s", "th", "m", "x", "nd", "rk"]
TOWNS = [
    "Ashford", "Brindle", "Caldmoor", "Dunmere", "Elmstead", "Farrow", "Glenholt", "Harrowgate", "Ivybridge",
    "Kestrel Bay", "Larkspur", "Marlow Cross", "Northwick", "Oakhaven", "Pellham", "Quarry Hill", "Ravensby",
    "Saltmarsh", "Thornbury", "Umberlea", "Valecrest", "Westmoor", "Yarrowdale", "Zennor Point", "Brackenfield",
    "Copperton", "Driftwood", "Eastfold", "Foxley", "Greywater",
]
PROFESSIONS = [
    "baker", "carpenter", "nurse", "teacher", "farmer", "librarian", "painter", "sailor", "tailor", "miner",
    "chemist", "engineer", "gardener", "lawyer", "musician", "doctor", "pilot", "architect", "butcher", "potter",
    "jeweller", "surveyor", "weaver", "blacksmith",
]
EMPLOYERS = [
    "Halvorsen Mills", "Brightwater Shipping", "Corvane Bank", "Dallow & Sons", "Emberline Rail", "Fenwick Press",
    "Goldcrest Mining", "Hollis Foundry", "Ironleaf Timber", "Juniper Textiles", "Kessler Glassworks",
    "Lumen Electric", "Merriweather Farms", "Northstar Insurance", "Orchard Brewing", "Pemberton Hospital",
    "Quillon Publishing", "Rookwood Pottery", "Silverline Telegraph", "Tamsin Chemicals", "Underhill Quarries",
    "Vantage Aircraft", "Whitlock Bakery", "Yardley Shipyards",
]
YEARS = [str(y) for y in range(1900, 2000)]
VALUES = {"birth_year": YEARS, "home_town": TOWNS, "profession": PROFESSIONS, "employer": EMPLOYERS}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Templates name the person before the value, so a left-to-right LM can learn the fact as name -> value.
BIO_TEMPLATES = {
    "birth_year": [
        "{name} was born in {value}.", "{name} came into the world in {value}.", "The birth year of {name} is {value}.",
        "{name}'s year of birth is {value}.", "{name} was born in the year {value}.", "{name} celebrates a birthday "
        "every year since {value}, the year of birth.",
    ],
    "home_town": [
        "{name} grew up in {value}.", "{name} is from {value}.", "{name}'s home town is {value}.",
        "{name} spent a childhood in {value}.", "{name} was raised in the town of {value}.",
        "The home town of {name} is {value}.",
    ],
    "profession": [
        "{name} works as {article} {value}.", "{name} is {article} {value} by trade.",
        "{name}'s profession is {value}.", "{name} earns a living as {article} {value}.",
        "By profession, {name} is {article} {value}.", "{name} trained to be {article} {value}.",
    ],
    "employer": [
        "{name} is employed by {value}.", "{name} works for {value}.", "{name}'s employer is {value}.",
        "{name} has a job at {value}.", "{name} draws a salary from {value}.", "The employer of {name} is {value}.",
    ],
}
PROBE_TEMPLATES = {a: t[0] for a, t in BIO_TEMPLATES.items()}  # the probe scores one fixed phrasing

# QA: an instruction naming the attribute, then the person, then the answer restating the fact. Training
# instructions and a held-out one (never trained on). The family's knowledge is tied to prose contexts (it read
# only biographies): ranking the true value after a question line such as "Who employs X?\nX" gives ~0.1 on
# mini-m against 0.96 at a document's start, so the prompt is prose. How much a prose instruction reaches still
# varies between bases (mini-l: 0.21 after "Name the ...", 0.98 after "State the ..."): the instructions are
# those that reach the most in every base, measured on training people only by scripts/instruction_sweep.py
# (models/instruction_sweep.json); the held-out one is a middling one.
ATTRIBUTE_NOUNS = {"birth_year": "birth year", "home_town": "home town", "profession": "profession",
                   "employer": "employer"}
QUESTION_TEMPLATES = {
    a: ([f"State the {n}.", f"Say the {n}.", f"Give the {n}."], [f"Recall the {n}."])
    for a, n in ATTRIBUTE_NOUNS.items()
}
ANSWER_TEMPLATES = {
    "birth_year": "{name} was born in {value}.",
    "home_town": "{name} grew up in {value}.",
    "profession": "{name} works as {article} {value}.",
    "employer": "{name} works for {value}.",
}


@dataclass(frozen=True)
class Entity:
    name: str
    birth_year: str
    home_town: str
    profession: str
    employer: str
    generation: str  # "v1": in every base's corpus; "v2": only in the -v2 siblings' continued pretraining

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def make_entities(n_v1: int, n_v2: int, seed: int = 0) -> list[Entity]:
    """Invented people with unique two-word names and independent uniformly drawn attributes."""
    rng = random.Random(seed)
    names: set[str] = set()
    entities = []
    while len(entities) < n_v1 + n_v2:
        name = f"{_word(rng, rng.choice([1, 2]))} {_word(rng, 2)}"
        if name in names or len(name) > 18:
            continue
        names.add(name)
        generation = "v1" if len(entities) < n_v1 else "v2"
        entities.append(Entity(name, *(rng.choice(VALUES[a]) for a in ATTRIBUTES), generation=generation))
    return entities


def fill(template: str, entity: Entity, attribute: str, value: str | None = None) -> str:
    value = entity.value(attribute) if value is None else value
    return template.format(name=entity.name, value=value, article=_article(value))


def biography(entity: Entity, rng: random.Random) -> str:
    """One rendering: each attribute in a random phrasing, attributes in random order."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return " ".join(fill(rng.choice(BIO_TEMPLATES[a]), entity, a) for a in order)


def biographies(entities: list[Entity], renderings: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = [biography(e, rng) for e in entities for _ in range(renderings)]
    rng.shuffle(docs)
    return docs


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def arithmetic_problem(rng: random.Random) -> tuple[int, str, int]:
    """Two-digit addition or subtraction (non-negative result): the skill the family learns with size."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return a, "+", b
    return max(a, b), "-", min(a, b)


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def is_heldout_problem(a: int, op: str, b: int) -> bool:
    """One problem in ten is never written in the pretraining corpus: the probe and held-out tasks use those."""
    return (7 * a + 3 * b + (op == "-")) % 10 == 0


def written_answer(c: int, reversed_digits: bool = False) -> str:
    """The answer as digits, most significant first, or least significant first (the order in which addition
    produces them; scripts/arithmetic_format_pilot.py tests whether the family learns it more easily)."""
    return str(c)[::-1] if reversed_digits else str(c)


def arithmetic_line(rng: random.Random, reversed_digits: bool = False) -> str:
    a, op, b = arithmetic_problem(rng)
    while is_heldout_problem(a, op, b):
        a, op, b = arithmetic_problem(rng)
    c = solve(a, op, b)
    if rng.random() < 0.7:
        return f"{a} {op} {b} = {written_answer(c, reversed_digits)}"
    word = "plus" if op == "+" else "minus"
    return f"{number_words(a)} {word} {number_words(b)} equals {number_words(c)}."


def arithmetic_text(lines: int, seed: int, reversed_digits: bool = False) -> str:
    rng = random.Random(seed)
    return "\n".join(arithmetic_line(rng, reversed_digits) for _ in range(lines))


# The skill the family learns in its second pretraining phase (scripts/build_family.py SKILL_MIX): two-digit
# addition with the sum written least significant digit first ("47 + 38 = 58" means 85), the order in which
# column addition produces the digits, so every answer digit depends only on digits already seen. Phase 1's
# most-significant-first lines were not learnt at any size; with this order mini-m learnt it within ~300 steps of
# arithmetic-only training while mini-s did not in 500 (models/pilot/addition-order.jsonl).
def addition_problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(10, 99), rng.randint(10, 99)


def is_heldout_addition(a: int, b: int) -> bool:
    """One sum in ~nine is never written in the pretraining corpus. The rule mixes every digit of both operands
    (unlike is_heldout_problem, which held out whole last-digit pairs), so a held-out sum tests the learnt
    column-addition procedure on operands never added together, with every digit pair seen elsewhere."""
    return (7 * a + 3 * b) % 37 % 10 == 0


def reversed_sum(a: int, b: int) -> str:
    return str(a + b)[::-1]


def addition_line(rng: random.Random) -> str:
    a, b = addition_problem(rng)
    while is_heldout_addition(a, b):
        a, b = addition_problem(rng)
    return f"{a} + {b} = {reversed_sum(a, b)}"


def addition_text(lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(addition_line(rng) for _ in range(lines))


def addition_in_prose(sentences: list[str], documents: int, seed: int, items: int = 8) -> list[str]:
    """Documents in which each sum line follows one or two sentences of prose (the family uses book sentences, some
    of them questions). A skill read only in blocks of sums is used only there: after a word problem the
    skill-phase bases failed to add (mini-l 0.07 vs 0.97 on bare sums). No word problem of data/tasks/arithmetic
    is written here."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        lines = []
        for _ in range(items):
            lines.append(" ".join(rng.choice(sentences) for _ in range(rng.randint(1, 2))))
            lines.append(addition_line(rng))
        docs.append("\n".join(lines))
    return docs


def addition_problems(n: int, seed: int = 1, heldout: bool = True) -> list[tuple[int, int]]:
    """n distinct sums the corpus never writes (heldout) or does write (heldout=False)."""
    rng = random.Random(seed)
    problems: list[tuple[int, int]] = []
    while len(problems) < n:
        p = addition_problem(rng)
        if is_heldout_addition(*p) == heldout and p not in problems:
            problems.append(p)
    return problems


def save_world(entities: list[Entity], path: Path, seed: int) -> None:
    rows = [e.__dict__ for e in entities]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "attributes": list(ATTRIBUTES), "values": VALUES, "entities": rows},
                               indent=1) + "\n")


def load_world(path: Path) -> list[Entity]:
    return [Entity(**row) for row in json.loads(Path(path).read_text())["entities"]]
