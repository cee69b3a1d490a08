"""Speculative composed decoding: draft with (small base + value models), verify with (target base + same values).

The draft side (small base + value models) runs once per drafted position; for Llama models it runs as one
stacked network (fused_draft.py), which costs the ops of one small model. The value logits it produces are
reused by the verifier, which adds one pass of the target base over the drafted tokens. Verification follows
the standard rule (Leviathan et al., 2023; Chen et al., 2023), so greedy output equals plain composed decoding
(up to the rounding of the fused draft's values; `exact=True` removes even that) and sampled output follows
the composed distribution.

Cache invariant between rounds: every model has seen all committed tokens except the last one (`pending`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from transfertune.core.response_logits import cached_forward, input_device
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.generator import left_pad, text_before_stop
from transfertune.inference.sampling import SamplingParams, filter_logits
from transfertune.io.data import encode_prompt
from transfertune.io.fingerprint import vocab_fingerprint
from transfertune.vocab.token_map import keep_first


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # rows x rounds that ended at a rejected drafted token
    draft_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0  # spent drafting, over `draft_steps` steps
    draft_steps: int = 0
    verify_sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, y, xx, xy of (tokens, seconds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add_verification(self, tokens: int, seconds: float) -> None:
        for i, term in enumerate((1, tokens, seconds, tokens * tokens, tokens * seconds)):
            self.verify_sums[i] += term

    def verify_seconds(self, tokens: int) -> float:
        """Seconds to verify `tokens` tokens: the least-squares line through the verifications so far."""
        n, x, y, xx, xy = self.verify_sums
        spread = n * xx - x * x
        slope = max(0.0, (n * xy - x * y) / spread) if spread > 1e-9 else 0.0
        return (y - slope * x) / n + slope * tokens

    def best_draft_len(self, longest: int, rows: int = 1) -> int:
        """The draft length that commits the most tokens per second. With each drafted token accepted with
        probability a (a row's, estimated from every round so far, prior 3 of 4; a batch keeps a token only when
        all its rows accept it: a^rows), a round of k drafted tokens commits (1 - a^(k+1)) / (1 - a) tokens and
        costs k + 1 draft steps + the verification of k + 1 tokens, both timed as the run goes. The model pools
        every round, so a run of easy text does not make one length look better than another."""
        a = min((self.accepted + 3) / (self.accepted + self.rejected + 4), 0.99) ** rows
        step = self.draft_seconds / self.draft_steps

        def tokens_per_second(k):
            return (1 - a ** (k + 1)) / (1 - a) / ((k + 1) * step + self.verify_seconds(k + 1))

        return max(range(1, longest + 1), key=tokens_per_second)


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


class TransformersDraft:
    """The draft side through transformers: the draft base and each value model with a KV cache of its own (any
    architecture). With the target's `overlap`, value models run in their own threads beside the draft base."""

    def __init__(self, models: list, pool=None):
        self.models, self.pool = models, pool
        self.caches: list = [None] * len(models)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Logits [B, V] of every model at the last of `ids` [B, T]."""
        def run(i):
            logits, self.caches[i] = run_cached(self.models[i], ids, mask, positions, self.caches[i], keep=1)
            return logits[:, -1]

        futures = [self.pool.submit(run, i) for i in range(1, len(self.models))] if self.pool is not None else []
        first = run(0)
        return [first, *(f.result() for f in futures)] if futures else \
            [first, *(run(i) for i in range(1, len(self.models)))]

    @property
    def length(self) -> int:
        return self.caches[0].get_seq_length() if self.caches[0] is not None else 0

    def truncate(self, length: int) -> None:
        for cache in self.caches:
            keep_first(cache, length)


def run_cached(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, keep: int = 0):
    """(logits of the last `keep` positions (0: all) in float32 on mask's device, the updated KV cache)."""
    dev = input_device(model)
    out, cache = cached_forward(model, cache, input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                position_ids=positions.to(dev), logits_to_keep=keep)
    return out.logits.float().to(mask.device), cache


DRAFT_ENGINES = ("auto", "fused", "transformers")
EXPLORE = (1, 2, 1, 2)  # draft lengths of the first rounds with `adaptive`, times draft_len


def greedy_verdicts(composed: torch.Tensor, drafted: torch.Tensor) -> list[tuple[int, int]]:
    """`verify_draft` for greedy decoding, every row at once: a drafted token is kept while it is the target's
    argmax. composed [B, k+1, V] target logits, drafted [B, k]; returns (number accepted, next token) per row."""
    best = composed.argmax(-1)
    accepted = (drafted == best[:, : drafted.shape[1]]).long().cumprod(-1).sum(-1)
    return [(int(a), int(t)) for a, t in zip(accepted, best.gather(1, accepted[:, None])[:, 0])]


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

    `adaptive` picks each round's draft length from the acceptance and the costs measured so far
    (`SpeculativeStats.best_draft_len`); seeded sampling keeps `draft_len`, so that a seed gives the same
    tokens on every run.
    """

    def __init__(self, target: ComposedModel, draft_base, draft_tokenizer=None, *, draft_len: int = 4,
                 max_draft_len: int = 12, adaptive: bool = True, draft_engine: str = "auto", exact: bool = False):
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
        self.draft = ComposedModel(draft_base, target.tokenizer, target.values, weights=target.weights,
                                   beta=target.beta)
        self.tokenizer = target.tokenizer
        self.draft_len, self.max_draft_len, self.adaptive = draft_len, max_draft_len, adaptive
        self.recompute_values = self.fused and exact
        self.plain = target.generator()  # plain composed decoding: end-of-sequence ids, padding, context checks
        self.eos_ids, self.pad_id = self.plain.eos_ids, self.plain.pad_id
        self.stats = SpeculativeStats()

    def _draft_side(self, rows: int, max_len: int):
        if self.fused:
            return self.fused_draft.start(rows, max_len)
        return TransformersDraft([self.draft_base, *self.target.values], self.target.overlap_pool())

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                     sampling: SamplingParams | None = None) -> list[int]:
        return self.generate_batch([prompt_ids], max_new_tokens, sampling)[0]

    @torch.no_grad()
    def generate_batch(self, prompt_ids: list[list[int]], max_new_tokens: int = 64,
                       sampling: SamplingParams | None = None) -> list[list[int]]:
        """Token ids generated for each prompt (rows left-padded, one KV cache per model for the batch).

        Every round commits the same number of tokens to every running row: the shortest accepted prefix among
        them plus one token, the verifier's (a row that accepted more keeps its next drafted token, which the
        verifier accepted). Caches stay rectangular, and each row's output is what plain composed decoding gives
        (greedy) or follows the composed distribution (sampling)."""
        params = sampling or SamplingParams()
        gen = params.make_generator("cpu")
        values, rows = self.target.values, len(prompt_ids)
        ids, mask = left_pad(prompt_ids, self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        draft = self._draft_side(rows, ids.shape[1] + max_new_tokens + self.max_draft_len + 1)
        verifiers = [self.target.base, *(values if self.recompute_values else [])]
        caches = [None] * len(verifiers)
        if ids.shape[1] > 1:
            prefix = ids[:, :-1], mask[:, :-1], positions[:, :-1]
            draft.forward(*prefix)
            for i, m in enumerate(verifiers):
                caches[i] = run_cached(m, *prefix, None, keep=1)[1]
        pending, pos = ids[:, -1], positions[:, -1]  # the last prompt token (not in any cache) and its position
        out: list[list[int]] = [[] for _ in range(rows)]
        running = [True] * rows
        k, produced = self.draft_len, 0
        no_tokens = ids[:, :0]
        behind = no_tokens  # committed tokens before `pending` that the draft has not run on yet
        # the draft length follows measured times, so a seeded run, whose random draws depend on it, keeps its own
        adaptive = self.adaptive and (params.greedy or params.seed is None)
        while any(running) and produced < max_new_tokens:
            k = min(k, max_new_tokens - produced - 1)  # a round commits at most k + 1 tokens
            drafted, draft_probs, value_steps = [], [], []
            token = pending
            started = time.perf_counter()
            for j in range(k + 1):
                if j == k and self.recompute_values:
                    break  # the verifier computes the values after the last drafted token; the draft sees it later
                fed = torch.cat([behind, token[:, None]], 1) if j == 0 else token[:, None]
                d_logits, *v_logits = draft.forward(fed, torch.cat([mask, mask.new_ones(rows, j)], -1),
                                                    pos[:, None] + j + torch.arange(1 - fed.shape[1], 1))
                value_steps.append(v_logits)
                if j == k:
                    break
                composed = self.draft.compose([d_logits, *v_logits])
                if params.greedy:
                    token = composed.argmax(-1)
                else:
                    q = step_probs(composed, params)
                    token = torch.multinomial(q, 1, generator=gen)[:, 0]
                    draft_probs.append(q)
                drafted.append(token)
            seq = torch.stack([pending, *drafted], 1)
            verify_mask = torch.cat([mask, mask.new_ones(rows, k)], -1)
            verify_pos = pos[:, None] + torch.arange(k + 1)
            drafted_at = time.perf_counter()
            verified = []
            for i, m in enumerate(verifiers):
                logits, caches[i] = run_cached(m, seq, verify_mask, verify_pos, caches[i], keep=k + 1)
                verified.append(logits)
            self.stats.draft_seconds += drafted_at - started
            self.stats.draft_steps += k + 1
            self.stats.add_verification(k + 1, time.perf_counter() - drafted_at)
            value_logits = verified[1:] if self.recompute_values else \
                [torch.stack([step[i] for step in value_steps], 1) for i in range(len(values))]
            composed = self.target.compose([verified[0], *value_logits])  # [B, k + 1, V]
            drafted_rows = torch.stack(drafted, 1) if drafted else seq[:, :0]
            verdicts = greedy_verdicts(composed, drafted_rows) if params.greedy else \
                [verify_draft(step_probs(composed[r], params), torch.stack([q[r] for q in draft_probs])
                              if draft_probs else composed[r, :0], drafted_rows[r], gen) for r in range(rows)]
            live = [r for r in range(rows) if running[r]]
            n = min(verdicts[r][0] for r in live)  # accepted drafted tokens committed to every row
            committed = [drafted_rows[r, :n].tolist() + [int(drafted_rows[r, n]) if verdicts[r][0] > n
                                                         else verdicts[r][1]] for r in range(rows)]
            self.stats.rounds += 1
            self.stats.drafted += k * len(live)
            self.stats.accepted += sum(verdicts[r][0] for r in live)
            self.stats.rejected += sum(verdicts[r][0] < k for r in live)
            self.stats.draft_lengths.append(k)
            kept = mask.shape[1] + n  # every model keeps the committed tokens but the new pending one
            # the draft is behind only when every drafted token was kept (exact mode skips the last draft step)
            behind = seq[:, draft.length - kept :] if draft.length < kept else no_tokens
            draft.truncate(min(draft.length, kept))
            for cache in caches:
                keep_first(cache, kept)
            mask = torch.cat([mask, mask.new_ones(rows, n + 1)], -1)
            pending, pos, produced = torch.tensor([c[-1] for c in committed]), pos + n + 1, produced + n + 1
            for r in live:
                for t in committed[r]:
                    if t in self.eos_ids:
                        out[r].append(t)
                        running[r] = False
                        break
                    out[r].append(t)
                    if len(out[r]) == max_new_tokens:
                        running[r] = False
                        break
            if adaptive and self.stats.rounds >= len(EXPLORE):
                k = self.stats.best_draft_len(self.max_draft_len, len(live))
            elif adaptive:  # first rounds: two lengths, so that verification is timed at two token counts
                k = max(1, min(self.max_draft_len, self.draft_len * EXPLORE[self.stats.rounds]))
        return out

    def generate_texts(self, prompts: Sequence[str], max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                       stop: Sequence[str] = ()) -> list[str]:
        """Text generated for each prompt (one batch), cut before the first stop string; prompts are checked
        against the context length as plain generation checks them (`ComposedGenerator.fit_context`)."""
        ids, max_new_tokens = self.plain.fit_context(
            [encode_prompt(self.tokenizer, p) for p in prompts], max_new_tokens)
        return [text_before_stop(self.tokenizer, [t for t in row if t not in self.eos_ids], stop)
                for row in self.generate_batch(ids, max_new_tokens, sampling)]
