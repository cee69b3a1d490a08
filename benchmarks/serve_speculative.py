"""`transfertune serve --draft` against the same server without it: streaming clients, tokens/s, where a round's
time goes.

    python benchmarks/serve_speculative.py --docs            # mini-l and mini-l x4 deep, draft mini-s, 1 and 8 clients
    python benchmarks/serve_speculative.py --clients 1 --requests 2 --rounds 1 --deeper 0   # quick look

For each target (--target, and with --deeper N the target N times as deep that benchmarks/speculative.py builds:
the same function at N times the cost per token, saved to a temporary directory) two servers run on 127.0.0.1,
one torch thread each (OMP_NUM_THREADS=1), --max-batch the largest client count: plain (`serve --base T --value
V`) and speculative (the same with `--draft D`). For each client count, --rounds turns of plain then speculative:
c concurrent streaming clients (benchmarks/serve.py's), each sending --requests greedy requests one after the
other, --new-tokens tokens each (end-of-sequence ignored), after held-out book text (models/heldout-slice.txt, the
prompts of decode.py and speculative.py). A row reports medians over the rounds: each server's tokens/s and their
ratio, time to first token, and from the speculative server's /health, per round: acceptance of drafted tokens,
draft length, rows, tokens committed per row, and milliseconds drafting / verifying / bookkeeping / prefilling
rows that joined / the engine's work between rounds (events, rows leaving); the plain server's ms per step beside.
Before measuring, one greedy request is answered by both servers: `same_text` says whether the texts agree.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reporting  # noqa: E402
import serve  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads, as for the serve benchmark)
import torch  # noqa: E402
from decode import make_prompts  # noqa: E402
from speculative import deepened  # noqa: E402

from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.io.loading import load_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("draft", "verify", "bookkeeping", "prefill", "between")
GOAL = 1.2  # issue 28: the server with --draft at >= 1.2x the server without it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="mini-l", help="the served base (default mini-l)")
    p.add_argument("--draft", default="mini-s", help="--draft of the speculative server (default mini-s)")
    p.add_argument("--value", default=str(ROOT / "outputs" / "demo" / "value"),
                   help="value directory (default: the demo's); without one, an untrained value model on --draft")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another (default 4)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="turns of plain then speculative (default 2); medians")
    p.add_argument("--deeper", type=int, default=4, help="also a target this many times as deep (0: no)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_speculative.json"))
    p.add_argument("--docs", action="store_true", help="write the serve-speculative section of docs/performance.md")
    return p.parse_args(argv)


def value_dir(args, tokenizer, tmp: Path) -> tuple[str, str]:
    """(directory, description) of the value model: --value, or an untrained one on --draft's weights."""
    if Path(args.value, "transfertune.json").is_file():
        return args.value, shown(args.value)
    value = ValueModel.create(args.draft, tokenizer=tokenizer, zero_init_head=False, training_base=args.draft)
    value.save(tmp / "value")
    return str(tmp / "value"), f"untrained ({args.draft} weights, output layer kept)"


def shown(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def targets(args, tmp: Path) -> dict[str, str]:
    """Name -> what `serve --base` takes: the target, and the deeper one saved under `tmp`."""
    out = {args.target: args.target}
    if args.deeper > 1:
        model, tok = load_base(args.target)
        path = tmp / "deep"
        deepened(model, args.deeper).save_pretrained(path)
        tok.save_pretrained(path)
        out[f"{args.target} x{args.deeper} deep"] = str(path)
    return out


def same_text(plain: str, spec: str, prompt: list[int], new_tokens: int) -> bool:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    texts = [httpx.post(f"{url}/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
             for url in (plain, spec)]
    return texts[0] == texts[1]


def round_profile(before: dict, after: dict) -> dict:
    """Per speculative round between two /health answers of the speculative server."""
    b, a = before["speculative"], after["speculative"]
    rounds = max(1, a["rounds"] - b["rounds"])
    row_rounds = max(1, a["row_rounds"] - b["row_rounds"])
    return {
        "rounds": a["rounds"] - b["rounds"],
        "acceptance": round((a["accepted"] - b["accepted"]) / max(1, a["drafted"] - b["drafted"]), 3),
        "mean_draft_len": round((a["draft_tokens"] - b["draft_tokens"]) / rounds, 2),
        "rows_per_round": round(row_rounds / rounds, 2),
        "tokens_per_row_per_round": round((a["committed"] - b["committed"]) / row_rounds, 3),
        "ms_per_round": {p: round((a["seconds"][p] - b["seconds"][p]) / rounds * 1e3, 2) for p in PHASES},
    }


def step_ms(before: dict, after: dict) -> float:
    return round((after["step_seconds"] - before["step_seconds"]) / max(1, after["steps"] - before["steps"]) * 1e3, 2)


def measure(args, name: str, base: str, value: str, prompts: list[list[int]]) -> list[dict]:
    rows = []
    batch = ("--max-batch", str(max(args.clients)))
    with serve.Server(base, [value], *batch, threads=1) as plain, \
            serve.Server(base, [value], *batch, "--draft", args.draft, threads=1) as spec:
        agree = same_text(plain.url, spec.url, prompts[0], args.new_tokens)
        for url in (plain.url, spec.url):  # warm-up; the speculative server's cost model learns from it
            asyncio.run(serve.load(url, prompts, max(args.clients), 1, 16))
        for c in args.clients:
            rounds = []
            for r in range(args.rounds):
                print(f"{name}, {c} client(s), round {r + 1}/{args.rounds} ...", flush=True)
                h0 = serve.httpx_get_json(f"{plain.url}/health")
                plain_run = asyncio.run(serve.load(plain.url, prompts, c, args.requests, args.new_tokens))
                h1 = serve.httpx_get_json(f"{plain.url}/health")
                s0 = serve.httpx_get_json(f"{spec.url}/health")
                spec_run = asyncio.run(serve.load(spec.url, prompts, c, args.requests, args.new_tokens))
                s1 = serve.httpx_get_json(f"{spec.url}/health")
                ratio = spec_run["tokens_per_second"] / plain_run["tokens_per_second"]
                rounds.append({"plain": plain_run, "speculative": spec_run, "ratio": round(ratio, 3),
                               "plain_step_ms": step_ms(h0, h1), "profile": round_profile(s0, s1)})
                print(f"  plain {plain_run['tokens_per_second']:.0f} tok/s, --draft "
                      f"{spec_run['tokens_per_second']:.0f} tok/s ({ratio:.2f}x), errors "
                      f"{plain_run['errors']} / {spec_run['errors']}; {rounds[-1]['profile']}", flush=True)
            rows.append(summarise(name, c, rounds, agree))
    return rows


def summarise(name: str, clients: int, rounds: list[dict], agree: bool) -> dict:
    med = statistics.median

    def ttft(side):
        times = sorted(t for r in rounds for t in r[side]["ttfts"])
        return round(1000 * med(times), 1) if times else None

    profiles = [r["profile"] for r in rounds]
    profile = {key: med(p[key] for p in profiles) for key in profiles[0] if key != "ms_per_round"}
    profile["ms_per_round"] = {ph: med(p["ms_per_round"][ph] for p in profiles) for ph in PHASES}
    return {
        "target": name, "clients": clients, "same_text": agree,
        "plain_tokens_per_second": round(med(r["plain"]["tokens_per_second"] for r in rounds), 1),
        "draft_tokens_per_second": round(med(r["speculative"]["tokens_per_second"] for r in rounds), 1),
        "ratio": round(med(r["ratio"] for r in rounds), 3),
        "plain_ttft_p50_ms": ttft("plain"), "draft_ttft_p50_ms": ttft("speculative"),
        "errors": sum(r["plain"]["errors"] + r["speculative"]["errors"] for r in rounds),
        "plain_step_ms": med(r["plain_step_ms"] for r in rounds), "profile": profile,
        "rounds": [{**r, "plain": _without_ttfts(r["plain"]), "speculative": _without_ttfts(r["speculative"])}
                   for r in rounds],
    }


def _without_ttfts(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "ttfts"}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    _, tok = load_base(args.target)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        value, value_note = value_dir(args, tok, Path(tmp))
        prompts = make_prompts(tok, max(args.clients) * args.requests, args.prompt_len)
        for name, base in targets(args, Path(tmp)).items():
            rows += measure(args, name, base, value, prompts)
    result = {"command": "python benchmarks/serve_speculative.py " + " ".join(argv),
              "device": f"cpu: {platform.processor() or platform.machine()}, 1 torch thread per server",
              "torch": torch.__version__, "target": args.target, "draft": args.draft, "value": value_note,
              "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "requests_per_client": args.requests,
              "rounds": args.rounds, "finished": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    lines = ["| target | clients | plain tok/s | --draft tok/s | --draft / plain | TTFT p50 ms plain / --draft "
             "| acceptance | draft length | rows per round | tokens/row/round "
             "| round ms: draft / verify / bookkeeping / prefill / between | plain step ms | same text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p, ms = r["profile"], r["profile"]["ms_per_round"]
        lines.append(
            f"| {r['target']} | {r['clients']} | {r['plain_tokens_per_second']:.0f} "
            f"| {r['draft_tokens_per_second']:.0f} | **{r['ratio']:.2f}** "
            f"| {r['plain_ttft_p50_ms']} / {r['draft_ttft_p50_ms']} | {p['acceptance']:.2f} "
            f"| {p['mean_draft_len']:.1f} | {p['rows_per_round']:.1f} | {p['tokens_per_row_per_round']:.2f} "
            f"| {' / '.join(f'{ms[ph]:.1f}' for ph in PHASES)} | {r['plain_step_ms']:.1f} "
            f"| {'yes' if r['same_text'] else 'no'} |")
    return "\n".join(lines)


def notes(result: dict) -> str:
    """Where the time goes, from the numbers themselves."""
    lines = []
    for r in result["rows"]:
        p, ms = r["profile"], r["profile"]["ms_per_round"]
        total = sum(ms.values()) or 1e-9
        per_token = total / max(p["tokens_per_row_per_round"] * p["rows_per_round"], 1e-9)
        plain_per_token = r["plain_step_ms"] / max(p["rows_per_round"], 1e-9)
        verdict = "meets" if r["ratio"] >= GOAL else "misses"
        lines.append(
            f"- {r['target']}, {r['clients']} client(s): {r['ratio']:.2f}x the plain server ({verdict} the "
            f"{GOAL}x goal). A round of {p['rows_per_round']:.1f} rows drafts {p['mean_draft_len']:.1f} tokens and "
            f"commits {p['tokens_per_row_per_round']:.2f} per row in {total:.1f} ms "
            f"({100 * ms['draft'] / total:.0f}% drafting, {100 * ms['verify'] / total:.0f}% verifying, "
            f"{100 * (ms['bookkeeping'] + ms['prefill'] + ms['between']) / total:.0f}% the rest): "
            f"{per_token:.2f} ms per token, against {plain_per_token:.2f} ms per token for the plain server.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    reporting.bar_chart(path, [f"{r['target']}\n{r['clients']} cl." for r in rows],
                        [("--draft / plain", [r["ratio"] for r in rows])], "tokens/s relative to the plain server",
                        f"serve --draft ({result['device']})", baseline=1.0)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    body = f"""## Serving with a draft (`serve --draft`)

Made by `{result['command']}` ({result['device']}, torch {result['torch']}, other jobs sharing the 2 cores);
target `{result['target']}`, draft `{result['draft']}`, value model: `{result['value']}`. Streaming clients on
127.0.0.1, each sending {result['requests_per_client']} greedy requests of {result['new_tokens']} tokens
(end-of-sequence ignored) after {result['prompt_len']}-token prompts of held-out book text; the plain server and
the `--draft` server take turns, {result['rounds']} rounds, medians shown. Raw numbers: `{shown(out)}`; plot:
`{shown(out.with_suffix('.png'))}`.

- *--draft / plain*: tokens/s of the server with `--draft` over the same server without it (goal {GOAL}x).
- The rest describe the `--draft` server's rounds: *acceptance* of drafted tokens, mean *draft length* (chosen
  from measured costs), *rows per round*, tokens committed per row and round (before rows ending inside a round
  drop theirs), and where a round's time goes: drafting (k + 1 fused draft steps), verifying (one target pass
  over k + 1 tokens per row), bookkeeping (composition, verdicts, cache commits), prefilling rows that joined,
  and the engine's work between rounds (events, rows leaving). *plain step ms*: the plain server's decoding step.
- *xN deep*: the target with N times its layers, the added ones adding nothing (zeroed output projections):
  the same function and acceptance at N times the cost per token (benchmarks/speculative.py).
- *same text*: one greedy request answered identically by both servers.

{table}

{notes(result)}
"""
    write_doc_section(ROOT / "docs" / "performance.md", "serve-speculative", body, heading="# Performance")


if __name__ == "__main__":
    main()
