"""Peak memory of scoring with a large vocabulary: the previous way (whole [batch, length, vocab] logits per
model, composed and log-softmaxed over all response positions at once) against sequence.
composed_response_logprobs (hidden states at response positions, output layer + composition per chunk).

Each way runs in its own process on random tiny models with a 262,144-token output layer (Gemma 3's), and
reports the growth of the process's peak resident memory while scoring (VmHWM - VmRSS before), so model
weights and libraries are not counted.

    .venv/bin/python benchmarks/score_memory.py [--vocab 262144] [--batch 4] [--length 128]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_one(way: str, vocab: int, batch: int, length: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from transfertune.core.response_logits import composed_response_logits, composed_response_logprobs
    from transfertune.io.data import IGNORE_INDEX

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    base, value = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (batch, length + 16))
    labels = ids.clone()
    labels[:, :16] = IGNORE_INDEX  # a 16-token prompt, `length` response tokens
    batch_ = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    with torch.no_grad():  # warm up both paths' kernels and allocator on a short input
        small = {k: v[:1, :20] for k, v in batch_.items()}
        composed_response_logprobs(base, [value], **small)
        composed_response_logits(base, [value], **small)
    before = _status("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if way == "whole":
            res = composed_response_logits(base, [value], **batch_)
            logp = F.log_softmax(res.composed, -1).gather(-1, res.targets[:, None]).squeeze(-1)
        else:
            logp = composed_response_logprobs(base, [value], **batch_).logprobs
    seconds = time.perf_counter() - start
    return {"way": way, "peak_growth_mb": round((_status("VmHWM") - before) / 2**20, 1),
            "seconds": round(seconds, 2), "tokens": int(logp.numel()), "sum_logprob": float(logp.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="response tokens per example")
    parser.add_argument("--one", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.vocab, args.batch, args.length)))
        return
    rows = []
    for way in ("whole", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--one", way, "--vocab", str(args.vocab), "--batch",
                              str(args.batch), "--length", str(args.length)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole, chunked = rows
    print(f"vocab {args.vocab:,}, batch {args.batch}, {args.length} response tokens each, base + 1 value model")
    for r in rows:
        print(f"  {r['way']:8s} peak memory growth {r['peak_growth_mb']:8.1f} MB   {r['seconds']:6.2f} s")
    print(f"  same log-probs: |sum difference| = {abs(whole['sum_logprob'] - chunked['sum_logprob']):.2e} "
          f"over {whole['tokens']} tokens")


if __name__ == "__main__":
    main()
