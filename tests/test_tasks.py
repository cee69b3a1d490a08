"""The shipped task data and its metrics."""
import pytest

from transfertune.tasks import SPLITS, TASKS, exact_match, label_accuracy, load_task, normalize_answer


def test_every_task_has_its_splits_and_kinds():
    assert {"classification", "qa", "generation"} <= {TASKS[t]["kind"] for t in TASKS}
    for task in TASKS:
        for split in SPLITS:
            rows = load_task(task, split)
            assert len(rows) == TASKS[task]["sizes"][split] > 0
            assert all(r["prompt"] and r["response"] and "<|endoftext|>" not in r["response"] for r in rows)


def test_splits_are_disjoint_by_example_and_by_template():
    for task in TASKS:
        train = load_task(task, "train")
        held_ex = load_task(task, "heldout_example")
        held_tpl = load_task(task, "heldout_template")
        train_examples = {r["example"] for r in train}
        train_templates = {r["template"] for r in train}
        if task != "common_gen":  # grouped by concept set there: indices differ, concepts do not
            assert not train_examples & {r["example"] for r in held_ex}
        assert {r["template"] for r in held_ex} <= train_templates
        assert not {r["template"] for r in held_tpl} & train_templates
        train_pairs = {(r["prompt"], r["response"]) for r in train}
        assert not train_pairs & {(r["prompt"], r["response"]) for r in held_ex}


def test_classification_rows_have_their_label_among_choices():
    for task in (t for t in TASKS if TASKS[t]["kind"] == "classification"):
        for r in load_task(task, "heldout_example"):
            assert r["choices"][r["label"]] == r["response"]


def test_label_accuracy_picks_highest_scoring_choice():
    examples = [
        {"prompt": "p1", "choices": ["a", "b"], "label": 1},
        {"prompt": "p2", "choices": ["a", "b", "c"], "label": 2},
        {"prompt": "p3", "choices": ["a", "b"], "label": 0},
    ]
    scores = {"a": 0.0, "b": 1.0, "c": -1.0}
    assert label_accuracy(examples, lambda ps, rs: [scores[r] for r in rs]) == pytest.approx(1 / 3)
    assert label_accuracy(examples, lambda ps, rs: [-scores[r] if p != "p1" else scores[r] for p, r in zip(ps, rs)]) == 1.0


def test_exact_match_normalises_case_articles_punctuation():
    assert normalize_answer("The  Coriolis effect.") == "coriolis effect"
    assert exact_match(["the Coriolis Effect", "alpha"], ["coriolis effect", "beta decay"]) == 0.5
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_unknown_task_or_split_is_named():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        load_task(next(iter(TASKS)), "dev")

