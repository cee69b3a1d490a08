"""Composed decoding inside vLLM against transfertune's own ComposedGenerator: throughput at 1, 8 and 32
concurrent requests, as ratios. Run it in .venv-vllm (`make vllm-venv`):

    .venv-vllm/bin/python benchmarks/vllm_engine.py                    # mini-l + an untrained value model on mini-s
    .venv-vllm/bin/python benchmarks/vllm_engine.py --docs             # also write the table into docs/serving.md
    .venv-vllm/bin/python benchmarks/vllm_engine.py --base B --value runs/v --concurrency 1 8 --new-tokens 32

For each concurrency c, c prompts of about --prompt-len tokens are decoded together, --new-tokens tokens each
(end-of-sequence ignored), fp32:
  native: ComposedGenerator's lock-step batch of the c prompts (one KV cache per model);
  vLLM: the same base + value models exported (`transfertune export --engine vllm`) and opened with `vllm.LLM`
     in this process (engine and worker in-process), the c requests submitted at once to `LLM.generate`
     (continuous batching, paged KV caches); eager mode unless --compile.
Both run in this one process on the same cores (vLLM's CPU worker binds all cores but one, and the process
with it), taking turns --repeat times per setting after a warm-up, so a machine whose load changes slows both
alike; the best turn of each is kept. Tokens/s = c * new tokens / wall time. The greedy tokens of both are
compared too (requests whose whole continuation is identical). Writes
--out (JSON) and with --docs the table into docs/serving.md between `<!-- section: vllm-bench -->` markers.

Without --value the value model is untrained: --value-init's weights with their output layer kept, which costs
what a trained value model of that size costs (vLLM's CPU attention needs head_dim >= 32 in both models).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import composed_setup
import torch

from transfertune.inference.composed_model import ComposedModel
from transfertune.io.loading import load_tokenizer
from transfertune.serving.vllm.export import export_vllm

ROOT = Path(__file__).resolve().parents[1]

SECTION = "vllm-bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    composed_setup.add_model_args(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="requests decoded together (default 1 8 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--repeat", type=int, default=3, help="turns per engine and setting, best kept (default 3)")
    p.add_argument("--compile", action="store_true", help="let vLLM use torch.compile (default: eager)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm.json"))
    p.add_argument("--docs", action="store_true", help="write the table into docs/serving.md")
    return p.parse_args(argv)


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """Token ids of `n` different texts of `length` tokens (windows over this file's docstring)."""
    ids = tokenizer(__doc__ * 8, add_special_tokens=False, verbose=False)["input_ids"]
    return [ids[i * 7: i * 7 + length] for i in range(n)]


def native_runner(cm: ComposedModel, prompts: list[list[int]]):
    """run(c, n) -> greedy tokens of the first c prompts, c decoded together by ComposedGenerator."""
    from transfertune.inference.sampling import SamplingParams

    gen = cm.generator()
    gen.eos_ids = set()

    def run(c: int, n: int) -> list[list[int]]:
        steps = [t.tolist() for t, _ in gen.decode_steps([list(p) for p in prompts[:c]], n, SamplingParams())]
        return [list(row) for row in zip(*steps)]

    return run


def vllm_runner(export: Path, prompts: list[list[int]], args):
    """(run(c, n) -> greedy tokens of the first c prompts submitted at once to vLLM, load seconds, version)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(export), dtype="float32", max_model_len=args.prompt_len + args.new_tokens + 8,
              enforce_eager=not args.compile, seed=0, distributed_executor_backend="uni",
              max_num_seqs=max(args.concurrency), enable_prefix_caching=False)
    load_s = time.perf_counter() - start

    def run(c: int, n: int) -> list[list[int]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts[:c]],
                            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run, load_s, vllm.__version__


def interleaved(runs: dict, concurrency: list[int], n: int, repeat: int) -> dict:
    """{c: {engine: (best seconds, tokens of the last run)}}: the engines take turns, `repeat` times each, so a
    machine whose load changes slows both alike; best of the turns is kept."""
    out = {}
    for c in concurrency:
        times = {name: [] for name in runs}
        tokens = {}
        for _ in range(repeat):
            for name, run in runs.items():
                start = time.perf_counter()
                tokens[name] = run(c, n)
                times[name].append(time.perf_counter() - start)
        out[c] = {name: (min(times[name]), tokens[name]) for name in runs}
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # what vLLM's CPU worker keeps (it reserves one core)
    tok = load_tokenizer(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        values, value_note = composed_setup.value_dirs(args, tok, tmp)
        prompts = make_prompts(tok, max(args.concurrency), args.prompt_len)
        cm = ComposedModel.from_pretrained(args.base, values)
        export = export_vllm(args.base, values, tmp / "export")
        runs = {"native": native_runner(cm, prompts)}
        runs["native"](1, 4)  # warm-up, before vLLM binds this process's threads
        print("loading the export into vLLM ...", flush=True)
        runs["vllm"], load_s, version = vllm_runner(export, prompts, args)
        runs["vllm"](1, 4)
        print(f"native and vLLM in turns at {args.concurrency} ...", flush=True)
        timed = interleaved(runs, args.concurrency, args.new_tokens, args.repeat)
    rows = []
    for c, r in timed.items():
        native, served = (c * args.new_tokens / r[name][0] for name in ("native", "vllm"))
        rows.append({"concurrency": c, "native_tokens_per_second": round(native, 1),
                     "vllm_tokens_per_second": round(served, 1), "vllm_over_native": round(served / native, 3),
                     "identical_greedy_requests": sum(a == b for a, b in zip(r["native"][1], r["vllm"][1]))})
    load = os.getloadavg()[0]
    result = {
        "command": "python benchmarks/vllm_engine.py " + " ".join(argv),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                  f"{load:.1f} at the end; both engines on the cores vLLM's CPU worker binds (all but one), "
                  f"{torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__, "vllm": version, "mode": "torch.compile" if args.compile else "eager",
        "base": args.base, "value": value_note, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "repeat": args.repeat, "vllm_load_seconds": round(load_s, 1), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    print(table)
    if args.docs:
        write_docs(result, table, out)
    print(f"\nwrote {out}")
    return result


def format_table(result: dict) -> str:
    lines = ["| concurrent requests | native tok/s | vLLM tok/s | vLLM / native | greedy tokens identical |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['concurrency']} | {r['native_tokens_per_second']:.0f} | {r['vllm_tokens_per_second']:.0f} "
                     f"| {r['vllm_over_native']:.2f} | {r['identical_greedy_requests']} of {r['concurrency']} |")
    return "\n".join(lines)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    shown = str(out.resolve().relative_to(ROOT)) if out.resolve().is_relative_to(ROOT) else str(out)
    body = f"""Made by `{result['command']}` in .venv-vllm ({result['device']}; torch {result['torch']}, vLLM
{result['vllm']}, {result['mode']}); base `{result['base']}`, value model: {result['value']}; prompts of
{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens each (end-of-sequence ignored), fp32; the two
engines take turns, best of {result['repeat']} turns each. vLLM loaded the export in {result['vllm_load_seconds']} s.
Raw numbers: `{shown}`.

{table}"""
    write_doc_section(ROOT / "docs" / "serving.md", SECTION, body, heading="# Serving")


if __name__ == "__main__":
    main()
