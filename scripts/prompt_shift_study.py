"""What makes a value model hold up under prompt shift (issue #26), measured on the DEV part only.

    python scripts/prompt_shift_study.py                  # every variant x 3 seeds, 2 worker processes
    python scripts/prompt_shift_study.py --report-only    # rewrite the table/plot from the cached cells

Every variant trains on the demo's rows (people_qa + arithmetic training splits) against frozen mini-s and is
composed, never fine-tuned, with mini-l. Each cell is exact match on: people_qa and arithmetic `heldout_example`
(the project's phrasings/stories: in distribution) and their `shifted_dev` (phrasings/stories nothing was trained
on; builtin_tasks/SHIFTED.md). `shifted_test` is never read here. The variants change the current recipe in one
way each (init and size, scheme, regularisers, learning rate and steps, prompt augmentation), and "beta x" are
the default value models composed at another beta. The LoRA rows fine-tune mini-l itself on the same rows (the
oracle; with augmentation, on the same augmented rows). Trained models and cells are cached in --out, so an
interrupted run resumes where it stopped. Writes the section `prompt-shift-study` of docs/results.md and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "prompt-shift-study"
TARGET, SOURCE = "mini-l", "mini-s"
CURRENT = {"max_steps": 600, "learning_rate": 2e-3, "batch_size": 16, "max_length": 256, "warmup_steps": 30,
           "augment": 0, "logging_steps": 60}
VARIANTS = {  # name -> (method, recipe changes, inference beta)
    "current recipe": ("value", {}, 1.0),
    "augment 1": ("value", {"augment": 1}, 1.0),
    "LoRA mini-l (oracle)": ("lora", {}, 1.0),
    "200 steps": ("value", {"max_steps": 200, "warmup_steps": 10, "logging_steps": 20}, 1.0),
    "lr 5e-4": ("value", {"learning_rate": 5e-4}, 1.0),
    "L1 0.1": ("value", {"l1_coef": 0.1}, 1.0),
    "init mini-m (bigger value model)": ("value", {"init": "mini-m"}, 1.0),
    "cascade": ("value", {"scheme": "cascade"}, 1.0),
    "augment 3": ("value", {"augment": 3}, 1.0),
    "augment 2": ("value", {"augment": 2}, 1.0),
    "augment 1, 1200 steps": ("value", {"augment": 1, "max_steps": 1200, "warmup_steps": 60,
                                        "logging_steps": 120}, 1.0),
    "augment 1, lr 1e-3": ("value", {"augment": 1, "learning_rate": 1e-3}, 1.0),
    "augment 1 + init mini-m": ("value", {"augment": 1, "init": "mini-m"}, 1.0),
    "LoRA mini-l, augment 1": ("lora", {"augment": 1}, 1.0),
    "beta 0.5 at inference": ("value", {}, 0.5),  # after the others: they reuse the current recipe's models
    "beta 2 at inference": ("value", {}, 2.0),
    # people_qa answers left to the base, as the sums are (the rows' "deferred" tail): the value model carries
    # the relation phrase only
    "people answers deferred": ("value", {"defer_people": True}, 1.0),
    "augment 1 + people answers deferred": ("value", {"augment": 1, "defer_people": True}, 1.0),
    "augment 3 + people answers deferred": ("value", {"augment": 3, "defer_people": True}, 1.0),
    "LoRA mini-l, augment 3": ("lora", {"augment": 3}, 1.0),
}
COLUMNS = [("people_qa", "heldout_example"), ("people_qa", "shifted_dev"),
           ("arithmetic", "heldout_example"), ("arithmetic", "shifted_dev")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--examples", type=int, default=160, help="examples per cell (default 160)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "prompt_shift_study")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def train_rows(seed: int, defer_people: bool = False) -> list[dict]:
    from transfertune.evaluation.tasks import load_task

    keep = ("prompt", "response", "deferred")
    rows = []
    for task in ("people_qa", "arithmetic"):
        for e in load_task(task, "train"):
            row = {k: e[k] for k in keep if k in e}
            if defer_people and task == "people_qa":
                row["deferred"] = deferred_answer(e)
            rows.append(row)
    random.Random(seed).shuffle(rows)
    return rows


def deferred_answer(row: dict) -> str:
    """The end of a people_qa response from the space before the fact (" works for| Northstar Insurance.")."""
    response = row["response"]
    return response[response.rindex(row["answer"]) - 1:]


def model_dir(out: Path, name: str, seed: int) -> Path:
    method, changes, _ = VARIANTS[name]
    key = json.dumps([method, sorted(changes.items())], default=str)
    slug = "".join(c if c.isalnum() else "-" for c in key)[:80]
    return out / "models" / f"{slug}-s{seed}"


def train(out: Path, name: str, seed: int) -> Path:
    import fcntl

    method, changes, _ = VARIANTS[name]
    path = model_dir(out, name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:  # variants sharing a model train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            _train(path, method, changes, seed)
    return path


def _train(path: Path, method: str, changes: dict, seed: int) -> None:
    from transfertune.training.recipe import ValueRecipe
    from transfertune.training.value_trainer import train_value_recipe

    staging = path.with_name(".staging-" + path.name)
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    changes = dict(changes)
    defer_people = changes.pop("defer_people", False)
    if method == "value":
        recipe = ValueRecipe(**{**CURRENT, "seed": seed, **changes})
        train_value_recipe(SOURCE, train_rows(seed, defer_people), str(staging), recipe)
    else:
        from transfertune.core.value_model import LoraSettings
        from transfertune.training.augment import augment_prompts
        from transfertune.training.sft import finetune_base

        rows = augment_prompts(train_rows(seed), changes.get("augment", 0), seed=seed)
        finetune_base(TARGET, rows, str(staging), lora=LoraSettings(), max_steps=CURRENT["max_steps"],
                      learning_rate=1e-3, batch_size=CURRENT["batch_size"], max_length=CURRENT["max_length"],
                      seed=seed, warmup_steps=CURRENT["warmup_steps"], logging_steps=CURRENT["logging_steps"])
    os.rename(staging, path)


def job(out: Path, name: str, seed: int, examples: int) -> dict:
    """Train (or reuse) and measure one (variant, seed); the cell file makes it resumable."""
    import torch

    torch.set_num_threads(1)
    cell = out / "cells" / f"{name.replace(' ', '_').replace('/', '_')}-s{seed}.json"
    if cell.is_file():
        return json.loads(cell.read_text())
    from transfertune.evaluation.metrics import greedy_answers
    from transfertune.evaluation.tasks import exact_match, load_task
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_base

    start = time.time()
    path = train(out, name, seed)
    train_seconds = time.time() - start
    method, _, beta = VARIANTS[name]
    if method == "value":
        cm = ComposedModel.from_pretrained(TARGET, [str(path)], beta=beta)
    else:
        cm = ComposedModel(*load_base(str(path)))
    result = {"variant": name, "seed": seed, "train_seconds": round(train_seconds, 1), "scores": {}}
    for task, split in COLUMNS:
        rows = load_task(task, split)[:examples]
        answers = greedy_answers(cm, [r["prompt"] for r in rows])
        result["scores"][f"{task}/{split}"] = exact_match(answers, [r["response"] for r in rows])
    result["seconds"] = round(time.time() - start, 1)
    cell.parent.mkdir(parents=True, exist_ok=True)
    cell.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for name in variants:
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        row = {"variant": name, "seeds": len(runs)}
        for task, split in COLUMNS:
            vals = [r["scores"][f"{task}/{split}"] for r in runs]
            row[f"{task}/{split}"] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        for task in ("people_qa", "arithmetic"):
            ind, shifted = row[f"{task}/heldout_example"][0], row[f"{task}/shifted_dev"][0]
            row[f"{task}/kept"] = shifted / ind if ind else None
        rows.append(row)
    return rows


CHOICE_RULE = ("among the value-model variants that a recipe expresses (inference beta 1), the highest mean of the "
               "two shifted (dev) scores whose in-distribution scores are each within 0.02 of the current recipe's "
               "or above; means over seeds, only variants with every seed")


def choose(rows: list[dict], seeds: int) -> dict | None:
    """The recipe the study adopts, by CHOICE_RULE."""
    current = next((r for r in rows if r["variant"] == "current recipe"), None)
    if current is None:
        return None
    eligible = []
    for r in rows:
        method, changes, beta = VARIANTS[r["variant"]]
        if method != "value" or beta != 1.0 or r["seeds"] < seeds or "defer_people" in changes:
            continue
        if all(r[f"{t}/heldout_example"][0] >= current[f"{t}/heldout_example"][0] - 0.02
               for t in ("people_qa", "arithmetic")):
            shifted = (r["people_qa/shifted_dev"][0] + r["arithmetic/shifted_dev"][0]) / 2
            eligible.append((shifted, r["variant"]))
    if not eligible:
        return None
    score, name = max(eligible)
    changed = {k: v for k, v in VARIANTS[name][1].items() if k not in ("logging_steps", "warmup_steps")}
    return {"variant": name, "recipe": changed, "study_recipe": CURRENT, "mean_shifted_dev": round(score, 4),
            "rule": CHOICE_RULE}


def format_table(rows: list[dict]) -> str:
    head = ("| variant | seeds | people_qa in-dist | people_qa shifted (dev) | kept | arithmetic in-dist | "
            "arithmetic shifted (dev) | kept |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cells = []
        for task in ("people_qa", "arithmetic"):
            for split in ("heldout_example", "shifted_dev"):
                m, s = r[f"{task}/{split}"]
                cells.append(f"{m:.3f} ± {s:.3f}")
            kept = r[f"{task}/kept"]
            cells.append("-" if kept is None else f"{kept:.0%}")
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    names = [r["variant"] for r in rows]
    y = range(len(rows))
    for ax, task in zip(axes, ("people_qa", "arithmetic")):
        for offset, split, color in ((-0.2, "heldout_example", "#9ab"), (0.2, "shifted_dev", "#c53")):
            means = [r[f"{task}/{split}"][0] for r in rows]
            errs = [r[f"{task}/{split}"][1] for r in rows]
            ax.barh([i + offset for i in y], means, 0.4, xerr=errs, color=color,
                    label="in distribution" if split == "heldout_example" else "shifted (dev)")
        ax.set_title(f"{task}: exact match on mini-l (mean ± sd over seeds)", fontsize=9)
        ax.set_xlim(0, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(list(y), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(rows: list[dict], args, png: Path, choice: dict | None) -> None:
    from transfertune.evaluation.report import write_doc_section

    body = f"""## Prompt shift: which value-model design holds up (dev part only)

Written by `python scripts/prompt_shift_study.py` (the cells: outputs/prompt_shift_study); do not edit by hand.
![{SECTION}](results-{SECTION}.png)

Value models trained against frozen `{SOURCE}` on the demo's rows (people_qa + arithmetic training splits),
composed with `{TARGET}`; current recipe: {CURRENT['max_steps']} steps, lr {CURRENT['learning_rate']}, batch
{CURRENT['batch_size']}. Each variant changes it in one way. Two stages: every variant was screened with seed 0;
the candidates that a recipe expresses and that did not lose in distribution on the screen (current, augment 1,
augment 3) and the inference betas ran seeds {', '.join(map(str, args.seeds))} (mean ± sd; the "seeds" column says
how many a row has). The LoRA oracles ran one seed (7-11 min each on the shared 2 cores).
Exact match on the first {args.examples} rows of each split: `heldout_example` (the project's phrasings and
stories) and `shifted_dev` (the benchmark's dev phrasings and stories, builtin_tasks/SHIFTED.md). "kept" =
shifted / in distribution. The test part was not read. The LoRA rows are the oracle: mini-l itself fine-tuned
(LoRA, lr 1e-3, the same steps) on the same rows.

{format_table(rows)}

Adopted as the default recipe (`docs/prompt_shift_choice.json`; rule: {CHOICE_RULE}):
{f"**{choice['variant']}** ({choice['recipe']})" if choice else "none (no variant met the rule)"}.
"""
    write_doc_section(args.docs, SECTION, body, png)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    results = []
    if args.report_only:
        for name, seed in jobs:
            cell = out / "cells" / f"{name.replace(' ', '_').replace('/', '_')}-s{seed}.json"
            if cell.is_file():
                results.append(json.loads(cell.read_text()))
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # the beta variants reuse the current recipe's models: train those first, in order
        with ProcessPoolExecutor(args.workers) as pool:
            futures = {pool.submit(job, out, name, seed, args.examples): (name, seed) for name, seed in jobs}
            for n, future in enumerate(as_completed(futures), start=1):
                name, seed = futures[future]
                try:
                    r = future.result()
                except Exception as err:  # noqa: BLE001 (one failed cell must not lose the others)
                    print(f"[{n}/{len(jobs)}] {name} seed {seed}: FAILED {err!r}", flush=True)
                    continue
                results.append(r)
                print(f"[{n}/{len(jobs)}] {name} seed {seed}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items()) + f" ({r['seconds']:.0f} s)",
                      flush=True)
    rows = summarise(results, args.variants)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    choice = choose(rows, len(args.seeds))
    if choice is not None and args.docs == ROOT / "docs" / "results.md":
        (ROOT / "docs" / "prompt_shift_choice.json").write_text(json.dumps(choice, indent=2) + "\n")
        print(f"adopted: {choice['variant']} {choice['recipe']}")
    print(format_table(rows))
    png = out / "prompt_shift_study.png"
    plot(rows, png)
    write_docs(rows, args, png, choice)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
