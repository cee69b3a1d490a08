"""Does the family learn two-digit arithmetic when answers are written least significant digit first?

    python scripts/arithmetic_format_pilot.py --formats reversed --models mini-s mini-m mini-l [--tokens 1000000]
    python scripts/arithmetic_format_pilot.py --formats msd --models mini-m       # the control: today's format
    python scripts/arithmetic_format_pilot.py --mix arithmetic ...               # arithmetic only: learnable at all?

The shipped family never learnt arithmetic (MODEL_CARD: seen problems <= 0.1 after 1.5 M arithmetic tokens,
answers written most significant digit first). This trains each size from scratch on the family's own mix
(scripts/build_family.py BASE_MIX, 4 of 16 rows arithmetic; --mix arithmetic: arithmetic alone) with only the
answer order changed, for --tokens tokens with the family's schedule, and measures greedy arithmetic in the
format it was trained on: on problems the corpus never writes (held out by rule) and on problems it does write
(seen). One JSON line per (model, format, mix), with the curve, goes to models/pilot/arithmetic-format.jsonl,
and the MODEL_CARD's notes are rewritten from it; weights stay in runs/family/pilot-format-*. The shipped
models do not change.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import build_family as bf  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

STREAMS = {"msd": "arith", "reversed": "arith_reversed"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bf.add_pilot_args(p, ["mini-s", "mini-m", "mini-l"], 1_000_000)
    p.add_argument("--formats", nargs="+", choices=sorted(STREAMS), default=["reversed"])
    p.add_argument("--mix", choices=("family", "arithmetic"), default="family",
                   help="family: the family's own mix (4 of 16 rows arithmetic); arithmetic: arithmetic only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = bf.load_tokenizer(args.work, "main")
    steps = args.tokens // (bf.BATCH * bf.CONTEXT)
    for fmt in args.formats:
        for size in args.models:
            spec = bf.FAMILY[f"{size}-phase1"]
            mix = {STREAMS[fmt] if k == "arith" else k: v for k, v in bf.BASE_MIX.items()} \
                if args.mix == "family" else {STREAMS[fmt]: bf.BATCH}
            name = f"pilot-format-{size}-{fmt}-{args.mix}-{args.tokens}"
            bf.FAMILY[name] = bf.Spec(name, "main", spec.hidden, spec.layers, spec.heads, spec.kv_heads,
                                      tokens=args.tokens, lr=spec.lr, mix=mix)
            start = time.time()
            final = bf.pretrain(bf.FAMILY[name], args.corpus, args.work, 0, 10_000, probe_every=max(1, steps // 5))
            model = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
            log = [json.loads(line) for line in (args.work / name / "log.jsonl").read_text().splitlines()]
            line = {"model": size, "format": fmt, "mix_name": args.mix, "tokens": args.tokens, "mix": mix,
                    **bf.arithmetic_scores(model, tok, reversed_digits=fmt == "reversed"),
                    "curve_heldout": [[r["tokens"], r["arithmetic"]] for r in log if "arithmetic" in r],
                    "seconds": round(time.time() - start)}
            bf.record_pilot(line, "arithmetic-format")
    bf.rewrite_model_card()


if __name__ == "__main__":
    main()
