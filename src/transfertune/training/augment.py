"""Prompt augmentation: extra copies of each training row whose prompt is reworded by task-agnostic rules, so
that what is post-trained keys on the content of a request rather than on the exact wording of the few
instruction templates in the data. The response is never changed.

Each copy applies, independently, with a seeded random generator:
  1. a frame: the prompt is prefixed by one of FRAMES (or left as it is);
  2. casing: the prompt's first word loses its capital (30%);
  3. punctuation: sentence punctuation (. ? ! : ;) after lowercase words is removed (30%);
  4. word dropout: each all-lowercase alphabetic word is dropped with probability `drop`, and a filler word
     (FILLERS) is inserted before it with probability `drop / 2`.
Words holding a digit or a capital letter (names, numbers: what a response refers to or copies) are never
dropped or changed, except the first word's capital; the last word of the prompt is kept as it is (responses
often continue it), and so are line breaks.

The frames and fillers are generic English, written without looking at any evaluation phrasing; the
prompt-shift benchmark (evaluation/builtin_tasks/SHIFTED.md) checks the result on phrasings nothing here saw.
Every trained method gets the same augmented rows when `transfertune eval` compares them."""
from __future__ import annotations

import random
import re

FRAMES = ("", "Question: ", "Request: ", "Task: ", "Query: ", "Input: ", "Please answer. ", "Answer this. ",
          "Here is a request. ", "I have a question. ", "Quick one: ", "Help me with this: ")
FILLERS = ("please", "now", "just", "also", "kindly", "briefly", "simply", "then")
_WORD = re.compile(r"\S+|\s+")
_PUNCT = re.compile(r"[.?!:;](?=\s|$)")


def _keep(word: str) -> bool:
    """Words that carry content a response may copy: numbers, names (any capital letter), anything not purely
    lowercase letters."""
    core = word.strip(".,?!:;\"'()")
    return not core.isalpha() or not core.islower()


def reword(prompt: str, rng: random.Random, drop: float = 0.1) -> str:
    """One reworded copy of `prompt` (see the module docstring for the rules)."""
    parts = _WORD.findall(prompt)
    words = [i for i, p in enumerate(parts) if not p.isspace()]
    if not words:
        return prompt
    first, last = words[0], words[-1]
    strip_punct, lower_first = rng.random() < 0.3, rng.random() < 0.3
    out = []
    for i, part in enumerate(parts):
        if part.isspace() or i == last:
            out.append(part)
            continue
        if i == first and lower_first and part[:1].isupper() and part[1:2].islower():
            part = part[:1].lower() + part[1:]
        if _keep(part) and i != first:
            out.append(part)
            continue
        if not _keep(part):
            if rng.random() < drop:
                continue
            if rng.random() < drop / 2:
                out.append(rng.choice(FILLERS) + " ")
            if strip_punct:
                part = _PUNCT.sub("", part)
        out.append(part)
    text = re.sub(r"(?<=\S)[ \t]{2,}", " ", "".join(out)).lstrip(" \t")
    return rng.choice(FRAMES) + text


def augment_prompts(records: list[dict], copies: int, seed: int = 0, drop: float = 0.1) -> list[dict]:
    """`records` followed by `copies` reworded copies of each (rows with "messages" are kept as they are: chats
    are not reworded). Deterministic for a seed."""
    if copies <= 0:
        return list(records)
    rng = random.Random(seed)
    extra = []
    for _ in range(copies):
        for r in records:
            if "prompt" not in r:
                continue
            extra.append({**r, "prompt": reword(r["prompt"], rng, drop)})
    return list(records) + extra
