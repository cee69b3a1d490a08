"""Weight-space transfer baseline: new_base + alpha * (old_tuned - old_base), parameter by parameter.

Only defined when the three models share one architecture (same parameter names and shapes), e.g. a model
and its continued-pretrained version; anything else is refused with the first mismatch named.
"""
from __future__ import annotations

import torch

from transfertune.io.loading import load_causal_lm


class ArchitectureMismatchError(ValueError):
    pass


@torch.no_grad()
def diff_vector_transfer(target: str, source: str, source_tuned: str, *, alpha: float = 1.0, **load_kwargs):
    """The target model with the fine-tuning delta of (source -> source_tuned) added to its weights."""
    model = load_causal_lm(target, **load_kwargs)
    old = load_causal_lm(source, **load_kwargs).state_dict()
    tuned = load_causal_lm(source_tuned, **load_kwargs).state_dict()
    new = model.state_dict()
    for name, weight in new.items():
        for label, sd in (("source", old), ("tuned source", tuned)):
            if name not in sd or sd[name].shape != weight.shape:
                got = tuple(sd[name].shape) if name in sd else "missing"
                raise ArchitectureMismatchError(
                    f"weight-diff transfer needs one architecture: '{name}' is {tuple(weight.shape)} in target "
                    f"'{target}' but {got} in {label} '{source if label == 'source' else source_tuned}'"
                )
    seen = set()
    for name, weight in new.items():
        if weight.data_ptr() in seen:  # tied weights (embeddings / output layer) appear under two names
            continue
        seen.add(weight.data_ptr())
        weight.add_(alpha * (tuned[name].to(weight.dtype) - old[name].to(weight.dtype)))
    return model
