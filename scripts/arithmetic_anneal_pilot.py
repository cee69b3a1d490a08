"""Does more arithmetic at the end of pretraining teach the built-in family two-digit arithmetic? (No.)

    python scripts/arithmetic_anneal_pilot.py [--models mini-s mini-l] [--tokens 500000]

Continues each finished phase-1 base (runs/family/<model>-phase1/final, from scripts/build_family.py) for --tokens
more tokens on
an arithmetic-heavy mix ({'bios_v1': 6, 'arith': 8, 'books': 2} rows per batch of 16, lr 1e-3, 20 warm-up steps,
cosine), then measures greedy arithmetic on problems the corpus contains ("seen") and on held-out ones, as the
MODEL_CARD does. Appends one JSON line per model to models/pilot/arithmetic-anneal.jsonl and rewrites the
MODEL_CARD's notes from it; the annealed weights stay in runs/family/pilot-anneal-* (the shipped models do not
change).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import build_family as bf  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

MIX = {"bios_v1": 6, "arith": 8, "books": 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bf.add_pilot_args(p, ["mini-s", "mini-l"], 500_000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = bf.load_tokenizer(args.work, "main")
    for model in args.models:
        parent = f"{model}-phase1"
        spec = bf.FAMILY[parent]
        name = f"pilot-anneal-{model}-{args.tokens}"
        bf.FAMILY[name] = bf.Spec(name, "main", spec.hidden, spec.layers, spec.heads, spec.kv_heads,
                                  tokens=args.tokens, lr=1e-3, mix=dict(MIX), init_from=parent, warmup=20)
        start = time.time()
        final = bf.pretrain(bf.FAMILY[name], args.corpus, args.work, 0, 10_000, probe_every=10_000)
        rows = {}
        for label, path in (("before", args.work / parent / "final"), ("after", final)):
            rows[label] = bf.arithmetic_scores(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok)
        bf.record_pilot({"model": model, "anneal_tokens": args.tokens, "mix": MIX, "lr": 1e-3, **rows,
                         "seconds": round(time.time() - start)}, "arithmetic-anneal")
    bf.rewrite_model_card()


if __name__ == "__main__":
    main()
