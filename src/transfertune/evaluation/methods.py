"""The methods `transfertune eval` compares, one builder each: (runner, target, task, knob, placement) -> the
ComposedModel to evaluate. `knob` is beta for target+value and alpha for proxy / diff_vector."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transfertune.evaluation.runner import EvalRunner
    from transfertune.inference.composed_model import ComposedModel


def _base(name: str, place: dict) -> ComposedModel:
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_base

    return ComposedModel(*load_base(name, **place))


def target(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    return _base(target, place)


def source(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    return _base(runner.cfg.source, place)


def source_ft(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    c = runner.cfg
    return _base(runner.finetuned(c.source, task, c.finetune_steps), place)


def with_value(base_of):
    def build(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
        from transfertune.inference.composed_model import ComposedModel

        base = base_of(runner, target)
        value = runner.value_dir(task)
        vocab_map = runner.vocab_map_for(target)
        if vocab_map == "align":
            runner.aligned_map(value, base, task)
        return ComposedModel.from_pretrained(base, [value], beta=knob, vocab_map=vocab_map, **place)

    return build


def proxy(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    from transfertune.inference.composed_model import ComposedModel

    c = runner.cfg
    return ComposedModel.from_pretrained(
        target, [], proxy=(runner.finetuned(c.source, task, c.finetune_steps), c.source), alpha=knob, **place)


def diff_vector(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.io.loading import load_tokenizer
    from transfertune.training.weight_diff import diff_vector_transfer

    c = runner.cfg
    model = diff_vector_transfer(target, c.source, runner.finetuned(c.source, task, c.finetune_steps), alpha=knob)
    model = model.to(**place) if place["dtype"] != "auto" else model.to(place["device"])
    return ComposedModel(model.eval().requires_grad_(False), load_tokenizer(target))


def target_ft(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    c = runner.cfg
    return _base(runner.finetuned(target, task, c.target_steps, lr=c.target_lr), place)


def target_lora(runner: EvalRunner, target: str, task: str, knob: float, place: dict) -> ComposedModel:
    return _base(runner.finetuned(target, task, runner.cfg.target_steps, lora=True), place)


BUILDERS = {
    "target": target, "source": source, "source_ft": source_ft,
    "source+value": with_value(lambda runner, target: runner.cfg.source),
    "target+value": with_value(lambda runner, target: target),
    "proxy": proxy, "diff_vector": diff_vector, "target_ft": target_ft, "target_lora": target_lora,
}
