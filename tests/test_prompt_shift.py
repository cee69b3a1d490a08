"""The prompt-shift benchmark (scripts/make_shifted_prompts.py, builtin_tasks/SHIFTED.md): the heldout_example
questions of people_qa and arithmetic in phrasings and stories never trained on, split into dev and test."""
import importlib.util
import json
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from transfertune.evaluation.tasks import SPLITS, TASKS, load_task, tasks_dir

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PARTS = ("shifted_dev", "shifted_test")
FILES = [f"{task}/{part}.jsonl" for task in ("people_qa", "arithmetic") for part in PARTS] + ["tasks.json"]


@pytest.fixture(scope="module")
def names():
    spec = importlib.util.spec_from_file_location("make_tasks", SCRIPTS / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NAMES


def normalise(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c not in string.punctuation).split())


def phrasing(row: dict) -> str:
    """The instruction before the person's name, which ends every people_qa prompt."""
    assert row["prompt"].endswith(" " + row["example"]), row["prompt"]
    return row["prompt"][: -len(row["example"]) - 1]


def pattern(row: dict) -> str:
    """A people_qa row's phrasing with its attribute noun put back as {noun} / {Noun}."""
    noun = {"birth_year": "birth year", "home_town": "home town"}.get(row["attribute"], row["attribute"])
    return phrasing(row).replace(noun, "{noun}").replace(noun[0].upper() + noun[1:], "{Noun}")


def story(row: dict, names: list[str]) -> str:
    """An arithmetic prompt with its numbers and name put back as {a}, {b} and {who}."""
    text = re.sub(r"\b(" + "|".join(names) + r")\b", "{who}", row["prompt"].removesuffix("\n"))
    a, b = row["example"].split("+")
    assert re.findall(r"\d+", text) == [a, b], row["prompt"]
    return re.sub(r"\d+", "{b}", re.sub(r"\d+", "{a}", text, count=1), count=1)


def test_shifted_splits_load_for_both_tasks():
    assert set(PARTS) <= set(SPLITS)
    for task in ("people_qa", "arithmetic"):
        for part in PARTS:
            rows = load_task(task, part)
            assert len(rows) == TASKS[task]["sizes"][part] == len(load_task(task, "heldout_example"))
            assert all(r["task"] == task and r["prompt"] and r["response"] for r in rows)


def test_people_qa_phrasings_are_new_and_dev_test_disjoint():
    seen = {normalise(phrasing(r)) for split in ("train", "heldout_template") for r in load_task("people_qa", split)}
    seen_templates = {r["template"] for split in ("train", "heldout_template") for r in load_task("people_qa", split)}
    parts = {part: load_task("people_qa", part) for part in PARTS}
    for rows in parts.values():
        assert all(re.fullmatch(rf"{r['attribute']}-shift-\d+", r["template"]) for r in rows)
        assert not {normalise(phrasing(r)) for r in rows} & seen
        assert not {r["template"] for r in rows} & seen_templates
    dev, test = parts.values()
    assert not {normalise(phrasing(r)) for r in dev} & {normalise(phrasing(r)) for r in test}
    assert not {r["template"].split("-shift-")[1] for r in dev} & {r["template"].split("-shift-")[1] for r in test}
    assert not {pattern(r) for r in dev} & {pattern(r) for r in test}


def test_people_qa_parts_ask_every_heldout_person_and_attribute_once():
    held = {(r["example"], r["attribute"]): r for r in load_task("people_qa", "heldout_example")}
    for part in PARTS:
        rows = load_task("people_qa", part)
        assert Counter((r["example"], r["attribute"]) for r in rows) == Counter(list(held))
        for r in rows:
            h = held[(r["example"], r["attribute"])]
            assert r["prompt"].endswith(" " + r["example"])
            assert (r["response"], r["answer"], r["generation"]) == (h["response"], h["answer"], "v1")
            assert r["response"].endswith(" " + r["answer"] + ".")


def test_people_qa_parts_hold_many_patterns_of_every_style():
    styles = {part: {r["style"] for r in load_task("people_qa", part)} for part in PARTS}
    assert styles["shifted_dev"] == styles["shifted_test"] and len(styles["shifted_dev"]) >= 5
    for part in PARTS:
        rows = load_task("people_qa", part)
        per_attribute = Counter(r["attribute"] for r in {(r["attribute"], r["template"]): r for r in rows}.values())
        assert set(per_attribute) == {r["attribute"] for r in rows} and min(per_attribute.values()) >= 10
        assert len({(r["template"].split("-shift-")[1], r["style"]) for r in rows}) == \
            len({r["template"].split("-shift-")[1] for r in rows})  # one style per pattern
        assert len({pattern(r) for r in rows}) == len({r["template"].split("-shift-")[1] for r in rows})
        uses = Counter(r["template"] for r in rows)
        for attribute in per_attribute:  # patterns are dealt out evenly
            counts = [n for t, n in uses.items() if t.startswith(attribute + "-")]
            assert max(counts) - min(counts) <= 1


def test_arithmetic_stories_are_new_and_dev_test_disjoint(names):
    seen = {story(r, names) for split in ("train", "heldout_template") for r in load_task("arithmetic", split)}
    seen_templates = {r["template"] for split in ("train", "heldout_template") for r in load_task("arithmetic", split)}
    stories = {}
    for part in PARTS:
        rows = load_task("arithmetic", part)
        by_template = {}
        for r in rows:
            by_template.setdefault(r["template"], set()).add(story(r, names))
        assert all(len(s) == 1 for s in by_template.values())  # one story per template
        stories[part] = {s for found in by_template.values() for s in found}
        assert len(stories[part]) >= 6 and not stories[part] & seen
        assert all(re.fullmatch(r"\+shift-\d+", t) for t in by_template) and not set(by_template) & seen_templates
    assert not stories["shifted_dev"] & stories["shifted_test"]
    assert not {normalise(s) for s in stories["shifted_dev"]} & {normalise(s) for s in stories["shifted_test"]}


def test_arithmetic_parts_ask_the_heldout_sums_with_consistent_answers():
    from transfertune.family.world import is_heldout_addition

    held = Counter(r["example"] for r in load_task("arithmetic", "heldout_example"))
    for part in PARTS:
        rows = load_task("arithmetic", part)
        assert Counter(r["example"] for r in rows) == held
        for r in rows:
            a, op, b, _, c = r["response"].split()
            assert f"{a}+{b}" == r["example"] and is_heldout_addition(int(a), int(b))
            assert op == "+" and c == r["answer"] and int(c[::-1]) == int(a) + int(b) == r["sum"]
            assert r["deferred"] == " " + c and r["response"] == f"{a} + {b} =" + r["deferred"]


def test_shifted_md_lists_each_part_as_built(names):
    doc = (tasks_dir() / "SHIFTED.md").read_text()
    dev, test = doc.split("## Test part")
    dev = dev.split("## Dev part")[1]
    assert "Test part fixed at commit:" in doc and "never used to choose a design" in doc
    for part, text, other in (("shifted_dev", dev, test), ("shifted_test", test, dev)):
        listed = {pattern(r) for r in load_task("people_qa", part)} | {story(r, names)
                                                                       for r in load_task("arithmetic", part)}
        for item in listed:
            assert f"`{item}`" in text and f"`{item}`" not in other, item


def test_script_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(SCRIPTS / "make_shifted_prompts.py"), "--tasks", str(tasks_dir()),
                    "--out", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tasks_dir() / name).read_bytes(), name


# -- the shifted split in `transfertune eval`, and the augmentation every method trains on ---------------------
def _shifted_task(tmp_path, monkeypatch, yes_no_records):
    root = tmp_path / "tasks"
    (root / "yesno").mkdir(parents=True)
    rows = [{**r, "response": r["response"].strip(), "choices": ["no", "yes"],
             "label": int(r["response"].strip() == "yes")} for r in yes_no_records]
    shifted = [{**r, "prompt": "Tell me, " + r["prompt"].lower()} for r in rows[16:]]
    for split, part in (("train", rows[:16]), ("heldout_example", rows[16:]), ("shifted_dev", shifted)):
        (root / "yesno" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    sizes = {"train": 16, "heldout_example": len(rows) - 16, "shifted_dev": len(shifted)}
    (root / "tasks.json").write_text(json.dumps({"yesno": {"kind": "classification", "sizes": sizes}}))
    monkeypatch.setenv("TRANSFERTUNE_TASKS", str(root))
    return "yesno"


def test_every_eval_method_accepts_the_shifted_split(model_dir, tmp_path, monkeypatch, yes_no_records):
    from transfertune.cli.main import main
    from transfertune.evaluation.config import DEFAULT_METHODS

    task = _shifted_task(tmp_path, monkeypatch, yes_no_records)
    source, target = model_dir("llama", hidden=32, seed=5), model_dir("llama", hidden=32, seed=6)
    cache = tmp_path / "eval"
    argv = ["eval", "--source", source, "--targets", target, "--tasks", task, "--examples", "6",
            "--value-steps", "2", "--finetune-steps", "2", "--target-steps", "2", "--batch-size", "4",
            "--shifted-split", "shifted_dev", "--cache-dir", str(cache), "--docs", str(tmp_path / "r.md")]
    assert main(argv) == 0
    rows = json.loads((cache / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(DEFAULT_METHODS)
    for r in rows:
        assert r["shifted_split"] == "shifted_dev" and "shifted_accuracy" in r and "shifted_nll" in r
        if r["accuracy"] > 0:
            assert r["share_kept"] == pytest.approx(r["shifted_accuracy"] / r["accuracy"], abs=1e-4)
    table = (tmp_path / "r.md").read_text()
    assert "acc / EM on shifted_dev | kept |" in table and "shifted_dev" in table
    # the shifted cells are measured on the shifted rows: the NLL differs from the in-distribution one
    assert any(r["shifted_nll"] != r["nll"] for r in rows)
    with pytest.raises(SystemExit) as refused:  # only shifted splits are offered
        main(argv[:-6] + ["--shifted-split", "heldout_example", "--cache-dir", str(cache)])
    assert refused.value.code == 2


def test_augmentation_keeps_responses_names_and_numbers():
    import random

    from transfertune.training.augment import augment_prompts, reword

    rows = [r for t in ("people_qa", "arithmetic") for r in load_task(t, "train")[:200]]
    out = augment_prompts(rows, 2, seed=3)
    assert out[: len(rows)] == rows and len(out) == 3 * len(rows)
    assert out == augment_prompts(rows, 2, seed=3) and out != augment_prompts(rows, 2, seed=4)
    changed = 0
    for i, extra in enumerate(out[len(rows):]):
        original = rows[i % len(rows)]
        assert extra["response"] == original["response"] and extra.get("deferred") == original.get("deferred")
        assert extra["prompt"].split()[-1] == original["prompt"].split()[-1]  # the word a response continues
        for word in original["prompt"].split():
            if any(ch.isdigit() for ch in word):
                assert word.strip(".,?!:;") in extra["prompt"]  # numbers are never dropped
        changed += extra["prompt"] != original["prompt"]
    assert changed > 0.8 * len(rows) * 2
    assert reword("Say the employer. Veth Louxlu", random.Random(0)).endswith("Veth Louxlu")
    assert augment_prompts(rows, 0) == rows


def test_recipe_default_is_the_study_choice():
    """The default recipe of `train`, `eval` and the demo is the one docs/results.md#prompt-shift-study chose."""
    from transfertune.evaluation.config import EVAL_VALUE_RECIPE
    from transfertune.family.demo import parse_args
    from transfertune.training.recipe import ValueRecipe

    chosen = json.loads((ROOT / "docs" / "prompt_shift_choice.json").read_text())
    assert chosen["recipe"], "the study adopted a change of the recipe"
    for field, value in chosen["recipe"].items():  # what the study changed, and so every default changes
        assert getattr(EVAL_VALUE_RECIPE, field) == value, field
        assert getattr(ValueRecipe(), field) == value, field
    demo = parse_args([])
    assert demo.augment == chosen["recipe"].get("augment", 0)
    assert demo.steps == chosen["study_recipe"]["max_steps"] and demo.lr == chosen["study_recipe"]["learning_rate"]
