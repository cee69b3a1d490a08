"""`transfertune classify`: any base over a label set, alone (zero-shot) or composed with label rewards.

The base scores each row's verbalisers with its own tokenizer; a reward reads its own backbone's features. Only
the label set has to be shared, so a reward fitted against one model composes with another size, another
tokenizer or another family."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from transfertune.labels.feature_reward import LabelReward, composed_label_logits
from transfertune.labels.label_data import LabelRows, read_label_rows
from transfertune.labels.label_scores import score_labels

MIN_CALIBRATION_ROWS = 16


@dataclass
class Classified:
    rows: LabelRows
    log_probs: torch.Tensor  # [B, L]

    @property
    def predictions(self) -> list[int]:
        return self.log_probs.argmax(-1).tolist()

    def accuracy(self) -> float | None:
        if not self.rows.labelled():
            return None
        return sum(p == t for p, t in zip(self.predictions, self.rows.targets)) / len(self.predictions)


def label_set_of(rewards: list[LabelReward], labels: list[str] | None) -> list[str] | None:
    """The rewards' shared label set (checked against --labels when both are given)."""
    if not rewards:
        return labels
    first = rewards[0].labels
    for r in rewards[1:]:
        if r.labels != first:
            raise ValueError(f"the label rewards have different label sets: {first} and {r.labels}")
    if labels and list(labels) != first:
        raise ValueError(f"--labels {' '.join(labels)} differs from the reward's label set {' '.join(first)}")
    return first


def classify(
    base: str, data: str, rewards: list[LabelReward] = (), *, labels: list[str] | None = None,
    calibrate: bool | None = None, backbone: str | None = None, trust_remote_code: bool = False,
    progress: bool = True,
) -> Classified:
    """Label log-probs of every row of `data` under `base` composed with `rewards` (none: zero-shot).
    `calibrate` defaults to the rewards' setting (on without rewards); `backbone` overrides where the rewards'
    backbone LM is found (it moved since training)."""
    from transfertune.io.loading import load_base
    from transfertune.labels.train_reward import model_reference

    rewards = list(rewards)
    rows = read_label_rows(data, label_set_of(rewards, labels))
    if calibrate is None:
        calibrate = rewards[0].config.calibrate if rewards else True
    if calibrate:
        warn_small_groups(rows)
    model, tokenizer = load_base(base, trust_remote_code=trust_remote_code)
    needs = {(r.config.feature_layer, r.config.pool, backbone or r.config.backbone) for r in rewards}
    same = [n for n in needs if model_reference(n[2]) == model_reference(base)]
    first = same[0] if same else None
    scores = score_labels(model, tokenizer, rows.prompts, rows.choices, progress=progress,
                          feature_layer=first[0] if first else None, pool=first[1] if first else "mean")
    features = {first: scores.features} if first else {}
    for need in needs - set(features):
        layer, pool, name = need
        other, other_tok = load_base(name, trust_remote_code=trust_remote_code)
        features[need] = score_labels(other, other_tok, rows.prompts, rows.choices, feature_layer=layer, pool=pool,
                                      progress=progress).features
    reward_logits = [r.rewards(features[(r.config.feature_layer, r.config.pool, backbone or r.config.backbone)])
                     for r in rewards]
    log_probs = composed_label_logits(scores.logprobs, rows.groups, calibrate, reward_logits,
                                      [r.config.scale for r in rewards])
    return Classified(rows, torch.log_softmax(log_probs, dim=-1))


def warn_small_groups(rows: LabelRows) -> None:
    sizes = {}
    for g in rows.groups:
        sizes[g] = sizes.get(g, 0) + 1
    small = [g for g, n in sizes.items() if n < MIN_CALIBRATION_ROWS]
    if small:
        print(f"warning: calibration estimates the base's prior over the labels from the rows themselves; "
              f"{len(small)} verbaliser set(s) have fewer than {MIN_CALIBRATION_ROWS} rows (e.g. "
              f"{' / '.join(small[0])}), so their prior is rough: classify more rows together, or --no-calibrate",
              file=sys.stderr)


def write_predictions(result: Classified, path: str | Path) -> None:
    import json

    from transfertune.io.run_dirs import write_atomic

    labels = result.rows.labels
    lines = []
    for i, pred in enumerate(result.predictions):
        row = {"prediction": labels[pred],
               "probabilities": {lab: round(float(p), 6) for lab, p in zip(labels, result.log_probs[i].exp())}}
        if result.rows.targets[i] is not None:
            row["label"] = labels[result.rows.targets[i]]
        lines.append(json.dumps(row))
    write_atomic(path, "\n".join(lines) + "\n")
