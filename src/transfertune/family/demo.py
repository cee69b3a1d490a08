"""The main job (`make demo`): post-train once on the smallest built-in model, carry it to the others.

1. Train one value model against frozen `mini-s` on closed-book QA about the family's fictional people and on
   arithmetic word problems (the training splits of `people_qa` and `arithmetic`); on the word problems it
   learns to write the equation and leaves the sum to the base (the rows' "deferred" answers).
2. Compose it with every base of the family (never fine-tuned) and measure each base alone vs composed on
   held-out questions: people the bases read about but the value model was never asked about (also asked in
   phrasings nothing was trained on: the prompt-shift test part), people only the -v2 siblings read about, and
   arithmetic problems no corpus contains (also in new stories). Exact match of the greedy answer and NLL.
3. Print the table; write outputs/demo/results.json and outputs/demo/results.png.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from transfertune.training.recipe import ValueRecipe

DEFAULT_TARGETS = ["mini-s", "mini-m", "mini-l", "mini-m-v2", "mini-l-v2"]
DEFAULT_TASKS = ["people_qa", "arithmetic"]
DEFAULT_EVALS = ["people_qa/heldout_example", "people_qa/shifted_test", "people_qa/heldout_new",
                 "arithmetic/heldout_example", "arithmetic/shifted_test"]
"""shifted_test: the same held-out questions in phrasings and stories nothing was trained or tuned on
(evaluation/builtin_tasks/SHIFTED.md): how much of the transfer survives a user's own wording."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m transfertune.family.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="mini-s", help="training base of the value model (default mini-s)")
    p.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, help="bases to compose with")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                   help=f"tasks whose training splits train the value model (default {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--evals", nargs="+", default=None, metavar="TASK/SPLIT",
                   help=f"held-out sets to report (default {' '.join(DEFAULT_EVALS)}, or the tasks' heldout_example)")
    p.add_argument("--steps", type=int, default=600, help="value-model optimiser steps (default 600)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--augment", type=int, default=ValueRecipe.augment,
                   help="reworded copies of each training prompt (training/augment.py; default %(default)s, the "
                        "recipe chosen by the prompt-shift study, docs/results.md#prompt-shift-study)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (the models' context is 256)")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples per set (default 200)")
    p.add_argument("--out", default="outputs/demo", help="where the value model, JSON and PNG go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update-card", action="store_true",
                   help="write the table into the built-in family's MODEL_CARD.md (\"## Demo results\")")
    p.add_argument("--report-only", action="store_true",
                   help="do not train or evaluate: re-report the results.json already in --out")
    return p.parse_args(argv)


def train_records(tasks: list[str], seed: int) -> list[dict]:
    from transfertune.evaluation.tasks import load_task

    keep = ("prompt", "response", "deferred")  # deferred: the answer a row leaves to the base (data.deferred_tail)
    records = [{k: e[k] for k in keep if k in e} for t in tasks for e in load_task(t, "train")]
    random.Random(seed).shuffle(records)
    return records


def run(args) -> dict:
    from transfertune.core.value_model import ValueModel
    from transfertune.evaluation.metrics import evaluate_task
    from transfertune.evaluation.tasks import TASKS, load_task
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_base
    from transfertune.training.value_trainer import train_value_model

    tasks = args.tasks
    evals = args.evals or (DEFAULT_EVALS if tasks == DEFAULT_TASKS else [f"{t}/heldout_example" for t in tasks])
    out = Path(args.out)
    value_dir = out / "value"
    t0 = time.time()
    print(f"[1/2] training a value model against frozen {args.source} on {len(tasks)} tasks: {', '.join(tasks)}")
    train_value_model(
        args.source, train_records(tasks, args.seed), str(value_dir), max_steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length, seed=args.seed,
        augment=args.augment,
        warmup_steps=max(1, args.steps // 20), logging_steps=max(1, args.steps // 10), weight_decay=0.0,
        overwrite=True,  # the demo's own output directory: re-running the demo replaces its value model
    )
    train_seconds = time.time() - t0
    value = ValueModel.load(value_dir)
    held_out = {e: load_task(*e.split("/"))[: args.eval_examples] for e in evals}

    print(f"[2/2] evaluating {len(args.targets)} bases alone and composed on {', '.join(evals)}")
    rows = []
    for target in args.targets:
        base, tok = load_base(target)
        for mode, values in (("alone", []), ("+value", [value])):
            cm = ComposedModel(base, tok, values, base_name=target)
            for name, examples in held_out.items():
                m = evaluate_task(cm, examples, TASKS[name.split("/")[0]]["kind"], max_length=args.max_length)
                rows.append({"base": target, "mode": mode, "task": name, **m})
                extra = "".join(f" {k} {m[k]:.3f}" for k in ("accuracy", "exact_match") if k in m)
                print(f"  {target:10s} {mode:7s} {name:32s} nll {m['nll']:.3f}{extra}")
    result = {"source": args.source, "targets": args.targets, "tasks": evals, "trained_on": tasks,
              "steps": args.steps, "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.time() - t0, 1), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(format_table(result))
    result["transfer_wins"] = transfer_wins(result)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\nwhere transfer beats both the target alone and the source + value:")
    print("\n".join(f"  {w}" for w in result["transfer_wins"]) or "  none")
    plot(result, out / "results.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'} ({result['total_seconds']:.0f} s in all)")
    return result


def _cell(rows, base, mode, task, key):
    for r in rows:
        if (r["base"], r["mode"], r["task"]) == (base, mode, task) and key in r:
            return r[key]
    return None


def _score(rows, base, mode, task):
    acc = _cell(rows, base, mode, task, "accuracy")
    return acc if acc is not None else _cell(rows, base, mode, task, "exact_match")


def format_table(result: dict) -> str:
    """Markdown table: one row per (task, base), alone vs composed: NLL, and accuracy (or exact match)."""
    lines = ["| task | base | NLL alone | NLL + value | acc/EM alone | acc/EM + value |", "|---|---|---|---|---|---|"]
    rows = result["rows"]
    for task in result["tasks"]:
        for base in result["targets"]:
            vals = [_cell(rows, base, m, task, "nll") for m in ("alone", "+value")]
            vals += [_score(rows, base, m, task) for m in ("alone", "+value")]
            fmt = ["-" if v is None else f"{v:.3f}" for v in vals]
            lines.append(f"| {task} | {base} | {fmt[0]} | {fmt[1]} | {fmt[2]} | {fmt[3]} |")
    return "\n".join(lines)


def transfer_wins(result: dict) -> list[str]:
    """Lines naming (task, target, metric) where target + value beats both the target alone and source + value:
    the value model carried over and the other base added to it."""
    rows, src, wins = result["rows"], result["source"], []
    for task in result["tasks"]:
        for key, lower_better in (("nll", True), ("accuracy", False), ("exact_match", False)):
            src_value = _cell(rows, src, "+value", task, key)
            for base in result["targets"]:
                alone, composed = _cell(rows, base, "alone", task, key), _cell(rows, base, "+value", task, key)
                if base == src or None in (alone, composed, src_value):
                    continue
                better = (lambda a, b: a < b) if lower_better else (lambda a, b: a > b)
                if better(composed, alone) and better(composed, src_value):
                    wins.append(f"{task} {key}: {base} + value {composed:.3f} beats {base} alone {alone:.3f} "
                                f"and {src} + value {src_value:.3f}")
    return wins


def update_model_card(result: dict, card: Path) -> None:
    """Replace the "## Demo results" section of the built-in family's MODEL_CARD.md with this run."""
    text = card.read_text() if card.is_file() else ""
    text = text.split("\n## Demo results")[0].rstrip("\n")
    wins = "\n".join(f"- {w}" for w in result["transfer_wins"]) or "- none"
    card.write_text(f"""{text}

## Demo results

Written by `make demo` (`python -m transfertune.family.demo`): one value model trained for {result['steps']} steps on
`{result['source']}` over the training splits of {', '.join(result['trained_on'])} ({result['train_seconds']:.0f} s),
then composed with each base, never fine-tuned. Rows are held-out sets (task/split); NLL is per response token
(end-of-sequence included); acc/EM is label accuracy (classification) or exact match of the greedy answer (qa).
Total {result['total_seconds']:.0f} s on 2 CPU cores. Plot: `demo_results.png`.

{format_table(result)}

Where the transferred value model beats both the target alone and the source + value:
{wins}
""")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, targets, rows = result["tasks"], result["targets"], result["rows"]
    panels = []
    for t in tasks:
        key = next((k for k in ("exact_match", "accuracy") if _cell(rows, targets[0], "alone", t, k) is not None),
                   "nll")
        panels.append((key, t, {"nll": "held-out NLL (lower is better)", "accuracy": "label accuracy",
                                "exact_match": "exact match"}[key]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    x = range(len(targets))
    for ax, (key, task, label) in zip(axes[0], panels):
        for i, mode in enumerate(("alone", "+value")):
            vals = [_cell(rows, b, mode, task, key) or 0 for b in targets]
            ax.bar([xi + (i - 0.5) * 0.38 for xi in x], vals, width=0.38, label=f"base {mode}" if mode == "alone" else
                   f"base + value ({result['source']})")
        ax.set_xticks(list(x), targets, rotation=30, fontsize=8)
        ax.set_title(f"{task}\n{label}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transfertune.io.loading import builtin_model_names

    missing = [m for m in [args.source, *args.targets] if m not in builtin_model_names()]
    if missing:
        print(f"built-in models missing: {', '.join(missing)}; build them with `make family`")
        return 2
    if args.report_only:
        result = json.loads((Path(args.out) / "results.json").read_text())
        result["transfer_wins"] = transfer_wins(result)
        print(format_table(result))
        print("\n".join(result["transfer_wins"]))
    else:
        result = run(args)
    if args.update_card:
        import shutil

        from transfertune.io.loading import builtin_models_dir

        update_model_card(result, builtin_models_dir() / "MODEL_CARD.md")
        shutil.copy(Path(args.out) / "results.png", builtin_models_dir() / "demo_results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
