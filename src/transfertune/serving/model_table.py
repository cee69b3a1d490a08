"""The model ids a server answers to, and what each request composes.

`/v1/models` lists, while they are available: the server's default model (`--served-model-name`, by default
`BASE+VALUE...`: every value model it started with, at `--weight` and `--beta`, as before value models could be
chosen), the base alone (its name), and `BASE+NAME` for every value model loaded (at its own beta, or the
server's `--beta`). A request's `model` picks one; its `value` (`{"name": weight, ...}`) composes any combination
of loaded value models instead, `weights` reweights the picked model's value models, and `beta` overrides the
beta. A value model being unloaded takes no new requests (409), an unknown id is a 404.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace

from transfertune.inference.composed_model import chat_template_of
from transfertune.io.data import PLAIN_CHAT
from transfertune.serving.protocol import APIError
from transfertune.serving.value_registry import ServedModel, ValueRegistry

log = logging.getLogger(__name__)


class ModelTable:
    def __init__(self, registry: ValueRegistry, default: ServedModel, base_id: str):
        self.registry, self.default, self.base_id = registry, default, base_id
        self._templates: dict[tuple[str, ...], tuple[str, bool]] = {}
        self._lock = threading.Lock()

    def value_id(self, name: str) -> str:
        return f"{self.base_id}+{name}"

    def served(self) -> list[ServedModel]:
        """Every model id available now: the default, the base alone, then each value model alone."""
        out = {}
        if self._unavailable(self.default.values) is None:
            out[self.default.id] = self.default
        out.setdefault(self.base_id, ServedModel(self.base_id))
        for name in self.registry.names():
            served = self.registry.get(name)
            if served is not None and served.ready and not served.unloading:
                out.setdefault(self.value_id(name), ServedModel(self.value_id(name), (name,), (1.0,), served.beta))
        return list(out.values())

    def _unavailable(self, names) -> tuple[str, str] | None:
        """(name, "unknown" | "unloading") of the first value model that cannot take new rows, else None."""
        for name in names:
            served = self.registry.get(name)
            if served is None or not served.ready:
                return name, "unknown"
            if served.unloading:
                return name, "unloading"
        return None

    def check_available(self, names, model_id: str, param: str = "model") -> None:
        """404 for a value model that is not loaded, 409 for one being unloaded."""
        problem = self._unavailable(names)
        if problem is None:
            return
        name, why = problem
        if why == "unloading":
            raise APIError(409, f"value model `{name}` (of `{model_id}`) is being unloaded and takes no new "
                                f"requests", param=param, code="model_unloading")
        raise APIError(404, f"value model `{name}` (of `{model_id}`) is not loaded; this server serves "
                            f"{self._listing()}", param=param, code="model_not_found")

    def _listing(self) -> str:
        return ", ".join(f"`{m.id}`" for m in self.served())

    def lookup(self, model: str | None) -> ServedModel:
        """The model a request names (none: the default)."""
        if not model or model == self.default.id:
            self.check_available(self.default.values, self.default.id)
            return self.default
        if model == self.base_id:
            return ServedModel(self.base_id)
        if model.startswith(f"{self.base_id}+"):
            name = model[len(self.base_id) + 1:]
            served = self.registry.get(name)
            if served is not None and served.ready:
                self.check_available((name,), model)
                return ServedModel(model, (name,), (1.0,), served.beta)
        raise APIError(404, f"The model `{model}` does not exist; this server serves {self._listing()}",
                       param="model", code="model_not_found")

    def resolve(self, model: str | None, value: dict[str, float] | None, weights: list[float] | None,
                beta: float | None) -> ServedModel:
        """What one request composes: its model, with `value`, `weights` and `beta` applied."""
        chosen = self.lookup(model)
        if value is not None:
            if weights is not None:
                raise APIError(400, "give either `value` (value models and their weights) or `weights` (for the "
                                    "model's own value models), not both", param="weights")
            names = tuple(value)
            self.check_available(names, chosen.id, param="value")
            chosen = ServedModel(chosen.id, names, tuple(float(w) for w in value.values()),
                                 self.registry.default_beta(names))
        elif weights is not None:
            if len(weights) != len(chosen.values):
                raise APIError(400, f"weights has {len(weights)} entries but `{chosen.id}` composes "
                                    f"{len(chosen.values)} value model(s)", param="weights")
            chosen = replace(chosen, weights=tuple(float(w) for w in weights))
        return chosen if beta is None else replace(chosen, beta=float(beta))

    # -- chats ------------------------------------------------------------------------------------------
    def chat_template(self, names: tuple[str, ...]) -> tuple[str, bool]:
        """(template, whether a value model was trained on plain `role: content` lines) for a combination,
        as `generate --chat` with those value models renders chats; notes are logged once per combination."""
        with self._lock:
            if names in self._templates:
                return self._templates[names]
        values = [v.value_model for v in map(self.registry.get, names) if v is not None and v.value_model]
        template, notes = chat_template_of(self.registry.tokenizer, values, self.registry.base_name)
        for note in notes:
            log.warning(note)
        found = template, any(v.config.chat_format == "plain" for v in values)
        with self._lock:
            self._templates[names] = found
        return found

    def chat_format(self, names: tuple[str, ...]) -> str:
        """How chats become prompts, as /v1/models reports it: "model" = a chat template (the one the value model
        was trained with, else the base's), "plain" = `role: content` lines (the value model was trained on chats
        rendered so, its training base having no template), "none" = chats are refused (no_chat_template)."""
        template, plain_trained = self.chat_template(names)
        if template != PLAIN_CHAT:
            return "model"
        return "plain" if plain_trained else "none"

    def forget_templates(self) -> None:
        """After a load or unload: a name may come back with another directory."""
        with self._lock:
            self._templates.clear()
