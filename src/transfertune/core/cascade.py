"""The cascade connection of Inverse Value Learning: the value model also reads the base's belief.

Residual (the default): the value model sees only the tokens, v = V(x, y_<t), and runs beside the base.
Cascade: its input embedding at each position t adds the expected next-token embedding under the base,

    e_t = E_value[y_t] + softmax(base_logits_t) @ E_value

so v depends on which base it is composed with; at inference the base runs first at every step (sequential,
no overlap), and a draft base cannot lend its value logits to a verifier (speculative decoding refuses it).
The composition itself (compose.py) is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from transfertune.core.choices import SCHEMES  # noqa: E402,F401 (re-exported)
from transfertune.core.compose import match_vocab_size


def cascade_embeddings(model, input_ids: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, H] of a cascade value model: token embedding + softmax(base logits) @ E."""
    embed = model.get_input_embeddings()
    weight = embed.weight
    if base_logits.shape[:2] != input_ids.shape:
        raise ValueError(f"cascade: base logits {tuple(base_logits.shape[:2])} do not cover the value model's "
                         f"input {tuple(input_ids.shape)}")
    probs = match_vocab_size(base_logits.float().softmax(-1), weight.shape[0])
    return embed(input_ids) + (probs.to(device=weight.device, dtype=weight.dtype) @ weight)


class CascadeValue(nn.Module):
    """A value LM run with `base_logits` (the base's logits at the same positions) as a required input."""

    needs_base_logits = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, base_logits=None, **kwargs):
        if base_logits is None:
            raise ValueError("a cascade value model needs the base's logits at its input positions")
        return self.model(inputs_embeds=cascade_embeddings(self.model, input_ids, base_logits), **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.get_input_embeddings().weight.device


def needs_base_logits(model) -> bool:
    return bool(getattr(model, "needs_base_logits", False))
