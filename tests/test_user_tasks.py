"""`transfertune eval` on a user's own JSONL data (issue #13): splits by example or template, kind and labels from
the data or flags, checks before any model loads, truncation counts, cache keys on the data, one vocabulary map
per target."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfertune.cli.main import main
from transfertune.evaluation.config import EvalConfig, parse_vocab_maps
from transfertune.evaluation.runner import EvalRunner
from transfertune.evaluation.tasks import is_user_task, load_user_task
from transfertune.io.validate import InputError
from transfertune.vocab.token_map import VocabMap


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def review_rows(n: int = 24, templates: int = 1) -> list[dict]:
    """Yes/no reviews: example i under `templates` phrasings, the label as a string."""
    return [{"prompt": f"{'Review' if t == 0 else 'Opinion'} {i}: the movie was {'great' if i % 2 else 'awful'}. "
                       f"Positive?", "label": "yes" if i % 2 else "no", "example": i, "template": f"t{t}"}
            for i in range(n) for t in range(templates)]


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def no_model_loads(monkeypatch):
    import transfertune.io.loading as loading

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_causal_lm", refuse)
    monkeypatch.setattr(loading, "load_base", refuse)


# -- splits, kinds and labels (no model) --------------------------------------------------------------------
def test_split_by_example_is_seeded_and_keeps_an_examples_rows_together(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", review_rows(20, templates=2))
    task = load_user_task(str(path), heldout_fraction=0.25, seed=0)
    assert task.name == "reviews" and task.heldout == "heldout_example"
    train, held = task.splits["train"], task.splits["heldout_example"]
    held_ids = {r["example"] for r in held}
    assert len(held_ids) == 5 and len(held) == 10 and not held_ids & {r["example"] for r in train}
    assert load_user_task(str(path), heldout_fraction=0.25, seed=0).splits == task.splits
    assert {r["example"] for r in load_user_task(str(path), heldout_fraction=0.25, seed=1)
            .splits["heldout_example"]} != held_ids
    # rows without an "example" id are examples one by one; at least one row is always held out and one trained on
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)])
    task = load_user_task(str(plain), heldout_fraction=0.01)
    assert (len(task.splits["train"]), len(task.splits["heldout_example"])) == (2, 1)
    assert task.kind == "generation" and task.where["train"][0].startswith(f"{plain}: line ")


def test_split_by_template_holds_out_whole_templates(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", review_rows(10, templates=2))
    task = load_user_task(str(path), split_by="template", heldout_fraction=0.5)
    assert task.heldout == "heldout_template"
    held = {r["template"] for r in task.splits["heldout_template"]}
    assert len(held) == 1 and not held & {r["template"] for r in task.splits["train"]}
    assert len(task.splits["train"]) == len(task.splits["heldout_template"]) == 10


def test_kind_and_labels_come_from_the_data_or_the_flags(tmp_path):
    labelled = load_user_task(str(write_jsonl(tmp_path / "a.jsonl", review_rows(6))))
    assert labelled.kind == "classification" and labelled.labels == ["no", "yes"]
    row = labelled.splits["train"][0]
    assert row["choices"] == ["no", "yes"] and row["response"] == row["choices"][row["label"]]

    own = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}", "choices": ["red", "green", "blue"], "label": i % 3}
                                             for i in range(6)])
    task = load_user_task(str(own))
    assert task.kind == "classification" and task.labels is None
    assert all(r["response"] == ["red", "green", "blue"][r["label"]] for r in task.splits["train"])

    responses = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"q{i}", "response": "A B C".split()[i % 3]}
                                                   for i in range(6)])
    assert load_user_task(str(responses)).kind == "generation"
    task = load_user_task(str(responses), labels=["A", "B", "C"])
    assert task.kind == "classification" and {r["label"] for r in task.splits["train"]} <= {0, 1, 2}

    answers = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                                 for i in range(6)])
    task = load_user_task(str(answers), kind="qa")
    assert task.kind == "qa" and task.splits["train"][0]["response"] == task.splits["train"][0]["answer"]


def test_a_directory_is_one_task_or_an_already_split_one(tmp_path):
    folder = tmp_path / "movies"
    write_jsonl(folder / "part1.jsonl", review_rows(6))
    write_jsonl(folder / "part2.jsonl", [{**r, "example": r["example"] + 6} for r in review_rows(6)])
    task = load_user_task(str(folder))
    assert task.name == "movies" and len(task.files) == 2 and sum(map(len, task.splits.values())) == 12

    presplit = tmp_path / "mine"
    write_jsonl(presplit / "train.jsonl", review_rows(8))
    write_jsonl(presplit / "heldout_example.jsonl", review_rows(3))
    task = load_user_task(str(presplit))
    assert task.recipe["presplit"] and [len(task.splits[s]) for s in ("train", "heldout_example")] == [8, 3]


def test_registry_names_stay_registry_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "people_qa").mkdir()  # a folder named like a built-in task does not shadow it
    assert not is_user_task("people_qa") and not is_user_task("arithmetic")
    assert is_user_task("./people_qa") and is_user_task("mine.jsonl") and is_user_task("dir/")


@pytest.mark.parametrize("rows, flags, message", [
    (['{"prompt": "a", "label": "yes"}', '{"prompt": "b", "label": "no"}', '{"prompt": "c", "label": "maybe"}'],
     ["--labels", "yes", "no"], "x.jsonl: line 3: label 'maybe' is not one of the choices (yes, no)"),
    (['{"prompt": "a", "choices": ["x", "y"], "label": 0}', '{"prompt": "b", "choices": ["x", "y"], "label": 2}'],
     [], 'x.jsonl: line 2: "label" 2 is not an index into the 2 choices'),
    (['{"prompt": "a", "response": "b", "template": "t"}', '{"prompt": "a", "response": "b"}'],
     ["--split-by", "template"], 'x.jsonl: line 2: no "template" field: --split-by template needs one in every row'),
    (['{"prompt": "a", "response": "b", "template": "t"}', '{"prompt": "c", "response": "d", "template": "t"}'],
     ["--split-by", "template"], "--split-by template needs at least 2 templates to split, found 1"),
    (['{"prompt": "a", "response": "b"}', '{"messages": [{"role": "user", "content": "hi"}]}'],
     [], 'x.jsonl: line 2: eval needs "prompt" and "response" fields'),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": ["b"]}'],
     [], "x.jsonl: line 2: response must be a string, got list"),
    (['{"prompt": "a", "response": "b"}', "{not json"], [], "x.jsonl: line 2 is not valid JSON"),
    (['{"prompt": "a", "label": "yes"}', '{"prompt": "b", "label": "yes"}'], [],
     "a classification task needs at least 2 labels; the data has ['yes']"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}'], ["--heldout-fraction", "1"],
     "argument --heldout-fraction: must be < 1, got 1.0"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}'], ["--labels", "A", "A"],
     "--labels must be at least 2 different labels"),
])
def test_bad_user_data_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, model_dir, rows, flags,
                                                         message):
    src = model_dir("llama", seed=3)
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    no_model_loads(monkeypatch)
    code, _, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", path, *flags,
                       "--cache-dir", tmp_path / "cache")
    assert code == 2 and message in err, err
    assert not (tmp_path / "cache").exists()


def test_missing_files_and_clashing_names_are_refused(tmp_path, capsys, model_dir):
    src = model_dir("llama", seed=3)
    code, _, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", tmp_path / "nope.jsonl")
    assert code == 2 and f"task file not found: {tmp_path / 'nope.jsonl'}" in err
    a = write_jsonl(tmp_path / "a" / "reviews.jsonl", review_rows(4))
    b = write_jsonl(tmp_path / "b" / "reviews.jsonl", review_rows(4))
    code, _, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", a, b)
    assert code == 2 and f"two tasks are named 'reviews' ({a} and {b}): rename one" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", empty)
    assert code == 2 and f"{empty} holds no .jsonl files" in err


# -- vocabulary maps per target -----------------------------------------------------------------------------
def test_vocab_map_values_parse_per_target():
    assert parse_vocab_maps(None) == ("exact", {})
    assert parse_vocab_maps(["align"]) == ("align", {})
    assert parse_vocab_maps(["mini-x=align", "exact", "other/dir=exact"]) == (
        "exact", {"mini-x": "align", "other/dir": "exact"})
    for values, message in ((["fuzzy"], "--vocab-map fuzzy: give exact or align"),
                            (["exact", "align"], "2 maps for every target"),
                            (["mini-x=align", "mini-x=exact"], "two maps for target mini-x")):
        with pytest.raises(InputError, match=message):
            parse_vocab_maps(values)
    with pytest.raises(InputError, match=r"--vocab-map names mini-q, not among --targets \(mini-s\)"):
        EvalRunner(EvalConfig(targets=["mini-s"], vocab_maps={"mini-q": "align"}))


def test_one_vocab_map_per_target(model_dir, other_tokenizer, tmp_path, capsys):
    source = model_dir("llama", hidden=32, seed=5)
    other = model_dir("llama", name="user-other-vocab", tok=other_tokenizer, seed=8)
    data = write_jsonl(tmp_path / "reviews.jsonl", review_rows(16))
    cache = tmp_path / "eval"
    base = ["eval", "--source", source, "--targets", source, other, "--tasks", data, "--examples", "4",
            "--methods", "target+value", "--value-steps", "2", "--batch-size", "4", "--cache-dir", cache]
    code, _, err = cli(capsys, *base, "--vocab-map", "exact", "--vocab-map", f"{other}=align")
    assert code == 0, err
    value_dir = next((cache / "artifacts").glob("value-*"))
    assert [m.kind for m in VocabMap.saved(value_dir)] == ["align"]  # built for `other` only
    cells = sorted(p.name for p in (cache / "results").rglob("*.json"))
    # the single-value form still works; it changes only the cells of the target whose map changed
    code, _, err = cli(capsys, *base, "--vocab-map", "exact")
    assert code == 0, err
    now = sorted(p.name for p in (cache / "results").rglob("*.json"))
    assert len(set(now) - set(cells)) == 1


# -- a whole run on user data -------------------------------------------------------------------------------
def test_eval_on_user_files_reports_truncation_and_keys_the_cache_on_the_data(model_dir, tmp_path, capsys):
    src = model_dir("llama", hidden=32, seed=5)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_rows(16, templates=2))
    long_prompt = "It was the best of times, it was the worst of times. " * 12  # more than --max-length 64 tokens
    stories = write_jsonl(tmp_path / "stories" / "s.jsonl",
                          [{"prompt": f"{long_prompt}Story {i}:", "response": f" the cat {i}"} for i in range(12)])
    cache, docs = tmp_path / "eval", tmp_path / "results.md"
    argv = ["eval", "--source", src, "--targets", src, "--tasks", reviews, stories.parent, "--examples", "4",
            "--methods", "target", "target+value", "--value-steps", "2", "--batch-size", "4", "--max-length", "64",
            "--heldout-fraction", "0.5", "--cache-dir", cache, "--docs", docs]

    def run(*extra) -> tuple[dict, str, set]:
        code, _, err = cli(capsys, *argv, *extra)
        assert code == 0, err
        entries = {str(p.relative_to(cache)) for p in (cache / "results").rglob("*.json")}
        entries |= {p.name for p in (cache / "artifacts").iterdir()}
        return json.loads((cache / "results.json").read_text()), err, entries

    code, _, err = cli(capsys, *argv, "--split-by", "template")
    assert code == 2 and f'{stories}: line 1: no "template" field' in err  # the stories carry no templates
    result, err, entries = run()
    assert result["tasks"]["reviews"]["kind"] == "classification"
    assert result["tasks"]["reviews"]["sizes"] == {"train": 16, "heldout_example": 16}
    assert result["tasks"]["stories"]["kind"] == "generation"
    rows = {(r["task"], r["label"]): r for r in result["rows"]}
    assert "accuracy" in rows[("reviews", "target")] and "accuracy" not in rows[("stories", "target")]
    assert (rows[("stories", "target")]["truncated_prompts"] == 4
            and rows[("reviews", "target")]["truncated_prompts"] == 0)
    assert f"note: stories on {src}: 4 of 4 held-out prompts lost tokens from the left to fit the context" in err
    assert "`reviews`: classification from" in docs.read_text() and "split by example, 0.5 held out" in docs.read_text()

    assert run()[2] == entries  # nothing changed: every cell and model is read back
    _, _, other_split = run("--heldout-fraction", "0.25")  # another split of the same files: trained and measured again
    assert len(other_split - entries) == 6  # per task: a value model and 2 cells
    write_jsonl(reviews, [{**r, "prompt": r["prompt"].replace("movie", "film")} for r in review_rows(16, 2)])
    _, _, edited = run("--heldout-fraction", "0.25")
    assert len(edited - other_split) == 3 and all("reviews" in e for e in edited - other_split)  # stories kept


def test_a_response_longer_than_the_context_names_its_file_and_line(model_dir, tmp_path, capsys):
    src = model_dir("llama", hidden=32, seed=5)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": f"Story {i}:", "response": " the cat sat" * 40}
                                                 for i in range(4)])
    code, _, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", path, "--methods", "target",
                       "--max-length", "64", "--cache-dir", tmp_path / "eval")
    assert code == 2 and f"{path}: line " in err and "the response is" in err and "context of 64 tokens" in err, err
