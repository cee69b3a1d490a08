"""The prompt-shift benchmark (scripts/make_shifted_prompts.py, builtin_tasks/SHIFTED.md): the heldout_example
questions of people_qa and arithmetic in phrasings and stories never trained on, split into dev and test."""
import importlib.util
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from transfertune.evaluation.tasks import SPLITS, TASKS, load_task, tasks_dir

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
