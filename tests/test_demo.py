"""`make demo`'s job runs end to end (here on tiny stand-in models, a few steps) and reports every cell."""
import json

from transfertune.family import demo


def test_demo_trains_composes_and_reports(model_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    for name, hidden in (("mini-s", 32), ("mini-m", 48)):
        (models / name).symlink_to(model_dir("llama", hidden=hidden, seed=hidden))
    monkeypatch.setenv("TRANSFERTUNE_MODELS", str(models))
    out = tmp_path / "demo"
    assert demo.main(["--targets", "mini-s", "mini-m", "--steps", "3", "--eval-examples", "3", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == demo.DEFAULT_EVALS
    assert len(result["rows"]) == 2 * 2 * len(result["tasks"])
    assert all("exact_match" in r and r["n"] == 3 for r in result["rows"])


def test_demo_reports_classification_accuracy(model_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "mini-s").symlink_to(model_dir("llama", hidden=32, seed=32))
    monkeypatch.setenv("TRANSFERTUNE_MODELS", str(models))
    out = tmp_path / "demo"
    assert demo.main(["--targets", "mini-s", "--tasks", "ag_news", "sciq", "--steps", "2", "--eval-examples", "2",
                      "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    kinds = {r["task"]: r for r in result["rows"]}
    assert "accuracy" in kinds["ag_news/heldout_example"] and "exact_match" in kinds["sciq/heldout_example"]
    assert (out / "results.png").is_file() and (out / "value" / "transfertune.json").is_file()
    assert isinstance(result["transfer_wins"], list)


def test_demo_refuses_missing_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERTUNE_MODELS", str(tmp_path))
    assert demo.main(["--out", str(tmp_path / "demo")]) == 2
    assert "make family" in capsys.readouterr().out
