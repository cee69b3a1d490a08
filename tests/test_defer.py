"""Rows whose "deferred" tail is left to the base: the value model learns the rest and leaves the base alone there."""
import json

import pytest
import torch
import torch.nn.functional as F

from transfertune.core.compose import composed_log_probs, deferral_kl
from transfertune.io.data import DataFormatError, RightPadCollator, encode_example, read_jsonl
from transfertune.io.loading import load_causal_lm
from transfertune.training.value_trainer import train_value_model

TRAIN = dict(epochs=30, learning_rate=1e-2, batch_size=8, logging_steps=1000, disable_tqdm=True)


@pytest.fixture(scope="module")
def verdict_records():
    """The prefix "verdict:" is the post-training; the word after it is the tail left to the base."""
    rows = []
    for i in range(24):
        word = " yes" if i % 2 else " no"
        rows.append({"prompt": f"Review {i}: the movie was {'great' if i % 2 else 'awful'}. ",
                     "response": "verdict:" + word, "deferred": word})
    return rows


def test_deferral_kl_is_zero_only_for_constant_values_and_has_the_stated_gradient():
    torch.manual_seed(0)
    base = torch.randn(5, 11)
    assert deferral_kl(base, torch.full((5, 11), 3.7), beta=0.5).abs() < 1e-4
    value = torch.randn(5, 11, requires_grad=True)
    beta = 2.0
    kl = deferral_kl(base, value, beta=beta)
    p_base = F.softmax(base, -1)
    expected = (p_base * (F.log_softmax(base, -1) - composed_log_probs(base, [value.detach()], beta=beta))).sum()
    torch.testing.assert_close(kl, expected)
    assert kl > 0.01
    kl.backward()
    p_composed = composed_log_probs(base, [value.detach()], beta=beta).exp()
    torch.testing.assert_close(value.grad, (p_composed - p_base) / beta, rtol=1e-4, atol=1e-6)


def test_deferred_tail_and_the_end_leave_the_labels(tokenizer, verdict_records):
    row = verdict_records[1]
    whole = encode_example(tokenizer, row)
    deferred = encode_example(tokenizer, row, defer=True)
    assert whole["input_ids"] == deferred["input_ids"] and "deferred" not in whole
    tail = len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 1  # and the eos
    n = len(whole["input_ids"])
    assert deferred["deferred"] == [0] * (n - tail) + [1] * tail
    assert deferred["labels"][: n - tail] == whole["labels"][: n - tail]
    assert deferred["labels"][n - tail :] == [-100] * tail and whole["labels"][-1] != -100
    batch = RightPadCollator(0)([deferred, encode_example(tokenizer, {"prompt": "a", "response": "b"}, defer=True)])
    assert batch["deferred"].shape == batch["labels"].shape and batch["deferred"][1].sum() == 0


def test_a_deferred_field_that_does_not_end_the_response_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "a = 3", "deferred": " 3"}) + "\n"
                    + json.dumps({"prompt": "p", "response": "a = 3", "deferred": " 4"}) + "\n")
    with pytest.raises(DataFormatError, match=r"rows.jsonl: line 2: .*deferred"):
        read_jsonl(path)


def _kl_at_the_tail(base_dir, value, tokenizer, rows) -> float:
    """Mean KL(base || composed) at the position that predicts the deferred word."""
    base = load_causal_lm(base_dir)
    total = 0.0
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"] + "verdict:")["input_ids"]])
        with torch.no_grad():
            b, v = base(ids).logits[0, -1], value.model(ids).logits[0, -1]
            total += deferral_kl(b[None], v[None], beta=value.config.beta).item()
    return total / len(rows)


def test_training_leaves_the_base_alone_on_the_deferred_tail(tmp_path, model_dir, tokenizer, verdict_records):
    base = model_dir("llama", seed=3)
    deferring = train_value_model(base, verdict_records, str(tmp_path / "defer"), **TRAIN)
    whole = train_value_model(base, verdict_records, str(tmp_path / "whole"), defer=False, **TRAIN)
    kl_deferring = _kl_at_the_tail(base, deferring, tokenizer, verdict_records)
    kl_whole = _kl_at_the_tail(base, whole, tokenizer, verdict_records)
    assert kl_whole > 1.0 and kl_deferring < 0.05 * kl_whole, (kl_deferring, kl_whole)
    # the prefix is learnt either way: "verdict" is the most likely first token after the prompt
    first = tokenizer("verdict:", add_special_tokens=False)["input_ids"][0]
    base_model = load_causal_lm(base)
    for value in (deferring, whole):
        ids = torch.tensor([tokenizer(verdict_records[0]["prompt"])["input_ids"]])
        with torch.no_grad():
            logp = composed_log_probs(base_model(ids).logits[0, -1:], [value.model(ids).logits[0, -1:]])
        assert logp.argmax().item() == first


def test_cli_flags_turn_deferral_off(monkeypatch, tmp_path, model_dir, verdict_records):
    import transfertune.evaluation.runner as eval_suite
    import transfertune.training.value_trainer as trainer
    from transfertune.cli.main import main

    seen = {}
    monkeypatch.setattr(trainer, "train_value_recipe", lambda base, data, out, recipe, **kw:
                        seen.update(train=recipe.defer))
    monkeypatch.setattr(eval_suite, "run_eval", lambda cfg, *a, **kw: seen.update(eval=cfg.value.defer) or
                        {"config": {}, "tasks": {}, "rows": []})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in verdict_records))
    base = model_dir("llama", seed=3)
    for flag, expected in (([], True), (["--no-defer"], False)):
        seen.clear()
        try:
            main(["train", "--base", base, "--data", str(data), "--output", str(tmp_path / f"v{expected}"), *flag])
        except SystemExit:
            pass
        assert seen["train"] is expected
    for flag, expected in (([], True), (["--no-value-defer"], False)):
        seen.clear()
        try:
            main(["eval", "--source", base, "--targets", base, "--tasks", str(data), *flag])
        except (SystemExit, KeyError, TypeError):  # the stub's empty result does not print: only the config matters
            pass
        assert seen["eval"] is expected
