"""Metrics of a ComposedModel on task examples: held-out response NLL and label accuracy."""
from __future__ import annotations

import torch

from .composed import ComposedModel


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


def evaluate_task(cm: ComposedModel, examples: list[dict], kind: str, max_length: int | None = None) -> dict:
    """{"nll": ..., "accuracy": ... (classification only)} on `examples`."""
    from .tasks import label_accuracy

    metrics = {"nll": response_nll(cm, examples, max_length=max_length), "n": len(examples)}
    if kind == "classification":
        metrics["accuracy"] = label_accuracy(examples, choice_scorer(cm, max_length=max_length))
    return metrics
