"""Value-model training speed and memory against plain SFT of the same network, side by side in one run.

    python benchmarks/train_step.py                    # built-in family, people_qa batches
    python benchmarks/train_step.py --pairs mini-s:mini-s --steps 3 --repeats 1 --no-memory   # quick look

Each pair VALUE:BASE trains a value model initialised from VALUE (head zeroed, as `transfertune train` does)
against the frozen BASE. Methods, all on the same batches (real task rows, prompt tokens masked), the same
number of optimiser steps (AdamW, gradient clipping at 1.0, as the Trainer does), full fine-tuning:
  sft           VALUE as a plain causal LM, the ordinary HF loss (`model(**batch).loss`)
  sft+base      sft plus a no-grad forward of BASE over the batch: the fair lower bound of value training,
                since the frozen base's forward is inherent to the method (its logits are part of the loss)
  value         ValueTrainer.compute_loss: base forward under no_grad, output layers only at response
                positions, fused log-softmax + add + cross-entropy (compose.composed_cross_entropy)
  value-unfused the same loss the way it was computed before (sequence.composed_response_logits: full
                [B, T, V] logits of both models, then compose_logits + F.cross_entropy), for comparison
tokens/s counts non-padding input tokens. The methods are interleaved step by step (the order rotating) and each
(method, batch) keeps its fastest of --repeats steps, so that a shared machine's load hits every method alike.
Peak memory is measured per method in a child process: peak RSS above the
after-import baseline on CPU, torch.cuda.max_memory_allocated on a GPU (weights, gradients, optimiser state and
activations). Writes --out (JSON), a PNG beside it, and with --docs a section of docs/performance.md.
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

import memory  # noqa: E402
import reporting  # noqa: E402

from transfertune.io.data import RightPadCollator, SFTDataset, pad_id_of, read_jsonl  # noqa: E402
from transfertune.io.loading import load_causal_lm, load_tokenizer  # noqa: E402

METHODS = ("sft", "sft+base", "value", "value-unfused")
SECTION = "train-step"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["mini-s:mini-s", "mini-m:mini-m", "mini-l:mini-l", "mini-s:mini-l"],
                   help="VALUE:BASE pairs (default: each size against itself, the `transfertune train` default, "
                        "and mini-s over mini-l)")
    p.add_argument("--data", default=str(ROOT / "data" / "tasks" / "people_qa" / "train.jsonl"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps (distinct batches)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first timed run")
    p.add_argument("--repeats", type=int, default=3, help="times each step is repeated per method; the fastest is kept")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--docs", action="store_true", help="also write the section of docs/performance.md")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_batches(args, tokenizer, count: int) -> list[dict]:
    rows = read_jsonl(args.data)
    need = args.batch_size * count
    rows = (rows * (need // max(len(rows), 1) + 1))[:need]
    dataset = list(SFTDataset(rows, tokenizer, args.max_length))
    collate = RightPadCollator(pad_id_of(tokenizer))
    return [{k: v.to(args.device) for k, v in collate(dataset[i : i + args.batch_size]).items()}
            for i in range(0, need, args.batch_size)]


class Method:
    """One way of training: `step(batch)` does forward, backward, clipping and the optimiser step."""

    def __init__(self, name: str, value_name: str, base_name: str, tokenizer, device: str, base=None):
        from transfertune.core.value_model import ValueModel

        self.name = name
        self.base = None
        if name in ("sft", "sft+base"):
            self.model = load_causal_lm(value_name, frozen=False, device=device).train()
        else:
            self.value = ValueModel.create(value_name, tokenizer=tokenizer)
            self.model = self.value.model.to(device).train()
        if name != "sft":
            self.base = base if base is not None else load_causal_lm(base_name, device=device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        if name == "value":
            from transfertune.training.value_trainer import ValueTrainer

            trainer = ValueTrainer.__new__(ValueTrainer)  # only compute_loss: no Trainer set-up
            trainer.value_model, trainer.base_model = self.value, self.base
            self.loss = lambda batch: trainer.compute_loss(self.model, batch)
        elif name == "value-unfused":
            self.loss = self._unfused_loss
        else:
            self.loss = lambda batch: self.model(**batch).loss

    def _unfused_loss(self, batch):
        import torch.nn.functional as F

        from transfertune.core.response_logits import composed_response_logits

        cfg = self.value.config
        res = composed_response_logits(self.base, [self.model], batch["input_ids"], batch["attention_mask"],
                                       batch["labels"], beta=cfg.beta, real_vocab_size=cfg.vocab_size)
        return F.cross_entropy(res.composed, res.targets, reduction="sum") / max(res.targets.numel(), 1)

    def step(self, batch) -> None:
        if self.name == "sft+base":
            with torch.no_grad():
                self.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(args, value_name: str, base_name: str) -> dict:
    tokenizer = load_tokenizer(value_name)
    batches = make_batches(args, tokenizer, args.warmup + args.steps)
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    base = load_causal_lm(base_name, device=args.device) if any(m != "sft" for m in args.methods) else None
    methods = {m: Method(m, value_name, base_name, tokenizer, args.device, base=base) for m in args.methods}
    for m in methods.values():
        for b in warm:
            m.step(b)
    # interleaved step by step (the order rotating), so that every method meets the same load on a shared
    # machine; each (method, batch) keeps its fastest time over the repeats
    best = {m: [float("inf")] * len(timed) for m in methods}
    names = list(methods)
    for r in range(args.repeats):
        for i, b in enumerate(timed):
            for name in names[(r + i) % len(names):] + names[: (r + i) % len(names)]:
                sync(args.device)
                start = time.perf_counter()
                methods[name].step(b)
                sync(args.device)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    best = {m: sum(v) for m, v in best.items()}
    return {"inherent_memory_mb": inherent_memory_mb(methods),
            "tokens_per_step": round(tokens / len(timed), 1),
            "response_tokens_per_step": round(sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)
                                              / len(timed), 1),
            "seconds_per_step": {k: round(v / len(timed), 5) for k, v in best.items()},
            "tokens_per_second": {k: round(tokens / v, 1) for k, v in best.items()}}


def _bytes(model, trainable: bool) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if (p.requires_grad or not trainable) and p.data_ptr() not in seen:  # tied weights count once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def inherent_memory_mb(methods: dict) -> dict:
    """What value training must hold beyond SFT of the same network, by construction: the frozen base's
    weights, and the state (weights, gradients, AdamW's two moments) of the parameters SFT does not have (the
    value model's untied output layer; LoRA's frozen backbone instead of its optimiser state)."""
    if "sft" not in methods or "value" not in methods:
        return {}
    sft, value = methods["sft"].model, methods["value"].model

    def state(model) -> int:
        return _bytes(model, trainable=False) + 3 * _bytes(model, trainable=True)

    base = _bytes(methods["value"].base, trainable=False)
    return {"base_weights": round(base / 2**20, 1),
            "value_vs_sft_parameters": round((state(value) - state(sft)) / 2**20, 1)}


def memory_probe(args) -> None:
    """Child process: peak memory of one method (--memory-probe 'VALUE:BASE:METHOD') over warm-up + steps."""
    import transfertune.core.response_logits  # noqa: F401  every method's code is imported before the baseline
    import transfertune.core.value_model  # noqa: F401
    import transfertune.training.value_trainer  # noqa: F401

    value_name, base_name, method = args.memory_probe.rsplit(":", 2)
    tokenizer = load_tokenizer(value_name)
    batches = make_batches(args, tokenizer, args.warmup + args.steps)
    cuda = args.device.startswith("cuda")
    baseline = torch.cuda.memory_allocated() if cuda else memory.rss_bytes()
    m = Method(method, value_name, base_name, tokenizer, args.device)
    reset = not cuda and memory.reset_peak()  # loading's transient copies are not training's peak
    for b in batches:
        m.step(b)
    peak = torch.cuda.max_memory_allocated() if cuda else memory.peak_bytes(reset)
    print(json.dumps({"peak_mb": round((peak - baseline) / 2**20, 1)}))


def measure_memory(args, argv: list[str], value_name: str, base_name: str) -> dict:
    out = {}
    keep = [a for a in argv if a != "--docs"]
    for method in args.methods:
        res = subprocess.run([sys.executable, __file__, *keep, "--memory-probe", f"{value_name}:{base_name}:{method}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe {method} failed:\n{res.stderr[-2000:]}")
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return {}
    torch.manual_seed(0)
    rows = []
    for pair in args.pairs:
        value_name, base_name = pair.rsplit(":", 1) if ":" in pair else (pair, pair)
        print(f"timing {value_name} over {base_name} ...", file=sys.stderr, flush=True)
        row = {"value": value_name, "base": base_name, **time_pair(args, value_name, base_name)}
        tps = row["tokens_per_second"]
        row["ratios"] = {f"{m}/sft": round(tps[m] / tps["sft"], 3) for m in tps if m != "sft" and "sft" in tps}
        if "value" in tps and "sft+base" in tps:
            row["ratios"]["value/(sft+base)"] = round(tps["value"] / tps["sft+base"], 3)
        if not args.no_memory:
            print(f"memory {value_name} over {base_name} ...", file=sys.stderr, flush=True)
            mem = measure_memory(args, argv, value_name, base_name)
            row["peak_memory_mb"] = mem
            if "sft" in mem:
                row["ratios"].update({f"memory {m}/sft": round(mem[m] / mem["sft"], 3) for m in mem if m != "sft"})
                if "value" in mem and row["inherent_memory_mb"]:
                    extra = sum(row["inherent_memory_mb"].values())
                    row["ratios"]["memory (value - inherent)/sft"] = round((mem["value"] - extra) / mem["sft"], 3)
        rows.append(row)
    result = {
        "command": "python benchmarks/train_step.py " + " ".join(argv),
        "device": device_name(args.device), "torch": torch.__version__,
        "data": str(Path(args.data).resolve().relative_to(ROOT)) if Path(args.data).resolve().is_relative_to(ROOT)
        else args.data,
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "memory": "peak CUDA memory allocated" if args.device.startswith("cuda") else
        "peak RSS while training (after the models loaded) above the after-import baseline",
        "rows": rows,
    }
    return report(result, args)


def report(result: dict, args) -> dict:
    return reporting.report(result, args, format_table, plot, write_docs)


def _cell(d: dict, key: str, fmt: str) -> str:
    return format(d[key], fmt) if key in d else "-"


def format_table(result: dict) -> str:
    lines = ["| value over base | tokens/step | SFT tok/s | value tok/s | value / SFT | value / (SFT + base fwd) "
             "| before: value / SFT | SFT peak MB | value peak MB | value / SFT memory | inherent MB "
             "| (value - inherent) / SFT memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tps, ratio, mem = r["tokens_per_second"], r["ratios"], r.get("peak_memory_mb", {})
        lines.append(
            f"| {r['value']} over {r['base']} | {r['tokens_per_step']:.0f} ({r['response_tokens_per_step']:.0f} "
            f"response) | {_cell(tps, 'sft', '.0f')} | {_cell(tps, 'value', '.0f')} "
            f"| {_cell(ratio, 'value/sft', '.2f')} "
            f"| {_cell(ratio, 'value/(sft+base)', '.2f')} | {_cell(ratio, 'value-unfused/sft', '.2f')} "
            f"| {_cell(mem, 'sft', '.0f')} | {_cell(mem, 'value', '.0f')} | {_cell(ratio, 'memory value/sft', '.2f')} "
            f"| {sum(r.get('inherent_memory_mb', {}).values()):.0f} "
            f"| {_cell(ratio, 'memory (value - inherent)/sft', '.2f')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['value']}\nover {r['base']}" for r in rows]
    methods = [m for m in METHODS if m in rows[0]["tokens_per_second"]]
    has_mem = all("peak_memory_mb" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4), squeeze=False)
    for ax, key, ylabel in [(axes[0][0], "tokens_per_second", "training tokens/s, relative to SFT"),
                            *([(axes[0][1], "peak_memory_mb", "peak memory, relative to SFT")] if has_mem else [])]:
        reporting.grouped_bars(ax, labels, [(m, [r[key][m] / r[key]["sft"] if "sft" in r[key] else r[key][m]
                                                 for r in rows]) for m in methods])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel(ylabel)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(methods), fontsize=7)
    fig.suptitle(f"Value-model training vs plain SFT ({result['device']}, batch {result['batch_size']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(result: dict, table: str, out: Path) -> None:
    from transfertune.evaluation.report import write_doc_section

    def shown(path: Path) -> str:
        return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)

    body = f"""## Training step: value model vs plain SFT

Made by `{result['command']}` ({result['device']}, torch {result['torch']}).
Batches of {result['batch_size']} rows of `{result['data']}` (prompt tokens masked), {result['steps']} optimiser steps
(AdamW, gradient clipping), full fine-tuning; the methods interleaved step by step, each step the fastest of
{result['repeats']}. Raw numbers: `{shown(out)}`; plot: `{shown(out.with_suffix('.png'))}`.

- *value*: `ValueTrainer` training a value model initialised from the first model (output layer zeroed) against
  the frozen second; *SFT*: the first model fine-tuned as a plain causal LM with the ordinary HF loss, same
  batches. tokens/s counts non-padding input tokens.
- The frozen base's forward pass is inherent to the method (its log-probs are part of the loss), so
  *value / (SFT + base fwd)* is the ratio against the fair lower bound: SFT plus a no-grad forward of the base.
- Value training runs the output layers only at response positions and fuses log-softmax + add +
  cross-entropy (`compose.composed_cross_entropy`); *before* is the earlier way (full [B, T, V] logits of both
  models, then `compose_logits` + `F.cross_entropy`), measured in the same run. SFT computes its output layer
  at every position, so value training can beat SFT + base fwd, and where the output layer is a large share of
  the network (mini-s: 4096 x 96, as much compute as its 4 layers) SFT itself.
- Peak memory: {result['memory']}.
  *inherent*: what value training holds by construction beyond SFT of the same network: the frozen base's
  weights, and the weights, gradients and AdamW moments of its untied output layer (the zeroed head; SFT of a
  tied model shares it with the input embeddings).

{table}"""
    write_doc_section(ROOT / "docs" / "performance.md", SECTION, body, heading="# Performance")


if __name__ == "__main__":
    main()
