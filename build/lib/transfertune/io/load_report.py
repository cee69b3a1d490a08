"""transformers' load report, minus the one entry transfertune causes on purpose.

A value model whose checkpoint ties the output layer to the input embeddings is loaded with
`tie_word_embeddings=False` (so its head can be zeroed, or replaced by the adapter's copy). transformers then
reports `lm_head.weight | MISSING ... newly initialized` on every such load, though the layer is overwritten
right after. `held_load_report` holds the report back during that load and lets it through unless its only
entries are the output layer's parameters marked MISSING: any other missing, unexpected or mismatched key is
still shown.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager

REPORT_LOGGER = "transformers.modeling_utils"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Held(logging.Filter):
    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def settle(self, model) -> None:
        """Drop the report if it only says that `model`'s output layer was missing; emit everything else."""
        expected = output_layer_keys(model)
        self.records = [r for r in self.records
                        if not (expected and report_is_only(r.getMessage(), expected, status="MISSING"))]
        self.release()

    def release(self) -> None:
        """Stop holding, and emit what is held."""
        self.logger.removeFilter(self)
        records, self.records = self.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)


def output_layer_keys(model) -> set[str]:
    """State-dict names of the parameters of `model`'s output layer (e.g. {"lm_head.weight"})."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
    return set()


def report_is_only(report: str, keys: set[str], status: str) -> bool:
    """Whether a load report's table lists only `keys` (some of them), each with `status`."""
    rows = []
    lines = _ANSI.sub("", report).splitlines()
    body = False
    for line in lines:
        if set(line.strip()) <= set("-+") and line.strip():
            body = True  # the line under the table's header
            continue
        if body:
            if "|" not in line:
                break
            cells = [c.strip() for c in line.split("|")]
            rows.append((cells[0], cells[1] if len(cells) > 1 else ""))
    return bool(rows) and all(key in keys and state == status for key, state in rows)


@contextmanager
def held_load_report(active: bool = True):
    """Hold transformers' load report while loading; call `.settle(model)` on the yielded object after the
    load. Held records are emitted if the load fails or `settle` is never called."""
    held = _Held(logging.getLogger(REPORT_LOGGER))
    if active:
        held.logger.addFilter(held)
    try:
        yield held
    finally:
        held.release()
