"""Speculative composed decoding: draft with (small base + value models), verify with (target base + same values).

The draft side (small base + value models) runs once per drafted position; for Llama models it runs as one
stacked network (fused_draft.py), which costs the ops of one small model. The value logits it produces are
reused by the verifier, which adds one pass of the target base over the drafted tokens. Verification follows
the standard rule (Leviathan et al., 2023; Chen et al., 2023), so greedy output equals plain composed decoding
(up to the rounding of the fused draft's values; `exact=True` removes even that) and sampled output follows
the composed distribution.

Rows of a batch accept different numbers of drafted tokens. Each row commits its own (`per_row`): its rejected
slots are masked out of the caches and each row continues at its own length (ragged_cache.py); models whose
attention cannot take such holes commit, in every row, what all rows accepted (rectangular caches).

`SpeculativeBatch` is the step-level API: rows join (prefilled, first token drawn), every row advances one
round (`round`), rows leave (`keep`) between rounds; `SpeculativeComposedGenerator.generate` is a loop over it.
Each row composes at its own value weights and beta (`join`'s `weights` / `beta`, default the target's), in the
draft and in the verifier alike, and the composed logits every committed token was chosen from stay readable
(`composed_logits`) for the log-probs a server reports.
Cache invariant between rounds: the caches hold every committed token of a row but the last one (`pending`);
with `exact`, the draft may also lack the one before (`behind`: the last drafted token, run next round).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.generator import GenerationOutput, TextStream, left_pad, text_before_stop
from transfertune.inference.ragged_cache import HOLE_ARCHITECTURES, RaggedCaches, TransformersKV, takes_holes
from transfertune.inference.sampling import SamplingParams, filter_logits, sample_rows
from transfertune.inference.speculative_costs import SpeculativeStats
from transfertune.io.data import encode_prompt
from transfertune.io.fingerprint import vocab_fingerprint

__all__ = ["SpeculativeBatch", "SpeculativeComposedGenerator", "SpeculativeStats", "greedy_verdicts", "verify_draft"]

DRAFT_ENGINES = ("auto", "fused", "transformers")
EXPLORE = (1, 2, 1, 2)  # draft lengths of the first rounds with `adaptive`, times draft_len
COMPACT_AT = 16  # compact a side's caches once this many slots (and a quarter of them) are holes


def step_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a (non-greedy) sampling rule draws from."""
    return filter_logits(logits, params).softmax(-1)


def verify_draft(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, drafted: torch.Tensor, generator=None
) -> tuple[int, int]:
    """Accept a prefix of the drafted tokens; return (number accepted, the next token).

    target_probs [k+1, V]: target distribution before each drafted token and after the last;
    draft_probs [k, V]: the distribution each drafted token was drawn from; drafted [k].
    Token i is kept with probability min(1, p(x)/q(x)); the first rejected one is replaced by a draw from
    normalise(max(0, p - q)); when all are kept, a bonus token is drawn from the last target row.
    """
    k = len(drafted)
    for i in range(k):
        x = int(drafted[i])
        p, q = target_probs[i, x], draft_probs[i, x]
        u = torch.rand((), generator=generator)
        if q > 0 and u * q <= p:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        if residual.sum() <= 0:
            residual = target_probs[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def greedy_verdicts(composed: torch.Tensor, drafted: torch.Tensor) -> list[tuple[int, int]]:
    """`verify_draft` for greedy decoding, every row at once: a drafted token is kept while it is the target's
    argmax. composed [B, k+1, V] target logits, drafted [B, k]; returns (number accepted, next token) per row."""
    best = composed.argmax(-1)
    accepted = (drafted == best[:, : drafted.shape[1]]).long().cumprod(-1).sum(-1)
    return [(int(a), int(t)) for a, t in zip(accepted, best.gather(1, accepted[:, None])[:, 0])]


class SpeculativeBatch:
    """Rows decoding speculatively together, each with its own sampling rule, caches and length.

        first = batch.join(prompt_ids, sampling)  # prefill; each new row's first token (a plain composed step)
        tokens = batch.round(k)                   # per row: its accepted drafted tokens + the verifier's token
        batch.keep(rows)                          # rows that go on (finished or cancelled rows leave)

    A round drafts `k` tokens for every row and commits, per row, 1 to k + 1 tokens (`spec.per_row`), or the
    same number for every row. Tokens past a row's end (end of sequence, stop string, max tokens) are the
    caller's to drop: the row leaves before the next round.

    `composed_logits` [B, T, V]: the composed logits the last `join` (its new rows, T = 1) or `round` drew from;
    a row's i-th token of that call was chosen from [row, i] (log-probs: its log_softmax)."""

    def __init__(self, spec: SpeculativeComposedGenerator):
        self.spec = spec
        self.draft = RaggedCaches(spec.draft_store(0, 1))
        self.verifier = RaggedCaches(TransformersKV(spec.verifiers))
        self.pending = torch.zeros(0, dtype=torch.long)  # each row's last committed token, in no cache yet
        self.behind = torch.zeros(0, dtype=torch.long)  # exact: a committed token the draft has not run (-1: none)
        self.params: list[SamplingParams] = []
        self.generators: list = []
        self.weights = torch.zeros(0, len(spec.target.values), dtype=torch.float64)  # [B, n_values]
        self.beta = torch.zeros(0, dtype=torch.float64)  # [B]
        self.composed_logits: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self.params)

    @torch.no_grad()
    def join(self, prompt_ids: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             weights: Sequence[Sequence[float]] | None = None, beta: Sequence[float] | None = None) -> list[int]:
        """Prefill new rows (appended after the running ones) and draw their first tokens. `weights` (one tuple
        per row) and `beta` (one per row): each row's composition (default: the target's)."""
        started = time.perf_counter()
        n, target = len(prompt_ids), self.spec.target
        params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        generators = [p.make_generator("cpu") for p in params]
        weights = torch.tensor([list(target.weights)] * n if weights is None else [list(w) for w in weights],
                               dtype=torch.float64).reshape(n, len(target.values))
        beta = torch.tensor([float(target.beta)] * n if beta is None else [float(b) for b in beta],
                            dtype=torch.float64)
        ids, mask = left_pad(prompt_ids, self.spec.pad_id)
        draft = RaggedCaches(self.spec.draft_store(len(prompt_ids), ids.shape[1] + 64))
        verifier = RaggedCaches(TransformersKV(self.spec.verifiers))
        drafted = [logits[:, -1] for logits in draft.forward(ids, mask)]
        verified = [logits[:, -1] for logits in verifier.forward(ids, mask)]
        values = verified[1:] if self.spec.recompute_values else drafted[1:]
        composed = target.compose([verified[0], *values], weights=weights, beta=beta)
        first = sample_rows(composed, params, generators)
        self.composed_logits = composed[:, None]
        self.draft.merge(draft)
        self.verifier.merge(verifier)
        self.pending = torch.cat([self.pending, first])
        self.behind = torch.cat([self.behind, torch.full_like(first, -1)])
        self.params += params
        self.generators += generators
        self.weights, self.beta = torch.cat([self.weights, weights]), torch.cat([self.beta, beta])
        self.spec.stats.seconds["prefill"] += time.perf_counter() - started
        return first.tolist()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order."""
        rows = list(rows)
        if not rows:
            self.draft.mask = self.verifier.mask = None
        else:
            self.draft.keep_rows(rows)
            self.verifier.keep_rows(rows)
        idx = torch.tensor(rows, dtype=torch.long)
        self.pending, self.behind = self.pending[idx], self.behind[idx]
        self.weights, self.beta = self.weights[idx], self.beta[idx]
        self.params = [self.params[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]

    def _draw(self, composed: torch.Tensor, draft_probs: list[list]) -> torch.Tensor:
        """Drafted tokens [B]: the argmax for greedy rows, a draw from each sampling row's distribution q (kept in
        draft_probs for the verdict)."""
        tokens = composed.argmax(-1)
        for r, (p, gen) in enumerate(zip(self.params, self.generators)):
            if not p.greedy:
                q = step_probs(composed[r], p)
                tokens[r] = torch.multinomial(q, 1, generator=gen)[0]
                draft_probs[r].append(q)
        return tokens

    def _verdicts(self, composed: torch.Tensor, drafted: torch.Tensor, draft_probs: list[list]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted drafted tokens [B], next token [B]) of every row."""
        greedy = [r for r, p in enumerate(self.params) if p.greedy]
        accepted, nxt = torch.zeros(self.rows, dtype=torch.long), torch.zeros(self.rows, dtype=torch.long)
        if greedy:
            idx = torch.tensor(greedy)
            for r, (a, t) in zip(greedy, greedy_verdicts(composed[idx], drafted[idx])):
                accepted[r], nxt[r] = a, t
        for r, (p, gen) in enumerate(zip(self.params, self.generators)):
            if not p.greedy:
                q = torch.stack(draft_probs[r]) if draft_probs[r] else composed[r, :0]
                accepted[r], nxt[r] = verify_draft(step_probs(composed[r], p), q, drafted[r], gen)
        return accepted, nxt

    @torch.no_grad()
    def round(self, k: int) -> list[list[int]]:
        """Draft k >= 1 tokens for every row, verify them, commit; returns the tokens each row committed."""
        spec, rows, exact = self.spec, self.rows, self.spec.recompute_values
        started = time.perf_counter()
        has_behind = bool((self.behind >= 0).any())
        if has_behind:  # exact mode: rows that kept every drafted token run the last one before their pending one
            fed, valid = torch.stack([self.behind.clamp(min=0), self.pending], 1), torch.stack(
                [self.behind >= 0, torch.ones_like(self.pending, dtype=torch.bool)], 1)
        else:
            fed, valid = self.pending[:, None], None
        drafted, value_steps, draft_probs = [], [], [[] for _ in range(rows)]
        settings = {"weights": self.weights, "beta": self.beta}
        for j in range(k + 1):
            if j == k and exact:
                break  # the verifier computes the values after the last drafted token; the draft runs it later
            d_logits, *v_logits = (logits[:, -1] for logits in self.draft.forward(fed, valid))
            value_steps.append(v_logits)
            if j == k:
                break
            token = self._draw(spec.draft_composed.compose([d_logits, *v_logits], **settings), draft_probs)
            drafted.append(token)
            fed, valid = token[:, None], None
        drafted_at = time.perf_counter()
        seq = torch.stack([self.pending, *drafted], 1)  # [B, k + 1]
        verified = self.verifier.forward(seq, keep=k + 1)
        verified_at = time.perf_counter()
        values = verified[1:] if exact else [torch.stack([step[i] for step in value_steps], 1)
                                             for i in range(len(spec.target.values))]
        composed = spec.target.compose([verified[0], *values], **settings)  # [B, k + 1, V]
        self.composed_logits = composed
        accepted, nxt = self._verdicts(composed, seq[:, 1:], draft_probs)
        kept = accepted
        if not spec.per_row:  # every row commits what all rows accepted, then one token of its own
            kept = accepted.min().expand(rows)
            nxt = torch.where(accepted > kept, seq[torch.arange(rows), (kept + 1).clamp(max=k)], nxt)
        committed = [seq[r, 1 : 1 + int(kept[r])].tolist() + [int(nxt[r])] for r in range(rows)]
        self.verifier.commit(k + 1, kept + 1)
        if exact:
            self.draft.commit(k + has_behind, has_behind + (kept + 1).clamp(max=k))
            self.behind = torch.where(kept == k, seq[:, k], -1)
        else:
            self.draft.commit(k + 1, kept + 1)
        self.pending = nxt
        for side in (self.draft, self.verifier):
            if side.waste >= COMPACT_AT and 4 * side.waste >= side.mask.shape[1]:
                side.compact()
        spec.stats.add_round(rows, k, accepted.tolist(), sum(map(len, committed)), len(value_steps),
                             (drafted_at - started, verified_at - drafted_at, time.perf_counter() - verified_at))
        return committed


class SpeculativeComposedGenerator:
    """Speculative decoding of `target` (a ComposedModel) with `draft_base` in place of its base.

    `draft_engine`: "fused" runs the draft base and the value models as one stacked Llama network
    (fused_draft.py: the ops of one small model per drafted token); "transformers" runs each through its own
    forward pass (any architecture); "auto" fuses when every one of them is a plain Llama model.
    The verifier composes the target base's logits with the value logits the draft computed (one value pass
    per position). A fused draft computes the same function as the value models' own forward pass, rounded
    differently (differences near 1e-6 in float32), so where two tokens tie that closely greedy output may pick
    the other one. `exact=True` (fused drafts only) has the verifier recompute the value logits with the value
    models themselves: greedy output is then token for token what plain composed decoding gives, at the cost
    of a second value pass. A transformers draft computes the values as plain decoding does: always exact.

    `per_row` (default: where every model through transformers takes cache holes, ragged_cache.takes_holes):
    each row of a batch commits its own accepted tokens; False: every row commits what all rows accepted.

    `adaptive` picks each round's draft length from the acceptance and the costs measured so far
    (`SpeculativeStats.best_draft_len`); seeded sampling keeps `draft_len`, so that a seed gives the same
    tokens on every run.
    """

    def __init__(self, target: ComposedModel, draft_base, draft_tokenizer=None, *, draft_len: int = 4,
                 max_draft_len: int = 12, adaptive: bool = True, draft_engine: str = "auto", exact: bool = False,
                 per_row: bool | None = None):
        if target.proxy is not None:
            raise ValueError("speculative decoding supports base + value models, not proxy-tuning")
        from transfertune.inference.fused_draft import can_fuse
        from transfertune.vocab.token_map import CrossVocabValue

        if any(getattr(v, "needs_base_logits", False) for v in target.values):
            raise ValueError("speculative decoding reuses the draft's value logits, so it needs residual value "
                             "models: a cascade value model reads its base, and the draft's base is another")
        if any(isinstance(v, CrossVocabValue) for v in target.values):
            raise ValueError("speculative decoding needs value models that share the base's vocabulary")
        if draft_tokenizer is not None and vocab_fingerprint(draft_tokenizer) != vocab_fingerprint(target.tokenizer):
            raise ValueError("the draft base must share the target's vocabulary")
        if draft_engine not in DRAFT_ENGINES:
            raise ValueError(f"draft_engine must be one of {', '.join(DRAFT_ENGINES)}, got {draft_engine!r}")
        fusable = can_fuse([draft_base, *target.values])
        if draft_engine == "fused" and not fusable:
            raise ValueError("a fused draft needs plain Llama models (full weights, no biases) for the draft base "
                             "and every value model; use draft_engine='transformers'")
        self.fused = draft_engine == "fused" or (draft_engine == "auto" and fusable)
        if self.fused:
            from transfertune.inference.fused_draft import FusedDraft

            self.fused_draft = FusedDraft([draft_base, *target.values])  # weights stacked once, here
        self.target = target
        self.draft_base = draft_base
        self.draft_composed = ComposedModel(draft_base, target.tokenizer, target.values, weights=target.weights,
                                            beta=target.beta)
        self.tokenizer = target.tokenizer
        self.draft_len, self.max_draft_len, self.adaptive = draft_len, max_draft_len, adaptive
        self.recompute_values = self.fused and exact
        self.verifiers = [target.base, *(target.values if self.recompute_values else [])]
        through_transformers = self.verifiers + ([] if self.fused else [draft_base, *target.values])
        holes = all(takes_holes(m) for m in through_transformers)
        if per_row and not holes:
            raise ValueError("per-row commits need models whose attention takes masked cache slots "
                             f"({', '.join(HOLE_ARCHITECTURES)}); use per_row=False")
        self.per_row = holes if per_row is None else per_row
        self.plain = target.generator()  # plain composed decoding: end-of-sequence ids, padding, context checks
        self.eos_ids, self.pad_id = self.plain.eos_ids, self.plain.pad_id
        self.stats = SpeculativeStats()

    def draft_store(self, rows: int, capacity: int):
        """An empty KV store for the draft side (ragged_cache.py)."""
        if self.fused:
            return self.fused_draft.start(rows, capacity)
        return TransformersKV([self.draft_base, *self.target.values], self.target.overlap_pool())

    def new_batch(self) -> SpeculativeBatch:
        return SpeculativeBatch(self)

    def next_draft_len(self, rows: int) -> int:
        """The draft length of the next round of `rows` rows: `draft_len` and twice it for the first rounds (so
        verification is timed at two sizes), then the best for the measured acceptance and costs."""
        if not self.adaptive:
            return self.draft_len
        if self.stats.rounds < len(EXPLORE):
            return max(1, min(self.max_draft_len, self.draft_len * EXPLORE[self.stats.rounds]))
        return self.stats.best_draft_len(self.max_draft_len, rows, self.per_row)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                     sampling: SamplingParams | None = None) -> list[int]:
        return self.generate_batch([prompt_ids], max_new_tokens, sampling)[0]

    @torch.no_grad()
    def generate_batch(self, prompt_ids: list[list[int]], max_new_tokens: int = 64,
                       sampling: SamplingParams | None = None) -> list[list[int]]:
        """Token ids generated for each prompt, an end-of-sequence token included: each row's output is what
        plain composed decoding gives (greedy) or follows the composed distribution (sampling)."""
        tokens, reasons = self.decode(prompt_ids, max_new_tokens, sampling)
        return [row + [eos] if eos is not None else row for row, (_, eos) in zip(tokens, reasons)]

    @torch.no_grad()
    def decode(self, prompt_ids: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None,
               stop: Sequence[str] = ()) -> tuple[list[list[int]], list[tuple[str, int | None]]]:
        """(tokens of each row without its end-of-sequence token, (finish reason, that token or None)): the rows
        decode as one SpeculativeBatch, and a row leaves it as soon as it ends (end of sequence, a stop string,
        max_new_tokens)."""
        params = sampling or SamplingParams()
        n = len(prompt_ids)
        out: list[list[int]] = [[] for _ in range(n)]
        reasons: list[tuple[str, int | None]] = [("length", None)] * n
        if not n or not max_new_tokens:
            return out, reasons
        # the draft length follows measured times, so a seeded run, whose random draws depend on it, keeps its own
        adaptive = params.greedy or params.seed is None
        streams = [TextStream(self.tokenizer, stop) for _ in range(n)] if stop else None

        def add(i: int, tokens: list[int]) -> bool:
            """Append a row's committed tokens; whether the row has ended."""
            for t in tokens:
                if t in self.eos_ids:
                    reasons[i] = ("eos", t)
                    return True
                out[i].append(t)
                if streams is not None:
                    streams[i].push(t)
                    if streams[i].stopped:
                        reasons[i] = ("stop", None)
                        return True
                if len(out[i]) == max_new_tokens:
                    return True
            return False

        batch = self.new_batch()
        live = list(range(n))  # prompt index of each batch row
        committed = [[t] for t in batch.join(prompt_ids, params)]
        started = time.perf_counter()
        k = self.draft_len
        while True:
            going = [j for j, i in enumerate(live) if not add(i, committed[j])]
            if len(going) < len(live):
                batch.keep(going)
                live = [live[j] for j in going]
            if not live:
                break
            if adaptive:
                k = self.next_draft_len(len(live))
            k = max(1, min(k, max(max_new_tokens - len(out[i]) for i in live) - 1))
            round_started = time.perf_counter()
            self.stats.seconds["between"] += round_started - started
            committed = batch.round(k)
            started = time.perf_counter()
        self.stats.seconds["between"] += time.perf_counter() - started
        return out, reasons

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                 truncate_prompts: bool = False) -> GenerationOutput:
        """`ComposedGenerator.generate`, speculatively: the same texts, token ids and finish reasons."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, max_new_tokens = self.plain.fit_context([encode_prompt(self.tokenizer, p) for p in prompts],
                                                     max_new_tokens, truncate_prompts)
        tokens, reasons = self.decode(ids, max_new_tokens, sampling, stop)
        return GenerationOutput([text_before_stop(self.tokenizer, row, stop) for row in tokens], tokens,
                                [reason for reason, _ in reasons])

    def generate_texts(self, prompts: Sequence[str], max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                       stop: Sequence[str] = ()) -> list[str]:
        """Text generated for each prompt (one batch), cut before the first stop string; prompts are checked
        against the context length as plain generation checks them (`ComposedGenerator.fit_context`)."""
        return self.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop).text
