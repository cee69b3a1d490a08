"""Sampling rules: turn one step's logits [B, V] into next tokens [B]. No model code here."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        from transfertune.io.validate import check_number, check_optional

        check_number(self.temperature, "temperature", ge=0)
        check_number(self.top_p, "top_p", gt=0, le=1)
        check_number(self.top_k, "top_k", integer=True, ge=0)
        check_optional(self.seed, "seed", integer=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device="cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus); removed tokens get -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always survives, whatever rounding does to top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    if not torch.isfinite(probs).all():  # nothing left to sample from (e.g. every logit -inf): take the argmax
        return logits.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """`sample_next` with its own parameters (and seeded generator) for each row of a batch."""
    tokens = logits.argmax(-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = sample_next(logits[row : row + 1], p, gen)[0]
    return tokens
