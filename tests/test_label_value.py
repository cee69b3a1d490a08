"""Portable reward tuning over a label set: zero reward is the classifier, a trained reward transfers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfertune.inference.composed_model import ComposedModel
from transfertune.labels.label_reward import (
    ComposedClassifier,
    LabelValueModel,
    LMLabelClassifier,
    TextRewardBackbone,
    train_label_value,
)


class Linear(nn.Module):
    def __init__(self, n_in=2, n_out=3, seed=0, zero=False):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Sequential(nn.Linear(n_in, 32), nn.Tanh(), nn.Linear(32, n_out))
        if zero:
            nn.init.zeros_(self.lin[-1].weight)
            nn.init.zeros_(self.lin[-1].bias)

    def forward(self, x, **_):
        return self.lin(x)


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 2
    y = (torch.atan2(x[:, 1], x[:, 0]) + torch.pi).mul(3 / (2 * torch.pi)).long().clamp(max=2)  # three sectors
    return x, y


def test_zero_reward_is_the_classifier():
    clf = Linear(seed=1).eval()
    x, _ = blobs(50, 0)
    composed = ComposedClassifier(clf, [LabelValueModel(Linear(zero=True), 3)])
    torch.testing.assert_close(composed.logits({"x": x}), F.log_softmax(clf(x), -1).detach())


def test_trained_reward_transfers_to_another_classifier(tmp_path):
    source, target = Linear(seed=1).eval(), Linear(seed=2).eval()  # random classifiers: near chance
    x, y = blobs(600, 0)
    xt, yt = blobs(400, 1)
    acc = lambda logits: float((logits.argmax(-1) == yt).float().mean())  # noqa: E731
    records = [{"x": x[i], "labels": int(y[i])} for i in range(len(y))]
    reward = train_label_value(LabelValueModel(Linear(seed=3, zero=True), 3), source, records, str(tmp_path / "r"),
                               max_steps=150, learning_rate=1e-2, batch_size=64, disable_tqdm=True)
    with torch.no_grad():
        alone = acc(target(xt))
    transferred = acc(ComposedClassifier(target, [reward]).logits({"x": xt}))
    assert alone < 0.6 and transferred > 0.85 and transferred > alone + 0.3
    loaded = LabelValueModel.load(tmp_path / "r", Linear(seed=9))
    torch.testing.assert_close(loaded(x=xt), reward(x=xt))
    with pytest.raises(ValueError, match="does not fit this backbone"):
        LabelValueModel.load(tmp_path / "r", nn.Linear(2, 3))
    with pytest.raises(ValueError, match="share the label set"):
        ComposedClassifier(Linear(n_out=4), [reward]).logits({"x": xt})


def test_language_model_as_zero_shot_classifier(model_dir, tokenizer, tmp_path):
    base = model_dir("llama", name="label-lm", seed=2)
    cm = ComposedModel.from_pretrained(base)
    clf = LMLabelClassifier(cm)
    prompts, choices = ["The cat sat on the", "Answer:"], [[" mat", " park"], [" yes", " no"]]
    logits = clf(prompt=prompts, choices=choices)
    assert logits.shape == (2, 2)
    scored = cm.score([prompts[0]] * 2, choices[0], add_eos=True)
    torch.testing.assert_close(logits[0], torch.tensor([float(lp.mean()) for lp in scored]))
    summed = LMLabelClassifier(cm, normalize="sum")(prompt=prompts, choices=choices)
    torch.testing.assert_close(summed[0], torch.tensor([float(lp.sum()) for lp in scored]))
    reward = LabelValueModel(TextRewardBackbone.from_pretrained(base, 2), 2)
    assert torch.count_nonzero(reward(prompt=prompts, choices=choices)) == 0  # zeroed head: starts at the classifier
    records = [{"prompt": p, "choices": c, "labels": 0} for p, c in zip(prompts, choices)] * 8
    train_label_value(reward, clf, records, str(tmp_path / "t"), max_steps=4, learning_rate=1e-2, batch_size=4,
                      disable_tqdm=True)
    composed = ComposedClassifier(clf, [reward]).logits({"prompt": prompts, "choices": choices})
    assert (composed[:, 0] - composed[:, 1]).gt(logits[:, 0] - logits[:, 1]).all()  # moved towards label 0


def test_birth_decade_label_set_follows_the_world_and_people_qa_split():
    """The v2 label-set task: each person's true decade, train people = people_qa's training people."""
    from transfertune.evaluation.tasks import load_task
    from transfertune.family.label_demo import DECADES, birth_decade_records, load_world_people

    years = {e.name: int(e.birth_year) for g in ("v1", "v2") for e in load_world_people(g)}
    train, held = birth_decade_records("v1", "train"), birth_decade_records("v1", "heldout")
    new = birth_decade_records("v2")
    names = lambda rows: {r["prompt"].removesuffix(" was born in") for r in rows}  # noqa: E731
    assert names(train) == {r["example"] for r in load_task("people_qa", "train")}
    assert not names(train) & names(held) and not (names(train) | names(held)) & names(new)
    for r in train + held + new:
        year = years[r["prompt"].removesuffix(" was born in")]
        assert r["choices"][r["labels"]] == f" {year // 10 * 10}s" and len(r["choices"]) == len(DECADES)


def test_text_reward_from_an_fp16_checkpoint_is_float32(model_dir, tokenizer, tmp_path):
    from transfertune.io.loading import load_causal_lm

    half = tmp_path / "half"
    load_causal_lm(model_dir("llama", seed=2)).to(torch.float16).save_pretrained(half)
    tokenizer.save_pretrained(half)
    backbone = TextRewardBackbone.from_pretrained(str(half), 3)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
