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
from .sampling import SamplingParams, filter_logits
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
    """Batch-1 speculative decoding of `target` (a ComposedModel) with `draft_base` in place of its base."""

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
        self.eos_ids = target.generator().eos_ids
        self.stats = SpeculativeStats()

    @staticmethod
    def _forward(model, ids: list[int], cache):
        out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True)
        return out.logits[0].float(), out.past_key_values

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                     sampling: SamplingParams | None = None) -> list[int]:
        params = sampling or SamplingParams()
        gen = params.make_generator("cpu")
        values = self.target.values
        if len(prompt_ids) > 1:
            _, t_cache = self._forward(self.target.base, prompt_ids[:-1], None)
            _, d_cache = self._forward(self.draft_base, prompt_ids[:-1], None)
            v_caches = [self._forward(v, prompt_ids[:-1], None)[1] for v in values]
        else:
            t_cache = d_cache = None
            v_caches = [None] * len(values)
        committed = len(prompt_ids) - 1  # tokens every cache holds
        pending = prompt_ids[-1]
        out: list[int] = []
        k = self.draft_len
        while len(out) < max_new_tokens:
            k = min(k, max_new_tokens - len(out))
            drafted, draft_probs, value_rows = [], [], []
            token = pending
            for _ in range(k + 1):
                d_logits, d_cache = self._forward(self.draft_base, [token], d_cache)
                v_logits = []
                for j, v in enumerate(values):
                    logits, v_caches[j] = self._forward(v, [token], v_caches[j])
                    v_logits.append(logits[-1])
                value_rows.append(v_logits)
                if len(drafted) == k:
                    break
                q = step_probs(self.draft.compose([d_logits[-1], *v_logits])[None], params)[0]
                token = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=gen))
                drafted.append(token)
                draft_probs.append(q)
            t_logits, t_cache = self._forward(self.target.base, [pending, *drafted], t_cache)
            composed = torch.stack([self.target.compose([t_logits[i], *value_rows[i]]) for i in range(k + 1)])
            target_probs = step_probs(composed, params)
            accepted, next_token = verify_draft(target_probs, torch.stack(draft_probs), torch.tensor(drafted), gen)
            self.stats.rounds += 1
            self.stats.drafted += k
            self.stats.accepted += accepted
            self.stats.draft_lengths.append(k)
            new = drafted[:accepted] + [next_token]
            committed += 1 + accepted
            for cache in (t_cache, d_cache, *v_caches):
                keep_first(cache, committed)
            pending = next_token
            for t in new:
                out.append(t)
                if t in self.eos_ids or len(out) == max_new_tokens:
                    return out
            if self.adaptive:
                k = min(self.max_draft_len, k + 2) if accepted == k else max(1, k - 1)
        return out

    def generate(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingParams | None = None) -> str:
        ids = self.generate_ids(encode_prompt(self.tokenizer, prompt), max_new_tokens, sampling)
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)
