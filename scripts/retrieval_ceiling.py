"""What a base can supply under a phrasing: the base alone, given the prompt AND the right start of the answer
(the relation phrase " works for", or the equation "a + b ="), greedily continues with the answer (its
continuation starts with it; the base alone does not stop there). This is the ceiling
of every method that leaves the fact or the sum to the base (a value model, proxy-tuning), per split.

    python scripts/retrieval_ceiling.py [--bases mini-s mini-l] [--examples 160] [--splits heldout_example shifted_dev]

Writes outputs/retrieval_ceiling.json and prints a table. Reads dev splits only unless asked otherwise.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def answer_start(row: dict) -> str:
    """The response up to the part the base supplies: before the deferred tail, else before the answer."""
    response = row["response"]
    if row.get("deferred"):
        return response[: len(response) - len(row["deferred"])]
    return response[: response.rindex(row["answer"])].rstrip(" ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=["mini-s", "mini-l"])
    p.add_argument("--splits", nargs="+", default=["heldout_example", "shifted_dev"])
    p.add_argument("--examples", type=int, default=160)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "retrieval_ceiling.json")
    p.add_argument("--docs", type=Path, default=None, help="also write the table as a section of this markdown file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from transfertune.evaluation.metrics import greedy_answers
    from transfertune.evaluation.tasks import load_task, normalize_answer
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_base

    result = {}
    for base in args.bases:
        cm = ComposedModel(*load_base(base))
        for task in ("people_qa", "arithmetic"):
            for split in args.splits:
                rows = load_task(task, split)[: args.examples]
                starts = [answer_start(r) for r in rows]
                got = greedy_answers(cm, [r["prompt"] + s for r, s in zip(rows, starts)])
                want = [r["response"][len(s):].strip() for r, s in zip(rows, starts)]
                # the base alone does not stop after the answer: its continuation must start with it
                hits = [normalize_answer(g).startswith(normalize_answer(w)) for g, w in zip(got, want)]
                result[f"{base} {task}/{split}"] = sum(hits) / len(hits)
                print(f"{base:8s} {task:11s} {split:16s} {result[f'{base} {task}/{split}']:.3f}", flush=True)
                for style in sorted({r.get("style") for r in rows} - {None}):
                    mine = [h for h, r in zip(hits, rows) if r.get("style") == style]
                    result[f"{base} {task}/{split} [{style}]"] = sum(mine) / len(mine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        write_docs(result, args)
    return 0


def write_docs(result: dict, args) -> None:
    from transfertune.evaluation.report import write_doc_section

    lines = ["| base | task / split [style] | the base continues with the answer |", "|---|---|---|"]
    lines += [f"| {key.split(' ', 1)[0]} | {key.split(' ', 1)[1]} | {value:.3f} |" for key, value in result.items()]
    body = f"""## What the base supplies under a phrasing (the ceiling of leaving the answer to the base)

Written by `python scripts/retrieval_ceiling.py --docs docs/results.md`; do not edit by hand. Each base alone is
given the prompt *and* the right start of the answer (" works for", "a + b =") and greedily continues; a hit is
a continuation that starts with the fact or the sum. A value model (or proxy-tuning) that writes the relation
phrase and leaves the fact to the base cannot score above this, except by sharpening what the base already
ranks high. First {args.examples} rows of each split; dev part only.

{chr(10).join(lines)}
"""
    write_doc_section(args.docs, "prompt-shift-ceiling", body)


if __name__ == "__main__":
    raise SystemExit(main())
