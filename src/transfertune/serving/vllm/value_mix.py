"""Which value models, at which weights and beta, one vLLM request composes: read from its `extra_args`.

An export (export.py) holds several named value models. A request that says nothing composes the export's
default (every value model at its export weight, the export's beta); a request may instead carry, in
`SamplingParams.extra_args` (vLLM's OpenAI server fills it from the body's `vllm_xargs`):

    transfertune_value     a value model's name, or a list of names: compose these only ([]: the base alone)
    transfertune_weights   one weight per name of transfertune_value (default 1 each), or without it one per
                           value model of the export, in its order
    transfertune_beta      the steering strength (value logits / beta)

Flat keys, because vLLM's OpenAI server types `vllm_xargs` as `dict[str, str | int | float | list[str | int |
float]]` (entrypoints/openai/completion/protocol.py): a nested object is refused with a 400 there.

Without `transfertune_beta`, a request composes at the export's beta when one was fixed (`export --beta`, or
`hf_overrides={"transfertune_beta": B}` at load time), else at its first named value model's own beta, as the
native server does for its `value` field (and `transfertune generate --value DIR` with that model alone).

The composition itself happens in the model's `compute_logits` (model.py); the rows of a step reach it from the
logits processor (mix_processor.py) through `publish_step` / `take_step`, keyed by the engine's
`vllm_config.instance_id`. Nothing here imports vLLM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from transfertune.serving.protocol import BETA_RANGE, MAX_VALUES_PER_REQUEST, MAX_WEIGHT

VALUE_ARG, WEIGHTS_ARG, BETA_ARG = "transfertune_value", "transfertune_weights", "transfertune_beta"
ARGS = (VALUE_ARG, WEIGHTS_ARG, BETA_ARG)
NAMES_ENV = "TRANSFERTUNE_VLLM_VALUE_NAMES"  # comma-separated names the serving process's export holds


class MixError(ValueError):
    """A request's transfertune_* arguments are malformed or name a value model the export lacks."""


@dataclass(frozen=True)
class RequestMix:
    """What one request asked for; None fields take the export's defaults."""

    names: tuple[str, ...] | None
    weights: tuple[float, ...] | None
    beta: float | None


def _number(value, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise MixError(f"{what} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def parse_request(extra_args: dict | None) -> RequestMix | None:
    """The request's mix from its extra_args, checked for form and range (not against an export); None when it
    sets none of the transfertune_* keys."""
    if not extra_args:
        return None
    given = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("transfertune")}
    if not given:
        return None
    unknown = sorted(set(given) - set(ARGS))
    if unknown:
        raise MixError(f"unknown argument(s) {', '.join(unknown)}: transfertune reads {', '.join(ARGS)}")
    names = given.get(VALUE_ARG)
    if names is not None:
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise MixError(f"{VALUE_ARG} must be a value model's name or a list of names, got {given[VALUE_ARG]!r}")
        if len(set(names)) != len(names):
            raise MixError(f"{VALUE_ARG} names a value model twice: {names}")
        if len(names) > MAX_VALUES_PER_REQUEST:
            raise MixError(f"{VALUE_ARG} names {len(names)} value models, at most {MAX_VALUES_PER_REQUEST}")
        names = tuple(names)
    weights = given.get(WEIGHTS_ARG)
    if weights is not None:
        weights = [weights] if isinstance(weights, (int, float)) and not isinstance(weights, bool) else weights
        if not isinstance(weights, list):
            raise MixError(f"{WEIGHTS_ARG} must be a list of numbers, got {given[WEIGHTS_ARG]!r}")
        weights = tuple(_number(w, f"{WEIGHTS_ARG}[{i}]", -MAX_WEIGHT, MAX_WEIGHT) for i, w in enumerate(weights))
        if names is not None and len(weights) != len(names):
            raise MixError(f"{VALUE_ARG} names {len(names)} value models but {WEIGHTS_ARG} has {len(weights)} "
                           f"weights")
    beta = given.get(BETA_ARG)
    if beta is not None:
        beta = _number(beta, BETA_ARG, *BETA_RANGE)
    return RequestMix(names, weights, beta)


def check_names(mix: RequestMix, names: tuple[str, ...]) -> None:
    """Refuse a mix that names a value model outside `names` (an export's, in its order) or gives weights
    without names that are not one per value model."""
    missing = [n for n in mix.names or () if n not in names]
    if missing:
        raise MixError(f"{VALUE_ARG}: no value model named {', '.join(map(repr, missing))} in this export (it holds "
                       f"{', '.join(names) or 'none'})")
    if mix.names is None and mix.weights is not None and len(mix.weights) != len(names):
        raise MixError(f"{WEIGHTS_ARG} without {VALUE_ARG} needs one weight per value model of the export "
                       f"({len(names)}: {', '.join(names)}), got {len(mix.weights)}")


@dataclass(frozen=True)
class ExportMix:
    """An export's value models by name, the default composition, and each value model's own beta."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    value_betas: tuple[float, ...]
    beta_fixed: bool  # set at export (--beta) or load (hf_overrides): every request's default beta

    @classmethod
    def from_meta(cls, meta: dict, *, beta: float | None = None, weights=None) -> ExportMix:
        """From an export's config.json "transfertune" section; `beta` and `weights` are load-time overrides."""
        values = meta["values"]
        names = tuple(str(v.get("name") or i) for i, v in enumerate(values))  # exports before names: 0, 1, ...
        weights = tuple(float(v.get("weight", 1.0)) for v in values) if weights is None else \
            tuple(float(w) for w in weights)
        if len(weights) != len(values):
            raise MixError(f"{len(values)} value models but {len(weights)} weights")
        value_betas = tuple(float(v.get("beta", meta["beta"])) for v in values)
        fixed = beta is not None or bool(meta.get("beta_fixed", False))
        return cls(names, weights, float(meta["beta"] if beta is None else beta), value_betas, fixed)

    def resolve(self, mix: RequestMix) -> tuple[tuple[float, ...], float]:
        """(one weight per value model of the export, beta) for a request's mix."""
        check_names(mix, self.names)
        if mix.names is None:
            weights = mix.weights if mix.weights is not None else self.weights
        else:
            chosen = dict(zip(mix.names, mix.weights if mix.weights is not None else [1.0] * len(mix.names)))
            weights = tuple(chosen.get(n, 0.0) for n in self.names)
        if mix.beta is not None:
            beta = mix.beta
        elif self.beta_fixed or not mix.names:
            beta = self.beta
        else:
            beta = self.value_betas[self.names.index(mix.names[0])]
        return tuple(weights), beta


# -- the exports the serving process knows, so that a request naming another value model is refused at admission --
_known_exports: set[tuple[str, ...]] = set()


def register_names(names) -> None:
    _known_exports.add(tuple(names))


def known_exports() -> list[tuple[str, ...]]:
    """The value names (in export order) of each export this process serves: those registered in it (an engine
    running in this process) and the one the launcher put in the environment (vLLM's API server processes)."""
    from_env = tuple(n for n in os.environ.get(NAMES_ENV, "").split(",") if n)
    return sorted(_known_exports | ({from_env} if from_env else set()))


def check_known(mix: RequestMix) -> None:
    """`check_names` against the exports this process knows, when it knows any: a mix fitting one of them."""
    exports = known_exports()
    errors = []
    for names in exports:
        try:
            return check_names(mix, names)
        except MixError as err:
            errors.append(err)
    if errors:
        raise errors[0]


# -- one step's rows, from the logits processor to compute_logits --
@dataclass
class StepRows:
    """The weights [rows, n_values] and betas [rows] of a step's rows, in the runner's batch order."""

    weights: torch.Tensor
    beta: torch.Tensor
    fresh: bool = True


_steps: dict[str, StepRows] = {}


def publish_step(key: str, rows: StepRows | None) -> None:
    """The rows of the coming step (None: every row composes the export's default)."""
    if rows is None:
        _steps.pop(key, None)
    else:
        rows.fresh = True
        _steps[key] = rows


def take_step(key: str, n_rows: int) -> StepRows | None:
    """The published rows, once per step: for the first compute_logits after the processor's update (the
    sampled rows). A later call in the same step (prompt log-probs, a dummy run) or one of another size gets
    None, the default composition."""
    rows = _steps.get(key)
    if rows is None or not rows.fresh:
        return None
    rows.fresh = False
    return rows if rows.weights.shape[0] == n_rows else None
