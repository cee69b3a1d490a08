"""One base, many value models chosen per request: throughput, time to first token and memory of
`transfertune serve` holding 1, 4 or 8 value models, against one server per value model.

    python benchmarks/serve_multi_value.py            # mini-l + value models of mini-s's shape, 32 clients
    python benchmarks/serve_multi_value.py --docs     # also write the table and plot into docs/serving.md
    python benchmarks/serve_multi_value.py --values 1 8 --requests 2 --new-tokens 16 --separate 0   # quick

What it runs, all on 127.0.0.1 (servers in subprocesses with --threads torch threads each, stopped at the end):
  - for each N in --values: one server holding N value models (`--value vK=DIR`); --clients concurrent streaming
    clients each send --requests requests one after the other, each for `BASE+vK` with K drawn at random (seeded:
    the same draws for every configuration of the same N). N = 1 is the reference: every request for one value
    model, the same clients and tokens.
  - with --separate N (default: the largest of --values): N servers, one per value model (the base loaded in
    each), every request sent to the server of the value model it drew: what serving N post-trainings costs
    without choosing per request (no batch shared across them, the base once per server).
The configurations take turns, --rounds times (a machine whose load drifts slows all alike); a row shows the
medians. Tokens/s = completion tokens / wall time; TTFT = time to the first streamed text; memory = resident
set size of the server process(es) at its peak (VmHWM: weights, KV caches, allocator), summed over the servers of
a configuration. Before measuring, one greedy answer per value model of the largest server is checked against
ComposedGenerator with that value model alone.

The value models are untrained: mini-s's architecture with random weights (`ValueModel.create("random:...")`, a
seed each, output layer kept), so each composes differently and costs exactly what a trained one of that size
costs; the text is not meant to be good.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/serve.py: the same waiting everywhere

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reporting  # noqa: E402
from serve import Server, load, make_prompts  # noqa: E402

from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.io.loading import load_tokenizer  # noqa: E402

SECTION = "multi-value-bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="mini-l", help="base model (default mini-l)")
    p.add_argument("--value-shape", default="mini-s", help="architecture of the random value models (default mini-s)")
    p.add_argument("--values", type=int, nargs="+", default=[1, 4, 8], help="value models per server (1 4 8)")
    p.add_argument("--separate", type=int, default=None,
                   help="also N servers of one value model each (default: the largest --values; 0: skip)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another (default 4)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="turns of every configuration; medians shown (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_multi_value.json"))
    p.add_argument("--docs", action="store_true", help="write the table and plot into docs/serving.md")
    return p.parse_args(argv)


def make_values(shape: str, tokenizer, n: int, tmp: Path) -> list[str]:
    dirs = []
    for k in range(n):
        torch.manual_seed(1000 + k)
        value = ValueModel.create(f"random:{shape}", tokenizer=tokenizer, zero_init_head=False,
                                  training_base=shape)
        value.save(tmp / f"v{k}")
        dirs.append(str(tmp / f"v{k}"))
    return dirs


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def check_greedy(url: str, base: str, names: list[str], dirs: list[str], prompt: str) -> dict[str, bool]:
    """Whether each value model's greedy answer from the server equals ComposedGenerator with it alone."""
    import httpx

    same = {}
    for name, directory in zip(names, dirs):
        body = {"model": f"{base}+{name}", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        gen = ComposedModel.from_pretrained(base, [directory]).generator()
        gen.eos_ids = set()
        same[name] = got == gen.generate([prompt], max_new_tokens=8).text[0]
    return same


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    separate = max(args.values) if args.separate is None else args.separate
    tok = load_tokenizer(args.base)
    total = args.clients * args.requests
    prompts = make_prompts(tok, total, args.prompt_len)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        dirs = make_values(args.value_shape, tok, max(args.values + [separate]), Path(tmp))
        names = [f"v{k}" for k in range(len(dirs))]
        server_args = ("--max-batch", str(args.clients), "--max-queue", "1024")
        configs = []  # (label, n value models, [(server, [names it serves])])
        print("starting servers ...", flush=True)
        for n in args.values:
            server = stack.enter_context(Server(args.base, [f"{m}={d}" for m, d in zip(names[:n], dirs[:n])],
                                                *server_args, threads=args.threads))
            configs.append((f"1 server, {n} value model{'s' * (n > 1)}", n, [(server, names[:n])]))
        if separate:
            servers = [(stack.enter_context(Server(args.base, [f"{m}={d}"], *server_args, threads=args.threads)),
                        [m]) for m, d in zip(names[:separate], dirs[:separate])]
            configs.append((f"{separate} servers, 1 value model each", separate, servers))
        biggest = max(configs[: len(args.values)], key=lambda c: c[1])[2][0][0]
        print("checking greedy answers against ComposedGenerator ...", flush=True)
        greedy_same = check_greedy(biggest.url, args.base, names[: max(args.values)], dirs, prompts[0])
        rows = {label: [] for label, _, _ in configs}
        for r in range(args.rounds):
            for label, n, servers in configs:
                draws = random.Random(f"{args.seed}-{n}").choices(range(n), k=total)
                where = {name: server.url for server, served in servers for name in served}
                targets = [(where[names[k]], f"{args.base}+{names[k]}") for k in draws]
                for server, served in servers:  # warm-up: every value model once
                    for name in served:
                        asyncio.run(load(None, prompts, 1, 1, 2, targets=[(server.url, f"{args.base}+{name}")]))
                print(f"round {r + 1}/{args.rounds}: {label}: {args.clients} clients x {args.requests} requests ...",
                      flush=True)
                run = asyncio.run(load(None, prompts, args.clients, args.requests, args.new_tokens, targets=targets))
                run["requests_per_value_model"] = [draws.count(k) for k in range(n)]
                print(f"  {run['tokens_per_second']:.0f} tok/s, {run['errors']} errors", flush=True)
                rows[label].append(run)
        table_rows = []
        for label, n, servers in configs:
            rounds = rows[label]
            ttfts = sorted(t for run in rounds for t in run.pop("ttfts"))
            rss = [peak_rss_mib(server.proc.pid) for server, _ in servers]
            table_rows.append({
                "configuration": label, "value_models": n, "servers": len(servers),
                "tokens_per_second": round(statistics.median(run["tokens_per_second"] for run in rounds), 1),
                "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
                "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1) if ttfts else None,
                "peak_rss_mib": round(sum(rss), 1) if all(x is not None for x in rss) else None,
                "errors": sum(run["errors"] for run in rounds), "rounds": rounds,
            })
    one = next((row for row in table_rows if row["value_models"] == 1 and row["servers"] == 1), None)
    for row in table_rows:
        row["vs_one_value_model"] = round(row["tokens_per_second"] / one["tokens_per_second"], 2) if one else None
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "command": "python benchmarks/serve_multi_value.py " + " ".join(argv),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": args.threads, "torch": torch.__version__,
        "load_average_at_end": None if load_avg is None else round(load_avg, 1),
        "base": args.base, "value_shape": args.value_shape, "clients": args.clients,
        "requests_per_client": args.requests, "new_tokens": args.new_tokens,
        "prompt_tokens": round(statistics.mean(len(encode_prompt(tok, p)) for p in prompts), 1),
        "rounds": args.rounds, "greedy_equal_to_generate": greedy_same, "rows": table_rows,
    }
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    lines = ["| configuration | requests | tok/s | vs 1 value model | TTFT p50 ms | TTFT p95 ms | peak RSS MiB "
             "| errors |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['configuration']} | {result['clients'] * result['requests_per_client']} "
                     f"| {r['tokens_per_second']:.0f} | {r['vs_one_value_model']:.2f} | {r['ttft_p50_ms']} "
                     f"| {r['ttft_p95_ms']} | {r['peak_rss_mib']:.0f} | {r['errors']} |")
    same = result["greedy_equal_to_generate"]
    lines.append(f"\nGreedy answers equal to `ComposedGenerator` with the value model alone: {sum(same.values())} of "
                 f"{len(same)} value models.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['value_models']} value{'s' * (r['value_models'] > 1)}" if r["servers"] == 1
              else f"{r['servers']} servers\n(1 value each)" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, ylabel in zip(axes, ("tokens_per_second", "ttft_p50_ms", "peak_rss_mib"),
                               ("tokens / s", "time to first token, p50 (ms)", "peak RSS (MiB)")):
        ax.bar(range(len(rows)), [r[key] or 0 for r in rows], color=["C0"] * (len(rows) - 1) + ["C1"])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
    fig.suptitle(f"{result['base']} + value models of {result['value_shape']}'s shape, {result['clients']} clients x "
                 f"{result['requests_per_client']} requests x {result['new_tokens']} tokens; {result['device']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    body = f"""Made by `{result['command']}` ({result['device']}, {result['torch_threads']} torch thread(s) per server,
torch {result['torch']}; load average {result['load_average_at_end']} at the end, other jobs sharing the machine);
base `{result['base']}`, value models: untrained, {result['value_shape']}'s architecture with random weights (a seed
each); {result['clients']} streaming clients x {result['requests_per_client']} requests, prompts of about
{result['prompt_tokens']} tokens, {result['new_tokens']} tokens per request (end-of-sequence ignored); each request
picks one of the server's value models at random; the configurations take turns, {result['rounds']} rounds, medians
shown. Raw numbers: `{shown}`.

{table}

![tokens/s, TTFT and memory per configuration](results-{SECTION}.png)"""
    write_doc_section(ROOT / "docs" / "serving.md", SECTION, body, png=out.with_suffix(".png"), heading="# Serving")


if __name__ == "__main__":
    main()
