"""Lock-step decoding of a ComposedModel: every model keeps its own KV cache; the prefix is never recomputed.

The loop (`decode_steps`) only runs models and appends tokens; choosing a token is `sampling.sample_next`.
Batches are left-padded; position ids come from the attention mask, so padded rows match unpadded runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .composed import ComposedModel
from .data import encode_prompt, pad_id_of
from .sampling import SamplingParams, sample_next


@dataclass
class GenerationOutput:
    text: list[str]
    token_ids: list[list[int]]
    finish_reason: list[str]  # "eos" | "stop" | "length"


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

    def _left_pad(self, prompt_ids: list[list[int]]):
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids, mask

    @torch.no_grad()
    def decode_steps(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        finished: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next_tokens [B], composed_logits [B, V]) once per step.

        `finished` [B] bool may be set by the caller between steps (e.g. a stop string was seen); finished
        rows keep being fed the pad token, and the loop ends when every row is finished.
        """
        device = self.composed.device
        ids, mask = (t.to(device) for t in self._left_pad(prompt_ids))
        finished = finished if finished is not None else torch.zeros(len(prompt_ids), dtype=torch.bool)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [None] * len(self.composed.models)
        generator = params.make_generator(device)
        eos = torch.tensor(sorted(self.eos_ids), device=device, dtype=torch.long)
        step_ids = ids
        for _ in range(max_new_tokens):
            step_logits = []
            for i, model in enumerate(self.composed.models):
                out = model(
                    input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=caches[i], use_cache=True, logits_to_keep=1,
                )
                caches[i] = out.past_key_values
                step_logits.append(out.logits[:, -1])
            logits = self.composed.compose(step_logits)
            next_tokens = sample_next(logits, params, generator)
            next_tokens = torch.where(finished.to(device), torch.full_like(next_tokens, self.pad_id), next_tokens)
            yield next_tokens, logits
            finished |= torch.isin(next_tokens, eos).cpu()
            if bool(finished.all()):
                return
            step_ids = next_tokens[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, p) for p in prompts]

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationOutput:
        """Generate for a batch of prompts. Text stops before the first stop string (which is not included)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = sampling or SamplingParams()
        n = len(prompts)
        finished = torch.zeros(n, dtype=torch.bool)
        tokens: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        for next_tokens, _ in self.decode_steps(self._encode(prompts), max_new_tokens, sampling, finished):
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
        texts = []
        for toks in tokens:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            cut = _find_stop(text, stop)
            texts.append(text if cut is None else text[:cut])
        return GenerationOutput(texts, tokens, reasons)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield pieces of text as they are decoded. Text that may still turn into a stop string, or an
        incomplete UTF-8 character, is held back until it is settled."""
        sampling = sampling or SamplingParams()
        hold = max((len(s) for s in stop), default=1) - 1
        tokens: list[int] = []
        sent = 0
        text = ""
        for next_tokens, _ in self.decode_steps(self._encode([prompt]), max_new_tokens, sampling):
            t = int(next_tokens[0])
            if t in self.eos_ids:
                break
            tokens.append(t)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _find_stop(text, stop)
            if cut is not None:
                text = text[:cut]
                break
            ready = len(text) - hold
            while ready > sent and text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        if len(text) > sent:
            yield text[sent:]


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
