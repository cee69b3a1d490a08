"""What a base knows before any post-training: a knowledge probe and the arithmetic skill, untuned.

knowledge_probe: for each (person, attribute), score the sentence "<name> grew up in <value>." for *every* value
of that attribute and count the person as known when the true value has the highest likelihood. Chance is
1 / (number of values). With `instruction`, the sentence follows the people_qa prompt ("State the home town. <name>
grew up in <value>."): whether the knowledge can be reached from the prompt that QA tuning starts from.
arithmetic_accuracy: greedy completion of "a + b =" in the pretraining format.
"""
from __future__ import annotations

import random

import torch
from tqdm import tqdm

from transfertune.family.world import (
    ANSWER_TEMPLATES,
    ATTRIBUTE_NOUNS,
    ATTRIBUTES,
    PROBE_TEMPLATES,
    QUESTION_TEMPLATES,
    VALUES,
    Entity,
    fill,
    solve,
    written_answer,
)


@torch.no_grad()
def sequence_logprobs(model, tok, texts: list[str], batch_size: int = 256) -> list[float]:
    """Sum of log p(token) over each text, after the BOS/EOS token the pretraining documents start with."""
    device = next(model.parameters()).device
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = [[bos] + tok(t, add_special_tokens=False).input_ids for t in texts[i : i + batch_size]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, : len(e)] = torch.tensor(e)
            mask[r, : len(e)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        out.extend((logp * mask[:, 1:]).sum(-1).tolist())
    return out


def knowledge_probe(model, tok, entities: list[Entity], attributes=ATTRIBUTES,
                    instruction: str | None = None) -> dict[str, float]:
    """Accuracy per attribute and overall ("all") of ranking the true value first among all its values.

    instruction: None scores the bare biography sentence; "train" / "heldout" put the first training / held-out
    people_qa instruction before it, in the task's own format (prompt "<instruction> <name>", answer sentence);
    any other string is an instruction template with "{n}" for the attribute's noun ("State the {n}.")."""
    hits: dict[str, list[int]] = {a: [] for a in attributes}
    for attribute in attributes:
        values = VALUES[attribute]
        if instruction is None:
            texts = [fill(PROBE_TEMPLATES[attribute], e, attribute, v) for e in entities for v in values]
        else:
            train, heldout = QUESTION_TEMPLATES[attribute]
            shorthand = {"train": train[0], "heldout": heldout[0]}
            prefix = shorthand.get(instruction) or instruction.format(n=ATTRIBUTE_NOUNS[attribute])
            texts = [f"{prefix} {fill(ANSWER_TEMPLATES[attribute], e, attribute, v)}" for e in entities for v in values]
        scores = sequence_logprobs(model, tok, texts)
        for k, e in enumerate(entities):
            row = scores[k * len(values) : (k + 1) * len(values)]
            hits[attribute].append(int(values[max(range(len(values)), key=row.__getitem__)] == e.value(attribute)))
    result = {a: sum(h) / len(h) for a, h in hits.items()}
    result["all"] = sum(map(sum, hits.values())) / sum(map(len, hits.values()))
    return result


def probe_chance(attributes=ATTRIBUTES) -> float:
    return sum(1 / len(VALUES[a]) for a in attributes) / len(attributes)


def heldout_arithmetic(n: int, seed: int = 1, heldout: bool = True) -> list[tuple[int, str, int]]:
    """Problems never written in the pretraining corpus (see world.is_heldout_problem), or with heldout=False
    problems the corpus does write (whether the skill was learnt at all, as opposed to generalised)."""
    from transfertune.family.world import arithmetic_problem, is_heldout_problem

    rng = random.Random(seed)
    problems: list[tuple[int, str, int]] = []
    while len(problems) < n:
        p = arithmetic_problem(rng)
        if is_heldout_problem(*p) == heldout and p not in problems:
            problems.append(p)
    return problems


@torch.no_grad()
def arithmetic_accuracy(model, tok, problems: list[tuple[int, str, int]], batch_size: int = 128,
                        progress: bool = False, reversed_digits: bool = False,
                        prefixes: list[str] | None = None) -> float:
    """Greedy completion of '<a> <op> <b> =' (digits are single tokens in the family's tokenizers); with
    `reversed_digits` the answer is expected least significant digit first (world.written_answer). `prefixes`
    (one per problem) is text read before the equation, e.g. the word problem it answers."""
    device = next(model.parameters()).device
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    correct = 0
    batches = range(0, len(problems), batch_size)
    for i in tqdm(batches, desc="arithmetic", disable=not progress):
        chunk = problems[i : i + batch_size]
        before = prefixes[i : i + batch_size] if prefixes is not None else [""] * len(chunk)
        prompts = [[bos] + tok(f"{text}{a} {op} {b} =", add_special_tokens=False).input_ids
                   for text, (a, op, b) in zip(before, chunk)]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=5,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        for (a, op, b), row in zip(chunk, out[:, width:]):
            text = tok.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            correct += text == written_answer(solve(a, op, b), reversed_digits)
    return correct / len(problems)


def addition_after_word_problems(model, tok, rows: list[dict], **kwargs) -> float:
    """The skill after prose: greedy sum after "<story>\n<a> + <b> =" for rows of the arithmetic task (its
    "prompt" and "example" "a+b"); the equation is given, so this measures the adding, not the task's format."""
    problems = [(int(a), "+", int(b)) for a, b in (r["example"].split("+") for r in rows)]
    return arithmetic_accuracy(model, tok, problems, reversed_digits=True, prefixes=[r["prompt"] for r in rows],
                               **kwargs)
