"""Which QA instructions reach what the bases know: the knowledge probe after each candidate instruction.

The family's knowledge is tied to the contexts it was read in, and how much of it a prompt reaches varies a
lot between bases (mini-l: 0.21 after "Name the ...", 0.98 after "State the ..."). A value model only adds
logits, so transfer can deliver no more than what the target reaches after the task's prompt. This sweep picked
people_qa's instructions (world.QUESTION_TEMPLATES). It probes *training* people only (the first PEOPLE of the
v1 generation: make_tasks.py trains on the first half), never the people of the held-out splits.

    python scripts/instruction_sweep.py mini-s mini-m mini-l   # writes models/instruction_sweep.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from transfertune.family.probe import knowledge_probe  # noqa: E402
from transfertune.family.world import load_world  # noqa: E402
from transfertune.io.loading import load_base  # noqa: E402

CANDIDATES = ["State the {n}.", "Say the {n}.", "Give the {n}.", "Recall the {n}.", "Name the {n}.",
              "Tell me the {n}.", "Report the {n}.", "Write down the {n}.", "Mention the {n}.", "Provide the {n}.",
              "Recite the {n}.", "Answer with the {n}."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--people", type=int, default=40, help="training people probed (default 40)")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "instruction_sweep.json")
    args = p.parse_args()
    people = [e for e in load_world(ROOT / "data" / "world" / "entities.json") if e.generation == "v1"]
    people = people[: args.people]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.models:
        model, tok = load_base(name)
        result[name] = {c: round(knowledge_probe(model, tok, people, instruction=c)["all"], 4) for c in CANDIDATES}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| instruction | " + " | ".join(result) + " |")
    print("|---|" + "---|" * len(result))
    for c in CANDIDATES:
        print(f"| {c.format(n='<attribute>')} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for r in result.values())
              + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
