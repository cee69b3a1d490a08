"""Portable reward tuning over label sets, measured: \
`python -m transfertune.family.label_demo [--docs docs/results.md]`.

digits  scikit-learn's bundled 8x8 digits (real scans, 1,797 images). An MLP and a CNN are pre-trained on
        clean digits; the post-training task is noisy, shifted scans. A reward model is tuned against the frozen
        MLP, then composed with the frozen CNN, and compared with the CNN fine-tuned on the same data and with
        proxy-tuning (CNN + (MLP_ft - MLP)).
text    the built-in family as zero-shot classifiers over verbalised labels: the decade each of the family's
        people was born in (birth_decade; the bases know the year from pretraining, mini-s a third of them,
        mini-l nearly all), or t0 tasks (every base is at chance there). A reward model on mini-s's body is tuned
        against mini-s and composed with the other bases (mini-x too: label-level composition needs no token
        map); held-out people, and people only the -v2 siblings read about.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transfertune.core.compose import compose_logits
from transfertune.labels.label_reward import (
    ComposedClassifier,
    LabelValueModel,
    LMLabelClassifier,
    TextRewardBackbone,
    train_label_value,
)


# -- digits -------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden: int = 32, out: int = 10, zero_head: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, out))
        if zero_head:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, pixels, **_):
        return self.net(pixels)


class CNN(nn.Module):
    def __init__(self, out: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * 4 * 4, out)

    def forward(self, pixels, **_):
        return self.head(self.features(pixels).flatten(1))


def digits_splits(seed: int = 0, noise: float = 0.15):
    """Clean pre-training digits; shifted, noisy post-training and test digits (pixel range 0-1)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.images[order] / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target[order])
    pre, post, test = slice(0, 700), slice(700, 1100), slice(1100, None)

    def corrupt(imgs):  # the new domain: scans one pixel to the right, with sensor noise
        gen = torch.Generator().manual_seed(seed + len(imgs))
        shifted = torch.roll(imgs, shifts=1, dims=3)
        return (shifted + noise * torch.randn(shifted.shape, generator=gen)).clamp(0, 1.5)

    return (x[pre], y[pre]), (corrupt(x[post]), y[post]), (corrupt(x[test]), y[test])


def _records(x, y, extra: dict | None = None) -> list[dict]:
    return [{"pixels": x[i], "labels": int(y[i]), **({k: v[i] for k, v in extra.items()} if extra else {})}
            for i in range(len(y))]


def _supervised(model: nn.Module, x, y, out: Path, steps: int, lr: float) -> nn.Module:
    """Plain supervised training through the same trainer (no classifier = nothing to compose with)."""
    wrapped = LabelValueModel(model, 10)
    train_label_value(wrapped, None, _records(x, y), str(out), max_steps=steps, learning_rate=lr, batch_size=64,
                      disable_tqdm=True)
    return model.eval()


def _acc(logits: torch.Tensor, y) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def run_digits(out: Path, steps: int = 300, seed: int = 0) -> dict:
    import copy

    torch.manual_seed(seed)
    (xa, ya), (xb, yb), (xt, yt) = digits_splits(seed)
    mlp = _supervised(MLP(), xa, ya, out / "mlp", steps, 3e-3)
    cnn = _supervised(CNN(), xa, ya, out / "cnn", steps, 3e-3)
    with torch.no_grad():
        mlp_b = mlp(xb)
    reward = LabelValueModel(MLP(hidden=64, zero_head=True), 10)
    train_label_value(reward, mlp, _records(xb, yb, {"classifier_logits": mlp_b}), str(out / "reward"),
                      max_steps=steps, learning_rate=3e-3, batch_size=64, disable_tqdm=True)
    mlp_ft = _supervised(copy.deepcopy(mlp).train(), xb, yb, out / "mlp_ft", steps, 3e-3)
    cnn_ft = _supervised(copy.deepcopy(cnn).train(), xb, yb, out / "cnn_ft", steps, 3e-3)
    inputs = {"pixels": xt}
    rows = []
    with torch.no_grad():
        for name, clf, ft in (("MLP (source)", mlp, mlp_ft), ("CNN (target)", cnn, cnn_ft)):
            proxy = compose_logits(clf(xt), proxy=(mlp_ft(xt), mlp(xt)))
            rows.append({
                "classifier": name,
                "alone": _acc(clf(xt), yt),
                "+ reward": _acc(ComposedClassifier(clf, [reward]).logits(inputs), yt),
                "proxy (EFT)": _acc(proxy, yt),
                "fine-tuned": _acc(ft(xt), yt),
            })
    return {"task": "digits", "n_test": len(yt), "rows": rows,
            "note": "pre-trained on 700 clean digits; post-training: 400 noisy, shifted digits; test: 697 more"}


# -- text ---------------------------------------------------------------------------------------------
def _label_records(task: str, split: str, limit: int | None = None) -> list[dict]:
    from transfertune.evaluation.tasks import load_task

    rows = load_task(task, split)[:limit]
    return [{"prompt": r["prompt"], "choices": list(r["choices"]), "labels": int(r["label"])} for r in rows]


def _zero_shot_logits(base: str, records: list[dict]) -> torch.Tensor:
    from transfertune.inference.composed_model import ComposedModel

    clf = LMLabelClassifier(ComposedModel.from_pretrained(base))
    out = []
    for i in range(0, len(records), 64):
        batch = records[i : i + 64]
        out.append(clf(prompt=[r["prompt"] for r in batch], choices=[r["choices"] for r in batch]))
    return torch.cat(out)


DECADES = [f"{d}s" for d in range(1900, 2000, 10)]


def birth_decade_records(generation: str, people: str = "all") -> list[dict]:
    """The family's people as a 10-way label set: "<name> was born in" -> " 1960s" etc. A base that read the
    person's biographies gives the true decade's digits a high likelihood zero-shot; the reward has to learn
    the rest (the decade's "0s", which no biography writes). people = "train" (people_qa's training people),
    "heldout" (the other v1 people) or "all"."""
    from transfertune.evaluation.tasks import load_task

    trained = {r["example"] for r in load_task("people_qa", "train")}
    rows = []
    for e in load_world_people(generation):
        if people != "all" and (e.name in trained) != (people == "train"):
            continue
        rows.append({"prompt": f"{e.name} was born in", "choices": [f" {d}" for d in DECADES],
                     "labels": DECADES.index(f"{int(e.birth_year) // 10 * 10}s")})
    return rows


def load_world_people(generation: str):
    from transfertune.family.world import load_world
    from transfertune.io.locations import world_file

    return [e for e in load_world(world_file()) if e.generation == generation]


def _text_splits(task: str, examples: int | None) -> tuple[list[dict], dict[str, list[dict]], int]:
    """(train records, {test set name: records}, number of labels) of a t0 task or the world's birth decades."""
    if task == "birth_decade":
        tests = {"held-out people": birth_decade_records("v1", "heldout")[:examples],
                 "new people (v2)": birth_decade_records("v2")[:examples]}
        return birth_decade_records("v1", "train"), tests, len(DECADES)
    train = _label_records(task, "train")
    return train, {"held out": _label_records(task, "heldout_example", examples)}, len(train[0]["choices"])


def run_text(out: Path, task: str, source: str = "mini-s", targets=("mini-s", "mini-m", "mini-l", "mini-x"),
             steps: int = 200, examples: int | None = None, seed: int = 0, learning_rate: float = 1e-4) -> dict:
    train, tests, n_labels = _text_splits(task, examples)
    base_train = _zero_shot_logits(source, train)
    reward = LabelValueModel(TextRewardBackbone.from_pretrained(source, n_labels), n_labels)
    train_label_value(reward, None, [dict(r, classifier_logits=base_train[i]) for i, r in enumerate(train)],
                      str(out / f"reward-{task}"), max_steps=steps, learning_rate=learning_rate, batch_size=16,
                      seed=seed, disable_tqdm=True)
    rows = []
    for split, test in tests.items():
        y = torch.tensor([r["labels"] for r in test])
        prompts, choices = [r["prompt"] for r in test], [r["choices"] for r in test]
        with torch.no_grad():
            rewards = torch.cat([reward(prompt=prompts[i : i + 32], choices=choices[i : i + 32])
                                 for i in range(0, len(test), 32)])
        for target in targets:
            zs = _zero_shot_logits(target, test)
            rows.append({"classifier": target if len(tests) == 1 else f"{target}, {split}", "alone": _acc(zs, y),
                         "+ reward": _acc(compose_logits(zs, [rewards]), y), "reward alone": _acc(rewards, y)})
    n_test = " + ".join(str(len(t)) for t in tests.values())
    return {"task": task, "n_test": n_test, "rows": rows,
            "note": f"reward model: {source} body + {n_labels}-way head, {steps} steps (lr {learning_rate:g}) "
                    f"against {source} zero-shot on {len(train)} training examples"}


# -- report -------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    cols = [k for k in result["rows"][0] if k != "classifier"]
    lines = [f"| classifier | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['classifier']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in result["rows"]]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        cols = [k for k in res["rows"][0] if k != "classifier"]
        width = 0.8 / len(cols)
        for j, col in enumerate(cols):
            ax.bar([i + j * width for i in range(len(res["rows"]))], [r[col] for r in res["rows"]], width, label=col)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(res["rows"]))], [r["classifier"] for r in res["rows"]],
                      fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{res['task']}: test accuracy", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/labels")
    p.add_argument("--steps", type=int, default=300, help="training steps of every digits model")
    p.add_argument("--text-steps", type=int, default=200)
    p.add_argument("--text-tasks", nargs="*", default=["birth_decade"],
                   help="birth_decade (the family's people, 10 decades; default) and/or t0 tasks such as "
                        "amazon_polarity ag_news (every built-in base is at chance on those)")
    p.add_argument("--targets", nargs="+", default=["mini-s", "mini-m", "mini-l", "mini-m-v2"])
    p.add_argument("--text-lr", type=float, default=1e-4, help="learning rate of the text reward model")
    p.add_argument("--examples", type=int, default=None, help="held-out text examples per task (default all)")
    p.add_argument("--docs", default=None, metavar="MD", help="write the tables as a section of this markdown file")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_digits(out, args.steps)]
    results += [run_text(out, t, targets=args.targets, steps=args.text_steps, examples=args.examples,
                         learning_rate=args.text_lr) for t in args.text_tasks]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "results.png")
    body = "\n\n".join(f"### {r['task']} ({r['n_test']} test examples)\n\n{r['note']}.\n\n{format_table(r)}"
                       for r in results)
    print(body)
    if args.docs:
        from transfertune.evaluation.report import write_doc_section

        command = " ".join(["python -m transfertune.family.label_demo", *(sys.argv[1:] if argv is None else argv)])
        write_doc_section(Path(args.docs), "labels", "## Portable reward tuning over label sets\n\n"
                          f"Written by `{command}`. ![labels](results-labels.png)\n\n{body}", out / "results.png")


if __name__ == "__main__":
    main()
