"""Which digit order makes two-digit sums learnable within a few hundred steps? (The pilot behind the skill phase.)

    python scripts/addition_order_pilot.py --model mini-m --order reversed --ops + --lr 2e-3 --steps 300

Continues a phase-1 base (a models/ directory from before the skill phase: `--models-dir`) on arithmetic lines
alone ("a + b = c", 60k lines, 16 random 256-token windows a step, AdamW, 20 warm-up steps, cosine) and measures
greedy answers every 50 steps on 100 problems the lines never contain and 100 they do. Held out here by
(7a + 3b) % 37 == 0 (% 97 with --ops +-), a rule over whole operands. Prints one JSON line per probe; the runs
behind the MODEL_CARD are in models/pilot/addition-order.jsonl: mini-m learnt reversed sums between steps 200
and 300 (0.10 -> 0.92 held out), mini-s did not within 350 (<= 0.04), nor either order with subtraction mixed in.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
from transfertune.family.probe import arithmetic_accuracy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini-m")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--order", choices=("msd", "reversed"), default="reversed")
    p.add_argument("--ops", choices=("+", "+-"), default="+")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = PreTrainedTokenizerFast.from_pretrained(args.models_dir / args.model)
    model = LlamaForCausalLM.from_pretrained(args.models_dir / args.model, dtype=torch.float32)
    modulus = 37 if args.ops == "+" else 97

    def problem(r):
        a, b, op = r.randint(10, 99), r.randint(10, 99), r.choice(args.ops)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    def held(p):
        return (7 * p[0] + 3 * p[2]) % modulus == 0

    def answer(a, op, b):
        c = str(a + b if op == "+" else a - b)
        return c[::-1] if args.order == "reversed" else c

    rng = random.Random(0)
    lines = []
    while len(lines) < 60000:
        p = problem(rng)
        if not held(p):
            lines.append(f"{p[0]} {p[1]} {p[2]} = {answer(*p)}")
    tokens = np.array(tok("\n".join(lines)).input_ids)
    er = random.Random(5)
    heldout: list = []
    while len(heldout) < 100:
        p = problem(er)
        if held(p) and p not in heldout:
            heldout.append(p)
    seen = [p for p in (problem(er) for _ in range(200)) if not held(p)][:100]

    def accuracy(problems):
        model.eval()
        score = arithmetic_accuracy(model, tok, problems, reversed_digits=args.order == "reversed")
        model.train()
        return score

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    windows = np.random.default_rng(0)
    start = time.time()
    print(json.dumps({"step": 0, "held": accuracy(heldout), "seen": accuracy(seen)}), flush=True)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        starts = windows.integers(0, len(tokens) - 257, size=16)
        x = torch.from_numpy(np.stack([tokens[s : s + 257] for s in starts]).astype(np.int64))
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 50 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "held": accuracy(heldout),
                              "seen": accuracy(seen), "t": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
