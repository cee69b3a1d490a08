"""The shipped task data and its metrics."""
import pytest

from transfertune.evaluation.tasks import SPLITS, TASKS, exact_match, label_accuracy, load_task, normalize_answer


def test_every_task_has_its_splits_and_kinds():
    assert {"classification", "qa", "generation"} <= {TASKS[t]["kind"] for t in TASKS}
    for task in TASKS:
        assert set(TASKS[task]["sizes"]) <= set(SPLITS)
        for split in TASKS[task]["sizes"]:
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


def test_people_qa_splits_separate_people_and_generations():
    """Held-out people were never asked about in training; heldout_new asks only about people of the v2 corpus."""
    train_people = {r["example"] for r in load_task("people_qa", "train")}
    held = load_task("people_qa", "heldout_example")
    assert not train_people & {r["example"] for r in held}
    assert {r["generation"] for r in held} == {"v1"}
    assert {r["generation"] for r in load_task("people_qa", "heldout_new")} == {"v2"}
    assert {r["example"] for r in load_task("people_qa", "heldout_template")} <= train_people
    for r in held:
        assert r["prompt"].endswith(" " + r["example"]) and r["response"].endswith(" " + r["answer"] + ".")


def test_arithmetic_answers_are_right_and_heldout_sums_never_in_the_corpus():
    from transfertune.family.world import is_heldout_addition

    for split, heldout in (("train", False), ("heldout_example", True), ("heldout_template", False)):
        for r in load_task("arithmetic", split):
            a, op, b, _, c = r["response"].split()
            assert op == "+" and c == r["answer"] and int(c[::-1]) == int(a) + int(b) == r["sum"]
            assert is_heldout_addition(int(a), int(b)) == heldout
            assert r["deferred"] == " " + c and r["response"] == f"{a} + {b} =" + r["deferred"]


def test_sums_in_prose_are_right_follow_prose_and_skip_heldout_sums():
    from transfertune.family.world import addition_in_prose, is_heldout_addition

    sentences = ["Ada was born in 1911.", "What did he say?", "The mill stood by the river."]
    docs = addition_in_prose(sentences, documents=20, seed=3, items=5)
    assert len(docs) == 20
    for doc in docs:
        lines = doc.split("\n")
        assert len(lines) == 10
        for prose, line in zip(lines[::2], lines[1::2]):
            assert prose in sentences or prose in {f"{x} {y}" for x in sentences for y in sentences}
            a, op, b, _, c = line.split()
            assert op == "+" and c == str(int(a) + int(b))[::-1] and not is_heldout_addition(int(a), int(b))


def test_skill_phase_addition_lines_are_right_and_skip_heldout_sums():
    from transfertune.family.world import addition_problems, addition_text, is_heldout_addition

    lines = addition_text(500, seed=5).split("\n")
    assert len(lines) == 500
    for line in lines:
        a, op, b, _, c = line.split()
        assert op == "+" and c == str(int(a) + int(b))[::-1]
        assert not is_heldout_addition(int(a), int(b))
    held = addition_problems(50)
    assert len(set(held)) == 50 and all(is_heldout_addition(a, b) for a, b in held)


def test_heldout_sums_mix_every_digit():
    """Every (last digit, last digit) pair of the operands occurs among both the held-out and the written sums,
    so a held-out sum asks for a procedure the corpus teaches, not for a digit pair it never shows."""
    from transfertune.family.world import is_heldout_addition

    pairs = {False: set(), True: set()}
    for a in range(10, 100):
        for b in range(10, 100):
            pairs[is_heldout_addition(a, b)].add((a % 10, b % 10))
    assert len(pairs[True]) == len(pairs[False]) == 100


@pytest.mark.parametrize("reversed_digits", [False, True])
def test_pretraining_arithmetic_lines_are_right_in_either_digit_order(reversed_digits):
    from transfertune.family.world import arithmetic_text, is_heldout_problem

    digit_lines = [line for line in arithmetic_text(300, seed=5, reversed_digits=reversed_digits).split("\n")
                   if line[0].isdigit()]
    assert len(digit_lines) > 150
    for line in digit_lines:
        a, op, b, _, c = line.split()
        expected = str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert c == (expected[::-1] if reversed_digits else expected)
        assert not is_heldout_problem(int(a), op, int(b))


def test_ag_news_rows_carry_all_four_classes():
    for r in load_task("ag_news", "heldout_example"):
        assert len(r["choices"]) == 4


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
    assert label_accuracy(
        examples, lambda ps, rs: [-scores[r] if p != "p1" else scores[r] for p, r in zip(ps, rs)]) == 1.0


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

