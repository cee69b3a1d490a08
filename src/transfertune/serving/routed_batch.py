"""A decode batch in which each row names its own value models, and each value model runs only on its rows.

The base (and a proxy-tuning pair) runs on every row, in one `DecodeBatch`. Each value model has a
`DecodeBatch` of its own holding only the rows that use it: its KV cache, mask and positions cover those rows and
nothing else, so a value model nobody asks for costs neither time nor memory, and a group that empties drops its
cache. A step runs the base on all rows, then every group on its rows; `compose` gathers each row's base and
value logits and composes them (`compose.compose_logits_per_row`, once per distinct combination of value
models), so a row's logits are those of a `ComposedModel` of the base with exactly its value models.

A cascade value model reads the base's logits at every position it is fed: its group runs the base too (on
the group's rows), which keeps it exact at the price of a second base pass for those rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from transfertune.core.cascade import needs_base_logits
from transfertune.core.compose import compose_logits, compose_logits_per_row
from transfertune.inference.generator import DecodeBatch, ModelGroup


class _Group:
    """One value model's rows (in the order of its DecodeBatch) and their decoding state."""

    def __init__(self, module, base, device, pad_id: int):
        self.cascade = needs_base_logits(module)
        models = [base, module] if self.cascade else [module]
        self.batch = DecodeBatch(ModelGroup(models, device), pad_id)
        self.rows: list = []


class RoutedBatch:
    """Rows (any objects, identified by themselves) joining, stepping and leaving as in `DecodeBatch`, each
    with a tuple of value names; `modules(names)` gives the networks for those names when a group starts."""

    def __init__(self, base_models: Sequence, device: torch.device, pad_id: int, modules):
        self.base = DecodeBatch(ModelGroup(list(base_models), device), pad_id)
        self.device, self.pad_id, self.modules = device, pad_id, modules
        self.groups: dict[str, _Group] = {}
        self.rows: list = []  # every running row, in the base batch's order
        self.joining: list = []

    def join(self, rows: Sequence, prompt_ids: Sequence[list[int]], values: Sequence[tuple[str, ...]]) -> None:
        for row, ids, names in zip(rows, prompt_ids, values):
            self.base.join([ids])
            for name in names:
                group = self.groups.get(name)
                if group is None:
                    group = self.groups[name] = _Group(self.modules([name])[0], self.base.models[0], self.device,
                                                       self.pad_id)
                group.batch.join([ids])
                group.rows.append(row)
            self.joining.append(row)

    @torch.no_grad()
    def step(self) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Run every model once. Returns the base models' logits [B, V] (rows in `self.rows` order, joining rows
        last) and, per value name, (the batch positions of its rows, their value logits [n, V])."""
        base_logits = self.base.step()
        self.rows += self.joining
        self.joining = []
        where = {id(row): i for i, row in enumerate(self.rows)}
        values = {}
        for name, group in self.groups.items():
            logits = group.batch.step()[-1]
            rows = torch.tensor([where[id(row)] for row in group.rows], dtype=torch.long, device=self.device)
            values[name] = (rows, logits)
        return base_logits, values

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only these running rows (positions in `self.rows`, in this order)."""
        kept = [self.rows[i] for i in keep]
        self.base.keep(keep)
        alive = {id(row) for row in kept}
        for name in list(self.groups):
            group = self.groups[name]
            mine = [j for j, row in enumerate(group.rows) if id(row) in alive]
            if not mine:
                del self.groups[name]  # its caches go with it
                continue
            if len(mine) < len(group.rows):
                group.batch.keep(mine)
                group.rows = [group.rows[j] for j in mine]
        self.rows = kept

    def feed(self, next_tokens: torch.Tensor) -> None:
        """Each running row's next token [B] (in `self.rows` order)."""
        self.base.feed(next_tokens)
        where = {id(row): i for i, row in enumerate(self.rows)}
        for group in self.groups.values():
            idx = torch.tensor([where[id(row)] for row in group.rows], dtype=torch.long, device=next_tokens.device)
            group.batch.feed(next_tokens[idx])

    @property
    def running(self) -> int:
        return len(self.rows)


def compose_routed(base_logits: list[torch.Tensor], value_logits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   row_values: Sequence[tuple[str, ...]], weights: Sequence[tuple[float, ...]],
                   betas: Sequence[float], *, proxy: bool, alpha: float, real_vocab_size: int | None) -> torch.Tensor:
    """Composed logits [B, V]: row i is the composition of the base with the value models `row_values[i]` (in
    that order) at `weights[i]` and `betas[i]`. Rows with the same value models are composed together, so a row's
    logits are bit-identical to a ComposedModel of those value models composing it (per-row and scalar settings
    give the same numbers: compose.compose_logits_per_row)."""
    base = base_logits[0]
    rest = tuple(base_logits[1:3]) if proxy else None
    common = dict(alpha=alpha, real_vocab_size=real_vocab_size)
    by_combination: dict[tuple[str, ...], list[int]] = {}
    for i, names in enumerate(row_values):
        by_combination.setdefault(tuple(names), []).append(i)
    if len(by_combination) == 1 and len(set(zip(map(tuple, weights), betas))) == 1:
        names = row_values[0]
        values = [_in_order(value_logits[n], torch.arange(base.shape[0], device=base.device)) for n in names]
        return compose_logits(base, values, weights=list(weights[0]), beta=float(betas[0]), proxy=rest, **common)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for names, members in by_combination.items():
        idx = torch.tensor(members, dtype=torch.long, device=base.device)
        values = [_in_order(value_logits[n], idx) for n in names]
        part = compose_logits_per_row(
            base[idx], values, weights=torch.tensor([weights[i] for i in members], dtype=torch.float64),
            beta=torch.tensor([betas[i] for i in members], dtype=torch.float64),
            proxy=tuple(p[idx] for p in rest) if rest is not None else None, **common)
        out[idx] = part
    return out


def _in_order(group: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """A group's value logits for the batch positions `idx` (every one of which the group holds)."""
    rows, logits = group
    if rows.shape[0] == idx.shape[0] and torch.equal(rows, idx):
        return logits
    lookup = torch.full((int(max(rows.max(), idx.max())) + 1,), -1, dtype=torch.long, device=rows.device)
    lookup[rows] = torch.arange(rows.shape[0], device=rows.device)
    return logits[lookup[idx]]
