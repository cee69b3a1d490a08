"""The value-model training recipe, written once (TRL-style): `train_value_model`'s keywords, the `train` flags and
`eval`'s `--value-*` flags are all made from `ValueRecipe`'s fields, their defaults and their help."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

from transfertune.core.choices import LORA_HEADS, SCHEMES, VALUE_HEADS

if TYPE_CHECKING:
    from transfertune.core.value_model import LoraSettings


def option(help: str, *, flag: str | None = None, choices=None, bounds: dict | None = None, metavar=None,
           eval: bool = False, aliases: tuple[str, ...] = ()) -> dict:
    """A field's command-line spelling: `flag` (default: the field name with dashes), its help and checks;
    `eval` = also offered by `transfertune eval` as --value-FLAG; `aliases` = eval's older spellings, accepted
    for one more release."""
    return {"help": help, "flag": flag, "choices": choices, "bounds": bounds or {}, "metavar": metavar,
            "eval": eval, "aliases": aliases}


@dataclass(frozen=True)
class ValueRecipe:
    """How a value model is made and trained. The defaults are `transfertune train`'s."""

    # the model
    init: str | None = field(default=None, metadata=option(
        "LM the value model starts from (default: the base itself); 'random:MODEL' = MODEL's config, fresh weights",
        metavar="MODEL", eval=True))
    scheme: str = field(default="residual", metadata=option(
        "how the value model connects to the base: residual = it reads only the tokens (default, runs beside the "
        "base); cascade = its input also adds softmax(base logits) @ embeddings (Inverse Value Learning; runs "
        "after the base, no speculative decoding or vLLM)", choices=SCHEMES, eval=True))
    head: str = field(default="zero", metadata=option(
        "the init LM's output layer: zero (default; training starts at the base distribution) or copy (kept: the "
        "sum starts at twice the base logits, as in IVL's release)", choices=VALUE_HEADS, eval=True))
    lora: bool = field(default=False, metadata=option(
        "train LoRA adapters (+ the output layer) instead of all weights"))
    lora_r: int = field(default=16, metadata=option(
        "LoRA rank (default %(default)s)", bounds={"integer": True, "ge": 1, "le": 65536}))
    lora_alpha: int = field(default=32, metadata=option(
        "LoRA alpha (default %(default)s)", bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))
    lora_dropout: float = field(default=0.0, metadata=option(
        "LoRA dropout (default %(default)s)", bounds={"ge": 0, "lt": 1}))
    lora_head: str = field(default="lora", metadata=option(
        "with --lora, how the output layer trains: lora = a rank-r adapter, so the directory holds only adapters "
        "(default); full = the whole layer (vocabulary x hidden) is trained and saved", choices=LORA_HEADS))
    # the objective
    beta: float = field(default=1.0, metadata=option(
        "value scale used in training and stored as the default (default %(default)s)", bounds={"gt": 0}))
    l1_coef: float = field(default=0.0, metadata=option(
        "IVL norm penalty coefficient on mean |value logit| (default %(default)s; 0 = off)", flag="l1",
        bounds={"ge": 0}, eval=True,
        aliases=("--l1",)))
    entropy_coef: float = field(default=0.0, metadata=option(
        "PRT entropy bonus coefficient on softmax(values) (default %(default)s; 0 = off)", flag="entropy",
        bounds={"ge": 0},
        eval=True, aliases=("--entropy",)))
    defer: bool = field(default=True, metadata=option(
        'train on whole responses, also on the "deferred" tail a row leaves to the base (by default the value '
        "model learns to leave the base's distribution unchanged there)", eval=True))
    augment: int = field(default=1, metadata=option(
        "reworded copies of each training row's prompt added to the data (training/augment.py: frames, casing, "
        "punctuation, word dropout; responses unchanged; default %(default)s, chosen by the prompt-shift study, "
        "docs/results.md#prompt-shift-study; 0 = off); in eval every trained method gets the same rows",
        bounds={"integer": True, "ge": 0, "le": 16}, eval=True))
    # the optimisation
    epochs: float = field(default=1.0, metadata=option("passes over the data (default %(default)s)", bounds={"gt": 0}))
    max_steps: int = field(default=-1, metadata=option(
        "stop after this many optimiser steps (default %(default)s; -1 = off: --epochs decides)",
        bounds={"integer": True, "ge": -1, "le": 2**31 - 1},
        eval=True, aliases=("--value-steps",)))
    learning_rate: float = field(default=1e-4, metadata=option(
        "peak learning rate, cosine schedule (default %(default)s)", flag="lr", bounds={"ge": 0}, eval=True))
    batch_size: int = field(default=8, metadata=option(
        "examples per device per step (default %(default)s)", bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))
    grad_accum: int = field(default=1, metadata=option(
        "gradient accumulation steps (default %(default)s)", bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))
    max_length: int | None = field(default=None, metadata=option(
        "truncate examples to this many tokens (default: the base's context, at most 512)",
        bounds={"integer": True, "ge": 2, "le": 2**31 - 1}))
    seed: int = field(default=0, metadata=option(
        "random seed (default %(default)s)", bounds={"integer": True, "ge": 0, "le": 2**32 - 1}))
    warmup_steps: int = field(default=0, metadata=option(
        "linear warm-up steps before the cosine schedule (default %(default)s)",
        bounds={"integer": True, "ge": 0, "le": 2**31 - 1}))
    weight_decay: float = field(default=0.0, metadata=option(
        "AdamW weight decay (default %(default)s)", bounds={"ge": 0}))
    logging_steps: int = field(default=10, metadata=option(
        "log the loss and tokens/s every N steps (default %(default)s)",
        bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))
    save_steps: int | None = field(default=None, metadata=option(
        "write a resumable checkpoint every N steps", bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))
    eval_steps: int | None = field(default=None, metadata=option(
        "evaluate --eval-data every N steps (default: --logging-steps)",
        bounds={"integer": True, "ge": 1, "le": 2**31 - 1}))

    @classmethod
    def from_kwargs(cls, **kwargs) -> tuple[ValueRecipe, dict]:
        """(recipe, the keywords that are not recipe fields). Also takes the Python API's older spellings:
        `zero_init_head` (bool) and `lora` as a LoraSettings."""
        from transfertune.core.value_model import LoraSettings

        if "zero_init_head" in kwargs:
            kwargs["head"] = "zero" if kwargs.pop("zero_init_head") else "copy"
        if isinstance(kwargs.get("lora"), LoraSettings):
            settings = kwargs.pop("lora")
            kwargs.update(lora=True, lora_r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout)
            if settings.target_modules != LoraSettings.target_modules:
                kwargs["lora_target_modules"] = settings.target_modules
        elif kwargs.get("lora") is None:
            kwargs.pop("lora", None)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), \
            {k: v for k, v in kwargs.items() if k not in names}

    def with_changes(self, **changes) -> ValueRecipe:
        return replace(self, **changes)

    def lora_settings(self, target_modules=None) -> LoraSettings | None:
        from transfertune.core.value_model import LoraSettings

        if not self.lora:
            return None
        extra = {"target_modules": target_modules} if target_modules is not None else {}
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, **extra)

    @property
    def zero_init_head(self) -> bool:
        return self.head == "zero"

    def check(self) -> None:
        """Every field within its bounds and choices (InputError naming the field)."""
        from transfertune.io.validate import InputError, check_number, check_optional

        for f in fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            if meta.get("choices") and value not in meta["choices"]:
                raise InputError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta.get("bounds"):
                (check_optional if f.default is None else check_number)(value, f.name, **meta["bounds"])
        if self.max_steps == 0:
            raise InputError("max_steps must be >= 1 (or -1: use epochs), got 0")

    def to_dict(self) -> dict:
        return asdict(self)

