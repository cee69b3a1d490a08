"""Issue #30, data loss: no command overwrites or deletes a file transfertune did not write, and `train
--overwrite` keeps the old model until the new one is saved. Each test is a case of docs/reliability.md
("Data loss (issue 30)"); only the tiny in-process models of conftest.py are used."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import cli, no_model_loads

import transfertune.io.run_dirs as run_dirs
from transfertune.cli.main import main
from transfertune.core.value_model import ValueModel
from transfertune.evaluation.report import write_doc_section
from transfertune.evaluation.runner import EvalRunner
from transfertune.io.run_dirs import LOCK_NAME, MARKER, RUN_NAME, claim_output, read_run, swap_in
from transfertune.io.validate import InputError
from transfertune.training.value_trainer import ValueTrainer


@pytest.fixture()
def data_file(tmp_path, yes_no_records):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- D1: score --output ------------------------------------------------------------------------------------
def test_score_output_inside_a_model_dir_is_refused(tmp_path, base, data_file, capsys, monkeypatch):
    mb = tmp_path / "mb"
    shutil.copytree(base, mb)
    value = tmp_path / "v"
    ValueModel.create(base).save(value)
    before = {d: snapshot(d) for d in (mb, value)}
    no_model_loads(monkeypatch)
    for argv in (["--base", "./mb", "--output", "mb/model.safetensors"],
                 ["--base", "./mb", "--output", "mb/scores.jsonl", "--overwrite"],
                 ["--base", base, "--value", "v", "--output", "v/model.safetensors", "--overwrite"]):
        monkeypatch.chdir(tmp_path)
        code, err = cli(capsys, "score", "--data", data_file, *argv)
        flag = "--value" if "--value" in argv else "--base"
        assert code == 2 and f"is inside the model directory of {flag}" in err, err
    assert {d: snapshot(d) for d in (mb, value)} == before


def test_score_output_over_a_file_it_did_not_write_needs_overwrite(tmp_path, base, data_file, capsys, monkeypatch):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("three years of work\n")
    with monkeypatch.context() as m:
        no_model_loads(m)
        code, err = cli(capsys, "score", "--base", base, "--data", data_file, "--output", thesis)
    assert code == 2 and "was not written by `transfertune score`" in err and "--overwrite" in err
    assert thesis.read_text() == "three years of work\n"

    assert cli(capsys, "score", "--base", base, "--data", data_file, "--output", thesis, "--overwrite")[0] == 0
    rows = [json.loads(line) for line in thesis.read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"logprob", "tokens", "nll", "token_logprobs"}
    # a file score wrote, and an empty one, are replaced without --overwrite
    assert cli(capsys, "score", "--base", base, "--data", data_file, "--output", thesis)[0] == 0
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert cli(capsys, "score", "--base", base, "--data", data_file, "--output", empty)[0] == 0
    assert len(empty.read_text().splitlines()) == 24


# -- D2 and D3: eval --docs, eval --output ---------------------------------------------------------------
class Trained(Exception):
    """Raised where the evaluation would start: every check passed."""


@pytest.fixture()
def eval_argv(tmp_path, base, yes_no_records):
    task = tmp_path / "g.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    return ["eval", "--source", base, "--targets", base, "--tasks", task, "--methods", "target", "--examples", "2",
            "--cache-dir", tmp_path / "cache"]


def stop_before_training(monkeypatch):
    def run(self):
        raise Trained

    monkeypatch.setattr(EvalRunner, "run", run)
    no_model_loads(monkeypatch)


def test_eval_docs_must_be_a_markdown_file_transfertune_wrote(tmp_path, eval_argv, capsys, monkeypatch):
    stop_before_training(monkeypatch)
    task = tmp_path / "g.jsonl"
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n\nHand-written notes.\n")
    (tmp_path / "notes.txt").write_text("notes")
    before = snapshot(tmp_path)
    cases = [(["--docs", task], f"--docs {task} is an input of this evaluation (--tasks {task})"),
             (["--docs", tmp_path / "notes.txt"], "is not a markdown file (.md)"),
             (["--docs", readme], f"--docs {readme} is a file transfertune did not write"),
             (["--output", tmp_path / "out", "--docs", tmp_path / "out" / "results.md"],
              "is the results.md that eval writes to --output")]
    for extra, message in cases:
        code, err = cli(capsys, *eval_argv, *extra, "--overwrite")
        assert code == 2 and message in err, err
    assert snapshot(tmp_path) == before

    # a new file whose plot name is taken: only with --overwrite
    (tmp_path / "results-main.png").write_bytes(b"my picture")
    code, err = cli(capsys, *eval_argv, "--docs", tmp_path / "new.md")
    assert code == 2 and "results-main.png already exists beside it" in err and "--overwrite" in err
    with pytest.raises(Trained):
        main([str(a) for a in [*eval_argv, "--docs", tmp_path / "new.md", "--overwrite"]])
    # files transfertune wrote: a "# Transfer results" file, sections in any markdown file, an empty file
    ours = {"a.md": "# Transfer results\n", "b.md": "# Notes\n\n<!-- section: x -->\nx\n<!-- /section: x -->\n",
            "c.md": ""}
    for name, text in ours.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(Trained):
            main([str(a) for a in [*eval_argv, "--docs", tmp_path / name]])


def test_write_doc_section_refuses_a_users_markdown(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n")
    with pytest.raises(InputError, match="did not write"):
        write_doc_section(readme, "main", "## table")
    assert readme.read_text() == "# My project\n"
    with pytest.raises(InputError, match="not a markdown file"):
        write_doc_section(tmp_path / "data.jsonl", "main", "## table")
    assert not (tmp_path / "data.jsonl").exists()
    write_doc_section(tmp_path / "ours.md", "main", "## table")
    write_doc_section(tmp_path / "ours.md", "other", "## more")
    text = (tmp_path / "ours.md").read_text()
    assert text.startswith("# Transfer results") and "## table" in text and "## more" in text


def test_eval_results_it_did_not_write_need_overwrite(tmp_path, eval_argv, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("my results\n")
    (out / "results.json").write_text('{"mine": 1}\n')
    before = snapshot(out)
    with monkeypatch.context() as m:
        stop_before_training(m)
        code, err = cli(capsys, *eval_argv, "--output", out)
        assert code == 2 and f"--output {out} holds results.json, results.md, which transfertune did not write" in err
        assert "pass --overwrite" in err
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "results.png").write_bytes(b"my picture")
        code, err = cli(capsys, *eval_argv)
        assert code == 2 and f"--cache-dir {cache} holds results.png" in err
    assert snapshot(out) == before and (cache / "results.png").read_bytes() == b"my picture"

    assert cli(capsys, *eval_argv, "--output", out, "--overwrite")[0] == 0
    result = json.loads((out / "results.json").read_text())
    assert {"config", "rows"} <= set(result) and (out / "results.md").read_text().startswith("| target | task |")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(capsys, *eval_argv, "--output", out)[0] == 0  # its own results are replaced without --overwrite
    (out / "results.md").write_text("edited by hand\n")
    code, err = cli(capsys, *eval_argv, "--output", out)
    assert code == 2 and "holds results.md, which transfertune did not write" in err


# -- D4: train --overwrite stages the new model and swaps it in ---------------------------------------------
@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_overwrite_keeps_the_old_model_until_the_new_one_is_saved(tmp_path, base, data_file, capsys, monkeypatch,
                                                                    swap):
    if swap == "renames":  # systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(run_dirs, "_exchange", lambda a, b: False)
    out = tmp_path / "v"
    argv = ["train", "--base", base, "--data", data_file, "--output", out, "--max-steps", "1", "--logging-steps", "9"]
    assert cli(capsys, *argv)[0] == 0
    old_id = read_run(out)["run_id"]
    before = snapshot(out)
    nxt = tmp_path / ".v.transfertune-next"
    # a refusal after the claim (once the models are loaded) leaves the old model
    code, err = cli(capsys, *argv, "--overwrite", "--max-length", "100000")
    assert code == 2 and "more than the context" in err and snapshot(out) == before

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ValueTrainer, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main([str(a) for a in [*argv, "--overwrite", "--seed", "7"]])
    assert snapshot(out) == before and ValueModel.load(out).config.extra["run_id"] == old_id
    assert read_run(nxt)["staged"] and not read_run(nxt)["finished"]

    # the interrupted --overwrite run is what --resume continues, in every process of a distributed launch
    code, err = cli(capsys, *argv)
    assert code == 2 and "--resume continues the interrupted --overwrite run" in err
    code, err = cli(capsys, *argv, "--resume", "--seed", "8")
    assert code == 2 and "the interrupted --overwrite run of" in err and "seed 7 -> 8" in err
    with monkeypatch.context() as m:
        m.setenv("RANK", "1")
        with claim_output(out, settings={}, resume=True) as claim:
            assert claim.directory == nxt and claim.target == out.resolve()
        with claim_output(out, settings={}, overwrite=True) as claim:
            assert claim.directory == nxt
    assert cli(capsys, *argv, "--resume", "--seed", "7")[0] == 0
    new_id = read_run(out)["run_id"]
    assert new_id != old_id and read_run(out)["finished"] and ValueModel.load(out).config.extra["run_id"] == new_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "v"]
    assert LOCK_NAME in os.listdir(out) and snapshot(out) != before

    # a plain --overwrite replaces the model in one step and leaves nothing beside it
    assert cli(capsys, *argv, "--overwrite")[0] == 0
    assert read_run(out)["run_id"] not in (old_id, new_id) and ValueModel.load(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "v"]


def fake_value_dir(path: Path, tag: str, finished: bool = True) -> Path:
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"files": ["model.safetensors"]}))
    (path / "model.safetensors").write_text(tag)
    (path / RUN_NAME).write_text(json.dumps({"run_id": tag, "finished": finished, "staged": True}))
    return path


def test_a_swap_cut_short_leaves_one_whole_directory(tmp_path, monkeypatch):
    target = fake_value_dir(tmp_path / "v", "old")
    new = fake_value_dir(tmp_path / ".v.transfertune-next", "new")
    (target / "notes.txt").write_text("added while training")
    with pytest.raises(InputError, match="gained files transfertune did not write while training"):
        swap_in(new, target)
    (target / "notes.txt").unlink()

    # two renames: an error between them is undone
    monkeypatch.setattr(run_dirs, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(run_dirs.os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        swap_in(new, target)
    monkeypatch.setattr(run_dirs.os, "rename", real_rename)
    assert (target / "model.safetensors").read_text() == "old" and (new / "model.safetensors").read_text() == "new"

    # a kill between them: the next claim completes the swap when the new run had finished, else undoes it
    old = tmp_path / ".v.transfertune-old"
    os.rename(target, old)
    with pytest.raises(InputError, match="already holds a value model"):
        with claim_output(target, settings={}):
            pass
    assert (target / "model.safetensors").read_text() == "new"
    shutil.rmtree(old)
    fake_value_dir(tmp_path / ".v.transfertune-next", "newer", finished=False)
    os.rename(target, old)
    with pytest.raises(InputError, match="already holds a value model"):
        with claim_output(target, settings={}):
            pass
    assert (target / "model.safetensors").read_text() == "new"


# -- D5: a refused claim writes nothing -----------------------------------------------------------------------
def test_a_refused_train_output_is_left_as_it_was(tmp_path, base, data_file, capsys, monkeypatch):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, err = cli(capsys, "train", "--base", base, "--data", data_file, "--output", user, "--max-steps", "1",
                        *extra)
        assert code == 2 and str(user) in err
        assert sorted(os.listdir(user)) == ["notes.txt"]

    def refused(*_):
        raise InputError("refused")

    monkeypatch.setattr(run_dirs, "_decide", refused)
    with pytest.raises(InputError, match="refused"):
        with claim_output(tmp_path / "new" / "deeper", settings={}):
            pass
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "userdir"]
