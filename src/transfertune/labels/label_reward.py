"""Portable reward tuning over a label set (PRT's classification setting).

    log p(label | x) = log_softmax( log_softmax(classifier(x)) + reward(x) / beta )

The same `compose_logits` as for language models, over labels instead of tokens. The classifier stays
frozen; the reward model is trained with cross-entropy through the composition (`LabelValueTrainer`), then
composed with a *different* classifier over the same labels (`ComposedClassifier`). A classifier is any
module returning label logits [B, L] (HF sequence/image classification models included, through `.logits`),
or a causal LM scoring verbalised labels (`LMLabelClassifier`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from transfertune.core.compose import compose_logits

CONFIG_NAME = "label_value.json"
WEIGHTS_NAME = "label_value.safetensors"


def label_logits(module: nn.Module, inputs: dict) -> torch.Tensor:
    out = module(**inputs)
    return out.logits if hasattr(out, "logits") else out


class LabelValueModel(nn.Module):
    """Rewards over `num_labels` labels from any backbone that returns [B, num_labels] (or `.logits`)."""

    def __init__(self, backbone: nn.Module, num_labels: int, *, beta: float = 1.0, labels: Sequence[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_labels = num_labels
        self.beta = beta
        self.labels = list(labels) if labels is not None else None

    def forward(self, **inputs) -> torch.Tensor:
        rewards = label_logits(self.backbone, inputs)
        if rewards.shape[-1] != self.num_labels:
            raise ValueError(f"the reward backbone returned {rewards.shape[-1]} outputs for {self.num_labels} labels")
        return rewards

    def save(self, directory: str | Path) -> None:
        """Only what was trained: the backbone's weights (safetensors) and the label set."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        meta = {"num_labels": self.num_labels, "beta": self.beta, "labels": self.labels,
                "backbone": type(self.backbone).__name__}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, backbone: nn.Module) -> LabelValueModel:
        """Load saved rewards into `backbone` (built by the caller, as for a PEFT adapter's base)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a label value directory: {CONFIG_NAME} is missing")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        missing, unexpected = backbone.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory} does not fit this backbone: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]} (saved from a {meta.get('backbone')})")
        return cls(backbone.eval(), meta["num_labels"], beta=meta["beta"], labels=meta.get("labels"))


class ComposedClassifier:
    """A frozen classifier plus label reward models: log_softmax(classifier) + sum_i reward_i / beta."""

    def __init__(self, classifier: nn.Module, rewards: Sequence[LabelValueModel] = (), *, beta: float | None = None,
                 classifier_inputs: Callable[[dict], dict] | None = None):
        self.classifier = classifier
        self.rewards = list(rewards)
        self.beta = beta if beta is not None else (self.rewards[0].beta if self.rewards else 1.0)
        self.classifier_inputs = classifier_inputs or (lambda x: x)

    @torch.no_grad()
    def logits(self, inputs: dict, classifier_logits: torch.Tensor | None = None) -> torch.Tensor:
        base = classifier_logits if classifier_logits is not None else label_logits(
            self.classifier, self.classifier_inputs(inputs))
        rewards = [r(**inputs) for r in self.rewards]
        for r in rewards:
            if r.shape != base.shape:
                raise ValueError(f"classifier gives {tuple(base.shape)} label logits but a reward model "
                                 f"gives {tuple(r.shape)}: they must share the label set")
        return compose_logits(base, rewards, beta=self.beta)

    def predict(self, inputs: dict, classifier_logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(inputs, classifier_logits).argmax(-1)


class LabelValueTrainer(Trainer):
    """CE of the composed label distribution; only the reward model is trained. A batch may carry
    precomputed `classifier_logits` (the classifier is frozen, so they can be computed once). With no
    classifier at all this is plain supervised training of `model` (the fine-tuning oracle)."""

    def __init__(self, model: LabelValueModel, classifier: nn.Module | None = None, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.classifier = classifier.eval().requires_grad_(False) if classifier is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        base = inputs.pop("classifier_logits", None)
        reward = model(**inputs)
        if base is None and self.classifier is not None:
            with torch.no_grad():
                base = label_logits(self.classifier, inputs)
        logits = reward if base is None else compose_logits(base, [reward], beta=model.beta)
        loss = F.cross_entropy(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.args.should_save:
            self.model.save(output_dir or self.args.output_dir)


def train_label_value(
    model: LabelValueModel,
    classifier: nn.Module | None,
    records: list[dict],
    output_dir: str,
    *,
    collate_fn: Callable[[list[dict]], dict] | None = None,
    max_steps: int = 200,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    **training_args,
) -> LabelValueModel:
    """Train `model` against a frozen `classifier` on records (dicts of model inputs + "labels"), save it."""
    from transformers import set_seed

    from transfertune.training.value_trainer import build_training_args

    set_seed(seed)
    model.train().requires_grad_(True)
    args = build_training_args(
        output_dir, batch_size=batch_size, grad_accum=1, epochs=1.0, max_steps=max_steps,
        learning_rate=learning_rate, logging_steps=training_args.pop("logging_steps", max(1, max_steps // 5)),
        save_steps=None, seed=seed, **training_args,
    )
    trainer = LabelValueTrainer(model, classifier, args=args, train_dataset=records, data_collator=collate_fn or stack)
    trainer.train()
    model.eval().requires_grad_(False)
    model.save(output_dir)
    return model


def stack(rows: list[dict]) -> dict:
    """Collate dicts of tensors / numbers / strings: tensors stacked, numbers to a tensor, strings to a list."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


class LMLabelClassifier(nn.Module):
    """A causal LM as a zero-shot classifier: the logit of each choice is its log-prob (+ end of sequence)
    after the prompt, averaged per token (`normalize="mean"`, the default: choices of different lengths are
    otherwise tens of nats apart) or summed (`"sum"`). forward(prompt=[...], choices=[[...], ...]) -> [B, L]."""

    def __init__(self, composed, batch_size: int = 32, max_length: int | None = 256, normalize: str = "mean"):
        super().__init__()
        if normalize not in ("mean", "sum"):
            raise ValueError(f"normalize must be 'mean' or 'sum', not {normalize!r}")
        self.composed = composed  # a ComposedModel: a plain base, or a base + value models
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize

    @torch.no_grad()
    def forward(self, prompt: Sequence[str], choices: Sequence[Sequence[str]], **_) -> torch.Tensor:
        n = len(choices[0])
        if any(len(c) != n for c in choices):
            raise ValueError("every example needs the same number of choices")
        prompts = [p for p, cs in zip(prompt, choices) for _ in cs]
        responses = [c for cs in choices for c in cs]
        lps = self.composed.score(prompts, responses, add_eos=True, batch_size=self.batch_size,
                                  max_length=self.max_length)
        reduce = torch.mean if self.normalize == "mean" else torch.sum
        return torch.tensor([float(reduce(lp)) for lp in lps]).view(len(prompt), n)


class TextRewardBackbone(nn.Module):
    """A sequence-classification LM over `prompt` (+ the listed choices): one reward per choice position."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.tokenizer.truncation_side = "left"  # the question and the choices come last

    @staticmethod
    def text_of(prompt: str, choices: Sequence[str]) -> str:
        return f"{prompt}\nChoices: {' | '.join(choices)}"

    def forward(self, prompt: Sequence[str], choices: Sequence[Sequence[str]], **_) -> torch.Tensor:
        texts = [self.text_of(p, c) for p, c in zip(prompt, choices)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        device = next(self.model.parameters()).device
        return self.model(**{k: v.to(device) for k, v in enc.items()}).logits

    @classmethod
    def from_pretrained(cls, name: str, num_labels: int, zero_init_head: bool = True, **kwargs) -> TextRewardBackbone:
        """A causal LM's body with a new reward head (zeroed: training starts at the classifier)."""
        from transformers import AutoModelForSequenceClassification

        from transfertune.io.loading import load_tokenizer, resolve_model

        tok = load_tokenizer(name)
        model = AutoModelForSequenceClassification.from_pretrained(  # float32: fp16 checkpoints train to NaN on CPU
            resolve_model(name), num_labels=num_labels, use_safetensors=True, pad_token_id=tok.pad_token_id,
            dtype=torch.float32)
        if zero_init_head:
            head = getattr(model, "score", None) or model.classifier
            with torch.no_grad():
                head.weight.zero_()
        return cls(model, tok, **kwargs)
