"""`transfertune serve` under load: throughput, time to first token, errors, and a fuzzing run.

    python benchmarks/serve.py                    # built-in mini-l base + an untrained value model on mini-s
    python benchmarks/serve.py --docs             # also write the table into docs/serving.md
    python benchmarks/serve.py --base B --value runs/v --clients 1 8 --requests 2 --new-tokens 16 --fuzz 50

What it does, all on 127.0.0.1:
  1. for each --threads t: starts `transfertune serve` in a subprocess (a free port) with t torch threads, as
     this process then has too, and the same OMP_WAIT_POLICY (PASSIVE unless set: see the note at the imports).
  2. for each client count c, --rounds times in turn:
     direct: the load's requests through ComposedGenerator.generate in this process, as --requests batches of
       c prompts one after another (end-of-sequence ignored, so every row makes exactly --new-tokens tokens);
     server: c concurrent streaming clients (httpx, in this process) that each send --requests requests one
       after the other (`ignore_eos`, --new-tokens tokens each): tokens/s over the whole run, time to first
       token (first text chunk) per request, errors, and the CPU time of the server (by thread), of the
       clients and of the direct run. Taking turns makes a load that drifts (other jobs on the machine) hit
       both sides alike; a row reports the medians over its rounds (the ratio is the median of each round's
       server / direct). c = 1 is "one at a time"; every other row is also compared with it.
  3. fuzzing: a second server (--max-model-len 48 keeps answers short) gets --fuzz request bodies drawn from its
     own OpenAPI schema (tests/fuzz_strategies.py, hypothesis); counts 5xx, then checks that a greedy completion still
     equals ComposedGenerator's. Every server it starts, it stops.

Without --value the value model is untrained: mini-s's own weights with their output layer as values
(`ValueModel.create(--value-init, zero_init_head=False)`), which costs exactly what a trained value model of that
size costs; the text is not meant to be good. Writes --out (JSON), a PNG beside it, and with --docs the table
into docs/serving.md between the `<!-- section: serve-bench -->` markers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch's OpenMP threads wait for work the same way here and in the server: with libgomp's default policy a
# team started from the main thread spins between ops and one started from another thread (the server's engine)
# barely does, once libgomp runs more threads than there are cores; set OMP_WAIT_POLICY to compare otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

import reporting  # noqa: E402
from composed_setup import add_model_args, value_dirs  # noqa: E402

from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.io.loading import load_tokenizer  # noqa: E402

SECTION = "serve-bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default 1 8 32)")
    p.add_argument("--requests", type=int, default=8, help="requests per client, one after another (default 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--fuzz", type=int, default=1000, help="fuzzed requests (default 1000; 0 = skip)")
    p.add_argument("--fuzz-seconds", type=float, default=900, help="stop fuzzing after this long (default 900)")
    p.add_argument("--rounds", type=int, default=3,
                   help="turns of direct then server per client count; medians are reported (default 3)")
    p.add_argument("--threads", type=int, nargs="+", default=[0],
                   help="torch threads, here and in the server: one server and one table block per value "
                        "(0: torch's default here, and as many there; default 0)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    p.add_argument("--docs", action="store_true", help="write the table into docs/serving.md")
    return p.parse_args(argv)


def make_prompts(tokenizer, n: int, length: int) -> list[str]:
    """Texts of about `length` tokens (this file's docstring), shifted so that no two are the same."""
    ids = tokenizer(__doc__ * 8)["input_ids"]
    return [tokenizer.decode(ids[i * 5 : i * 5 + length]) for i in range(n)]


def batches(prompts: list[str], clients: int, requests: int) -> list[list[str]]:
    """The prompts of the load run, as `requests` batches of one prompt per client (client c's request r is
    prompts[c * requests + r], as in `load`)."""
    return [[prompts[(c * requests + r) % len(prompts)] for c in range(clients)] for r in range(requests)]


def direct(gen, prompts: list[str], clients: int, requests: int, new_tokens: int) -> float:
    """Tokens/s of the load run's requests through ComposedGenerator.generate: one batch of `clients` prompts
    after another (as many batches as each client sends requests), end-of-sequence ignored."""
    start = time.perf_counter()
    for batch in batches(prompts, clients, requests):
        gen.generate(batch, max_new_tokens=new_tokens)
    return clients * requests * new_tokens / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time of a process's threads by name (Linux /proc; {} elsewhere): the engine thread, the event loop
    (the main thread) and torch's worker threads."""
    out: dict[str, float] = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            name = "main" if task.name == str(pid) else name
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transfertune serve` in a subprocess on 127.0.0.1; a context manager that always stops it."""

    def __init__(self, base: str, values: list[str], *extra: str, threads: int = 0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "transfertune.cli.main", "serve", "--base", base, "--port", str(self.port),
                    "--served-model-name", "bench", *[a for v in values for a in ("--value", v)], *extra]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def __enter__(self):
        import httpx

        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("server did not start in 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def stream_one(client, url: str, prompt: str, new_tokens: int,
                     model: str = "bench") -> tuple[float | None, int, str | None]:
    """(time to first token, tokens, error) of one streaming completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens, done = time.perf_counter(), None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return None, 0, f"HTTP {resp.status_code}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                if ttft is not None and '"usage"' not in line and '"error"' not in line:
                    continue  # the client only parses what it measures, to leave the CPU to the server
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return ttft, tokens, chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - start
    except Exception as err:  # counted, not raised: the run reports its errors
        return ttft, tokens, f"{type(err).__name__}: {err}"
    if not done or tokens != new_tokens:
        return ttft, tokens, f"incomplete: {tokens} of {new_tokens} tokens"
    return ttft, tokens, None


async def load(url: str | None, prompts: list[str], clients: int, requests: int, new_tokens: int,
               targets: list[tuple[str, str]] | None = None) -> dict:
    """`clients` concurrent clients, `requests` each, streaming from `url`; with `targets`, request r of client c
    goes to targets[c * requests + r] = (url, model) instead."""
    import httpx

    async def client_loop(c: int, http):
        results = []
        for r in range(requests):
            where, *model = targets[c * requests + r] if targets else (url,)
            results.append(await stream_one(http, where, prompts[(c * requests + r) % len(prompts)], new_tokens,
                                            *model))
        return results

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ttfts = sorted(t for t, _, _ in results if t is not None)
    errors = [e for _, _, e in results if e]
    tokens = sum(n for _, n, _ in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_examples": errors[:3],
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_second": round(tokens / wall, 1), "ttfts": ttfts,
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
            "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1) if ttfts else None}


def fuzz(url: str, count: int, seconds: float) -> dict:
    """`count` schema-drawn requests, one after another; statuses counted, nothing raised."""
    import importlib.util

    import httpx
    from hypothesis import HealthCheck, Phase, given, settings

    spec = importlib.util.spec_from_file_location("fuzz_strategies", ROOT / "tests" / "fuzz_strategies.py")
    strategies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strategies)
    requests = strategies.requests

    statuses: dict[int, int] = {}
    examples_5xx = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=120) as http:
        schema = http.get(f"{url}/openapi.json").json()

        @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(requests(schema))
        def one(case):
            if sum(statuses.values()) >= count or time.monotonic() > deadline:
                return
            route, body = case
            try:
                status = http.post(f"{url}{route}", json=body).status_code
            except httpx.HTTPError as err:
                status = 599
                examples_5xx.append({"body": body, "error": str(err)})
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500 and len(examples_5xx) < 5:
                examples_5xx.append({"route": route, "body": body, "status": status})

        while sum(statuses.values()) < count and time.monotonic() < deadline:
            one()
    sent = sum(statuses.values())
    return {"requests": sent, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": sum(v for k, v in statuses.items() if k >= 500), "examples_5xx": examples_5xx}


def check_answer(url: str, cm: ComposedModel, prompt: str) -> bool:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    got = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    return got == cm.generator().generate([prompt], max_new_tokens=8).text[0]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    tok = load_tokenizer(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        values, value_note = value_dirs(args, tok, Path(tmp))
        cm = ComposedModel.from_pretrained(args.base, values)
        prompts = make_prompts(tok, max(args.clients) * args.requests, args.prompt_len)
        prompt_tokens = round(statistics.mean(len(encode_prompt(tok, p)) for p in prompts), 1)
        gen = cm.generator()
        gen.eos_ids = set()  # as the clients' ignore_eos
        rows = []
        for threads in [t or default_threads for t in args.threads]:
            torch.set_num_threads(threads)  # the server gets as many: the comparison is at equal thread counts
            gen.generate(prompts[:1], max_new_tokens=4)  # warm-up
            rows += measure(args, gen, values, prompts, threads)
        fuzz_result = None
        if args.fuzz:
            print(f"fuzzing with {args.fuzz} requests ...", flush=True)
            with Server(args.base, values, "--max-model-len", "48", threads=threads) as server:
                fuzz_result = fuzz(server.url, args.fuzz, args.fuzz_seconds)
                fuzz_result["correct_after"] = check_answer(server.url, cm, prompts[0])
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "command": "python benchmarks/serve.py " + " ".join(argv),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": sorted({r["torch_threads"] for r in rows}),
        "load_average_at_end": None if load_avg is None else round(load_avg, 1),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__, "base": args.base, "value": value_note, "new_tokens": args.new_tokens,
        "prompt_tokens": prompt_tokens, "requests_per_client": args.requests, "rounds": args.rounds, "rows": rows,
        "fuzz": fuzz_result,
    }
    return report(result, args)


def measure(args, gen, values: list[str], prompts: list[str], threads: int) -> list[dict]:
    """The table's rows for one thread count: a server with `threads` torch threads, and for each client count,
    --rounds turns of direct then server."""
    rows = []
    with Server(args.base, values, "--max-batch", str(max(args.clients)), "--max-queue", "1024",
                threads=threads) as server:
        asyncio.run(load(server.url, prompts, 1, 1, 4))  # warm-up
        for c in args.clients:
            rounds = []
            for r in range(args.rounds):  # direct and server take turns: a load that drifts hits both
                print(f"{threads} torch thread(s), round {r + 1}/{args.rounds}: direct batches of {c}, then {c} "
                      f"streaming client(s) x {args.requests} requests ...", flush=True)
                cpu_direct = time.process_time()
                direct_tps = direct(gen, prompts, c, args.requests, args.new_tokens)
                cpu_direct = time.process_time() - cpu_direct
                health = httpx_get_json(f"{server.url}/health")
                threads_before = thread_cpu_seconds(server.proc.pid)
                cpu_server, cpu_client = cpu_seconds(server.proc.pid), time.process_time()
                run = asyncio.run(load(server.url, prompts, c, args.requests, args.new_tokens))
                cpu_client = time.process_time() - cpu_client
                cpu_server = (cpu_seconds(server.proc.pid) - cpu_server) if cpu_server is not None else None
                after = httpx_get_json(f"{server.url}/health")
                threads_after = thread_cpu_seconds(server.proc.pid)
                by_thread = {k: round(v - threads_before.get(k, 0.0), 2) for k, v in threads_after.items()
                             if v - threads_before.get(k, 0.0) >= 0.01}
                run.update(direct_tokens_per_second=round(direct_tps, 1),
                           server_over_direct=round(run["tokens_per_second"] / direct_tps, 3),
                           engine_steps=after["steps"] - health["steps"],
                           engine_step_seconds=round(after["step_seconds"] - health["step_seconds"], 3),
                           direct_cpu_seconds=round(cpu_direct, 2),
                           server_cpu_seconds=None if cpu_server is None else round(cpu_server, 2),
                           client_cpu_seconds=round(cpu_client, 2), server_cpu_by_thread=by_thread)
                print(f"  direct {direct_tps:.0f} tok/s, server {run['tokens_per_second']:.0f} tok/s "
                      f"({run['server_over_direct']:.2f}), {run['errors']} errors; CPU s: direct {cpu_direct:.1f}, "
                      f"server {run['server_cpu_seconds']} {by_thread}, client {cpu_client:.1f}", flush=True)
                rounds.append(run)
            rows.append({"torch_threads": threads, **summarise(rounds)})
    one = next((r for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["speedup_vs_one_at_a_time"] = round(r["tokens_per_second"] / one["tokens_per_second"], 2) if one else None
    return rows


def httpx_get_json(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=60).json()


def _cpu_ratio(rounds: list[dict], key: str) -> float | None:
    ratios = [r[key] / r["direct_cpu_seconds"] for r in rounds if r.get(key) is not None and r["direct_cpu_seconds"]]
    return round(statistics.median(ratios), 2) if ratios else None


def summarise(rounds: list[dict]) -> dict:
    """One row of the table from the rounds of one client count: medians of the throughputs and of the
    per-round ratios (each ratio pairs a server run with the direct run just before it), TTFT over all rounds."""
    med = statistics.median
    ttfts = sorted(t for r in rounds for t in r.pop("ttfts"))
    return {
        "clients": rounds[0]["clients"], "requests": rounds[0]["requests"],
        "errors": sum(r["errors"] for r in rounds),
        "error_examples": [e for r in rounds for e in r["error_examples"]][:3],
        "tokens_per_second": round(med(r["tokens_per_second"] for r in rounds), 1),
        "direct_tokens_per_second": round(med(r["direct_tokens_per_second"] for r in rounds), 1),
        "server_over_direct": round(med(r["server_over_direct"] for r in rounds), 3),
        "server_cpu_over_direct": _cpu_ratio(rounds, "server_cpu_seconds"),
        "client_cpu_over_direct": _cpu_ratio(rounds, "client_cpu_seconds"),
        "ttft_p50_ms": round(1000 * med(ttfts), 1) if ttfts else None,
        "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1) if ttfts else None,
        "rounds": rounds,
    }


def report(result: dict, args) -> dict:
    return reporting.report(result, args, format_table, plot, write_docs)


def format_table(result: dict) -> str:
    lines = ["| torch threads | clients | requests | server tok/s | direct tok/s (same batches) | server / direct "
             "| vs one at a time | TTFT p50 ms | TTFT p95 ms | server CPU / direct CPU | client CPU / direct CPU "
             "| errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['torch_threads']} | {r['clients']} | {r['requests']} | {r['tokens_per_second']:.0f} "
                     f"| {r['direct_tokens_per_second']:.0f} | {r['server_over_direct']:.2f} "
                     f"| {r['speedup_vs_one_at_a_time'] or 0:.2f} | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} "
                     f"| {_num(r.get('server_cpu_over_direct'))} | {_num(r.get('client_cpu_over_direct'))} "
                     f"| {r['errors']} |")
    f = result.get("fuzz")
    if f:
        lines.append(f"\nFuzzing: {f['requests']} requests drawn from the OpenAPI schema, statuses {f['statuses']}, "
                     f"{f['5xx']} 5xx; a greedy completion afterwards "
                     f"{'matched' if f['correct_after'] else 'DID NOT match'} ComposedGenerator.")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tokens_per_second"] for r in rows], 0.4, label="server (streaming clients)")
    ax.bar([i + 0.2 for i in x], [r["direct_tokens_per_second"] for r in rows], 0.4, label="ComposedGenerator")
    ax.set_xticks(list(x), [f"{r['clients']} cl.\n{r['torch_threads']} thr." for r in rows], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['base']} + value, {result['new_tokens']} tokens/request", fontsize=9)
    ax2.bar([i - 0.2 for i in x], [r["ttft_p50_ms"] or 0 for r in rows], 0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [r["ttft_p95_ms"] or 0 for r in rows], 0.4, label="p95")
    ax2.set_xticks(list(x), [f"{r['clients']} cl.\n{r['torch_threads']} thr." for r in rows], fontsize=8)
    ax2.set_xlabel("concurrent clients, torch threads")
    ax2.set_ylabel("time to first token (ms)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, OMP_WAIT_POLICY={result.get('omp_wait_policy')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    def shown(path: Path) -> str:
        return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)

    load = result.get("load_average_at_end")
    body = f"""Made by `{result['command']}` ({result['device']}, {'/'.join(map(str, result['torch_threads']))} torch
thread(s) in the benchmark and in the server alike, OMP_WAIT_POLICY={result.get('omp_wait_policy')},
torch {result['torch']}; load average {load} at the end, other jobs sharing the machine); base `{result['base']}`,
value model: {result['value']}; prompts of about {result['prompt_tokens']} tokens, {result['new_tokens']} tokens per
request (end-of-sequence ignored), {result['requests_per_client']} requests per client; direct and server take
turns, {result['rounds']} rounds each, medians shown. Raw numbers (every round): `{shown(out)}`; plot:
`{shown(out.with_suffix('.png'))}`.

- *server tok/s*: completion tokens of all requests / wall time, streaming clients (httpx) on 127.0.0.1.
- *direct tok/s*: the same requests through `ComposedGenerator.generate` in the benchmark's process, as batches of
  one prompt per client, one batch after another (no HTTP, no scheduling); *server / direct* (the median of each
  round's ratio) is what serving costs.
- *vs one at a time*: against the 1-client row (requests served strictly one after another).
- *TTFT*: time to the first streamed text, per request (all rounds).
- *server CPU / direct CPU*: CPU time of the whole server process (engine thread, event loop, torch threads)
  over that of the direct run, for the same tokens; *client CPU*: the benchmark's clients, which share the
  machine's cores with the server.

{table}"""
    write_doc_section(ROOT / "docs" / "serving.md", SECTION, body, heading="# Serving")


if __name__ == "__main__":
    main()
