"""Speculative composed decoding: draft with (small base + value models), verify with (target base + same values).

The value models run once per position: the logits they produce while drafting are reused by the verifier,
which only adds one forward pass of the target base over the drafted tokens. Verification follows the
standard rule (Leviathan et al., 2023; Chen et al., 2023), so greedy output equals plain composed decoding
and sampled output follows the composed distribution exactly.

Cache invariant between rounds: every model has seen all committed tokens except the last one (`pending`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .composed import ComposedModel
from .cross_vocab import keep_first
from .data import encode_prompt
from .generation import left_pad
from .sampling import SamplingParams, filter_logits
from .sequence import input_device
from .vocab import vocab_fingerprint


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def step_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling rule draws from: one-hot of the argmax when greedy."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
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


class SpeculativeComposedGenerator:
    """Speculative decoding of `target` (a ComposedModel) with `draft_base` in place of its base."""

    def __init__(self, target: ComposedModel, draft_base, draft_tokenizer=None, *, draft_len: int = 4,
                 max_draft_len: int = 12, adaptive: bool = True):
        if target.proxy is not None:
            raise ValueError("speculative decoding supports base + value models, not proxy-tuning")
        from .cross_vocab import CrossVocabValue

        if any(getattr(v, "needs_base_logits", False) for v in target.values):
            raise ValueError("speculative decoding reuses the draft's value logits, so it needs residual value "
                             "models: a cascade value model reads its base, and the draft's base is another")
        if any(isinstance(v, CrossVocabValue) for v in target.values):
            raise ValueError("speculative decoding needs value models that share the base's vocabulary")
        if draft_tokenizer is not None and vocab_fingerprint(draft_tokenizer) != vocab_fingerprint(target.tokenizer):
            raise ValueError("the draft base must share the target's vocabulary")
        self.target = target
        self.draft_base = draft_base
        self.draft = ComposedModel(draft_base, target.tokenizer, target.values, weights=target.weights,
                                   beta=target.beta)
        self.tokenizer = target.tokenizer
        self.draft_len, self.max_draft_len, self.adaptive = draft_len, max_draft_len, adaptive
        generator = target.generator()
        self.eos_ids, self.pad_id = generator.eos_ids, generator.pad_id
        self.stats = SpeculativeStats()

    @staticmethod
    def _forward(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        dev = input_device(model)
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                    past_key_values=cache, use_cache=True)
        return out.logits.float().to(mask.device), out.past_key_values

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
        pool = self.target.overlap_pool()
        ids, mask = left_pad(prompt_ids, self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        models = [self.target.base, self.draft_base, *values]
        caches = [None] * len(models)
        if ids.shape[1] > 1:
            for i, m in enumerate(models):
                caches[i] = self._forward(m, ids[:, :-1], mask[:, :-1], positions[:, :-1], None)[1]
        pending, pos = ids[:, -1], positions[:, -1]  # the last prompt token (not in any cache) and its position
        out: list[list[int]] = [[] for _ in range(rows)]
        running = [True] * rows
        k, produced = self.draft_len, 0
        while any(running) and produced < max_new_tokens:
            k = min(k, max_new_tokens - produced - 1)  # a round commits at most k + 1 tokens
            drafted, draft_probs, value_rows = [], [], []
            token = pending
            for j in range(k + 1):
                step = (token[:, None], torch.cat([mask, mask.new_ones(rows, j)], -1), (pos + j)[:, None])
                # with the target's `overlap`, value models run in their own threads while the draft base runs
                running_values = [pool.submit(self._forward, v, *step, caches[2 + i]) for i, v in enumerate(values)] \
                    if pool is not None else None
                d_logits, caches[1] = self._forward(self.draft_base, *step, caches[1])
                v_logits = []
                for i, v in enumerate(values):
                    logits, caches[2 + i] = running_values[i].result() if running_values is not None else \
                        self._forward(v, *step, caches[2 + i])
                    v_logits.append(logits[:, -1])
                value_rows.append(v_logits)
                if j == k:
                    break
                q = step_probs(self.draft.compose([d_logits[:, -1], *v_logits]), params)
                token = q.argmax(-1) if params.greedy else torch.multinomial(q, 1, generator=gen)[:, 0]
                drafted.append(token)
                draft_probs.append(q)
            seq = torch.stack([pending, *drafted], 1)
            verify_mask = torch.cat([mask, mask.new_ones(rows, k)], -1)
            t_logits, caches[0] = self._forward(self.target.base, seq, verify_mask,
                                                pos[:, None] + torch.arange(k + 1), caches[0])
            composed = torch.stack([self.target.compose([t_logits[:, i], *value_rows[i]]) for i in range(k + 1)], 1)
            target_probs = step_probs(composed.flatten(0, 1), params).view(rows, k + 1, -1)
            drafted_rows = torch.stack(drafted, 1) if drafted else seq[:, :0]
            q_rows = torch.stack(draft_probs, 1) if draft_probs else target_probs[:, :0]
            verdicts = [verify_draft(target_probs[r], q_rows[r], drafted_rows[r], gen) for r in range(rows)]
            live = [r for r in range(rows) if running[r]]
            n = min(verdicts[r][0] for r in live)  # accepted drafted tokens committed to every row
            committed = [drafted_rows[r, :n].tolist() + [int(drafted_rows[r, n]) if verdicts[r][0] > n
                                                         else verdicts[r][1]] for r in range(rows)]
            self.stats.rounds += 1
            self.stats.drafted += k * len(live)
            self.stats.accepted += sum(verdicts[r][0] for r in live)
            self.stats.draft_lengths.append(k)
            for cache in caches:
                keep_first(cache, cache.get_seq_length() - (k - n))
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
            if self.adaptive:
                k = min(self.max_draft_len, k + 2) if n == k else max(1, k - 1)
            k = max(k, 1)
        return out

    def generate(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingParams | None = None) -> str:
        ids = self.generate_ids(encode_prompt(self.tokenizer, prompt), max_new_tokens, sampling)
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)
