"""Continuous batching for the server: concurrent requests decode together in one `DecodeBatch`.

One thread owns the models and runs `Engine._loop`. At every step boundary it drops rows that finished or
whose client went away, admits waiting rows (they are prefilled inside the next step), runs one-off jobs
(prompt scoring for `echo`, loading or unloading a value model), then runs one lock-step decoding step for the
whole batch. Each row keeps its own sampling parameters, seed, stop strings, value models (by name, from the
server's `ValueRegistry`), beta and value weights. The batch is a `RoutedBatch`: the base runs on every row,
each value model only on the rows that name it, and each row is composed with its own value models and settings
(`routed_batch.compose_routed` -> `compose.compose_logits_per_row`).

Request handlers live on an asyncio loop: they `submit` rows and read lists of `Event`s from an asyncio.Queue
(a `Sink`). After each step the engine thread hands every loop all of that step's events in one
`loop.call_soon_threadsafe` (one wake-up of the loop per step, however many requests are in flight). The waiting
queue is bounded: `submit` raises `Overloaded` instead of letting it grow.

With a draft base (`serve --draft BASE`) rows also decode speculatively, in a `speculative.SpeculativeBatch` beside
the routed one: rows that compose the default model's value models (any weights and beta) join it, are
prefilled at once (their first token goes out before the next round), and each round commits 1 to k + 1 tokens
per row, pushed into the row one at a time until it ends (end of sequence, stop string, max_tokens); what
follows is dropped and the row leaves before the next round. Rows composing other value models, and seeded
sampling rows (so that a seed gives the same text with or without the draft), decode in the routed batch; each
engine iteration runs one step of it and one round of the speculative batch.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from transfertune.core.compose import Composition
from transfertune.core.response_logits import composed_response_logits
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.generator import TextStream
from transfertune.inference.sampling import SamplingParams, sample_rows
from transfertune.inference.speculative import SpeculativeBatch, SpeculativeComposedGenerator
from transfertune.inference.speculative_costs import SpeculativeStats
from transfertune.io.data import IGNORE_INDEX
from transfertune.serving.routed_batch import RoutedBatch, compose_routed
from transfertune.serving.value_registry import ServedModel, ValueRegistry

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The engine's waiting queue is full."""


@dataclass(slots=True)
class Event:
    """What one step produced for one row. `token` is None only for an error event."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None


class Sink:
    """Where a request's events go: an asyncio.Queue on the handler's loop, fed from the engine thread with one
    list of events per step (so a busy server wakes each handler once per step, not once per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self.closed = False

    def send(self, events: list[Event]) -> None:
        _deliver_threadsafe(self.loop, [(self, events)])


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop, batches: list[tuple[Sink, list[Event]]]) -> None:
    """Put each sink's events in its queue, from another thread: one call into the loop for all of them."""
    try:
        loop.call_soon_threadsafe(_deliver, batches)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        for sink, _ in batches:
            sink.closed = True


def _deliver(batches: list[tuple[Sink, list[Event]]]) -> None:
    for sink, events in batches:
        sink.queue.put_nowait(events)


@dataclass(eq=False)
class Row:
    """One sequence to generate (one choice of one request)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    beta: float | None = None  # None: the composed model's own
    weights: tuple[float, ...] | None = None  # one per value model of `values`
    logprobs: int | None = None  # top tokens to report with each token; None: no log-probs at all
    index: int = 0  # choice index within its request
    ignore_eos: bool = False
    values: tuple[str, ...] | None = None  # names of its value models; None: the composed model's
    sink: Sink | None = None
    cancelled: bool = False
    # set by the engine
    generated: int = 0
    text: TextStream | None = None
    generator: torch.Generator | None = None


@dataclass
class Draft:
    """A draft base for speculative decoding (`serve --draft`), with `SpeculativeComposedGenerator`'s options."""

    model: torch.nn.Module
    tokenizer: object = None  # checked against the base's vocabulary when given
    options: dict = field(default_factory=dict)
    name: str = "the draft base"  # for error messages


class Engine:
    """Decodes rows with the base of `composed` and the value models of `registry` (default: the composed
    model's, named as `value_registry.default_names` does). A row's `values` name its value models (`()`: the
    base alone); a row that leaves them None composes `default` (default: every value model of `composed`, at
    its weights and beta). With a `draft`, rows composing `default`'s value models decode speculatively (the
    module docstring); its ValueError says why a draft cannot speculate for these models."""

    def __init__(self, composed: ComposedModel, *, registry: ValueRegistry | None = None,
                 default: ServedModel | None = None, max_batch: int = 32, max_queue: int = 256,
                 draft: Draft | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.composed = composed
        self.registry = registry if registry is not None else ValueRegistry.of_composed(composed)
        self.default = default or ServedModel("default", tuple(self.registry.names()), tuple(composed.weights),
                                              composed.beta)
        self.speculative: SpeculativeComposedGenerator | None = None
        self.draft_name = draft.name if draft is not None else None
        if draft is not None:
            target = ComposedModel(composed.base, composed.tokenizer, self.registry.modules(self.default.values),
                                   weights=list(self.default.weights), beta=self.default.beta, proxy=composed.proxy,
                                   alpha=composed.alpha, base_name=composed.base_name)
            try:
                self.speculative = SpeculativeComposedGenerator(target, draft.model, draft.tokenizer, **draft.options)
            except ValueError as err:
                raise ValueError(f"{draft.name}: {err}") from None
        self.generator = composed.generator()
        self.tokenizer = composed.tokenizer  # used by the engine thread only
        self.eos_ids = self.generator.eos_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._jobs: deque[tuple[Callable, asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._rows: list[Row] = []  # running rows, in the order of the batch
        self._batch = self.new_batch()
        self._spec_rows: list[Row] = []  # rows decoding speculatively, in the order of their batch
        self._spec_joining: list[Row] = []
        self._spec_batch: SpeculativeBatch | None = self.speculative.new_batch() if self.speculative else None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"steps": 0, "tokens": 0, "rows_done": 0, "max_running": 0, "step_seconds": 0.0}
        self.speculative_row_rounds = 0  # rows x rounds, for tokens per row and round

    def new_batch(self) -> RoutedBatch:
        proxy = list(self.composed.proxy or ())
        return RoutedBatch([self.composed.base, *proxy], self.composed.device, self.generator.pad_id,
                           self.registry.modules)

    def check_batching(self, values: tuple[str, ...] | None = None) -> None:
        """Join, step, leave and join again once, on a dummy prompt, with the base and these value models
        (default: all): fails, with the reason, for models whose KV caches rows cannot join or leave (e.g.
        sliding-window layers); warms the models up."""
        pad = self.generator.pad_id
        names = tuple(self.registry.names()) if values is None else values
        batch = self.new_batch()
        try:
            batch.join(["a", "b"], [[pad, pad], [pad]], [names, names])
            batch.step()
            batch.keep([1])
            batch.feed(torch.tensor([pad]))
            batch.join(["c"], [[pad]], [names])
            batch.step()
        except NotImplementedError as err:
            raise ValueError(f"this model cannot be served with continuous batching: {err}") from None
        if self.speculative is not None and values is None:
            spec = self.speculative.new_batch()
            try:
                spec.join([[pad, pad], [pad]])
                spec.round(1)
                spec.keep([1])
                spec.join([[pad]])
                spec.round(2)
            except NotImplementedError as err:
                raise ValueError(f"{self.draft_name}: these models cannot decode speculatively with continuous "
                                 f"batching: {err}") from None
            self.speculative.stats = SpeculativeStats()  # the draft length is chosen from warm rounds only

    def speculates(self, row: Row) -> bool:
        """Whether a row (its value models resolved) decodes speculatively: it composes the default model's value
        models, still those the draft was built with (a value model unloaded and loaded again is another), and
        is not seeded sampling."""
        spec = self.speculative
        if spec is None or row.values != self.default.values or (row.sampling.seed is not None
                                                                  and not row.sampling.greedy):
            return False
        served = [self.registry.get(name) for name in row.values]
        return all(s is not None and s.module is m for s, m in zip(served, spec.target.values))

    def uses(self, name: str) -> bool:
        """Whether a running or waiting row composes the value model `name` (ask from the engine thread, e.g.
        in a job: rows move between the queue and the batch there)."""
        with self._cond:
            waiting = list(self._waiting)
        running = self._rows + self._spec_rows + self._spec_joining
        return any(not row.cancelled and name in (row.values or ()) for row in waiting + running)

    # -- called from request handlers ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="transfertune-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: list[Row]) -> None:
        """Queue rows for decoding (their events go to `row.sink`). Raises Overloaded when the queue is full."""
        with self._cond:
            if len(self._waiting) + len(self._jobs) + len(rows) > self.max_queue:  # first forget abandoned rows
                self._waiting = deque(row for row in self._waiting if not row.cancelled)
            if len(self._waiting) + len(self._jobs) + len(rows) > self.max_queue:
                raise Overloaded(f"the server is busy: {len(self._waiting)} sequences are waiting")
            self._waiting.extend(rows)
            self._cond.notify_all()

    def cancel(self, rows: list[Row]) -> None:
        """Forget these rows: they leave the batch at the next step boundary (a client went away)."""
        for row in rows:
            row.cancelled = True

    async def run_job(self, fn: Callable):
        """Run fn() on the engine thread between two steps (models are not thread-safe); await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if len(self._waiting) + len(self._jobs) + 1 > self.max_queue:
                raise Overloaded("the server is busy")
            self._jobs.append((fn, future, loop))
            self._cond.notify_all()
        return await future

    @property
    def load(self) -> dict:
        out = {"running": len(self._rows) + len(self._spec_rows), "waiting": len(self._waiting), **self.stats}
        if self.speculative is not None:
            s = self.speculative.stats
            out["speculative"] = {"rows": len(self._spec_rows), "rounds": s.rounds,
                                  "row_rounds": self.speculative_row_rounds, "drafted": s.drafted,
                                  "accepted": s.accepted, "committed": s.committed,
                                  "draft_tokens": s.draft_tokens, "seconds": dict(s.seconds)}
        return out

    # -- the engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._jobs or self._rows or self._spec_rows
                           or self._spec_joining):
                    self._cond.wait()
                if self._stopping:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future, loop in jobs:
                self._run_job(fn, future, loop)
            try:
                self._drop_cancelled()
                self._admit()
                for rows, step in ((self._rows, self._step), (self._spec_rows or self._spec_joining, self._speculate)):
                    if rows:
                        start = time.perf_counter()
                        step()
                        self.stats["step_seconds"] += time.perf_counter() - start
            except Exception as err:  # a model failed: fail the rows in flight, keep serving
                log.exception("decoding step failed")
                failed = self._rows + self._spec_rows + self._spec_joining
                _send([(row, Event(row.index, error=f"{type(err).__name__}: {err}")) for row in failed])
                self._rows, self._batch = [], self.new_batch()
                self._spec_rows, self._spec_joining = [], []
                self._spec_batch = self.speculative.new_batch() if self.speculative else None
        _send([(row, Event(row.index, error="the server is shutting down"))
               for row in self._rows + self._spec_rows + self._spec_joining + list(self._waiting)])

    @staticmethod
    def _run_job(fn, future, loop) -> None:
        try:
            result, error = fn(), None
        except Exception as err:  # handed to the awaiting handler
            result, error = None, err

        def settle():
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.cancelled]
        if len(keep) < len(self._rows):
            self._leave(keep)
        keep = [i for i, row in enumerate(self._spec_rows) if not row.cancelled]
        if len(keep) < len(self._spec_rows):
            self._spec_leave(keep)

    def _admit(self) -> None:
        joining = []
        with self._cond:
            while self._waiting and len(self._rows) + len(self._spec_rows) + len(joining) < self.max_batch:
                row = self._waiting.popleft()
                if not row.cancelled:
                    joining.append(row)
        ready, refused = [], []
        for row in joining:
            if row.values is None:
                row.values, weights, beta = self.default.values, self.default.weights, self.default.beta
            else:
                row.values = tuple(row.values)
                weights, beta = (1.0,) * len(row.values), self.registry.default_beta(row.values)
            row.beta = beta if row.beta is None else row.beta
            row.weights = tuple(weights if row.weights is None else row.weights)
            row.text = TextStream(self.tokenizer, row.stop)
            row.generator = row.sampling.make_generator(self.composed.device)
            missing = [name for name in row.values if self.registry.get(name) is None]
            if missing:  # unloaded while it waited (the server does not let that happen; a direct caller may)
                refused.append((row, Event(row.index, error=f"value model {missing[0]!r} is not loaded")))
            elif len(row.weights) != len(row.values):
                refused.append((row, Event(row.index, error=f"{len(row.values)} value models but "
                                                             f"{len(row.weights)} weights")))
            else:
                ready.append(row)
        _send(refused)
        if self._spec_batch is not None and not self._spec_rows and not self._spec_joining:
            self._forget_stale_draft()
        speculates = [self.speculates(row) for row in ready]
        self._spec_joining += [row for row, spec in zip(ready, speculates) if spec]
        ready = [row for row, spec in zip(ready, speculates) if not spec]
        if ready:
            self._batch.join(ready, [row.prompt_ids for row in ready], [row.values for row in ready])
            self._rows.extend(ready)
        running = len(self._rows) + len(self._spec_rows) + len(self._spec_joining)
        self.stats["max_running"] = max(self.stats["max_running"], running)

    def _forget_stale_draft(self) -> None:
        """Once a value model of the draft has been unloaded (and its last speculative row is gone), drop the
        draft, so that the memory goes: later rows decode in the routed batch."""
        names = self.default.values
        if all((s := self.registry.get(n)) is not None and s.module is m
               for n, m in zip(names, self.speculative.target.values)):
            return
        log.warning("speculative decoding is off from now on: a value model of the default model (%s) was unloaded",
                    ", ".join(names))
        self.speculative = self._spec_batch = None

    def _leave(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    def _spec_leave(self, keep: list[int]) -> None:
        self._spec_rows = [self._spec_rows[i] for i in keep]
        self._spec_batch.keep(keep)

    def _step(self) -> None:
        rows = self._rows
        base_logits, value_logits = self._batch.step()
        logits = compose_routed(base_logits, value_logits, [row.values for row in rows],
                                [row.weights for row in rows], [row.beta for row in rows],
                                proxy=self.composed.proxy is not None, alpha=self.composed.alpha,
                                real_vocab_size=self.composed.real_vocab_size)
        next_tokens = sample_rows(logits, [row.sampling for row in rows], [row.generator for row in rows])
        keep = self._emit(rows, [[t] for t in next_tokens.tolist()], logits[:, None])
        self.stats["steps"] += 1
        if len(keep) < len(rows):
            self._leave(keep)
        if keep:
            self._batch.feed(next_tokens[keep])

    def _speculate(self) -> None:
        """Prefill the rows that joined (their first tokens go out at once), then one speculative round."""
        spec, batch = self.speculative, self._spec_batch
        if self._spec_joining:
            rows, self._spec_joining = self._spec_joining, []
            firsts = batch.join([r.prompt_ids for r in rows], [r.sampling for r in rows],
                                [r.weights for r in rows], [r.beta for r in rows])
            started = time.perf_counter()
            kept = self._emit(rows, [[t] for t in firsts], batch.composed_logits)
            running = len(self._spec_rows)
            self._spec_rows += rows
            if len(kept) < len(rows):
                self._spec_leave(list(range(running)) + [running + i for i in kept])
            spec.stats.seconds["between"] += time.perf_counter() - started
        rows = self._spec_rows
        if not rows:
            return
        k = spec.next_draft_len(len(rows))
        k = max(1, min(k, max(row.max_tokens - row.generated for row in rows) - 1))
        committed = batch.round(k)
        self.speculative_row_rounds += len(rows)
        started = time.perf_counter()
        keep = self._emit(rows, committed, batch.composed_logits)
        self.stats["steps"] += 1
        if len(keep) < len(rows):
            self._spec_leave(keep)
        spec.stats.seconds["between"] += time.perf_counter() - started

    def _emit(self, rows: list[Row], tokens: list[list[int]], logits: torch.Tensor) -> list[int]:
        """Push each row's new tokens into it, one at a time, up to its end (end of sequence, a stop string,
        max_tokens: the rest are dropped), and send the events; returns the positions of the rows that go on.
        `logits` [B, T, V]: the composed logits row i's j-th token was chosen from, at [i, j]."""
        logp = F.log_softmax(logits, -1) if any(row.logprobs is not None for row in rows) else None
        keep, events = [], []
        for i, (row, row_tokens) in enumerate(zip(rows, tokens)):
            if row.cancelled or (row.sink is not None and row.sink.closed):
                continue
            for j, token in enumerate(row_tokens):
                event = self._event(row, token, None if row.logprobs is None else logp[i, j])
                events.append((row, event))
                if event.finish_reason is not None:
                    self.stats["rows_done"] += 1
                    break
            else:
                keep.append(i)
        _send(events)
        self.stats["tokens"] += len(events)
        return keep

    def _event(self, row: Row, token: int, logp: torch.Tensor | None) -> Event:
        """One generated token of a row: its text, log-probs and, when it ends the row, the finish reason."""
        row.generated += 1
        event = Event(row.index, token=token)
        if logp is not None:
            event.logprob, event.top = _logprobs_at(logp, token, row.logprobs)
        if token in self.eos_ids and not row.ignore_eos:
            event.text, event.finish_reason = row.text.flush(), "stop"
        else:
            event.text = row.text.push(token)
            if row.text.stopped:
                event.finish_reason = "stop"
            elif row.generated >= row.max_tokens:
                event.text += row.text.flush()
                event.finish_reason = "length"
        return event


def _send(events: list[tuple[Row, Event]]) -> None:
    """Hand each sink its rows' events of this step, with one call into each event loop."""
    by_sink: dict[Sink, list[Event]] = {}
    for row, event in events:
        if row.sink is not None:
            by_sink.setdefault(row.sink, []).append(event)
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sink, list[Event]]]] = {}
    for sink, batch in by_sink.items():
        by_loop.setdefault(sink.loop, []).append((sink, batch))
    for loop, batches in by_loop.items():
        _deliver_threadsafe(loop, batches)


def _logprobs_at(logp: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    best = []
    if top:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        best = list(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), best


@torch.no_grad()
def prompt_logprobs(
    composed: ComposedModel, prompt_ids: list[int], top: int, *, beta: float, weights: tuple[float, ...],
    values: list | None = None,
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """For each prompt token, its composed log-prob given the tokens before it and the `top` most likely
    tokens there (None for the first token, which has no context). The same computation as
    `ComposedModel.score` (sequence.composed_response_logits), with this request's value models (networks;
    default: the composed model's), beta and weights."""
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    ids = torch.tensor([prompt_ids], device=composed.device)
    labels = ids.clone()
    labels[0, 0] = IGNORE_INDEX
    composition = Composition(tuple(weights), beta, composed.alpha, composed.real_vocab_size)
    values = composed.values if values is None else values
    res = composed_response_logits(composed.base, values, ids, torch.ones_like(ids), labels,
                                   composition=composition, proxy=composed.proxy)
    logp = F.log_softmax(res.composed, -1)
    return [None] + [_logprobs_at(logp[i], t, top) for i, t in enumerate(res.targets.tolist())]
