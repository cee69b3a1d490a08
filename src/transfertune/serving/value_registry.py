"""The value models one server holds, by name: what a request's `model` (or `value`) picks, and what
`/v1/load_value` and `/v1/unload_value` add and remove while the server runs.

A `ServedValue` is a value model ready to run beside the base: the module the decode batch runs (the network
itself, or its cross-vocabulary / cascade wrapper from `vocab.token_map.attach_value`), the beta it composes at
by default, and whether it is being unloaded (it then takes no new requests, and leaves once its rows finish).
A `ServedModel` is one id of `/v1/models`: a combination of value names with their weights and beta (none: the
base alone).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfertune.core.value_model import ValueConfig, ValueModel
from transfertune.io.fingerprint import vocab_fingerprint
from transfertune.io.validate import InputError
from transfertune.vocab.token_map import VocabMap, attach_value

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ValueLoadError(InputError):
    """A value directory the server will not load; the message says why."""


def check_value_name(name: str, what: str = "value name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > 64:
        raise InputError(f"{what} {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                         f"or digit")
    return name


@dataclass(eq=False)
class ServedValue:
    name: str
    module: torch.nn.Module  # what runs beside the base (attach_value's result)
    beta: float  # the beta a request for this value model alone composes at by default
    value_model: ValueModel | None = None  # the directory's model, for its config and chat template
    directory: str | None = None
    ready: bool = True  # False while a value model loaded at run time is being checked: no request may pick it
    unloading: bool = False


@dataclass(frozen=True)
class ServedModel:
    """One model id: value names (in composition order) with their default weights, and the default beta."""

    id: str
    values: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    beta: float = 1.0


@dataclass
class ValueRegistry:
    """Named value models for one base. Lookups and changes may come from any thread (a lock guards the dict);
    the engine runs the modules, the HTTP handlers choose them."""

    tokenizer: object
    base_name: str = "base"
    vocab_map: str | VocabMap | None = None  # how value models on another vocabulary are composed (None: refused)
    beta: float | None = None  # the server's --beta: every value model's default (None: each its own)
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    values: dict[str, ServedValue] = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._fingerprint = vocab_fingerprint(self.tokenizer)

    # -- lookups ----------------------------------------------------------------------------------------
    def get(self, name: str) -> ServedValue | None:
        with self._lock:
            return self.values.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.values)

    def modules(self, names) -> list[torch.nn.Module]:
        with self._lock:
            return [self.values[n].module for n in names]

    def default_beta(self, names) -> float:
        """A combination's beta: the server's --beta, else the first value model's own (ComposedModel's rule)."""
        if self.beta is not None:
            return float(self.beta)
        first = self.get(names[0]) if names else None
        return first.beta if first is not None else 1.0

    # -- changes ----------------------------------------------------------------------------------------
    def add(self, name: str, value, *, directory: str | None = None, beta: float | None = None,
            module: torch.nn.Module | None = None, ready: bool = True) -> ServedValue:
        """Register a loaded value model (a ValueModel, or a bare network composed as it is) under `name`.
        `module`: what runs beside the base when already attached (a ComposedModel's `values`)."""
        check_value_name(name)
        if module is None:
            module = attach_value(value, self.tokenizer, self.base_name, self.vocab_map)
        config_beta = value.config.beta if isinstance(value, ValueModel) else None
        own = self.beta if self.beta is not None else (beta if beta is not None else config_beta)
        served = ServedValue(name, module, float(own if own is not None else 1.0),
                             value if isinstance(value, ValueModel) else None,
                             directory or getattr(value, "directory", None), ready)
        with self._lock:
            if name in self.values:
                raise InputError(f"a value model named {name!r} is already loaded")
            self.values[name] = served
        return served

    @classmethod
    def of_composed(cls, composed, names: Sequence[str] | None = None, *, beta: float | None = None,
                    vocab_map=None) -> ValueRegistry:
        """The value models of a ComposedModel, named `names` (default: their directories' names, else value1,
        value2, ...); new ones load on the base's device and in its dtype."""
        names = list(names) if names is not None else default_names(composed)
        if len(names) != len(composed.values):
            raise ValueError(f"{len(composed.values)} value models but {len(names)} names")
        param = next(composed.base.parameters(), None)
        registry = cls(composed.tokenizer, composed.base_name, vocab_map, beta, composed.device,
                       param.dtype if param is not None and param.is_floating_point() else torch.float32)
        for name, module in zip(names, composed.values):
            value = _value_model_of(composed, module)
            registry.add(name, value if value is not None else module, module=module,
                         beta=None if value is not None else composed.beta)
        return registry

    def load(self, name: str, directory: str, *, trust_remote_code: bool = False) -> ServedValue:
        """Load a value directory and register it, not `ready` yet; a ValueLoadError says why a directory is
        refused (before its weights load when its config already tells: not a value directory, another
        vocabulary)."""
        check_value_name(name)
        if self.get(name) is not None:
            raise ValueLoadError(f"a value model named {name!r} is already loaded; unload it first or pick "
                                 f"another name")
        path = Path(directory)
        if not path.is_dir():
            raise ValueLoadError(f"value directory {directory} does not exist (paths are on the server's machine)")
        try:
            config = ValueConfig.load(path)
        except (OSError, ValueError) as err:
            raise ValueLoadError(str(err)) from None
        self._check_vocabulary(config, directory)
        try:
            value = ValueModel.load(path, device=self.device, dtype=self.dtype, trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 (whatever the files hold, the reason goes back to the client)
            raise ValueLoadError(f"value directory {directory} could not be loaded: {err}") from None
        try:
            return self.add(name, value, directory=str(directory), ready=False)
        except ValueError as err:  # another vocabulary no map covers, a name taken meanwhile
            raise ValueLoadError(str(err)) from None

    def _check_vocabulary(self, config: ValueConfig, directory: str) -> None:
        if self.vocab_map is not None or config.vocab_fingerprint in (None, self._fingerprint):
            return
        raise ValueLoadError(
            f"value directory {directory} was trained on the vocabulary of '{config.training_base}' "
            f"({config.vocab_size} tokens, fingerprint {config.vocab_fingerprint}), which base '{self.base_name}' "
            f"does not share ({len(self.tokenizer)} tokens, fingerprint {self._fingerprint}), and this server "
            f"composes no token map (start it with --vocab-map auto to compose through one)")

    def mark_unloading(self, name: str) -> ServedValue:
        with self._lock:
            served = self.values[name]
            served.unloading = True
            return served

    def remove(self, name: str) -> None:
        with self._lock:
            self.values.pop(name, None)


def default_names(composed) -> list[str]:
    """A name per value model of a ComposedModel: its directory's name (made a valid name, made unique), else
    value1, value2, ..."""
    names = []
    for i, module in enumerate(composed.values, start=1):
        value = _value_model_of(composed, module)
        directory = getattr(value, "directory", None)
        name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(directory).name).lstrip("._-")[:64] if directory else ""
        name = name or f"value{i}"
        while name in names:
            name = f"{name}-{i}"
        names.append(name)
    return names


def _value_model_of(composed, module) -> ValueModel | None:
    """The ValueModel a ComposedModel ran as `module` (attach_value's result), if it came from one."""
    for value in composed.value_models:
        if module is value.model or getattr(module, "model", None) is value.model:
            return value
    return None
