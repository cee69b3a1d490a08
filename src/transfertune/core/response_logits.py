"""Composed log-probabilities over whole (prompt, response) sequences.

Training and `ComposedModel.score` share the composition (compose.py), so the distribution a value model is
trained on is, by construction, the one it is scored and sampled from.

- `logits_at_positions` (training: the value model keeps its graph) runs one model and computes its output
  layer only at the response positions ([N, H] -> [N, V], N = response tokens in the batch), through a
  pre-hook on the layer; the value trainer composes what it returns.
- `composed_response_logits` (the server's prompt log-probs, tests) runs every model whole and composes at the
  response positions.
- `composed_response_logprobs` (scoring, no gradients) never holds logits of more than a chunk of positions:
  each model runs its transformer body once, keeps the final hidden state at the response positions ([N, H]),
  and the output layer, the composition and the log-softmax run per chunk of positions. Peak memory is then
  the chunk's [chunk, V] tensors, not [batch, length, V] (2 GB per model at batch 8 x 256 tokens x 262k tokens).

Each model may sit on its own device: its inputs are moved to it, and compose.py moves every model's logits
to the base's logits device before composing.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transfertune.core.cascade import needs_base_logits
from transfertune.core.compose import Composition
from transfertune.io.data import IGNORE_INDEX

CHUNK_BYTES = 64 << 20
"""Bytes of one float32 [chunk, V] logits tensor in `composed_response_logprobs` (64 MiB: 64 positions of a
262,144-token vocabulary). A chunk holds a handful of such tensors at once."""


@dataclass
class ResponseLogits:
    composed: torch.Tensor  # [N, V] composed logits at each response position
    targets: torch.Tensor  # [N] the token that follows
    values: list[torch.Tensor]  # [N, V] raw value logits, one per value model (for regularisers)
    rows: torch.Tensor  # [N] batch row of each position


@dataclass
class ResponseLogProbs:
    logprobs: torch.Tensor  # [N] composed log-prob of each response token (float32)
    greedy: torch.Tensor  # [N] whether that token is the composed argmax
    targets: torch.Tensor  # [N]
    rows: torch.Tensor  # [N] batch row of each position


def response_positions(labels: torch.Tensor):
    """(rows, cols, targets): logits at (row, col) predict labels[row, col + 1]."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def input_device(model) -> torch.device:
    """Where a model's token ids must be: its input embeddings' device (the first device of a model spread over
    several with device_map), else its first parameter's."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def full_logits(model, input_ids, attention_mask, base_logits=None) -> torch.Tensor:
    """The model's logits [B, T, V]; a cascade value model (cascade.py) also gets the base's."""
    dev = input_device(model)
    extra = {"base_logits": base_logits} if needs_base_logits(model) else {}
    return model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False, **extra).logits


def cached_forward(model, cache, **inputs):
    """model(**inputs, use_cache=True) continuing the KV cache `cache` (None: start one); returns (outputs, the
    updated cache). The cache goes in, and is read back, under the name the model uses (`cache_keyword`)."""
    out = model(**inputs, use_cache=True, **{cache_keyword(model): cache})
    return out, out.cache if "cache" in getattr(out, "__dataclass_fields__", ()) else out.past_key_values


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` where transformers renamed it (there
    `past_key_values` warns that it is deprecated), `past_key_values` in earlier 5.x releases and in remote code
    written for them. A wrapper that passes keywords on (a cascade value model, a PEFT model) answers for the
    model it wraps. Unknown: `past_key_values`, which every 5.x release still accepts (a model that does not
    know `cache` would silently drop it)."""
    while model is not None:
        name = _cache_parameter(type(model).forward)
        if name is not None:
            return name
        model = getattr(model, "model", None)
    return "past_key_values"


@functools.cache
def _cache_parameter(forward) -> str | None:
    parameters = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def at_positions(logits: torch.Tensor, rows, cols) -> torch.Tensor:
    """[B, T, ...] (logits or hidden states) -> [N, ...] at (rows, cols), each predicting the token after it."""
    return logits[:, :-1][rows.to(logits.device), cols.to(logits.device)]


def logits_at(model, input_ids, attention_mask, rows, cols, base_logits=None) -> torch.Tensor:
    return at_positions(full_logits(model, input_ids, attention_mask, base_logits), rows, cols)


def _base_logits_for_cascade(base, values, input_ids, attention_mask):
    """The base's logits at every position when a value model reads them (the cascade scheme), else None."""
    if not any(needs_base_logits(v) for v in values):
        return None
    with torch.no_grad():
        return full_logits(base, input_ids, attention_mask)


def composed_response_logits(
    base,
    values,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    composition: Composition = Composition(),
    proxy=None,
    vocab_maps=None,
) -> ResponseLogits:
    """Run every model over the batch and compose at response positions.

    The base (and the proxy pair) run under no_grad; value models keep their graph when grad is enabled.
    """
    rows, cols, targets = response_positions(labels)
    base_full = _base_logits_for_cascade(base, values, input_ids, attention_mask)
    with torch.no_grad():
        if base_full is not None:
            base_logits = at_positions(base_full, rows, cols)
        else:
            base_logits = logits_at(base, input_ids, attention_mask, rows, cols)
        proxy_logits = None
        if proxy is not None:
            proxy_logits = tuple(logits_at(m, input_ids, attention_mask, rows, cols) for m in proxy)
    value_logits = [logits_at(v, input_ids, attention_mask, rows, cols, base_full) for v in values]
    composed = composition.logits(base_logits, value_logits, vocab_maps=vocab_maps, proxy=proxy_logits)
    return ResponseLogits(composed, targets.to(composed.device), value_logits, rows)


@torch.no_grad()
def composed_response_logprobs(
    base,
    values,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    composition: Composition = Composition(),
    proxy=None,
    chunk_size: int | None = None,
) -> ResponseLogProbs:
    """Log-prob and greedy flag of every response token under the composed distribution, `chunk_size`
    positions at a time (default: as many as fit CHUNK_BYTES for this vocabulary). The numbers are those of
    `composed_response_logits` followed by a log-softmax; only peak memory differs."""
    rows, cols, targets = response_positions(labels)
    models = [base, *values, *(proxy or ())]
    base_full = _base_logits_for_cascade(base, values, input_ids, attention_mask)
    heads = [_response_logits_source(m, input_ids, attention_mask, rows, cols, base_full) for m in models[1:]]
    if base_full is not None:  # the cascade's base logits already hold the base's own: not run a second time
        gathered = at_positions(base_full, rows, cols)
        heads.insert(0, lambda start, end: gathered[start:end])
    else:
        heads.insert(0, _response_logits_source(base, input_ids, attention_mask, rows, cols))
    del base_full
    n_values = len(values)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (4 * max(_vocab_size(base, composition.real_vocab_size), 1)))
    logprobs, greedy = [], []
    for start in range(0, len(targets), chunk_size):
        part = [head(start, start + chunk_size) for head in heads]
        composed = composition.logits(part[0], part[1 : 1 + n_values],
                                      proxy=tuple(part[1 + n_values :]) if proxy is not None else None)
        del part
        target = targets[start : start + chunk_size].to(composed.device)
        logprobs.append(F.log_softmax(composed, -1).gather(-1, target[:, None]).squeeze(-1))
        greedy.append(composed.argmax(-1) == target)
        del composed
    device = logprobs[0].device if logprobs else targets.device
    empty = torch.zeros(0, device=device)
    return ResponseLogProbs(torch.cat(logprobs) if logprobs else empty,
                            torch.cat(greedy) if greedy else empty.bool(), targets, rows)


def _vocab_size(model, fallback: int | None) -> int:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError, TypeError):
        return int(getattr(getattr(model, "config", None), "vocab_size", None) or fallback or 1)


def _response_logits_source(model, input_ids, attention_mask, rows, cols, base_logits=None):
    """A function (start, end) -> the model's logits [end - start, V] at response positions start..end-1.

    When the model's output layer can be run on its own (checked once per model, see `_checked_head`), the
    transformer body runs once and keeps [N, H] hidden states; otherwise the whole forward pass runs and its
    logits are gathered to [N, V] (a cross-vocabulary value model, remote code with its own head)."""
    head = None if needs_base_logits(model) else _checked_head(model, input_ids, attention_mask)
    dev = input_device(model)
    if head is None:
        gathered = logits_at(model, input_ids, attention_mask, rows, cols, base_logits)
        return lambda start, end: gathered[start:end]
    hidden = model.get_decoder()(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                 use_cache=False).last_hidden_state
    hidden = at_positions(hidden, rows, cols)
    return lambda start, end: head(hidden[start:end])


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked_head(model, input_ids, attention_mask):
    """hidden [n, H] -> logits [n, V] the way `model` computes them after its transformer body, or None.

    The function (output layer, then the logit scaling or soft-capping some architectures apply) is checked
    once per model against the model's own forward pass on the first tokens of the batch; a model that
    disagrees, or has no separate body and output layer, is run whole."""
    if model in _HEADS:
        return _HEADS[model]
    head = None
    try:
        candidate = _head_function(model)
        row_len = int(attention_mask[0].sum())
        n = max(1, min(8, row_len))
        dev = input_device(model)
        ids = input_ids[:1, :n].to(dev)
        mask = torch.ones_like(ids)
        reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0]
        mine = candidate(hidden)
        if mine.shape == reference.shape:
            ref, got = reference.float(), mine.float().to(reference.device)
            tolerance = 1e-3 if reference.dtype == torch.float32 else 2e-2
            if bool(((ref - got).abs() <= tolerance * (1 + ref.abs())).all()):
                head = candidate
    except Exception:  # any model that does not split this way (remote code, wrappers) is simply run whole
        head = None
    _HEADS[model] = head
    return head


def _head_function(model):
    layer = model.get_output_embeddings()
    if layer is None or not hasattr(model, "get_decoder"):
        raise AttributeError("no separate output layer")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
    divide = getattr(config, "logits_scaling", None)  # Granite
    scale = getattr(model, "logit_scale", None)  # Cohere
    scale = scale if isinstance(scale, (int, float)) else None

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = layer(hidden)
        if scale is not None:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return head


def logits_at_positions(model, input_ids, attention_mask, rows, cols, **model_inputs) -> torch.Tensor:
    """The model's logits [N, V] at (rows, cols) (predicting the token after each), computing the output layer
    only there: a pre-hook hands the layer the final hidden states at those positions ([N, H] instead of
    [B, T, H]), and whatever the model does after the layer (soft-capping, scaling) still applies. A model whose
    output layer is not called as a module is run whole and its logits gathered."""
    head = _output_embeddings(model)
    hooked = []

    def response_hidden_only(_module, args):
        hidden = args[0] if args else None
        if (not hooked and isinstance(hidden, torch.Tensor) and hidden.dim() == 3
                and hidden.shape[:2] == input_ids.shape):
            hooked.append(True)
            return (at_positions(hidden, rows, cols), *args[1:])
        return None

    handle = head.register_forward_pre_hook(response_hidden_only) if head is not None else None
    try:
        logits = model(**_inputs(input_ids, model_inputs), attention_mask=attention_mask, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if hooked:
        if logits.shape[:-1] == rows.shape:
            return logits
        # the model reshaped what its output layer returned: run it whole
        logits = model(**_inputs(input_ids, model_inputs), attention_mask=attention_mask, use_cache=False).logits
    return at_positions(logits, rows, cols)


def _inputs(input_ids, model_inputs: dict) -> dict:
    """input_ids, unless the caller hands the model its input embeddings (the cascade scheme)."""
    return model_inputs if "inputs_embeds" in model_inputs else {"input_ids": input_ids, **model_inputs}


def _output_embeddings(model):
    """The output-embedding module of a (possibly DDP / PEFT wrapped) causal LM, or None."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and the like
        model = model.module
    try:
        layer = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return layer if isinstance(layer, torch.nn.Module) else None
