"""How to build the value model, measured on the built-in family: the design studies of Inverse Value Learning
and Portable Reward Tuning, each variant trained with several seeds (mean and spread reported).

    python scripts/design_study.py design     # connection scheme, initialisation, regularisers, value size, beta
    python scripts/design_study.py budget     # learning-rate sweep of every trained method on a dev split, then
                                              # the main comparison at equal steps, each with its own tuned rate

Every value model is trained on `people_qa`'s training split against a source base and composed, never
fine-tuned, with: the source itself (in distribution), `mini-l` (bigger), `mini-m-v2` (newer) on people every
base read (`heldout_example`), and `mini-m-v2` on people only it read (`heldout_new`). Cells are
`transfertune eval` cells (cached in outputs/eval, shared with `make results`). Each study writes its section of
docs/results.md and a PNG beside it; raw numbers go to outputs/study/<study>.json.

The learning-rate sweep tunes on a dev split carved from the *training* people (by person), never on the
held-out people it then reports.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from transfertune.evaluation.config import EVAL_VALUE_RECIPE, EvalConfig
from transfertune.evaluation.report import write_doc_section
from transfertune.evaluation.runner import EvalRunner
from transfertune.training.recipe import ValueRecipe

ROOT = Path(__file__).resolve().parents[1]

DOCS = ROOT / "docs" / "results.md"
OUT = ROOT / "outputs" / "study"
TASK = "people_qa"
COLUMNS = [  # (name, split, target or None for the source)
    ("in distribution", "heldout_example", None),
    ("bigger: mini-l", "heldout_example", "mini-l"),
    ("newer: mini-m-v2", "heldout_example", "mini-m-v2"),
    ("new people: mini-m-v2", "heldout_new", "mini-m-v2"),
]
VARIANTS = {  # name -> EvalConfig changes; the first is the default every other one differs from in one way
    "residual (default)": {},
    "cascade": {"scheme": "cascade"},
    "init: random": {"init": "random"},
    "init: mini-m (other member)": {"init": "mini-m"},
    "head copied": {"head": "copy"},
    "L1 0.1": {"l1_coef": 0.1},
    "L1 1.0": {"l1_coef": 1.0},
    "entropy 0.01": {"entropy_coef": 0.01},
    "entropy 0.1": {"entropy_coef": 0.1},
    "value smaller than base (mini-s on mini-m)": {"source": "mini-m", "init": "mini-s"},
}
BETAS = [0.5, 1.0, 2.0]


def with_settings(cfg: EvalConfig, **changes) -> EvalConfig:
    """`cfg` with `changes`: ValueRecipe fields go to its value recipe, the others to the config."""
    recipe_fields = set(ValueRecipe.__dataclass_fields__)
    value = cfg.value.with_changes(**{k: v for k, v in changes.items() if k in recipe_fields})
    return replace(cfg, value=value, **{k: v for k, v in changes.items() if k not in recipe_fields})


def base_config(args) -> EvalConfig:
    return EvalConfig(source="mini-s", tasks=[TASK], methods=["target+value"], eval_examples=args.examples,
                      value=EVAL_VALUE_RECIPE.with_changes(max_steps=args.steps),
                      finetune_steps=args.steps, target_steps=args.steps,
                      cache_dir=str(ROOT / "outputs" / "eval"))


def value_cells(cfg: EvalConfig, betas=(1.0,)) -> dict:
    """{(column, beta): row} for one trained value model (one variant, one seed)."""
    cells = {}
    for column, split, target in COLUMNS:
        runner = EvalRunner(replace(cfg, split=split, targets=[target or cfg.source], betas=list(betas)))
        for beta in betas:
            cells[(column, beta)] = runner.cell("target+value", target or cfg.source, TASK, beta)
    return cells


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; inf when a value is, e.g. an NLL of inf)."""
    if any(math.isinf(v) for v in values):
        return math.inf, math.inf
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# -- design ---------------------------------------------------------------------------------------------------
def run_design(args) -> dict:
    base = base_config(args)
    variants = {n: VARIANTS[n] for n in (args.variants or VARIANTS)}
    plan = [(name, seed) for name in variants for seed in args.seeds]
    rows = []
    for name, seed in tqdm(plan, desc="variants x seeds"):
        cfg = with_settings(replace(base, seed=seed), **VARIANTS[name])
        betas = BETAS if name == "residual (default)" else [1.0]
        for (column, beta), row in value_cells(cfg, betas).items():
            rows.append({"variant": name, "seed": seed, "column": column, "beta": beta,
                         "exact_match": row["exact_match"], "nll": row["nll"], "source": cfg.source})
    return {"study": "design", "seeds": args.seeds, "examples": args.examples, "steps": args.steps,
            "variants": variants, "rows": rows}


def aggregate(rows: list[dict], key: str, **match) -> tuple[float, float] | None:
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return mean_spread(vals) if vals else None


def design_table(result: dict) -> str:
    rows = result["rows"]
    head = "| variant | " + " | ".join(c for c, _, _ in COLUMNS) + " | NLL, mini-l |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for name in result["variants"]:
        cells = []
        for column, _, _ in COLUMNS:
            m = aggregate(rows, "exact_match", variant=name, column=column, beta=1.0)
            cells.append("-" if m is None else f"{m[0]:.3f} ± {m[1]:.3f}")
        nll = aggregate(rows, "nll", variant=name, column="bigger: mini-l", beta=1.0)
        cells.append("-" if nll is None else f"{nll[0]:.3f} ± {nll[1]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    beta_lines = ["| beta at inference | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
    for beta in BETAS:
        cells = []
        for column, _, _ in COLUMNS:
            m = aggregate(rows, "exact_match", variant="residual (default)", column=column, beta=beta)
            cells.append("-" if m is None else f"{m[0]:.3f} ± {m[1]:.3f}")
        beta_lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(beta_lines)


def design_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = result["rows"], list(result["variants"])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(COLUMNS)
    for j, (column, _, _) in enumerate(COLUMNS):
        xs = [i + j * width for i in range(len(names))]
        stats = [aggregate(rows, "exact_match", variant=n, column=column, beta=1.0) or (0, 0) for n in names]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2, label=column)
        for x, n in zip(xs, names):
            seeds = [r["exact_match"] for r in rows if r["variant"] == n and r["column"] == column and r["beta"] == 1]
            ax.scatter([x] * len(seeds), seeds, s=6, color="black", zorder=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"exact match ({result['examples']} questions; mean, sd, seeds)")
    ax.set_title("Value-model design: one change from the default each; value model trained on the source, "
                 "composed with each base", fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def design_docs(result: dict, table: str, png: Path) -> None:
    body = f"""## Value-model design: connection, initialisation, regularisers, size, beta

Written by `python scripts/design_study.py design` (raw numbers: `outputs/study/design.json`); do not edit by
hand. ![design](results-design.png)

Each value model: {result['steps']} steps (lr 2e-3, batch 16) on `people_qa` train against `mini-s` (one
row: `mini-m`), seeds {', '.join(map(str, result['seeds']))}; exact match on {result['examples']} held-out
questions, mean ± sd over seeds. Columns: the source + value (in distribution), `mini-l` + value (bigger base),
`mini-m-v2` + value (newer base) on people every base read, and `mini-m-v2` + value on people only it read. Every
row changes one thing from the default (residual scheme, init = the training base, output layer zeroed, no
regulariser, beta 1).

{table}
"""
    write_doc_section(DOCS, "design", body, png)


# -- budget ---------------------------------------------------------------------------------------------------
def dev_task() -> str:
    """people_qa's training split as a user task file: `eval` splits it by person into train and dev."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "people_qa_train.jsonl"
    source = ROOT / "data" / "tasks" / TASK / "train.jsonl"
    if not path.is_file() or path.read_bytes() != source.read_bytes():
        path.write_bytes(source.read_bytes())
    return str(path)


SWEEPS = {  # deployed method -> (config field, learning rates); each is scored on mini-l, as it is deployed
    "target+value": ("learning_rate", [5e-4, 1e-3, 2e-3, 5e-3, 1e-2]),
    "proxy": ("finetune_lr", [5e-5, 2e-4, 1e-3, 3e-3]),
    "target_ft": ("finetune_lr", [2e-5, 5e-5, 2e-4, 1e-3, 3e-3]),
    "target_lora": ("lora_lr", [3e-4, 1e-3, 3e-3, 1e-2]),
}


def run_budget(args) -> dict:
    dev = EvalConfig(source="mini-s", targets=["mini-l"], tasks=[dev_task()], split_by="example",
                     heldout_fraction=0.2, split_seed=0, kind="qa", eval_examples=args.examples,
                     value=EVAL_VALUE_RECIPE.with_changes(max_steps=args.steps),
                     finetune_steps=args.steps, target_steps=args.steps,
                     cache_dir=str(ROOT / "outputs" / "eval"))
    sweep_rows = []
    plan = [(m, lr) for m, (_, lrs) in SWEEPS.items() for lr in lrs]
    for method, lr in tqdm(plan, desc="dev sweep"):
        field, _ = SWEEPS[method]
        runner = EvalRunner(with_settings(dev, **{field: lr}))
        row = runner.cell(method, "mini-l", runner.tasks[0], 1.0)
        sweep_rows.append({"method": method, "lr": lr, "exact_match": row["exact_match"], "nll": row["nll"]})
    best = best_rates(sweep_rows)
    # the held-out comparison: equal steps, each method at its own dev-tuned rate, several seeds
    test = EvalConfig(source="mini-s", targets=["mini-l"], tasks=[TASK], eval_examples=200,
                      value=EVAL_VALUE_RECIPE.with_changes(max_steps=args.steps),
                      finetune_steps=args.steps, target_steps=args.steps,
                      cache_dir=str(ROOT / "outputs" / "eval"))
    lr_of = {"target+value": ("learning_rate", best["target+value"]),
             "source+value": ("learning_rate", best["target+value"]),
             "proxy": ("finetune_lr", best["proxy"]), "source_ft": ("finetune_lr", best["proxy"]),
             "target_ft": ("finetune_lr", best["target_ft"]), "target_lora": ("lora_lr", best["target_lora"]),
             "target": (None, None)}
    test_rows = []
    for method, seed in tqdm([(m, s) for m in lr_of for s in args.seeds], desc="held-out, tuned rates"):
        field, lr = lr_of[method]
        cfg = with_settings(replace(test, seed=seed), **({field: lr} if field else {}))
        row = EvalRunner(cfg).cell(method, "mini-l", TASK, 1.0)
        test_rows.append({"method": method, "seed": seed, "lr": lr, "exact_match": row["exact_match"],
                          "nll": row["nll"], "seconds_per_token": row["seconds_per_token"]})
    return {"study": "budget", "seeds": args.seeds, "steps": args.steps, "dev_examples": args.examples,
            "sweep": sweep_rows, "best_lr": best, "rows": test_rows}


def best_rates(sweep_rows: list[dict]) -> dict:
    """{method: the learning rate with the best dev exact match (ties: the lower dev NLL)}."""
    methods = dict.fromkeys(r["method"] for r in sweep_rows)
    return {m: max((r for r in sweep_rows if r["method"] == m), key=lambda r: (r["exact_match"], -r["nll"]))["lr"]
            for m in methods}


def budget_table(result: dict) -> str:
    lines = ["| method | learning rates tried (dev EM) | chosen |", "|---|---|---|"]
    for method in SWEEPS:
        tried = ", ".join(f"{r['lr']:g} ({r['exact_match']:.2f})" for r in result["sweep"] if r["method"] == method)
        lines.append(f"| {method} | {tried} | {result['best_lr'][method]:g} |")
    rows = result["rows"]
    lines += ["", "| method on mini-l (held-out people) | lr | exact match | NLL |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        em, nll = aggregate(rows, "exact_match", method=method), aggregate(rows, "nll", method=method)
        lr = next(r["lr"] for r in rows if r["method"] == method)
        lines.append(f"| {method} | {'-' if lr is None else format(lr, 'g')} | {em[0]:.3f} ± {em[1]:.3f} "
                     f"| {nll[0]:.3f} ± {nll[1]:.3f} |")
    return "\n".join(lines)


def budget_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in SWEEPS:
        mine = [r for r in result["sweep"] if r["method"] == method]
        a.plot([r["lr"] for r in mine], [r["exact_match"] for r in mine], marker="o", label=method)
    a.set_xscale("log")
    a.set_xlabel("learning rate")
    a.set_ylabel("dev exact match on mini-l (training people held out)")
    a.set_title(f"Learning-rate sweep, {result['steps']} steps each", fontsize=9)
    a.legend(fontsize=8)
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    stats = [aggregate(rows, "exact_match", method=m) for m in methods]
    b.bar(methods, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3)
    for i, m in enumerate(methods):
        seeds = [r["exact_match"] for r in rows if r["method"] == m]
        b.scatter([i] * len(seeds), seeds, s=8, color="black", zorder=3)
    b.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    b.set_title("mini-l, held-out people: each method at its tuned rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_docs(result: dict, table: str, png: Path) -> None:
    body = f"""## Budget-fair baselines: equal steps, each method at its own tuned learning rate

Written by `python scripts/design_study.py budget` (raw numbers: `outputs/study/budget.json`); do not edit by
hand. ![budget](results-budget.png)

Every trained method gets {result['steps']} optimiser steps (batch 16). Learning rates are chosen on a dev split
of `people_qa`'s *training* people (a fifth of them, by person, {result['dev_examples']} questions; the
methods train on the other four fifths), then each method is trained on the full training split at its rate
and scored on the 200 held-out-people questions, seeds {', '.join(map(str, result['seeds']))} (mean ± sd).
Each method's rate is the one whose *deployed* system scores best on dev, on `mini-l`: the value model's by
`mini-l` + value, the source fine-tune's by proxy-tuning `mini-l` with it; source+value and source_ft (the
in-distribution rows) reuse those rates.

{table}
"""
    write_doc_section(DOCS, "budget", body, png)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["design", "budget"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of every trained model (default 300)")
    p.add_argument("--examples", type=int, default=200, help="questions per cell (default 200)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, metavar="NAME",
                   help="design: only these variants (default all)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    args = p.parse_args(argv)
    if args.study == "design":
        result, table_fn, plot_fn, docs_fn = run_design(args), design_table, design_plot, design_docs
    else:
        result, table_fn, plot_fn, docs_fn = run_budget(args), budget_table, budget_plot, budget_docs
    OUT.mkdir(parents=True, exist_ok=True)
    json_path = OUT / f"{args.study}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = table_fn(result)
    print(table)
    png = OUT / f"{args.study}.png"
    plot_fn(result, png)
    if not args.no_docs:
        docs_fn(result, table, png)
    print(f"\nwrote {json_path} and {png}")


if __name__ == "__main__":
    main()
