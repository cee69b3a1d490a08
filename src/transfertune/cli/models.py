"""`transfertune models`: list the built-in models."""
from __future__ import annotations

import json

DESCRIPTION = None


def add_arguments(p) -> None:
    pass


def run(args) -> None:
    from transfertune.io.loading import builtin_model_names, builtin_models_dir

    names = builtin_model_names()
    if not names:
        print(f"no built-in models found under {builtin_models_dir()}")
        return
    card = builtin_models_dir() / "family.json"
    family = json.loads(card.read_text()).get("models", {}) if card.is_file() else {}
    print(f"{'model':10s} {'params':>8s} {'vocab':>6s} {'knows v1':>9s} {'knows v2':>9s} {'adds':>6s} "
          f"{'in story':>8s}  "
          f"(knowledge probe, held-out addition and addition after a word problem, untuned: "
          f"{builtin_models_dir() / 'MODEL_CARD.md'})")
    for name in names:
        m = family.get(name, {})
        cells = [f"{m['parameters'] / 1e6:.2f}M" if "parameters" in m else "-", str(m.get("vocab_size", "-"))]
        cells += [f"{m[k]:.3f}" if k in m else "-" for k in ("probe_v1", "probe_v2", "addition", "addition_in_story")]
        print(f"{name:10s} {cells[0]:>8s} {cells[1]:>6s} {cells[2]:>9s} {cells[3]:>9s} {cells[4]:>6s} {cells[5]:>8s}")
