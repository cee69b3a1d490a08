"""Label rewards from the command line: `train --labels` and `classify` (labels/), on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import cli, no_model_loads

from transfertune.core.compose import compose_logits
from transfertune.labels.classify import classify
from transfertune.labels.feature_reward import (
    FeatureReward,
    LabelReward,
    LabelRewardConfig,
    fit_label_reward,
)
from transfertune.labels.label_scores import calibrate, score_labels

LABELS = ["negative", "positive"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def label_rows(tmp_path):
    words = {"positive": ["great", "lovely", "superb"], "negative": ["awful", "boring", "broken"]}
    rows = []
    for i in range(40):
        label = LABELS[i % 2]
        text = f"Review {i}: the film was {words[label][i % 3]}. Positive?"
        # two templates word the same labels differently; rows of one example share its id
        choices = [" no", " yes"] if i % 4 < 2 else [" bad", " good"]
        rows.append({"prompt": text, "label": label, "choices": choices, "example": i // 2})
    return write_rows(tmp_path / "rows.jsonl", rows)


def test_train_then_classify_with_its_own_and_another_tokenizer(tmp_path, capsys, model_dir, other_tokenizer,
                                                                label_rows):
    source = model_dir("llama", seed=3)
    other = model_dir("qwen2", seed=5, tok=other_tokenizer)
    out = tmp_path / "reward"
    code, err = cli(capsys, "train", "--labels", *LABELS, "--base", source, "--data", label_rows, "--output", out)
    assert code == 0, err
    reward = LabelReward.load(out)
    assert reward.labels == LABELS and 0.0 <= reward.config.scale <= 1.0
    assert reward.config.backbone == str(type(out)(source).resolve())
    for base in (source, other):
        preds = tmp_path / f"preds-{base == source}.jsonl"
        code, err = cli(capsys, "classify", "--base", base, "--value", out, "--data", label_rows, "--output", preds)
        assert code == 0, err
        lines = [json.loads(x) for x in preds.read_text().splitlines()]
        assert len(lines) == 40 and {x["prediction"] for x in lines} <= set(LABELS)
        assert all(abs(sum(x["probabilities"].values()) - 1) < 1e-4 for x in lines)
        assert [x["label"] for x in lines] == [LABELS[i % 2] for i in range(40)]
    # without --value: zero-shot over the label set (labels from the rows)
    capsys.readouterr()
    assert cli(capsys, "classify", "--base", other, "--data", label_rows)[0] == 0


def test_classify_is_compose_logits_over_the_label_scores(tmp_path, model_dir, other_tokenizer, label_rows):
    """The composition `classify` reports is compose_logits over the base's label scores and the reward."""
    from transfertune.io.loading import load_base
    from transfertune.labels.label_data import read_label_rows

    source, target = model_dir("llama", seed=3), model_dir("qwen2", seed=5, tok=other_tokenizer)
    rows = read_label_rows(label_rows, LABELS)
    head = FeatureReward(32, 2)
    torch.manual_seed(0)
    torch.nn.init.normal_(head.head.weight)
    reward = LabelReward(LabelRewardConfig(labels=LABELS, backbone=source, scale=0.7), head)
    got = classify(target, str(label_rows), [reward], progress=False)

    src_model, src_tok = load_base(source)
    features = score_labels(src_model, src_tok, rows.prompts, rows.choices, feature_layer="middle").features
    tgt_model, tgt_tok = load_base(target)
    scores = score_labels(tgt_model, tgt_tok, rows.prompts, rows.choices).logprobs
    expected = compose_logits(calibrate(scores, rows.groups), [head(features)], weights=[0.7]).log_softmax(-1)
    torch.testing.assert_close(got.log_probs, expected, atol=1e-5, rtol=1e-5)


def test_label_scores_equal_scoring_each_choice_as_a_response(model_dir, tokenizer):
    """One prompt pass with its cache repeated per choice gives the same log-probs as scoring prompt + choice."""
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_base

    path = model_dir("llama", seed=3)
    model, tok = load_base(path)
    prompts = ["The cat sat on the", "It was the best of times, it was the"]
    choices = [[" mat", " dog ran to the park"], [" worst of times", " age"]]
    got = score_labels(model, tok, prompts, choices).logprobs
    cm = ComposedModel.from_pretrained(path)
    for i, p in enumerate(prompts):
        want = torch.stack([cm.score([p], [c])[0].sum() for c in choices[i]])
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)


def test_fit_learns_signal_and_holds_back_on_noise():
    """Features that carry the label: a strong reward that fixes the base. Pure noise: scale near 0, and the
    composition on new rows is no worse than the base alone."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 200, 16
    labels = torch.randint(0, 2, (n,), generator=gen)
    base = torch.randn(n, 2, generator=gen) * 0.3  # a base near chance
    groups, examples = [("a", "b")] * n, list(range(n))
    config = LabelRewardConfig(labels=LABELS, backbone="x")
    signal = torch.randn(n, dim, generator=gen)
    signal[:, 0] += 3 * (labels.float() - 0.5)
    fitted = fit_label_reward(signal, base, labels, groups=groups, examples=examples, config=config)
    assert fitted.config.scale >= 0.5
    test = torch.randn(n, dim, generator=gen)
    test_labels = torch.randint(0, 2, (n,), generator=gen)
    test[:, 0] += 3 * (test_labels.float() - 0.5)
    acc = (fitted.compose(base, test, groups).argmax(-1) == test_labels).float().mean()
    assert acc > 0.85

    noise = torch.randn(n, dim, generator=gen)
    held_back = fit_label_reward(noise, base, labels, groups=groups, examples=examples, config=config)
    assert held_back.config.scale <= 0.3
    fresh = torch.randn(n, dim, generator=gen)
    composed = held_back.compose(base, fresh, groups)
    alone = held_back.compose(base, fresh, groups, scale=0.0)
    nll = torch.nn.functional.cross_entropy
    assert float(nll(composed, labels)) <= float(nll(alone, labels)) + 0.05


def test_save_load_round_trip(tmp_path):
    head = FeatureReward(8, 3)
    torch.nn.init.normal_(head.head.weight)
    LabelReward(LabelRewardConfig(labels=["a", "b", "c"], backbone="mini-s", scale=0.4), head).save(tmp_path)
    back = LabelReward.load(tmp_path)
    x = torch.randn(5, 8)
    torch.testing.assert_close(back.rewards(x), head(x))
    assert back.config.scale == 0.4 and back.labels == ["a", "b", "c"]


@pytest.mark.parametrize("rows, flags, message", [
    ([{"prompt": "a", "label": "positive"}, {"prompt": "b", "label": "neutral"}], ["--labels", *LABELS],
     "line 2: unknown label 'neutral'"),
    ([{"prompt": "a", "label": 0}, {"prompt": "b", "label": 1}], ["--labels"], "the label set is empty"),
    ([{"prompt": "a", "label": "positive"}, {"label": "negative"}], ["--labels", *LABELS], "line 2: no text"),
    ([{"prompt": "a", "label": "positive"}, {"prompt": "  ", "label": "negative"}], ["--labels", *LABELS],
     "line 2: no text"),
    ([{"prompt": "a", "label": "positive", "choices": [" x"]}], ["--labels", *LABELS],
     'line 1: "choices" must list one non-empty verbaliser per label'),
    ([{"prompt": "a", "label": 5}], ["--labels", *LABELS], 'line 1: "label" 5 is not an index'),
    ([{"prompt": "a"}], ["--labels", *LABELS], 'line 1: no "label"'),
    ([{"prompt": "a", "label": "x"}], ["--labels", "x", "x"], "repeated label"),
    ([{"prompt": "a", "label": "b", "choices": [" a", " b", " c"]}, {"prompt": "d", "label": "c",
      "choices": [" a", " b", " c"]}], ["--labels"], "give the whole label set with --labels"),
])
def test_bad_label_input_exits_2_naming_file_and_line(tmp_path, capsys, monkeypatch, base, rows, flags, message):
    no_model_loads(monkeypatch)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    code, err = cli(capsys, "train", *flags, "--base", base, "--data", data, "--output", tmp_path / "r")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_classify_refuses_unknown_labels_and_existing_output(tmp_path, capsys, monkeypatch, base):
    no_model_loads(monkeypatch)
    data = write_rows(tmp_path / "rows.jsonl", [{"text": "a", "label": "maybe"}])
    code, err = cli(capsys, "classify", "--base", base, "--labels", *LABELS, "--data", data)
    assert code == 2 and f"{data}: line 1: unknown label 'maybe'" in err
    mine = tmp_path / "mine.jsonl"
    mine.write_text("keep me\n")
    good = write_rows(tmp_path / "good.jsonl", [{"text": "a", "label": "positive"}, {"text": "b"}])
    code, err = cli(capsys, "classify", "--base", base, "--labels", *LABELS, "--data", good, "--output", mine)
    assert code == 2 and "--overwrite" in err and mine.read_text() == "keep me\n"


def test_train_labels_refuses_value_model_flags_and_foreign_output(tmp_path, capsys, monkeypatch, base, label_rows):
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "train", "--labels", *LABELS, "--base", base, "--data", label_rows, "--output",
                    tmp_path / "r", "--lora")
    assert code == 2 and "--lora" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = cli(capsys, "train", "--labels", *LABELS, "--base", base, "--data", label_rows, "--output", mine,
                    "--overwrite")
    assert code == 2 and "notes.txt" in err and (mine / "notes.txt").read_text() == "keep"


def test_eval_runs_label_rewards_as_a_method(tmp_path, capsys, model_dir, other_tokenizer):
    """eval --methods target+label_reward: fitted against --source, composed with a target of another tokenizer,
    with its accuracy and gap closed in the table; tasks whose rows word the labels differently are skipped with
    the reason."""
    source, target = model_dir("llama", seed=3), model_dir("qwen2", seed=5, tok=other_tokenizer)
    words = {"yes": ["great", "lovely", "superb"], "no": ["awful", "boring", "broken"]}
    reviews = write_rows(tmp_path / "reviews.jsonl", [
        {"prompt": f"Review {i}: the film was {words['yes' if i % 2 else 'no'][i % 3]}. Positive?",
         "label": "yes" if i % 2 else "no", "example": i} for i in range(40)])
    out = tmp_path / "results"
    code, err = cli(capsys, "eval", "--source", source, "--targets", target, "--tasks", reviews, "--methods",
                    "target", "target_ft", "target+label_reward", "--examples", 8, "--target-steps", 2,
                    "--out", out, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    reward = rows["target+label_reward"]
    assert reward["n"] == 8 and 0.0 <= reward["accuracy"] <= 1.0 and 0.0 <= reward["reward_scale"] <= 1.0
    assert "target+label_reward" in (out / "results.md").read_text()

    templated = write_rows(tmp_path / "templated.jsonl", [
        {"prompt": f"Review {i}: fine. Positive?", "choices": [" no", " yes"] if i % 2 else [" bad", " good"],
         "label": i % 2, "example": i} for i in range(20)])
    code, err = cli(capsys, "eval", "--source", source, "--targets", target, "--tasks", templated, "--methods",
                    "target+label_reward", "--examples", 4, "--out", tmp_path / "r2", "--cache-dir", tmp_path / "c2")
    assert code == 0, err
    row = json.loads((tmp_path / "r2" / "results.json").read_text())["rows"][0]
    assert "one label set" in row["skipped"]


def test_the_readme_label_example_runs_on_the_built_in_family(tmp_path, capsys, monkeypatch):
    """The README's copy-paste block for label rewards, as written (paths under a temporary directory)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text[text.index("### Rewards over a label set"):]
    block = block[block.index("```bash") + 7: block.index("```", block.index("```bash") + 7)]
    variables = dict(re.findall(r"^(\w+)=(\S+)", block, flags=re.M))
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("$T ")]
    assert len(commands) == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(root / "data")
    for command in commands:
        argv = shlex.split(command.replace("$D", variables["D"]))[1:]
        code, err = cli(capsys, *argv)
        assert code == 0, (command, err)
    lines = (tmp_path / "preds.jsonl").read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[0])["prediction"].endswith("0s")
