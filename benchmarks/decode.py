"""Composed decoding speed and memory, every method measured side by side in one run.

    python benchmarks/decode.py                       # built-in family: target mini-l, draft mini-s
    python benchmarks/decode.py --batch-sizes 1 --prompt-lens 32 --new-tokens 16   # quick look
    python benchmarks/decode.py --speculative         # speculative decoding alone, with its time per round
                                                      # (benchmarks/speculative.py: its flags follow)

Methods (all decode exactly --new-tokens tokens, end-of-sequence ignored):
  target       the target base alone (plain cached decoding)
  value        the value model alone
  draft        the small base alone (the proxy pair's cost unit)
  composed     target + value, lock-step with one KV cache each (transfertune)
  proxy        target + (tuned - untuned) small pair: three models (the tuned weights do not change the cost,
               so the small base stands in for both)
  naive        HF `generate` on the target with a LogitsProcessor that re-runs the value model over the whole
               prefix at every step, without a cache (what the seed papers' released code does)
  speculative  draft with small base + value, verify with target + the same value logits (each row of a batch
               commits its own accepted tokens), the draft fused into one stacked network (fused_draft.py) and
               its length adapted to measured costs; *exact*: the verifier recomputes the value logits itself;
               *transformers draft*: each draft model through its own transformers forward

Limits: a composed step cannot beat running its models back to back, so on CPU
limit(composed) = t_target + t_value and limit(proxy) = t_target + 2 t_draft per step; the table reports
ratio = limit / measured (1.0 = at the limit). Speculative decoding is compared with the target alone.
Writes JSON (--out), a PNG next to it, and with --docs the markdown table into docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_TEXT = ROOT / "models" / "heldout-slice.txt"

import memory  # noqa: E402
import reporting  # noqa: E402

from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.inference.sampling import SamplingParams  # noqa: E402
from transfertune.inference.speculative import SpeculativeComposedGenerator  # noqa: E402
from transfertune.io.loading import load_base, load_causal_lm  # noqa: E402


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--target, --draft, --value: the models decode.py and overlap.py measure (see load_value)."""
    p.add_argument("--target", default="mini-l", help="target base (default mini-l)")
    p.add_argument("--draft", default="mini-s",
                   help="small base: the proxy pair, the speculative draft, the weights of an untrained value model")
    p.add_argument("--value", default=str(ROOT / "outputs" / "demo" / "value"),
                   help="value directory (default: the demo's); without one, an untrained value model on --draft")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 128],
                   help="prompt tokens (default 32 128: with 128 new tokens, within the family's 256-token context)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the fastest is kept")
    p.add_argument("--naive-max-batch", type=int, default=8, help="skip the (slow) naive reference above this")
    p.add_argument("--speculative-max-batch", type=int, default=8, help="skip speculative decoding above this")
    p.add_argument("--speculative", action="store_true",
                   help="run benchmarks/speculative.py instead (speculative decoding, time per round; its flags)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    p.add_argument("--docs", action="store_true", help="also write docs/performance.md")
    p.add_argument("--memory-only", action="store_true",
                   help="re-measure only peak RSS and update the JSON (and docs) already at --out")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_value(args, tokenizer):
    if Path(args.value, "transfertune.json").is_file():
        return ValueModel.load(args.value)
    return ValueModel.create(args.draft, tokenizer=tokenizer, zero_init_head=False)


def make_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """Held-out book text (models/heldout-slice.txt: Gutenberg books no built-in model trained on) cut to
    `length` tokens, each row from another place in it."""
    ids = tokenizer(HELDOUT_TEXT.read_text(encoding="utf-8"))["input_ids"]
    stride = max(1, (len(ids) - length) // max(1, batch))
    return [ids[i * stride : i * stride + length] for i in range(batch)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def lockstep(cm: ComposedModel, prompts, new_tokens: int):
    gen = cm.generator()
    gen.eos_ids = set()

    def run():
        for _ in gen.decode_steps(prompts, new_tokens, SamplingParams()):
            pass

    return run


class ValueRerunProcessor:
    """The no-cache reference: the value model re-reads the whole prefix at every step."""

    def __init__(self, value_model):
        self.value_model = value_model

    def __call__(self, input_ids, scores):
        values = self.value_model(input_ids=input_ids, use_cache=False).logits[:, -1].float()
        return torch.log_softmax(scores.float(), -1) + values


def naive(target, value_model, tokenizer, prompts, new_tokens: int):
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts)  # equal-length prompts: no padding

    def run():
        target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                        logits_processor=LogitsProcessorList([ValueRerunProcessor(value_model)]))

    return run


SPECULATIVE = {"speculative": {}, "speculative_exact": {"exact": True},
               "speculative_transformers": {"draft_engine": "transformers"}}


def speculative(cm: ComposedModel, draft, prompts, new_tokens: int, stats: dict, **options):
    """One generator for the warm-up and the timed runs: its draft length adapts as it runs (as it would over
    the requests of a long job); the statistics are the last run's."""
    spec = SpeculativeComposedGenerator(cm, draft, draft_len=3, **options)
    spec.eos_ids = set()

    def run():
        s = spec.stats
        rounds, drafted, accepted = s.rounds, s.drafted, s.accepted  # before this run
        spec.generate_batch(prompts, new_tokens)
        lengths = s.draft_lengths[rounds:]
        stats.update(acceptance=(s.accepted - accepted) / max(1, s.drafted - drafted),
                     mean_draft_len=sum(lengths) / len(lengths), tokens_per_round=new_tokens / len(lengths))

    return run


def rss_probe(args) -> None:
    """Child process: peak RSS above the after-import, after-load baseline while decoding with one method."""
    from transfertune.io.loading import load_tokenizer

    tok = load_tokenizer(args.target)
    baseline = memory.rss_bytes()
    method = args.rss_probe
    base = load_causal_lm(args.target) if method in ("target", "composed") else None
    value = load_value(args, tok) if method in ("value", "composed") else None
    cm = {"target": lambda: ComposedModel(base, tok, []), "value": lambda: ComposedModel(value.model, tok, []),
          "composed": lambda: ComposedModel(base, tok, [value])}[method]()
    reset = memory.reset_peak()
    lockstep(cm, make_prompts(tok, 8, 128), args.new_tokens)()
    peak = memory.peak_bytes(reset)
    print(json.dumps({"method": method, "peak_above_baseline_mb": round((peak - baseline) / 2**20, 1)}))


def measure_memory(argv: list[str]) -> dict:
    out = {}
    for method in ("target", "value", "composed"):
        res = subprocess.run([sys.executable, __file__, *argv, "--rss-probe", method], capture_output=True,
                             text=True, check=True)
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])["peak_above_baseline_mb"]
    out["composed_over_sum"] = round(out["composed"] / (out["target"] + out["value"]), 3)
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--speculative" in argv:
        import speculative as speculative_benchmark

        return speculative_benchmark.main([a for a in argv if a != "--speculative"])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return {}
    if args.memory_only:
        result = json.loads(Path(args.out).read_text())
        result["memory_mb"] = measure_memory([a for a in argv if a not in ("--docs", "--memory-only")])
        return report(result, args)
    target, tok = load_base(args.target)
    draft = load_causal_lm(args.draft)
    value = load_value(args, tok)
    composed = ComposedModel(target, tok, [value], base_name=args.target)
    singles = {"target": ComposedModel(target, tok, []), "value": ComposedModel(value.model, tok, []),
               "draft": ComposedModel(draft, tok, [])}
    proxy = ComposedModel(target, tok, [], proxy=(draft, draft))
    rows = []
    from tqdm import tqdm

    cells = [(b, n) for n in args.prompt_lens for b in args.batch_sizes]
    for batch, plen in tqdm(cells, desc="benchmark cells"):
        prompts = make_prompts(tok, batch, plen)
        steps = args.new_tokens
        t = {name: timed(lockstep(cm, prompts, steps), args.repeats) / steps for name, cm in singles.items()}
        t["composed"] = timed(lockstep(composed, prompts, steps), args.repeats) / steps
        t["proxy"] = timed(lockstep(proxy, prompts, steps), args.repeats) / steps
        if batch <= args.naive_max_batch:
            t["naive"] = timed(naive(target, value.model, tok, prompts, steps), 1) / steps
        spec_stats: dict = {}
        if batch <= args.speculative_max_batch:
            for name, options in SPECULATIVE.items():
                stats = spec_stats if name == "speculative" else {}
                t[name] = timed(speculative(composed, draft, prompts, steps, stats, **options), args.repeats) / steps
        row = {"batch": batch, "prompt_len": plen, "new_tokens": steps,
               "seconds_per_step": {k: round(v, 6) for k, v in t.items()},
               "tokens_per_second": {k: round(batch / v, 1) for k, v in t.items()},
               "ratio_to_limit": {
                   "composed": round((t["target"] + t["value"]) / t["composed"], 3),
                   "proxy": round((t["target"] + 2 * t["draft"]) / t["proxy"], 3),
               },
               "speedup_vs_target_alone": {k: round(t["target"] / t[k], 3)
                                           for k in ("composed", "proxy", "naive", *SPECULATIVE) if k in t}}
        if spec_stats:
            row["speculative"] = {k: round(v, 3) for k, v in spec_stats.items()}
        rows.append(row)
    result = {
        "command": "python benchmarks/decode.py " + " ".join(argv),
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "target": args.target, "draft": args.draft,
        "value": args.value if Path(args.value, "transfertune.json").is_file() else f"untrained on {args.draft}",
        "rows": rows,
    }
    if not args.no_memory:
        result["memory_mb"] = measure_memory([a for a in argv if a != "--docs"])
    return report(result, args)


def report(result: dict, args) -> dict:
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    lines = [
        "| batch | prompt | target tok/s | composed tok/s | composed / limit | proxy / limit | naive vs target "
        "| speculative vs target | exact | transformers draft | acceptance | draft length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sp = r["speedup_vs_target_alone"]
        spec = r.get("speculative", {})
        lines.append(
            f"| {r['batch']} | {r['prompt_len']} | {r['tokens_per_second']['target']:.0f} "
            f"| {r['tokens_per_second']['composed']:.0f} | {r['ratio_to_limit']['composed']:.2f} "
            f"| {r['ratio_to_limit']['proxy']:.2f} | {sp.get('naive', float('nan')):.2f} "
            f"| {sp.get('speculative', float('nan')):.2f} | {sp.get('speculative_exact', float('nan')):.2f} "
            f"| {sp.get('speculative_transformers', float('nan')):.2f} | {spec.get('acceptance', float('nan')):.2f} "
            f"| {spec.get('mean_draft_len', float('nan')):.1f} |"
        )
    if "memory_mb" in result:
        m = result["memory_mb"]
        lines.append(f"\nPeak RSS above the import baseline (batch 8, prompt 128): target {m['target']} MB, value "
                     f"{m['value']} MB, composed {m['composed']} MB = {m['composed_over_sum']:.2f} x (target + value).")
    return "\n".join(lines).replace("nan", "-")


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    methods = ["target", "composed", "proxy", "naive", "speculative"]
    reporting.bar_chart(path, [f"b{r['batch']}/p{r['prompt_len']}" for r in rows],
                        [(m, [r["speedup_vs_target_alone"].get(m, 1.0 if m == "target" else 0) for r in rows])
                         for m in methods], "speed relative to the target alone",
                        f"Decoding speed, {result['target']} target ({result['device']})", baseline=1.0)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    body = f"""## Composed decoding

Made by `{result['command']}` ({result['device']}, torch {result['torch']}); target `{result['target']}`,
draft `{result['draft']}`, value model: `{shown(result['value'])}`. Raw numbers: `{out.relative_to(ROOT)}`; plot:
`{out.with_suffix('.png').relative_to(ROOT)}`.

- *composed / limit*: (t_target + t_value) / t_composed per step; 1.0 means composing costs nothing beyond
  running the two networks. *proxy / limit*: (t_target + 2 t_draft) / t_proxy.
- *naive vs target*, *speculative vs target*: speed relative to the target base alone with plain decoding.
- *speculative*: the draft base and the value model fused into one stacked network, the value logits it
  computes reused by the verifier; *exact*: the verifier recomputes them with the value model (greedy output
  token for token plain decoding's); *transformers draft*: both draft models through transformers.
- *acceptance*: fraction of drafted tokens the verifier kept (greedy); *draft length*: mean tokens drafted
  per round, chosen from the measured acceptance and costs.

{table}
{speculation_note(result)}"""
    write_doc_section(ROOT / "docs" / "performance.md", "decode", body, heading="# Performance")


def shown(path: str) -> str:
    """A path inside the repository relative to it (docs are read from any checkout)."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else path


def speculation_note(result: dict) -> str:
    """What the speculative cells show, per batch size, from the numbers themselves."""
    spec = [r for r in result["rows"] if "speculative" in r["speedup_vs_target_alone"]]
    lines = []
    for batch in sorted({r["batch"] for r in spec}):
        cells = [r for r in spec if r["batch"] == batch]
        def span(kind):
            vals = [r["speedup_vs_target_alone"][kind] for r in cells]
            return f"{min(vals):.2f}-{max(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"
        tokens = [r["speculative"]["tokens_per_round"] for r in cells]
        lines.append(f"- batch {batch}: speculative decoding runs at {span('speculative')} x the target alone "
                     f"(exact values {span('speculative_exact')} x, transformers draft "
                     f"{span('speculative_transformers')} x); {min(tokens):.2f}-{max(tokens):.2f} tokens per round.")
    if not lines:
        return ""
    t = spec[0]["seconds_per_step"]
    return ("\n" + "\n".join(lines) + f"\n\nA target step costs {t['target'] * 1e3:.2f} ms and a composed one "
            f"{t['composed'] * 1e3:.2f} ms (batch {spec[0]['batch']}), so speculative decoding must commit "
            f"{t['composed'] / t['target']:.2f} x more tokens per unit of time than plain composed decoding just to "
            "match the target alone. Where the time of a round goes, per batch size: `decode.py --speculative` "
            "(the speculative section).\n")


if __name__ == "__main__":
    main()
