"""A label reward on a frozen LM's features, fitted through the composition (Portable Reward Tuning over labels).

    log p(label | x) = log_softmax( base(x) + scale * r(x) ),    r(x) = W standardise(f(x)) + b

f(x): the prompt's features from a frozen backbone LM (by default the base the reward is trained against).
r is fitted by cross-entropy *through* the composition with the frozen source base, so it learns what the base
lacks, not what it already knows. Three things keep it from hurting a base it was not trained with:
- the base's own prior over the labels is taken out (`label_scores.calibrate`) before composing, so the reward
  does not learn to undo one base's label bias and then apply that correction to another base;
- the L2 strength is chosen on a held-out part of the training rows (grouped by example, so a row's other
  templates never land on both sides);
- so is `scale` in [0, 1]: the smallest scale whose held-out NLL is within one standard error of the best
  (the one-standard-error rule). Scale 0 is the base alone, so a reward whose held-out gain is within noise is
  switched off instead of adding noise to every base it is carried to.
Everything is fitted full-batch on cached features: seconds on a CPU.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transfertune.core.compose import compose_logits

CONFIG_NAME = "label_reward.json"
WEIGHTS_NAME = "label_reward.safetensors"
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
SCALE_GRID = tuple(i / 10 for i in range(11))


@dataclass
class LabelRewardConfig:
    labels: list[str]
    backbone: str  # the LM whose features the reward reads (a path or built-in name)
    feature_layer: int | str = "middle"  # probes read middle layers best (chosen on the dev splits)
    pool: str = "mean"
    calibrate: bool = True
    scale: float = 1.0
    l2: float = 1e-2
    trained_against: str | None = None
    fit: dict = field(default_factory=dict)  # held-out NLL per L2 and per scale, sizes: how the choice was made


class FeatureReward(nn.Module):
    """r(x) = W (f - mean) / std + b over the label set."""

    def __init__(self, dim: int, n_labels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.head = nn.Linear(dim, n_labels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features.float() - self.mean) / self.std)


class LabelReward:
    """A fitted `FeatureReward` with its config; `compose` applies it to any base's label scores."""

    def __init__(self, config: LabelRewardConfig, model: FeatureReward):
        self.config, self.model = config, model.eval()

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @torch.no_grad()
    def rewards(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def compose(self, base_scores: torch.Tensor, features: torch.Tensor, groups: Sequence,
                scale: float | None = None) -> torch.Tensor:
        """log p(label | x) of a base's verbaliser scores [B, L] composed with this reward."""
        scale = self.config.scale if scale is None else scale
        return composed_label_logits(base_scores, groups, self.config.calibrate, [self.rewards(features)], [scale])

    def save(self, directory: str | Path) -> None:
        """Only what was trained: the head (safetensors) and the config naming the backbone, each file written
        atomically, the config last (a directory with a config is complete)."""
        from safetensors.torch import save

        from transfertune.io.run_dirs import write_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / WEIGHTS_NAME, save({k: v.contiguous() for k, v in self.model.state_dict().items()}))
        write_atomic(directory / CONFIG_NAME, json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> LabelReward:
        from safetensors.torch import load_file

        from transfertune.io.validate import check_safetensors, read_json_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} is not a label reward directory: {CONFIG_NAME} is missing")
        raw = read_json_file(directory / CONFIG_NAME, "label reward config")
        try:
            config = LabelRewardConfig(**raw)
        except TypeError as err:
            raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None
        check_safetensors(directory / WEIGHTS_NAME)
        state = load_file(str(directory / WEIGHTS_NAME))
        weight = state.get("head.weight")
        if weight is None or weight.dim() != 2 or weight.shape[0] != len(config.labels):
            raise ValueError(f"{directory / WEIGHTS_NAME} does not hold a head for the {len(config.labels)} labels "
                             f"of {CONFIG_NAME}")
        model = FeatureReward(weight.shape[1], len(config.labels))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME}: missing {missing}, unexpected {unexpected}")
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            raise ValueError(f"{directory / WEIGHTS_NAME} holds non-finite weights")
        return cls(config, model)


def composed_label_logits(base_scores: torch.Tensor, groups: Sequence, calibrate: bool,
                          rewards: Sequence[torch.Tensor] = (), weights: Sequence[float] | None = None):
    """`compose_logits` over the label set: the base's label log-probs (calibrated or not) plus weighted rewards."""
    from transfertune.labels.label_scores import calibrate as take_out_prior
    from transfertune.labels.label_scores import label_log_probs

    base = take_out_prior(base_scores, groups) if calibrate else label_log_probs(base_scores)
    return compose_logits(base, list(rewards), weights=weights)


def heldout_split(groups: Sequence, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (fit, held out): a seeded `fraction` of the groups (examples) held out, at least one each."""
    keys = sorted(set(groups), key=str)
    random.Random(seed).shuffle(keys)
    n = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    held = set(keys[:n])
    return [i for i, g in enumerate(groups) if g not in held], [i for i, g in enumerate(groups) if g in held]


def fit_head(features: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, l2: float,
             steps: int = 200) -> FeatureReward:
    """Minimise CE(log_softmax(base + r(f)), label) + l2/2 |W|^2 with L-BFGS on the full batch."""
    model = FeatureReward(features.shape[1], base.shape[1])
    model.mean.copy_(features.mean(0))
    model.std.copy_(features.std(0).clamp_min(1e-6))
    opt = torch.optim.LBFGS(model.head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(base + model(features), labels) + 0.5 * l2 * model.head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval().requires_grad_(False)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits, labels))


def one_standard_error_choice(per_row: dict[float, torch.Tensor]) -> float:
    """The smallest key whose mean loss is within one standard error (of its per-row difference from the best
    key's) of the best mean loss."""
    best = min(per_row, key=lambda k: (float(per_row[k].mean()), k))
    for k in sorted(per_row):
        diff = per_row[k] - per_row[best]
        se = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if float(diff.mean()) <= se:
            return k
    return best


def fit_label_reward(
    features: torch.Tensor, base_scores: torch.Tensor, labels: torch.Tensor, *, groups: Sequence,
    examples: Sequence, config: LabelRewardConfig, heldout: float = 0.2, seed: int = 0,
) -> LabelReward:
    """Fit the reward against a base's verbaliser scores; L2 and scale chosen on held-out examples (see above).
    `groups`: each row's verbaliser set (for calibration); `examples`: each row's example id (for the split)."""
    base = (composed_label_logits(base_scores, groups, config.calibrate))
    fit_rows, held_rows = heldout_split(examples, heldout, seed)
    fit_idx, held_idx = torch.tensor(fit_rows), torch.tensor(held_rows)
    by_l2 = {}
    for l2 in L2_GRID:
        head = fit_head(features[fit_idx], base[fit_idx], labels[fit_idx], l2)
        with torch.no_grad():
            by_l2[l2] = nll(base[held_idx] + head(features[held_idx]), labels[held_idx])
    l2 = min(by_l2, key=lambda k: (by_l2[k], -k))
    head = fit_head(features[fit_idx], base[fit_idx], labels[fit_idx], l2)
    with torch.no_grad():
        held_rewards = head(features[held_idx])
    per_row = {s: F.cross_entropy(base[held_idx] + s * held_rewards, labels[held_idx], reduction="none")
               for s in SCALE_GRID}
    by_scale = {s: float(v.mean()) for s, v in per_row.items()}
    scale = one_standard_error_choice(per_row)
    final = fit_head(features, base, labels, l2)
    fit = {"rows": len(labels), "heldout_rows": len(held_rows), "heldout_nll_by_l2": by_l2,
           "heldout_nll_by_scale": by_scale, "base_heldout_nll": by_scale[0.0]}
    if not all(math.isfinite(v) for v in by_l2.values()):
        raise ValueError("the reward fit diverged (non-finite held-out loss)")
    config = LabelRewardConfig(**{**asdict(config), "l2": l2, "scale": scale, "fit": fit})
    return LabelReward(config, final)
