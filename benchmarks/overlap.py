"""Base and value forward passes overlapped: each model in its own CPU thread (one core each) vs one after the other.

    python benchmarks/overlap.py --docs

Per decoding step, measured side by side in one run (rounds interleaved, fastest of --repeats kept):
  base, value          each model alone, 1 torch thread
  sequential (1 thr)   composed, the models one after the other, 1 torch thread: the limit t_base + t_value
  sequential (N thr)   the same with every core per op (transfertune's default)
  overlapped           composed with `ComposedModel(..., overlap=True)`: the value model in a second thread,
                       1 torch thread each; the parallel limit is max(t_base, t_value)
Writes JSON (--out), a PNG next to it, and with --docs its section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import reporting  # noqa: E402
from decode import add_model_args, load_value, lockstep, make_prompts, shown  # noqa: E402

from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.loading import load_base  # noqa: E402

SECTION = "overlap"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="cores for the sequential N-thread run (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overlap.json"))
    p.add_argument("--docs", action="store_true", help="also write its section of docs/performance.md")
    return p.parse_args(argv)


def step_seconds(cm, prompts, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    cm._pool = None  # the pool's threads take the thread count current when it is made
    run = lockstep(cm, prompts, steps)
    import time

    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    many = args.threads or torch.get_num_threads()
    base, tok = load_base(args.target)
    value = load_value(args, tok)
    methods = {
        "base": (ComposedModel(base, tok, []), 1),
        "value": (ComposedModel(value.model, tok, []), 1),
        "sequential_1": (ComposedModel(base, tok, [value]), 1),
        f"sequential_{many}": (ComposedModel(base, tok, [value]), many),
        "overlapped": (ComposedModel(base, tok, [value], overlap=True), 1),
    }
    rows = []
    from tqdm import tqdm

    original_threads = torch.get_num_threads()
    for batch in tqdm(args.batch_sizes, desc="batch sizes"):
        prompts = make_prompts(tok, batch, args.prompt_len)
        best = {name: float("inf") for name in methods}
        for _ in range(args.repeats):  # interleaved: every method sees the same machine state
            for name, (cm, threads) in methods.items():
                best[name] = min(best[name], step_seconds(cm, prompts, args.new_tokens, threads))
        t = {k: round(v, 6) for k, v in best.items()}
        rows.append({"batch": batch, "seconds_per_step": t,
                     "sequential_limit": round(t["base"] + t["value"], 6),
                     "parallel_limit": round(max(t["base"], t["value"]), 6),
                     "overlapped_vs_sequential_1": round(t["sequential_1"] / t["overlapped"], 3),
                     f"overlapped_vs_sequential_{many}": round(t[f"sequential_{many}"] / t["overlapped"], 3)})
    torch.set_num_threads(original_threads)
    result = {"command": "python benchmarks/overlap.py " + " ".join(argv), "threads": many,
              "device": f"cpu: {platform.processor() or platform.machine()}, {many} cores used",
              "torch": torch.__version__, "target": args.target,
              "value": args.value if Path(args.value, "transfertune.json").is_file() else f"untrained on {args.draft}",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    n = result["threads"]
    lines = [f"| batch | base ms | value ms | sequential, 1 thread ms | limit t_base + t_value | overlapped ms "
             f"| limit max(t_base, t_value) | sequential, {n} threads ms | overlapped speed-up vs 1 / {n} threads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["seconds_per_step"]
        ms = lambda x: f"{x * 1e3:.2f}"  # noqa: E731
        lines.append(f"| {r['batch']} | {ms(t['base'])} | {ms(t['value'])} | {ms(t['sequential_1'])} "
                     f"| {ms(r['sequential_limit'])} | {ms(t['overlapped'])} | {ms(r['parallel_limit'])} "
                     f"| {ms(t[f'sequential_{n}'])} | {r['overlapped_vs_sequential_1']:.2f} / "
                     f"{r[f'overlapped_vs_sequential_{n}']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    n, rows = result["threads"], result["rows"]
    series = [("sequential, 1 thread", lambda r: r["seconds_per_step"]["sequential_1"]),
              ("limit t_base + t_value", lambda r: r["sequential_limit"]),
              ("overlapped, 2 threads x 1", lambda r: r["seconds_per_step"]["overlapped"]),
              ("limit max(t_base, t_value)", lambda r: r["parallel_limit"]),
              (f"sequential, {n} threads", lambda r: r["seconds_per_step"][f"sequential_{n}"])]
    reporting.bar_chart(path, [f"batch {r['batch']}" for r in rows],
                        [(label, [get(r) * 1e3 for r in rows]) for label, get in series], "ms per decoding step",
                        f"{result['target']} + value: overlapping the two forward passes ({result['device']})")


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    body = f"""## Base and value overlapped

Made by `{result['command']}` ({result['device']}, torch {result['torch']}); base `{result['target']}`, value model:
`{shown(result['value'])}`; prompt {result['prompt_len']} tokens, {result['new_tokens']} steps, \
fastest of interleaved runs.
Raw numbers: `{out.relative_to(ROOT)}`; plot: `{out.with_suffix('.png').relative_to(ROOT)}`.
*Overlapped*: `ComposedModel(..., overlap=True)` (`--overlap` on generate and serve) runs the value model in a
second thread during each step, one torch thread per model.

{table}
{overlap_note(result)}"""
    write_doc_section(ROOT / "docs" / "performance.md", SECTION, body, heading="# Performance")


def overlap_note(result: dict) -> str:
    n = result["threads"]
    vs_many = [r[f"overlapped_vs_sequential_{n}"] for r in result["rows"]]
    vs_one = [r["overlapped_vs_sequential_1"] for r in result["rows"]]
    if max(vs_many) >= 1.0:
        return f"\nOverlapping pays in {sum(v >= 1.0 for v in vs_many)} of {len(vs_many)} batch sizes here.\n"
    return (f"\nOn this CPU overlapping does not pay: against the default (every core for each op, one model after the "
            f"other) it runs at {min(vs_many):.2f}-{max(vs_many):.2f} x, and against one thread {min(vs_one):.2f}-"
            f"{max(vs_one):.2f} x. These models are small enough that a step is mostly per-op overhead, much of it "
            "under Python's GIL, which two threads cannot run at once; the default stays sequential. `--overlap` is "
            "meant for models on different devices (`--value-device`), where each thread waits on its own device "
            "(untested here: no accelerator).\n")


if __name__ == "__main__":
    main()
