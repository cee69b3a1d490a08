"""Lock-step decoding of a ComposedModel: every model keeps its own KV cache; the prefix is never recomputed.

`DecodeBatch` holds the decoding state (caches, mask, positions) and runs every model once per step; the loop
(`decode_steps`) only steps it and appends tokens; choosing a token is `sampling.sample_next`.
Batches are left-padded; position ids come from the attention mask, so padded rows match unpadded runs.
Rows may join a DecodeBatch (prefilled, then left-padded to the batch's width) and leave it between steps:
the server's continuous batching (serving/engine.py) is built on that. Full-attention and sliding-window KV cache
layers (Gemma-3, Mistral, Qwen-2.5) allow it (`batch_layers`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from transfertune.core.cascade import needs_base_logits
from transfertune.core.response_logits import cached_forward, input_device
from transfertune.inference.sampling import SamplingParams, sample_next
from transfertune.io.data import encode_prompt, pad_id_of
from transfertune.io.validate import ContextLengthError, check_number

if TYPE_CHECKING:
    from transfertune.inference.composed_model import ComposedModel


@dataclass
class GenerationOutput:
    text: list[str]
    token_ids: list[list[int]]
    finish_reason: list[str]  # "eos" | "stop" | "length"


class DecodeBatch:
    """Decoding state of a batch of rows: one KV cache per model, the attention mask [B, T] and the position of
    each row's last token. Rows are right-aligned (left padding); a row's padding is masked out.

    Between two `step` calls the caller gives every row its next token (`feed`), may drop rows (`keep`) and
    may add rows (`join`: they are prefilled at the next step and appended after the running rows).
    """

    def __init__(self, composed: ComposedModel, pad_id: int):
        self.models = composed.models
        self.device = composed.device
        self.input_devices = [input_device(m) for m in self.models]  # each model may sit on its own device
        self.cascade = any(needs_base_logits(m) for m in self.models)
        # composed.overlap: a thread pool running the other models while the base runs (None: one after another)
        self.overlap = composed.overlap_pool() if not self.cascade else None
        self.pad_id = pad_id
        self.caches: list | None = None
        self.mask: torch.Tensor | None = None  # [B, T], T counts the tokens fed (cached or pending)
        self.positions: torch.Tensor | None = None  # [B, 1], position of each row's last fed token
        self.pending: torch.Tensor | None = None  # [B, 1] tokens fed but not yet run
        self.joining: list[list[int]] = []

    @property
    def running(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, prompt_ids: list[list[int]]) -> None:
        self.joining.extend(list(p) for p in prompt_ids)

    def feed(self, next_tokens: torch.Tensor) -> None:
        self.pending = next_tokens.to(self.device)[:, None]
        self.positions = self.positions + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.pending)], dim=-1)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these running rows (in this order); columns only padding is left in are dropped."""
        rows = list(rows)
        if not rows:
            self.caches = self.mask = self.positions = self.pending = None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.caches = [_cache_select(c, idx) for c in self.caches]
        self.mask, self.positions = self.mask[idx], self.positions[idx]
        if self.pending is not None:
            self.pending = self.pending[idx]
        unused = int(self.mask.any(0).long().argmax())  # leading columns that no row uses
        if unused:
            self.caches = [_cache_trim_left(c, unused) for c in self.caches]
            self.mask = self.mask[:, unused:]

    @torch.no_grad()
    def step(self) -> list[torch.Tensor]:
        """Run every model once: the pending token of each running row, then the prompts of joining rows.
        Returns one logits tensor [B, V] per model, running rows first."""
        logits = None
        if self.running:
            assert self.pending is not None, "feed() every running row before the next step"
            logits = self._run(self.pending, self.mask, self.positions, self.caches)
            self.pending = None
        if self.joining:
            ids, mask = (t.to(self.device) for t in left_pad(self.joining, self.pad_id))
            self.joining = []
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            caches = [None] * len(self.models)
            new_logits = self._run(ids, mask, positions, caches)
            if logits is None:
                self.caches, self.mask, self.positions, logits = caches, mask, positions[:, -1:], new_logits
            else:
                self._merge(caches, mask, positions[:, -1:])
                logits = [torch.cat(pair) for pair in zip(logits, new_logits)]
        return logits

    def _run(self, ids, mask, positions, caches) -> list[torch.Tensor]:
        if self.overlap is not None:
            futures = [self.overlap.submit(self._forward, i, ids, mask, positions, caches)
                       for i in range(1, len(self.models))]
            first = self._forward(0, ids, mask, positions, caches)
            return [first[:, -1]] + [f.result()[:, -1] for f in futures]
        step_logits, base_logits = [], None
        for i in range(len(self.models)):
            logits = self._forward(i, ids, mask, positions, caches, base_logits)
            if i == 0:
                base_logits = logits  # every fed position when a cascade value model reads them
            step_logits.append(logits[:, -1])
        return step_logits

    def _forward(self, i, ids, mask, positions, caches, base_logits=None) -> torch.Tensor:
        """Model i over the fed tokens; its cache is updated in place and its logits come back on the device
        where composition and sampling happen."""
        model, dev = self.models[i], self.input_devices[i]
        extra = {"base_logits": base_logits} if needs_base_logits(model) else {}
        out, caches[i] = cached_forward(
            model, caches[i], input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
            logits_to_keep=0 if i == 0 and self.cascade else 1, **extra,
        )
        return out.logits.to(self.device)

    def _merge(self, caches, mask, positions) -> None:
        """Append prefilled rows, left-padding whichever side is narrower."""
        width = max(self.mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self.mask.shape[1], width - mask.shape[1]
        self.caches = [_cache_concat(a, pad_old, b, pad_new) for a, b in zip(self.caches, caches)]
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.positions = torch.cat([self.positions, positions])


@dataclass
class ModelGroup:
    """What a DecodeBatch reads of a ComposedModel, for a part of its models: the networks to run, in order, and
    where logits go."""

    models: list
    device: torch.device

    def overlap_pool(self):
        return None


class SplitPromptBatch:
    """A DecodeBatch for the base side (base, proxy models) and one for the value models, each reading its own
    rendering of the prompt (`generate --chat-template split`: a chat template for the value models, plain lines
    for a base without one); both are fed the same new tokens. `step` gives the logits in `composed.models`
    order."""

    def __init__(self, composed: ComposedModel, pad_id: int):
        if any(needs_base_logits(m) for m in composed.values):
            raise ValueError("a cascade value model reads the base's logits over its own tokens: its prompt cannot "
                             "be rendered apart from the base's")
        base_side = [composed.base, *(composed.proxy or ())]
        self.base = DecodeBatch(ModelGroup(base_side, composed.device), pad_id)
        self.values = DecodeBatch(ModelGroup(list(composed.values), composed.device), pad_id)

    def join(self, prompt_ids: list[list[int]], value_prompt_ids: list[list[int]]) -> None:
        self.base.join(prompt_ids)
        self.values.join(value_prompt_ids)

    def feed(self, next_tokens: torch.Tensor) -> None:
        self.base.feed(next_tokens)
        self.values.feed(next_tokens)

    def step(self) -> list[torch.Tensor]:
        base = self.base.step()
        return [base[0], *self.values.step(), *base[1:]]


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


# KV caches change batch membership only between steps. Three kinds are handled: transformers' DynamicCache of
# full-attention layers ([B, heads, T, dim] tensors) and of sliding-window layers (the same, holding only the last
# `sliding_window - 1` of the T slots), and the per-row state of a cross-vocabulary value model.
# Rows are right-aligned and every step appends a slot to every row, so a row's tokens are contiguous and a
# window over slots is a window over its tokens: a sliding layer needs only its slot count (`cumulative_length`,
# from which transformers sizes the mask) kept equal to the batch's width, and its kept slots the last ones.
def full_attention_layers(cache):
    """The initialised layers of a transformers KV cache, refusing layers other than full-attention ones."""
    from transformers.cache_utils import DynamicLayer

    return _layers_of_kinds(cache, (DynamicLayer,), "full-attention KV caches (DynamicLayer)")


def batch_layers(cache):
    """The initialised layers of a transformers KV cache whose rows can join or leave a `DecodeBatch`: full-attention
    and sliding-window ones; refuses the others (linear-attention state, indexed or static layers)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return _layers_of_kinds(cache, (DynamicLayer, DynamicSlidingWindowLayer),
                            "full-attention or sliding-window KV caches (DynamicLayer, DynamicSlidingWindowLayer)")


def _layers_of_kinds(cache, kinds: tuple, said: str):
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in kinds for layer in layers):
        found = sorted({type(layer).__name__ for layer in layers}) if layers else [type(cache).__name__]
        raise NotImplementedError(f"rows can join or leave a batch only with {said}, not {found}")
    return [layer for layer in layers if layer.is_initialized]


def _slots(layer) -> int:
    """The batch width a cache layer covers: its slot count (a sliding layer keeps only the last of them)."""
    return getattr(layer, "cumulative_length", layer.keys.shape[-2])


def _set_slots(layer, keys: torch.Tensor, values: torch.Tensor, slots: int) -> None:
    """Give a layer covering `slots` slots the last of them it keeps: all, or a sliding layer's window - 1."""
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = slots
        kept = min(slots, layer.sliding_window - 1)
        keys, values = keys[:, :, keys.shape[-2] - kept:], values[:, :, values.shape[-2] - kept:]
    layer.keys, layer.values = keys, values


def _cache_select(cache, idx: torch.Tensor):
    if hasattr(cache, "rows"):  # CrossVocabCache
        cache.rows = [cache.rows[i] for i in idx.tolist()]
        return cache
    batch_layers(cache)  # refuses layers other than full-attention and sliding-window ones
    cache.reorder_cache(idx)  # moves idx to each layer's device: a model spread over several keeps its cache there
    return cache


def _cache_trim_left(cache, n: int):
    """Drop the first n slots of every row (slots no row uses)."""
    if not hasattr(cache, "rows"):
        for layer in batch_layers(cache):
            slots = _slots(layer)
            drop = max(0, n - (slots - layer.keys.shape[-2]))  # of the slots the layer keeps
            _set_slots(layer, layer.keys[:, :, drop:], layer.values[:, :, drop:], slots - n)
    return cache


def _cache_concat(a, pad_a: int, b, pad_b: int):
    """Rows of b after rows of a, a's rows left-padded by pad_a slots and b's by pad_b (the two then cover as many)."""
    if hasattr(a, "rows"):
        a.rows = a.rows + b.rows
        return a
    for la, lb in zip(batch_layers(a), batch_layers(b)):
        slots = _slots(la) + pad_a
        assert slots == _slots(lb) + pad_b, "rows joining a batch must be padded to its width"
        kept = slots if not hasattr(la, "cumulative_length") else min(slots, la.sliding_window - 1)

        def padded(t):
            return F.pad(t, (0, 0, kept - t.shape[-2], 0))

        _set_slots(la, torch.cat([padded(la.keys), padded(lb.keys)]), torch.cat([padded(la.values), padded(lb.values)]),
                   slots)
    return a


class ComposedGenerator:
    def __init__(self, composed: ComposedModel):
        self.composed = composed
        self.tokenizer = composed.tokenizer
        self.pad_id = pad_id_of(self.tokenizer)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        gen_eos = getattr(getattr(self.composed.base, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return ids

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.composed, self.pad_id)

    @torch.no_grad()
    def decode_steps(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        finished: torch.Tensor | None = None,
        value_prompt_ids: list[list[int]] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next_tokens [B], composed_logits [B, V]) once per step.

        `finished` [B] bool may be set by the caller between steps (e.g. a stop string was seen); finished
        rows keep being fed the pad token, and the loop ends when every row is finished. `value_prompt_ids`: the
        value models read these prompts instead (`SplitPromptBatch`).
        """
        if value_prompt_ids is None:
            batch = self.new_batch()
            batch.join(prompt_ids)
        else:
            batch = SplitPromptBatch(self.composed, self.pad_id)
            batch.join(prompt_ids, value_prompt_ids)
        finished = finished if finished is not None else torch.zeros(len(prompt_ids), dtype=torch.bool)
        generator = params.make_generator(self.composed.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.composed.device, dtype=torch.long)
        for _ in range(max_new_tokens):
            logits = self.composed.compose(batch.step())
            next_tokens = sample_next(logits, params, generator)
            next_tokens = torch.where(finished.to(next_tokens.device), torch.full_like(next_tokens, self.pad_id),
                                      next_tokens)
            yield next_tokens, logits
            finished |= torch.isin(next_tokens, eos).cpu()
            if bool(finished.all()):
                return
            batch.feed(next_tokens)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, p) for p in prompts]

    def _fit(self, prompts: list[str], value_prompts, max_new_tokens: int, truncate: bool = False):
        """(prompt ids, value prompt ids or None, max_new_tokens), both sides fitted to the context."""
        prompt_ids, max_new_tokens = self.fit_context(self._encode(prompts), max_new_tokens, truncate)
        if value_prompts is None:
            return prompt_ids, None, max_new_tokens
        value_prompts = [value_prompts] if isinstance(value_prompts, str) else list(value_prompts)
        if len(value_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(value_prompts)} value prompts")
        value_ids, max_new_tokens = self.fit_context(self._encode(value_prompts), max_new_tokens, truncate)
        return prompt_ids, value_ids, max_new_tokens

    def fit_context(self, prompt_ids: list[list[int]], max_new_tokens: int,
                    truncate: bool = False) -> tuple[list[list[int]], int]:
        """(prompt_ids, max_new_tokens) that fit in the context: new tokens are capped so the longest prompt plus
        them fit. A prompt that leaves no room for a new token is a ContextLengthError, or with `truncate` loses
        tokens from the left to leave room for min(max_new_tokens, context - 1) new ones."""
        check_number(max_new_tokens, "max_new_tokens", integer=True, ge=0)
        limit = self.composed.context_length
        if limit is None or not prompt_ids:
            return prompt_ids, max_new_tokens
        if truncate:
            keep = limit - max(1, min(max_new_tokens, limit - 1))
            prompt_ids = [ids[-keep:] for ids in prompt_ids]
        for i, ids in enumerate(prompt_ids):
            if len(ids) >= limit:
                raise ContextLengthError(
                    f"prompt {i + 1} is {len(ids)} tokens: the context of these models is {limit} tokens, which "
                    f"leaves no room to generate; shorten the prompt to at most {limit - 1} tokens", index=i)
        return prompt_ids, min(max_new_tokens, limit - max(len(ids) for ids in prompt_ids))

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        truncate_prompts: bool = False,
        value_prompts: str | Sequence[str] | None = None,
    ) -> GenerationOutput:
        """Generate for a batch of prompts. Text stops before the first stop string (which is not included), and
        at the context length; a prompt too long for it is refused, or cut from the left with truncate_prompts
        (see `fit_context`). `value_prompts` (one per prompt): what the value models read instead of the prompts
        (the base and proxy models read `prompts`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = sampling or SamplingParams()
        n = len(prompts)
        finished = torch.zeros(n, dtype=torch.bool)
        tokens: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        prompt_ids, value_ids, max_new_tokens = self._fit(prompts, value_prompts, max_new_tokens, truncate_prompts)
        for next_tokens, _ in self.decode_steps(prompt_ids, max_new_tokens, sampling, finished, value_ids):
            for i, t in enumerate(next_tokens.tolist()):
                if finished[i]:
                    continue
                if t in self.eos_ids:
                    reasons[i] = "eos"
                    continue
                tokens[i].append(t)
                if stop and _find_stop(self.tokenizer.decode(tokens[i]), stop) is not None:
                    reasons[i] = "stop"
                    finished[i] = True
        return GenerationOutput([text_before_stop(self.tokenizer, toks, stop) for toks in tokens], tokens, reasons)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        value_prompt: str | None = None,
    ) -> Iterator[str]:
        """Yield pieces of text as they are decoded. Text that may still turn into a stop string, or an
        incomplete UTF-8 character, is held back until it is settled. `value_prompt`: as `generate`'s."""
        sampling = sampling or SamplingParams()
        text = TextStream(self.tokenizer, stop)
        prompt_ids, value_ids, max_new_tokens = self._fit([prompt], value_prompt, max_new_tokens)
        for next_tokens, _ in self.decode_steps(prompt_ids, max_new_tokens, sampling, value_prompt_ids=value_ids):
            t = int(next_tokens[0])
            if t in self.eos_ids:
                break
            piece = text.push(t)
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.flush()
        if piece:
            yield piece


class TextStream:
    """The text of a growing list of generated tokens, released piece by piece once settled: text that may
    still turn into a stop string, or an incomplete UTF-8 character, is held back. After a stop string the
    text ends before it and `stopped` is set.

    The text is `tokenizer.decode(tokens, skip_special_tokens=True)`, kept up to date incrementally: each token
    decodes a short window (the tokens since the last complete character, after the chunk before them, which
    gives the decoder its context) instead of the whole list, so a token costs the same however long the text
    is. Tokenizers that clean up spaces across tokens (`clean_up_tokenization_spaces`), or whose windows do not
    add up to the whole, decode the whole list every token."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.hold = max(self.longest, 1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.settled = ""  # the text of tokens[:read], which ends with a complete character
        self.prefix, self.read = 0, 0  # the window is tokens[prefix:]; tokens[prefix:read] were decoded before

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""

    def _update(self) -> int:
        """Bring `text` up to date; returns where it may have changed (a new stop string cannot start before)."""
        if self.incremental:
            before = self._decode(self.tokens[self.prefix : self.read])
            window = self._decode(self.tokens[self.prefix :])
            if window.startswith(before):
                changed = len(self.settled)
                self.text = self.settled + window[len(before) :]
                if len(window) > len(before) and not window.endswith("\ufffd"):
                    self.settled = self.text
                    self.prefix, self.read = self.read, len(self.tokens)
                return changed
            self.incremental = False  # a decoder whose windows do not add up: decode the whole list from now on
        self.text = self._decode(self.tokens)
        return 0

    def push(self, token: int) -> str:
        """Add a token; return the text that became settled."""
        self.tokens.append(token)
        changed = self._update()
        cut = _find_stop(self.text, self.stop, max(0, changed - self.longest + 1))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        ready = len(self.text) - self.hold
        while ready > self.sent and self.text[ready - 1] == "\ufffd":
            ready -= 1
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : ready], ready
        return piece

    def flush(self) -> str:
        """Everything not yet released (at the end of generation)."""
        piece = self.text[self.sent :]
        self.sent = max(self.sent, len(self.text))
        return piece


def text_before_stop(tokenizer, tokens: list[int], stop: Sequence[str]) -> str:
    """The text of `tokens`, cut before the first stop string."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = _find_stop(text, stop)
    return text if cut is None else text[:cut]


def _find_stop(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string in text[start:] begins (None: nowhere)."""
    hits = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
