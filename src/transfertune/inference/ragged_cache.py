"""KV caches whose rows keep slots of their own: speculative decoding with per-row acceptance.

A batch's KV caches are rectangular ([B, heads, W, d]), but after a speculative round each row keeps its own
number of the slots just fed. Here a row drops a slot by masking it (the attention mask is 0 there, as for left
padding) and the caches are only cropped to the longest row; each token's position is its row's count of
valid slots before it, so every row computes what it would alone. Dropped slots are holes until `compact`
moves each row's valid slots together. vLLM reaches the same by rolling a row's length back and overwriting
the rejected slots; a transformers cache appends for the whole batch, so holes are the way through it.

This needs models whose attention reads the 2-D mask and the position ids as given (`takes_holes`);
others keep rectangular commits (every row the same number of slots, no holes), which needs neither.

A KV store (`TransformersKV` here, `fused_draft.FusedRun`) has: `run(ids, mask, positions, keep)` -> logits
[B, keep, V] per model, `width`, `crop(width)`, `select(rows, first)` (rows [B'] from slot `first` on),
`pad_left(n)`, `take(slots)` (per-row slot indices [B, W']), `concat(other)` (rows of a store as wide) and
`empty(batch, capacity)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transfertune.core.response_logits import cached_forward, input_device
from transfertune.inference.generator import full_attention_layers
from transfertune.vocab.token_map import keep_first

# architectures whose attention is computed from the given 2-D mask and position ids, over full-attention layers
HOLE_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def takes_holes(model) -> bool:
    """Whether masked slots in the middle of a row's cache are read as absent: a Llama-like model (RoPE from the
    position ids, causal mask from the 2-D mask) without a sliding window."""
    from transfertune.core.value_model import ValueModel

    config = getattr(model.model if isinstance(model, ValueModel) else model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in HOLE_ARCHITECTURES:
        return False
    if kind.startswith("qwen"):  # Qwen configs name a window they use only with use_sliding_window
        return not getattr(config, "use_sliding_window", False)
    return not getattr(config, "sliding_window", None)


class RaggedCaches:
    """The caches of models that read the same tokens (a KV store), with the attention mask [B, W] that says
    which of the W slots each row holds. Tokens fed together get the positions their rows give them."""

    def __init__(self, kv):
        self.kv = kv
        self.mask: torch.Tensor | None = None  # [B, W] long; 0: padding or a dropped slot

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def waste(self) -> int:
        """Slots compacting would save."""
        return self.mask.shape[1] - int(self.mask.sum(1).max()) if self.rows else 0

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, keep: int = 1) -> list[torch.Tensor]:
        """Feed `ids` [B, T] after the cached slots; `valid` [B, T] (default all) masks fed slots out from the start.
        Returns each model's logits at the last `keep` positions, [B, keep, V]."""
        new = torch.ones_like(ids) if valid is None else valid.long()
        mask = new if self.mask is None else torch.cat([self.mask, new], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        logits = self.kv.run(ids, mask, positions, keep)
        self.mask = mask
        return logits

    def commit(self, fed: int, kept: torch.Tensor) -> None:
        """Of the last `fed` slots, row r keeps its first `kept[r]`; the rest are masked out, and the caches cropped
        to the longest row."""
        start = self.mask.shape[1] - fed
        dropped = torch.arange(fed)[None, :] >= kept[:, None]
        self.mask[:, start:] *= ~dropped
        width = start + int(kept.max())
        self.kv.crop(width)
        self.mask = self.mask[:, :width]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); leading slots no row uses are dropped."""
        idx = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[idx]
        first = int(mask.any(0).long().argmax())
        self.kv.select(idx, first)
        self.mask = mask[:, first:]

    def merge(self, other: RaggedCaches) -> None:
        """Append the rows of `other`, left-padding whichever side is narrower."""
        if not self.rows:
            self.kv, self.mask = other.kv, other.mask
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for side in (self, other):
            if (pad := width - side.mask.shape[1]):
                side.kv.pad_left(pad)
                side.mask = F.pad(side.mask, (pad, 0))
        self.kv.concat(other.kv)
        self.mask = torch.cat([self.mask, other.mask])

    def compact(self) -> None:
        """Move each row's valid slots together at the right (left padding before them)."""
        valid = self.mask.bool()
        width = int(valid.sum(1).max())
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, -width:]  # dropped slots first, kept in order
        self.kv.take(order)
        self.mask = self.mask.gather(1, order)


class TransformersKV:
    """A KV store of transformers models (any architecture), each with a cache of its own. With a thread pool,
    the models after the first run in its threads beside it."""

    def __init__(self, models: list, pool=None):
        self.models, self.pool = models, pool
        self.caches: list = [None] * len(models)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int = 1) -> list[torch.Tensor]:
        def one(i):
            model = self.models[i]
            dev = input_device(model)
            out, self.caches[i] = cached_forward(model, self.caches[i], input_ids=ids.to(dev),
                                                 attention_mask=mask.to(dev), position_ids=positions.to(dev),
                                                 logits_to_keep=keep)
            return out.logits[:, -keep:].float().to(mask.device)

        futures = [self.pool.submit(one, i) for i in range(1, len(self.models))] if self.pool is not None else []
        first = one(0)
        return [first, *(f.result() for f in futures)] if futures else \
            [first, *(one(i) for i in range(1, len(self.models)))]

    @property
    def width(self) -> int:
        return self.caches[0].get_seq_length() if self.caches[0] is not None else 0

    def crop(self, width: int) -> None:
        for cache in self.caches:
            keep_first(cache, width)

    def _each(self, change) -> None:
        for cache in self.caches:
            for layer in full_attention_layers(cache):
                layer.keys, layer.values = change(layer.keys), change(layer.values)

    def select(self, rows: torch.Tensor, first: int) -> None:
        self._each(lambda t: t.index_select(0, rows.to(t.device))[:, :, first:])

    def pad_left(self, n: int) -> None:
        self._each(lambda t: F.pad(t, (0, 0, n, 0)))

    def take(self, slots: torch.Tensor) -> None:
        def gather(t):
            return t.gather(2, slots.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
        self._each(gather)

    def concat(self, other: TransformersKV) -> None:
        for a, b in zip(self.caches, other.caches):
            for la, lb in zip(full_attention_layers(a), full_attention_layers(b)):
                la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])

    def empty(self, batch: int, capacity: int) -> TransformersKV:
        return TransformersKV(self.models, self.pool)


