"""Composed log-probabilities over whole (prompt, response) sequences.

Training and `ComposedModel.score` both call `composed_response_logits`, so the distribution a value
model is trained on is, by construction, the one it is scored and sampled from.
Only response positions are kept: logits are gathered to [N, V] (N = response tokens in the batch) as soon
as each model has run, so no model's full [B, T, V] tensor outlives its own forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compose import compose_logits
from .data import IGNORE_INDEX


@dataclass
class ResponseLogits:
    composed: torch.Tensor  # [N, V] composed logits at each response position
    targets: torch.Tensor  # [N] the token that follows
    values: list[torch.Tensor]  # [N, V] raw value logits, one per value model (for regularisers)
    rows: torch.Tensor  # [N] batch row of each position


def response_positions(labels: torch.Tensor):
    """(rows, cols, targets): logits at (row, col) predict labels[row, col + 1]."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def logits_at(model, input_ids, attention_mask, rows, cols) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[:, :-1][rows, cols]


def composed_response_logits(
    base,
    values,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights=None,
    beta: float = 1.0,
    proxy=None,
    alpha: float = 1.0,
    vocab_maps=None,
    real_vocab_size: int | None = None,
) -> ResponseLogits:
    """Run every model over the batch and compose at response positions.

    The base (and the proxy pair) run under no_grad; value models keep their graph when grad is enabled.
    """
    rows, cols, targets = response_positions(labels)
    with torch.no_grad():
        base_logits = logits_at(base, input_ids, attention_mask, rows, cols)
        proxy_logits = None
        if proxy is not None:
            proxy_logits = tuple(logits_at(m, input_ids, attention_mask, rows, cols) for m in proxy)
    value_logits = [logits_at(v, input_ids, attention_mask, rows, cols) for v in values]
    composed = compose_logits(
        base_logits,
        value_logits,
        weights=weights,
        beta=beta,
        vocab_maps=vocab_maps,
        proxy=proxy_logits,
        alpha=alpha,
        real_vocab_size=real_vocab_size,
    )
    return ResponseLogits(composed, targets, value_logits, rows)
