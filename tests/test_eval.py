"""`transfertune eval`: every method runs, gap closed follows its formula, results are cached,
weight-diff transfer is exact and refuses mismatched architectures."""
import json

import pytest
import torch

from transfertune.cli.main import main as cli_main
from transfertune.evaluation.config import DEFAULT_METHODS, EvalConfig
from transfertune.evaluation.report import add_gap_closed
from transfertune.evaluation.runner import EvalRunner
from transfertune.io.loading import load_causal_lm
from transfertune.training.weight_diff import ArchitectureMismatchError, diff_vector_transfer
from transfertune.vocab.token_map import VocabMap


@pytest.fixture()
def tiny_task(tmp_path, monkeypatch, yes_no_records):
    root = tmp_path / "tasks"
    (root / "yesno").mkdir(parents=True)
    rows = [{**r, "response": r["response"].strip(), "choices": ["no", "yes"],
             "label": int(r["response"].strip() == "yes")} for r in yes_no_records]
    for split, part in (("train", rows[:16]), ("heldout_example", rows[16:]), ("heldout_template", rows[16:])):
        (root / "yesno" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    sizes = {"train": 16, "heldout_example": 8, "heldout_template": 8}
    (root / "tasks.json").write_text(json.dumps({"yesno": {"kind": "classification", "sizes": sizes}}))
    monkeypatch.setenv("TRANSFERTUNE_TASKS", str(root))
    return "yesno"


def test_every_method_runs_and_is_cached(model_dir, tiny_task, tmp_path, capsys):
    source = model_dir("llama", hidden=32, seed=5)
    same_arch = model_dir("llama", hidden=32, seed=6)
    bigger = model_dir("llama", hidden=48, seed=7)
    cache = tmp_path / "eval"
    argv = ["eval", "--source", source, "--targets", same_arch, bigger, "--tasks", tiny_task, "--examples", "6",
            "--value-steps", "3", "--finetune-steps", "3", "--target-steps", "3", "--batch-size", "4",
            "--beta", "1", "0.5", "--cache-dir", str(cache), "--docs", str(tmp_path / "results.md")]
    assert cli_main(argv) == 0
    result = json.loads((cache / "results.json").read_text())
    rows = result["rows"]
    labels = {r["label"] for r in rows}
    assert {m for m in DEFAULT_METHODS if m not in ("target+value", "proxy", "diff_vector")} <= labels
    assert {"target+value@1", "target+value@0.5", "proxy@1", "diff_vector@1"} <= labels
    diff_rows = {r["target"]: r for r in rows if r["method"] == "diff_vector"}
    assert "accuracy" in diff_rows[same_arch]
    assert "one architecture" in diff_rows[bigger]["skipped"]
    assert all(r["seconds_per_token"] > 0 for r in rows if "skipped" not in r)
    assert (cache / "results.png").is_file() and "target+value@0.5" in (tmp_path / "results.md").read_text()
    # a re-run reads every cell and artifact from the cache: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "artifacts").rglob("*.safetensors")}
    assert cli_main(argv) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (cache / "artifacts").rglob("*.safetensors")}


def test_other_vocabulary_target_and_doc_sections(model_dir, tiny_task, tmp_path, other_tokenizer):
    source = model_dir("llama", hidden=32, seed=5)
    other = model_dir("llama", name="eval-other-vocab", tok=other_tokenizer, seed=8)
    docs = tmp_path / "results.md"
    docs.write_text("# Transfer results\n\n<!-- section: main -->\nkept\n<!-- /section: main -->\n")
    argv = ["eval", "--source", source, "--targets", other, "--tasks", tiny_task, "--examples", "6",
            "--methods", "target", "target+value", "proxy", "--value-steps", "3", "--finetune-steps", "3",
            "--batch-size", "4", "--cache-dir", str(tmp_path / "eval"), "--vocab-map", "align",
            "--docs", str(docs), "--docs-section", "other-vocab", "--docs-title", "Another tokenizer"]
    assert cli_main(argv) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    assert "does not share the vocabulary" in rows["proxy@1"]["skipped"]
    assert rows["target+value@1"]["nll"] != rows["target"]["nll"]
    value_dir = next((tmp_path / "eval" / "artifacts").glob("value-*"))
    assert [m.kind for m in VocabMap.saved(value_dir)] == ["align"]
    text = docs.read_text()
    assert "kept" in text and "## Another tokenizer" in text and (tmp_path / "results-other-vocab.png").is_file()
    assert cli_main(argv) == 0 and docs.read_text().count("## Another tokenizer") == 1


def test_gap_closed_formula():
    rows = [
        {"target": "T", "task": "t", "label": "target", "nll": 3.0, "accuracy": 0.5},
        {"target": "T", "task": "t", "label": "target_ft", "nll": 1.0, "accuracy": 0.9},
        {"target": "T", "task": "t", "label": "target+value@1", "nll": 2.5, "accuracy": 0.8},
    ]
    add_gap_closed(rows)
    assert rows[2]["gap_closed_nll"] == pytest.approx(0.25)
    assert rows[2]["gap_closed_accuracy"] == pytest.approx(0.75)
    assert rows[1]["gap_closed_nll"] == pytest.approx(1.0)
    rows[1]["accuracy"] = 0.52  # fine-tuning moved accuracy by one example in 50: no ratio over noise
    for r in rows:
        r.pop("gap_closed_accuracy", None)
    add_gap_closed(rows)
    assert "gap_closed_accuracy" not in rows[2] and rows[2]["gap_closed_nll"] == pytest.approx(0.25)


def test_diff_vector_is_exact_and_refuses_other_architectures(model_dir):
    s, s_ft, t = (model_dir("llama", hidden=32, seed=k) for k in (11, 12, 13))
    moved = diff_vector_transfer(s, s, s_ft)  # old base + (tuned - old base) = tuned
    for name, w in moved.state_dict().items():
        torch.testing.assert_close(w, load_causal_lm(s_ft).state_dict()[name], rtol=0, atol=1e-6)
    unchanged = diff_vector_transfer(t, s, s)
    for name, w in unchanged.state_dict().items():  # t + alpha * (s - s) adds exact zeros: bit-exact by construction
        assert torch.equal(w, load_causal_lm(t).state_dict()[name])
    with pytest.raises(ArchitectureMismatchError, match="one architecture"):
        diff_vector_transfer(model_dir("llama", hidden=48, seed=1), s, s_ft)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown methods"):
        EvalRunner(EvalConfig(methods=["magic"]))


def test_cache_is_keyed_on_everything_that_changes_a_result(model_dir, tiny_task, tmp_path):
    """Issue #13 item 10: a re-run with another seed, learning rate, batch size, max length or task data trains
    and measures again instead of serving the old cell under the new label."""
    source = model_dir("llama", hidden=32, seed=5)
    cache = tmp_path / "eval"
    argv = ["eval", "--source", source, "--targets", source, "--tasks", tiny_task, "--examples", "4",
            "--methods", "target+value", "--value-steps", "2", "--batch-size", "4", "--cache-dir", str(cache)]

    def run(*extra):
        assert cli_main(argv + list(extra)) == 0
        return {p.name for p in (cache / "artifacts").iterdir()}, {p.name for p in (cache / "results").rglob("*.json")}

    first = run()
    assert [len(x) for x in first] == [1, 1] and run() == first
    seen = first
    for extra in (["--seed", "1"], ["--value-lr", "0.1"], ["--batch-size", "2"], ["--max-length", "64"]):
        now = run(*extra)
        assert all(len(n - s) == 1 for n, s in zip(now, seen)), extra
        seen = now
    train = tmp_path / "tasks" / tiny_task / "train.jsonl"
    train.write_text(train.read_text().replace("awful", "dreadful"))
    now = run()
    assert all(len(n - s) == 1 for n, s in zip(now, seen))


def test_dtype_and_device_reach_the_evaluated_models_and_the_cell_keys(model_dir, tiny_task, tmp_path, capsys):
    source = model_dir("llama", hidden=32, seed=5)
    cache = tmp_path / "eval"
    argv = ["eval", "--source", source, "--targets", source, "--tasks", tiny_task, "--examples", "4",
            "--methods", "target", "--cache-dir", str(cache)]

    def nll(*extra) -> float:
        assert cli_main(argv + list(extra)) == 0
        return json.loads((cache / "results.json").read_text())["rows"][0]["nll"]

    fp32 = nll()
    assert nll("--dtype", "fp32", "--device", "cpu") == pytest.approx(fp32, rel=1e-6)  # what auto means on CPU
    cells = {p.name for p in (cache / "results").rglob("*.json")}
    bf16 = nll("--dtype", "bf16")
    assert len({p.name for p in (cache / "results").rglob("*.json")} - cells) == 1  # a cell of its own
    assert bf16 == pytest.approx(fp32, rel=0.05) and bf16 != fp32
    assert cli_main(argv + ["--device", "cuda:7"]) == 2
    assert "--device" in capsys.readouterr().err


def test_value_recipe_and_target_rate_reach_training_and_cache_keys(model_dir, tiny_task, tmp_path, monkeypatch):
    """--value-scheme/--value-init/--value-head and --target-lr change what is trained (and so the cache key);
    at their defaults the keys are those of runs made before the options existed."""
    import transfertune.training.sft as finetune
    import transfertune.training.value_trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "train_value_recipe",
                        lambda base, data, out, recipe, **kw: calls.append(("value", {**recipe.to_dict(), **kw})))
    monkeypatch.setattr(finetune, "finetune_base", lambda *a, **kw: calls.append(("ft", kw)))
    monkeypatch.setattr(EvalRunner, "_artifact", lambda self, kind, model, task, steps, train, **settings:
                        (train("unused"), settings)[1])
    source, target = model_dir("llama", hidden=32, seed=5), model_dir("llama", hidden=48, seed=7)
    # the recipe as it was before the options existed (augment came later, with default 1: checked below)
    base = EvalConfig(source=source, targets=[target], tasks=[tiny_task], cache_dir=str(tmp_path / "c"),
                      value=EvalConfig().value.with_changes(augment=0))
    default = EvalRunner(base)
    assert default.value_dir(tiny_task) == {"lr": base.value.learning_rate, "l1_coef": 0.0, "entropy_coef": 0.0}
    augmented = EvalRunner(EvalConfig(**{**base.__dict__, "value": base.value.with_changes(augment=1)}))
    assert augmented.value_dir(tiny_task)["augment"] == 1 and augmented._settings(target)["value_augment"] == 1
    assert "value_augment" not in default._settings(target)
    assert calls[-1][1]["defer"] is True
    recipe = base.value.with_changes(scheme="cascade", init="random", head="copy", defer=False)
    varied = EvalRunner(EvalConfig(**{**base.__dict__, "value": recipe, "target_lr": 1e-5}))
    assert varied.value_dir(tiny_task) == {"lr": base.value.learning_rate, "l1_coef": 0.0, "entropy_coef": 0.0,
                                           "init": f"random:{source}", "scheme": "cascade", "head": "copy",
                                           "defer": False}
    value_kw = calls[-1][1]
    assert (value_kw["scheme"], value_kw["init"], value_kw["head"]) == ("cascade", f"random:{source}", "copy")
    assert value_kw["defer"] is False and "value_defer" not in default._settings(target)
    assert varied.finetuned(target, tiny_task, 3, lr=varied.cfg.target_lr)["lr"] == 1e-5
    assert calls[-1][1]["learning_rate"] == 1e-5
    unset = EvalRunner(EvalConfig(**{**base.__dict__, "target_lr": None}))  # the target shares --finetune-lr
    assert "target_lr" not in unset._settings(target) and varied._settings(target)["target_lr"] == 1e-5
    with pytest.raises(Exception, match="value scheme"):
        EvalRunner(EvalConfig(**{**base.__dict__, "value": base.value.with_changes(scheme="serial")}))
