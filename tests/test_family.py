"""The shipped built-in family: every model loads by short name, has the recorded vocabulary, and still has
the held-out loss its MODEL_CARD states (catches a broken, truncated or swapped checkpoint)."""
import json

import pytest
import torch

from transfertune.io.fingerprint import vocab_fingerprint
from transfertune.io.loading import builtin_model_names, builtin_models_dir, load_base

FAMILY_JSON = builtin_models_dir() / "family.json"
FAMILY = json.loads(FAMILY_JSON.read_text()) if FAMILY_JSON.is_file() else {"models": {}}
SHIPPED = ["mini-s", "mini-m", "mini-l", "mini-m-v2", "mini-l-v2", "mini-x"]


def slice_loss(model, tok, text: str, context: int) -> float:
    ids = tok(text, return_tensors="pt").input_ids[0]
    x = torch.stack([ids[i : i + context] for i in range(0, len(ids) - context + 1, context)])
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def test_whole_family_is_shipped():
    assert set(SHIPPED) <= set(builtin_model_names())
    assert set(SHIPPED) <= set(FAMILY["models"])


@pytest.mark.parametrize("name", SHIPPED)
def test_model_loads_with_its_vocabulary_and_heldout_loss(name):
    record = FAMILY["models"][name]
    model, tok = load_base(name)
    assert vocab_fingerprint(tok) == record["vocab_fingerprint"]
    assert len(tok) == record["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    text = (builtin_models_dir() / FAMILY["heldout_slice"]).read_text(encoding="utf-8")
    assert slice_loss(model, tok, text, FAMILY["context"]) == pytest.approx(record["slice_loss"], abs=0.02)


def test_heldout_loss_falls_strictly_with_size():
    m = FAMILY["models"]
    assert m["mini-s"]["parameters"] < m["mini-m"]["parameters"] < m["mini-l"]["parameters"]
    assert m["mini-s"]["heldout_loss"] > m["mini-m"]["heldout_loss"] > m["mini-l"]["heldout_loss"]


def test_same_tokenizer_except_mini_x():
    fps = {n: FAMILY["models"][n]["vocab_fingerprint"] for n in SHIPPED}
    assert fps["mini-s"] == fps["mini-m"] == fps["mini-l"] == fps["mini-m-v2"] == fps["mini-l-v2"] != fps["mini-x"]


def test_head_dim_at_least_32():
    for name in SHIPPED:
        cfg = json.loads((builtin_models_dir() / name / "config.json").read_text())
        assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32, name


def test_knowledge_and_skill_rise_strictly_with_size():
    """What transfer has to carry: each size up knows more of the people and adds better (MODEL_CARD)."""
    m, chance = FAMILY["models"], FAMILY["probe_chance"]
    assert chance < m["mini-s"]["probe_v1"] < m["mini-m"]["probe_v1"] < m["mini-l"]["probe_v1"]
    assert m["mini-s"]["addition"] < m["mini-m"]["addition"] < m["mini-l"]["addition"]
    assert m["mini-l"]["probe_v1"] > m["mini-s"]["probe_v1"] + 0.3
    assert m["mini-l"]["addition"] > m["mini-s"]["addition"] + 0.3


def test_bases_add_after_a_word_problem_too():
    """Phase 3: the skill is usable after prose, which word-problem transfer needs (mini-s still cannot add)."""
    m = FAMILY["models"]
    assert m["mini-s"]["addition_in_story"] < m["mini-m"]["addition_in_story"] < m["mini-l"]["addition_in_story"]
    assert m["mini-l"]["addition_in_story"] > 0.8 > 0.2 > m["mini-s"]["addition_in_story"]


def test_addition_after_a_word_problem_of_the_shipped_weights_matches_the_card():
    from transfertune.evaluation.tasks import load_task
    from transfertune.family.probe import addition_after_word_problems

    model, tok = load_base("mini-l")
    measured = addition_after_word_problems(model, tok, load_task("arithmetic", "train")[:400])
    assert measured == pytest.approx(FAMILY["models"]["mini-l"]["addition_in_story"], abs=0.03)


def test_v2_siblings_know_the_new_people_and_v1_bases_do_not():
    m, chance = FAMILY["models"], FAMILY["probe_chance"]
    for v1, v2 in (("mini-m", "mini-m-v2"), ("mini-l", "mini-l-v2")):
        assert m[v1]["probe_v2"] < chance + 0.05
        assert m[v2]["probe_v2"] > m[v1]["probe_v2"] + 0.2


def test_probe_of_the_shipped_weights_matches_the_card():
    """Re-measure the knowledge probe of mini-s on the shipped fp16 weights (catches a swapped checkpoint)."""
    from transfertune.family.probe import knowledge_probe
    from transfertune.family.world import load_world
    from transfertune.io.locations import world_file

    people = [e for e in load_world(world_file()) if e.generation == "v1"]
    model, tok = load_base("mini-s")
    assert knowledge_probe(model, tok, people)["all"] == pytest.approx(FAMILY["models"]["mini-s"]["probe_v1"],
                                                                        abs=0.02)


def test_skill_of_the_shipped_weights_matches_the_card():
    """Re-measure held-out addition of mini-m on the shipped fp16 weights, the same 400 sums as the card."""
    from transfertune.family.probe import arithmetic_accuracy
    from transfertune.family.world import addition_problems

    model, tok = load_base("mini-m")
    problems = [(a, "+", b) for a, b in addition_problems(400)]
    assert arithmetic_accuracy(model, tok, problems, reversed_digits=True) == pytest.approx(
        FAMILY["models"]["mini-m"]["addition"], abs=0.03)


def test_models_command_shows_what_each_base_knows(capsys):
    from transfertune.cli.main import main

    main(["models"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(SHIPPED) <= set(lines)
    assert f"{FAMILY['models']['mini-l']['probe_v1']:.3f}" in lines["mini-l"]
    assert f"{FAMILY['models']['mini-l']['addition']:.3f}" in lines["mini-l"]
    assert f"{FAMILY['models']['mini-l']['addition_in_story']:.3f}" in lines["mini-l"]
