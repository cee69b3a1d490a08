"""`transfertune train --labels`: fit a label reward against a frozen base (labels/feature_reward.py).

One pass of the base over the rows gives both what the reward is composed with (its verbaliser scores) and what
it reads (its features), so training costs one forward pass per row plus a second-scale fit."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from transfertune.labels.feature_reward import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LabelReward,
    LabelRewardConfig,
    fit_label_reward,
)
from transfertune.labels.label_data import read_label_rows
from transfertune.labels.label_scores import score_labels


def model_reference(name: str) -> str:
    """How a reward names its backbone: a local path made absolute, anything else (a built-in name) as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_output(output: str | Path, overwrite: bool) -> Path:
    """A reward goes into a new or empty directory, or replaces only a reward's own files with --overwrite."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory")
    present = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    ours = {CONFIG_NAME, WEIGHTS_NAME}
    if present and not overwrite:
        raise ValueError(f"--output {output} is not empty ({', '.join(present[:5])}): choose another directory, or "
                         f"--overwrite to replace a label reward there")
    others = [name for name in present if name not in ours]
    if present and others:
        raise ValueError(f"--output {output} holds files that are not a label reward's ({', '.join(others[:5])}): "
                         f"--overwrite replaces only {CONFIG_NAME} and {WEIGHTS_NAME}; choose another directory")
    return output


def train_label_reward(
    base: str, data: str, output: str, labels: list[str] | None = None, *, calibrate: bool = True,
    feature_layer: int | str = "middle", pool: str = "mean", heldout: float = 0.2, seed: int = 0,
    overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True,
) -> LabelReward:
    from transfertune.io.loading import load_base

    rows = read_label_rows(data, labels, need_labels=True)
    if len(set(rows.examples)) < 5:
        raise ValueError(f"{data}: {len(set(rows.examples))} examples; a label reward needs at least 5 (a fifth "
                         f"of them choose its strength)")
    out = check_output(output, overwrite)
    model, tokenizer = load_base(base, trust_remote_code=trust_remote_code)
    scores = score_labels(model, tokenizer, rows.prompts, rows.choices, feature_layer=feature_layer, pool=pool,
                          progress=progress)
    config = LabelRewardConfig(labels=rows.labels, backbone=model_reference(base), feature_layer=feature_layer,
                               pool=pool, calibrate=calibrate, trained_against=model_reference(base))
    reward = fit_label_reward(scores.features, scores.logprobs, torch.tensor(rows.targets), groups=rows.groups,
                              examples=rows.examples, config=config, heldout=heldout, seed=seed)
    reward.save(out)
    fit = reward.config.fit
    print(f"label reward over {len(rows.labels)} labels fitted on {fit['rows']} rows: scale {reward.config.scale}, "
          f"L2 {reward.config.l2}; held-out NLL {fit['base_heldout_nll']:.3f} (base) -> "
          f"{fit['heldout_nll_by_scale'][reward.config.scale]:.3f} (base + reward)", file=sys.stderr)
    return reward
