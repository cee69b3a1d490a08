"""Speculative composed decoding against the target alone, side by side in one run, with where each round's
time goes. Also `python benchmarks/decode.py --speculative`.

    python benchmarks/speculative.py                               # mini-l target, mini-s draft, batch 1 8 32
    python benchmarks/speculative.py --batch-sizes 1 --new-tokens 32 --deeper 0   # quick look

Methods (greedy, every row decodes exactly --new-tokens tokens, end-of-sequence ignored):
  target        the target base alone, plain cached decoding (the reference: ratio 1.0)
  composed      target + value model, plain lock-step decoding
  per-row       speculative: mini-s + value drafting (one fused network), target verifying; each row commits
                its own accepted tokens (ragged caches), the draft length adapted to measured costs
  rectangular   the same, every row committing what all rows accepted (what non-Llama-like models get)
  exact         per-row, the verifier recomputing the value logits (greedy output token for token plain's)

Per round (per-row method): milliseconds drafting (k + 1 fused draft steps), verifying (one target pass over
k + 1 tokens per row), bookkeeping (composition, verdicts, cache commits), prefill and between rounds (rows
leaving), per round; tokens committed per row and round.

--deeper N adds the same cells with a target N times as deep: the target's layers, then copies of its last
layer whose output projections are zero, so they add nothing to the residual stream. The function (hence the
acceptance) is the target's, at N times its cost per token: what the same code gives where the target costs
more relative to the draft, as a bigger target (or a GPU, where verifying k + 1 tokens costs about one step) does.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reporting  # noqa: E402
from decode import add_model_args, load_value, lockstep, make_prompts  # noqa: E402

from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.inference.speculative import SpeculativeComposedGenerator  # noqa: E402
from transfertune.inference.speculative_costs import PHASES  # noqa: E402
from transfertune.io.loading import load_base, load_causal_lm  # noqa: E402

VARIANTS = {"per-row": {}, "rectangular": {"per_row": False}, "exact": {"exact": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method, interleaved; the fastest is kept")
    p.add_argument("--deeper", type=int, default=4, help="also a target this many times as deep (0: no)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
    p.add_argument("--docs", action="store_true", help="also write the speculative section of docs/performance.md")
    return p.parse_args(argv)


def deepened(model, factor: int):
    """`model` (a Llama) with `factor` times its layers; the added layers copy its last one with zeroed output
    projections (o_proj, down_proj), so they leave the residual stream, hence the logits, as they are."""
    config = copy.deepcopy(model.config)
    layers = config.num_hidden_layers
    config.num_hidden_layers = layers * factor
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types) + [config.layer_types[-1]] * (layers * (factor - 1))
    deep = type(model)(config).to(model.dtype).eval()
    state = model.state_dict()
    deep.load_state_dict(state, strict=False)
    last = model.model.layers[-1].state_dict()
    with torch.no_grad():
        for layer in deep.model.layers[layers:]:
            layer.load_state_dict(last)
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return deep


def speculative_run(spec, prompts, new_tokens: int):
    def run():
        spec.generate_batch(prompts, new_tokens)

    return run


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Seconds of each run (fastest of `repeats`), the methods taking turns so that load changes hit all alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def round_profile(spec, before: dict, rows: int) -> dict:
    """Per round of the runs since `before` (a snapshot of the stats): ms per phase, tokens per row, draft length."""
    s = spec.stats
    rounds = s.rounds - before["rounds"]
    lengths = s.draft_lengths[before["rounds"]:]
    return {
        "rounds": rounds,
        "ms_per_round": {p: round((s.seconds[p] - before["seconds"][p]) / rounds * 1e3, 3) for p in PHASES},
        "tokens_per_row_per_round": round((s.committed - before["committed"]) / rounds / rows, 3),
        "acceptance": round((s.accepted - before["accepted"]) / max(1, s.drafted - before["drafted"]), 3),
        "mean_draft_len": round(sum(lengths) / len(lengths), 2),
        "draft_step_ms": round(s.draft_step(rows) * 1e3, 3),
    }


def snapshot(spec) -> dict:
    s = spec.stats
    return {"rounds": s.rounds, "seconds": dict(s.seconds), "committed": s.committed, "accepted": s.accepted,
            "drafted": s.drafted}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    target, tok = load_base(args.target)
    draft = load_causal_lm(args.draft)
    value = load_value(args, tok)
    targets = {args.target: target}
    if args.deeper > 1:
        targets[f"{args.target} x{args.deeper} deep"] = deepened(target, args.deeper)
    rows = []
    for name, base in targets.items():
        alone, composed = ComposedModel(base, tok, []), ComposedModel(base, tok, [value], base_name=args.target)
        specs = {v: SpeculativeComposedGenerator(composed, draft, draft_len=3, **opts) for v, opts in VARIANTS.items()}
        for spec in specs.values():
            spec.eos_ids = set()
        for batch in args.batch_sizes:
            prompts = make_prompts(tok, batch, args.prompt_len)
            runs = {"target": lockstep(alone, prompts, args.new_tokens),
                    "composed": lockstep(composed, prompts, args.new_tokens)}
            runs |= {v: speculative_run(spec, prompts, args.new_tokens) for v, spec in specs.items()}
            for run in runs.values():
                run()  # warm-up outside the snapshot: the cost model learns from it
            before = {v: snapshot(spec) for v, spec in specs.items()}
            seconds = interleaved(runs, args.repeats)
            t = {m: s / args.new_tokens for m, s in seconds.items()}
            row = {"target": name, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "ms_per_step": {m: round(v * 1e3, 3) for m, v in t.items()},
                   "speedup_vs_target_alone": {m: round(t["target"] / v, 3) for m, v in t.items() if m != "target"},
                   "rounds": {v: round_profile(spec, before[v], batch) for v, spec in specs.items()}}
            rows.append(row)
            print(f"{name} batch {batch}: " + ", ".join(f"{m} {r:.2f}x" for m, r in
                                                       row["speedup_vs_target_alone"].items()), flush=True)
    result = {"command": "python benchmarks/speculative.py " + " ".join(argv),
              "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "target": args.target, "draft": args.draft,
              "value": args.value if Path(args.value, "transfertune.json").is_file() else f"untrained on {args.draft}",
              "rows": rows}
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    lines = ["| target | batch | target ms/step | composed | per-row | rectangular | exact | acceptance "
             "| draft length | tokens/row/round | round ms: draft / verify / bookkeeping / prefill+between "
             "| draft step / target step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp, pr = r["speedup_vs_target_alone"], r["rounds"]["per-row"]
        ms = pr["ms_per_round"]
        lines.append(
            f"| {r['target']} | {r['batch']} | {r['ms_per_step']['target']:.2f} | {sp['composed']:.2f} "
            f"| **{sp['per-row']:.2f}** | {sp['rectangular']:.2f} | {sp['exact']:.2f} | {pr['acceptance']:.2f} "
            f"| {pr['mean_draft_len']:.1f} | {pr['tokens_per_row_per_round']:.2f} "
            f"| {ms['draft']:.1f} / {ms['verify']:.1f} / {ms['bookkeeping']:.1f} / {ms['prefill'] + ms['between']:.1f} "
            f"| {pr['draft_step_ms'] / r['ms_per_step']['target']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    reporting.bar_chart(path, [f"{r['target']}\nb{r['batch']}" for r in rows],
                        [(m, [r["speedup_vs_target_alone"][m] for r in rows]) for m in ("composed", *VARIANTS)],
                        "speed relative to the target alone",
                        f"Speculative composed decoding ({result['device']})", baseline=1.0)


def write_docs(result: dict, table: str, out: Path) -> None:
    from decode import shown

    from transfertune.evaluation.report import write_doc_section

    body = f"""## Speculative decoding

Made by `{result['command']}` ({result['device']}, torch {result['torch']}); target `{result['target']}`,
draft `{result['draft']}`, value model: `{shown(result['value'])}`; greedy, {result['rows'][0]['new_tokens']} new
tokens per row after {result['rows'][0]['prompt_len']}-token prompts, methods interleaved, fastest of the runs.
Raw numbers: `{out.relative_to(ROOT)}`; plot: `{out.with_suffix('.png').relative_to(ROOT)}`.

- Columns *composed* to *exact*: speed relative to the target base alone (plain cached decoding). *per-row*:
  each row commits its own accepted tokens (the default for Llama-like models); *rectangular*: every row
  commits what all rows accepted (other architectures); *exact*: per-row, the verifier recomputing the value
  logits (greedy output token for token plain composed decoding's).
- The rest describe *per-row*: *acceptance* of drafted tokens, mean *draft length* chosen from measured costs,
  tokens committed per row and round, and where a round's time goes.
- *xN deep*: the target with N times its layers, the added ones adding nothing (zeroed output projections):
  the same function and acceptance at N times the cost per token.

{table}
{notes(result)}"""
    write_doc_section(ROOT / "docs" / "performance.md", "speculative", body, heading="# Performance")


def notes(result: dict) -> str:
    """What the cells show, from the numbers themselves."""
    lines = []
    for r in result["rows"]:
        pr = r["rounds"]["per-row"]
        ms = pr["ms_per_round"]
        total = sum(ms.values())
        lines.append(f"- {r['target']}, batch {r['batch']}: per-row {r['speedup_vs_target_alone']['per-row']:.2f} x "
                     f"the target alone (rectangular {r['speedup_vs_target_alone']['rectangular']:.2f} x); a round "
                     f"drafts {pr['mean_draft_len']:.1f} tokens and commits {pr['tokens_per_row_per_round']:.2f} per "
                     f"row in {total:.1f} ms: {100 * ms['draft'] / total:.0f}% drafting, "
                     f"{100 * ms['verify'] / total:.0f}% verifying, "
                     f"{100 * (total - ms['draft'] - ms['verify']) / total:.0f}% the rest.")
    return "\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
