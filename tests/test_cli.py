import json
import subprocess
import sys

import pytest

from transfertune.cli.main import main


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, model_dir, yes_no_records):
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    out = root / "value"
    assert main(["train", "--base", model_dir("llama", seed=3), "--data", str(data), "--output", str(out),
                 "--epochs", "40", "--lr", "3e-3", "--logging-steps", "1000"]) == 0
    return model_dir("llama", seed=3), out, data


def test_train_info_score_generate(trained_dir, capsys, tmp_path):
    base, out, data = trained_dir
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "full weights" in info and "320 tokens" in info and base in info
    assert main(["score", "--base", base, "--data", str(data), "--add-eos"]) == 0
    base_nll = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_nll"]
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--base", base, "--value", str(out), "--data", str(data), "--add-eos",
                 "--output", str(scores)]) == 0
    composed_nll = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_nll"]
    assert composed_nll < 0.5 * base_nll
    assert len(scores.read_text().splitlines()) == 24
    assert main(["generate", "--base", base, "--value", str(out), "Review 3: the movie was great. Positive?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == "yes"


def test_generate_reads_stdin_and_streams(trained_dir):
    base, out, _ = trained_dir
    res = subprocess.run(
        [sys.executable, "-m", "transfertune.cli.main", "generate", "--base", base, "--value", str(out), "--stream",
         "--max-new-tokens", "4"], input="Review 8: the movie was awful. Positive?", capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "no"


def test_generate_with_a_draft_gives_the_composed_models_text(trained_dir, capsys, model_dir, tmp_path):
    """--draft: speculative decoding of the same composed model (a bigger base verifies, the trained base drafts)."""
    _, out, _ = trained_dir
    target, draft = model_dir("llama", hidden=48, seed=1), model_dir("llama", seed=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Review 3: the movie was great. Positive?\nReview 8: the movie\nThe cat sat\n")
    common = ["generate", "--base", target, "--value", str(out), "--prompt-file", str(prompts), "--max-new-tokens",
              "12", "--jsonl", "--stop", "zz"]
    capsys.readouterr()
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--draft", draft, "--batch-size", "2"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*common, "--draft", draft, "--stream"]) == 2
    assert "--stream cannot be combined with --draft" in capsys.readouterr().err
    assert main([*common, "--draft", model_dir("qwen2", seed=3), "--proxy-tuned", draft, "--proxy-untuned",
                 draft]) == 2
    err = capsys.readouterr().err
    assert "--draft" in err and "proxy-tuning" in err


def test_errors_are_messages_not_tracebacks(trained_dir, tmp_path, capsys, model_dir, other_tokenizer):
    base, out, _ = trained_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    assert main(["score", "--base", base, "--data", str(bad)]) == 2
    assert f"{bad}: line 2 is not valid JSON" in capsys.readouterr().err
    other = model_dir("llama", name="cli-other", tok=other_tokenizer)
    assert main(["generate", "--base", other, "--value", str(out), "hi"]) == 2
    assert "vocabulary mismatch" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not a value directory" in capsys.readouterr().err
    assert main(["generate", "--base", base, "--proxy-tuned", base, "hi"]) == 2
    assert "--proxy-untuned" in capsys.readouterr().err


def test_train_and_eval_flags_are_made_from_the_recipe():
    """One recipe, one spelling: every ValueRecipe field is a `train` flag, the eval fields are `eval --value-*`
    flags with eval's defaults, and the parsed flags give back the recipe."""
    from dataclasses import fields

    from transfertune.cli.common import recipe_flag, recipe_from_args
    from transfertune.cli.main import build_parser
    from transfertune.evaluation.config import EvalConfig
    from transfertune.training.recipe import ValueRecipe

    train = build_parser("train")
    args = train.parse_args(["train", "--base", "b", "--data", "d", "--output", "o"])
    assert recipe_from_args(args) == ValueRecipe()
    text = train._subparsers._group_actions[0].choices["train"].format_help()
    for f in fields(ValueRecipe):
        assert recipe_flag(f)[1][0] in text, f.name
    args = train.parse_args(["train", "--base", "b", "--data", "d", "--output", "o", "--lr", "0.5", "--no-defer",
                             "--augment", "0", "--head", "copy", "--lora", "--lora-r", "4"])
    assert recipe_from_args(args) == ValueRecipe(learning_rate=0.5, defer=False, augment=0, head="copy", lora=True,
                                                 lora_r=4)
    ev = build_parser("eval")
    defaults = EvalConfig().value
    args = ev.parse_args(["eval"])
    assert recipe_from_args(args, prefix="value-", base=defaults) == defaults
    args = ev.parse_args(["eval", "--value-lr", "0.1", "--value-steps", "7", "--no-value-defer", "--l1", "0.2"])
    assert recipe_from_args(args, prefix="value-", base=defaults) == defaults.with_changes(
        learning_rate=0.1, max_steps=7, defer=False, l1_coef=0.2)
