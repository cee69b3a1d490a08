"""What choosing value models per request costs inside vLLM. Run it in .venv-vllm (`make vllm-venv`):

    .venv-vllm/bin/python benchmarks/vllm_value_mix.py                 # mini-l + 1 and 4 untrained value models
    .venv-vllm/bin/python benchmarks/vllm_value_mix.py --values 1 4 8 --docs

For each count N of --values, base + N value models are exported into one directory (`transfertune export
--engine vllm`, named v0, v1, ...) and opened with `vllm.LLM` in this process, with transfertune's logits
processor. --requests requests of --prompt-len tokens, --new-tokens each (end-of-sequence ignored, greedy, fp32,
eager), are submitted at once to `LLM.generate`:
  default:     no request says anything: every value model at weight 1 (the export's default composition);
  per request: each request picks one of the N value models at random (vllm_xargs transfertune_value), so each
               row is composed with its own (compose_logits_per_row).
The engines stay loaded side by side and take turns, --repeat times each, best kept; tok/s = requests x new
tokens / wall time, and tokens per CPU second of this process (engine and worker run in it), which other jobs
on a shared machine disturb less than wall time. In vLLM every value model runs on every row whatever the
request picks (docs/serving.md), so the per-request rows cost what the default ones do, plus the per-row
composition.

The value models are untrained: --value-init's weights with their output layer kept and perturbed by a seed each
(so the N differ), which costs what trained value models of that size cost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from transfertune.core.value_model import ValueModel
from transfertune.io.loading import load_tokenizer
from transfertune.serving.vllm.export import export_vllm

ROOT = Path(__file__).resolve().parents[1]
SECTION = "vllm-mix-bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="mini-l", help="base model (default mini-l)")
    p.add_argument("--value-init", default="mini-s", help="weights of the untrained value models (default mini-s)")
    p.add_argument("--values", type=int, nargs="+", default=[1, 4], help="value models per export (default 1 4)")
    p.add_argument("--requests", type=int, default=32, help="requests submitted at once (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--repeat", type=int, default=2, help="turns per engine and setting, best kept (default 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_value_mix.json"))
    p.add_argument("--docs", action="store_true", help="write the table into docs/serving.md")
    return p.parse_args(argv)


def value_dirs(args, tokenizer, tmp: Path, n: int) -> list[str]:
    dirs = []
    for i in range(n):
        value = ValueModel.create(args.value_init, tokenizer=tokenizer, zero_init_head=False,
                                  training_base=args.value_init)
        torch.manual_seed(i)
        with torch.no_grad():
            head = value.model.get_output_embeddings().weight
            head.add_(torch.randn_like(head) * head.std() * 0.1)
        value.save(tmp / f"v{i}")
        dirs.append(str(tmp / f"v{i}"))
    return dirs


def engine(export: Path, args):
    from vllm import LLM

    from transfertune.serving.vllm.mix_processor import ValueMixProcessor

    return LLM(model=str(export), dtype="float32", max_model_len=args.prompt_len + args.new_tokens + 8,
               enforce_eager=True, seed=0, distributed_executor_backend="uni", max_num_seqs=args.requests,
               enable_prefix_caching=False, logits_processors=[ValueMixProcessor])


def runner(llm, prompts: list[list[int]], n_values: int, per_request: bool, args):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    pick = random.Random(0)
    params = [SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True,
                             extra_args={"transfertune_value": f"v{pick.randrange(n_values)}"} if per_request
                             else None) for _ in prompts]
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def run() -> None:
        outs = llm.generate(requests, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)

    return run


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    tok = load_tokenizer(args.base)
    ids = tok(__doc__ * 8, add_special_tokens=False, verbose=False)["input_ids"]
    prompts = [ids[i * 7: i * 7 + args.prompt_len] for i in range(args.requests)]
    runs, load_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        values = value_dirs(args, tok, tmp, max(args.values))
        for n in args.values:
            export = export_vllm(args.base, values[:n], tmp / f"export-{n}")
            print(f"loading the export with {n} value model(s) ...", flush=True)
            start = time.perf_counter()
            llm = engine(export, args)
            load_s[n] = round(time.perf_counter() - start, 1)
            for mode in ("default", "per request"):
                runs[(n, mode)] = runner(llm, prompts, n, mode == "per request", args)
                runs[(n, mode)]()  # warm-up
        times = {key: [] for key in runs}
        cpu = {key: [] for key in runs}
        for _ in range(args.repeat):
            for key, run in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                times[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
    tokens = args.requests * args.new_tokens
    first = (args.values[0], "default")
    rows = [{"values": n, "requests": mode, "tokens_per_second": round(tokens / min(times[(n, mode)]), 1),
             "tokens_per_cpu_second": round(tokens / min(cpu[(n, mode)]), 1),
             "vs_first_default": round(min(times[first]) / min(times[(n, mode)]), 3),
             "cpu_vs_first_default": round(min(cpu[first]) / min(cpu[(n, mode)]), 3)} for n, mode in runs]
    result = {
        "command": "python benchmarks/vllm_value_mix.py " + " ".join(argv),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                  f"{os.getloadavg()[0]:.1f} at the end, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__, "vllm": vllm.__version__, "base": args.base, "value_init": args.value_init,
        "requests": args.requests, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "repeat": args.repeat, "load_seconds": load_s, "rows": rows,
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
    first = result["rows"][0]["values"]
    lines = [f"| value models in the export | requests | tok/s | vs {first}, default | tokens per CPU s | "
             f"vs {first}, default |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['values']} | {r['requests']} | {r['tokens_per_second']:.0f} | {r['vs_first_default']:.2f} "
                     f"| {r['tokens_per_cpu_second']:.0f} | {r['cpu_vs_first_default']:.2f} |")
    return "\n".join(lines)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    shown = str(out.resolve().relative_to(ROOT)) if out.resolve().is_relative_to(ROOT) else str(out)
    body = f"""Made by `{result['command']}` in .venv-vllm ({result['device']}; torch {result['torch']}, vLLM
{result['vllm']}, eager, fp32); base `{result['base']}`, value models: untrained ({result['value_init']} weights,
output layer kept, perturbed per value model); {result['requests']} requests submitted at once, prompts of
{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens each (end-of-sequence ignored); the engines
take turns, best of {result['repeat']}. Raw numbers: `{shown}`.

{table}"""
    write_doc_section(ROOT / "docs" / "serving.md", SECTION, body, heading="# Serving")


if __name__ == "__main__":
    main()
