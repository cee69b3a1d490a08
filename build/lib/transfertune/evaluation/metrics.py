"""Metrics of a ComposedModel on task examples: held-out response NLL and label accuracy."""
from __future__ import annotations

import torch

from transfertune.inference.composed_model import ComposedModel


def response_nll(cm: ComposedModel, examples: list[dict], batch_size: int = 16, max_length: int | None = None) -> float:
    """Mean per-token NLL of the responses (end-of-sequence token included) given their prompts."""
    lps = cm.score([e["prompt"] for e in examples], [e["response"] for e in examples], add_eos=True,
                   batch_size=batch_size, max_length=max_length)
    return -torch.cat(lps).mean().item()


def choice_scorer(cm: ComposedModel, batch_size: int = 32, max_length: int | None = None):
    """score_fn(prompts, responses) -> total log-prob of each response (+ end-of-sequence) given its prompt."""

    def score_fn(prompts, responses):
        lps = cm.score(prompts, responses, add_eos=True, batch_size=batch_size, max_length=max_length)
        return [float(lp.sum()) for lp in lps]

    return score_fn


def greedy_answers(cm: ComposedModel, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy completions cut at the first newline: the answer of a short-answer (qa) task. A prompt longer
    than the context loses tokens from the left, as it does when scored."""
    gen = cm.generator()
    answers = []
    for i in range(0, len(prompts), batch_size):
        out = gen.generate(prompts[i : i + batch_size], max_new_tokens=max_new_tokens, stop=["\n"],
                           truncate_prompts=True)
        answers.extend(text.strip() for text in out.text)
    return answers


def evaluate_task(cm: ComposedModel, examples: list[dict], kind: str, max_length: int | None = None) -> dict:
    """{"nll", "n"} plus "accuracy" (classification: best-scoring choice) or "exact_match" (qa: greedy answer)."""
    from transfertune.evaluation.tasks import exact_match, label_accuracy

    metrics = {"nll": response_nll(cm, examples, max_length=max_length), "n": len(examples)}
    if kind == "classification":
        metrics["accuracy"] = label_accuracy(examples, choice_scorer(cm, max_length=max_length))
    elif kind == "qa":
        answers = greedy_answers(cm, [e["prompt"] for e in examples])
        metrics["exact_match"] = exact_match(answers, [e["response"] for e in examples])
    return metrics
