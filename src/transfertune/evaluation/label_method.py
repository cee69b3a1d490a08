"""`eval --methods target+label_reward`: a label reward (labels/) fitted against the source on a classification
task's training rows, composed with the target over the label set, as `train --labels` and `classify` do.

It needs one label set: rows that all list the same choices (user data with --labels, or rows carrying the same
"choices"). Tasks whose templates word the labels differently per row (the built-in t0 tasks) are reported as
skipped with the reason; `data/tasks/labels/` holds them mapped onto their label sets for `classify`."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transfertune.evaluation.runner import EvalRunner

METHOD = "target+label_reward"


class NotApplicable(ValueError):
    """The method cannot run on this task; the message says why (the table shows it as skipped)."""


def shared_label_set(rows: list[dict]) -> list[str]:
    first = list(rows[0]["choices"])
    if any(list(r["choices"]) != first for r in rows):
        raise NotApplicable("label rewards need one label set, but the rows' choices differ (templates verbalise "
                            "labels differently): map them onto one label set (data/tasks/labels/, "
                            "`transfertune classify`)")
    return first


def _write(path, rows: list[dict], labels: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "label": labels[r["label"]],
                                        **({"example": r["example"]} if "example" in r else {})}) + "\n"
                            for r in rows))


def label_reward_metrics(runner: EvalRunner, target: str, task: str, examples: list[dict], key: str) -> dict:
    """{"accuracy", "label_nll" (of the right label over the label set: not the response NLL of the other
    methods), "n", "reward_scale"}: fit (cached under `key`) and classify."""
    from transfertune.labels.classify import classify
    from transfertune.labels.feature_reward import CONFIG_NAME, LabelReward
    from transfertune.labels.train_reward import train_label_reward

    if runner.kind(task) != "classification":
        raise NotApplicable(f"label rewards classify; task {task} is {runner.kind(task)}")
    train = runner.rows(task, "train")
    labels = shared_label_set(train + examples)
    where = runner.cache / "label_rewards" / key
    where.mkdir(parents=True, exist_ok=True)
    reward_dir = where / "reward"
    if not (reward_dir / CONFIG_NAME).is_file():
        _write(where / "train.jsonl", train, labels)
        train_label_reward(runner.cfg.source, str(where / "train.jsonl"), str(reward_dir), labels, overwrite=True,
                           seed=runner.cfg.seed, progress=False)
    reward = LabelReward.load(reward_dir)
    _write(where / "heldout.jsonl", examples, labels)
    result = classify(target, str(where / "heldout.jsonl"), [reward], labels=labels, progress=False)
    targets = result.rows.targets
    nll = -sum(float(result.log_probs[i, t]) for i, t in enumerate(targets)) / len(targets)
    return {"accuracy": result.accuracy(), "label_nll": nll if math.isfinite(nll) else None, "n": len(targets),
            "reward_scale": reward.config.scale}
