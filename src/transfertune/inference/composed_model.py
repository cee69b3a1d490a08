"""ComposedModel: a frozen base plus value models (and/or a proxy-tuning pair), sharing one vocabulary."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from transfertune.core.compose import Composition, VocabularyMismatchError, compose_logits, compose_logits_per_row
from transfertune.core.response_logits import composed_response_logprobs, input_device
from transfertune.core.value_model import ValueModel
from transfertune.io.data import IGNORE_INDEX, RightPadCollator, encode_example, pad_id_of
from transfertune.io.fingerprint import vocab_fingerprint
from transfertune.io.loading import context_length, load_base, real_vocab_size
from transfertune.io.validate import ContextLengthError, check_number
from transfertune.vocab.token_map import attach_value


class ComposedModel:
    """log_softmax(base) + sum_i w_i v_i / beta [+ alpha (log_softmax(tuned) - log_softmax(untuned))].

    A value model trained on another vocabulary is composed through a token map when `vocab_map` is given
    ("auto", "exact", "align" or a VocabMap; see cross_vocab.py), and refused when it is None.

    `models` lists every network that runs at each step, in a fixed order: base, values..., [tuned, untuned].
    """

    def __init__(
        self,
        base,
        tokenizer,
        values: Sequence = (),
        *,
        weights: Sequence[float] | None = None,
        beta: float | None = None,
        proxy: tuple | None = None,
        alpha: float = 1.0,
        base_name: str = "base",
        vocab_map=None,
        overlap: bool = False,
    ):
        self.base = base
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.value_models = [v for v in values if isinstance(v, ValueModel)]  # what the directories hold
        self.values = [attach_value(v, tokenizer, base_name, vocab_map) for v in values]
        configs = [v.config for v in values if isinstance(v, ValueModel)]
        self.beta = beta if beta is not None else (configs[0].beta if configs else 1.0)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.values)
        self.proxy = tuple(proxy) if proxy is not None else None
        self.alpha = alpha
        self.real_vocab_size = real_vocab_size(tokenizer)
        self.overlap = overlap
        self._pool = None
        if len(self.weights) != len(self.values):
            raise ValueError(f"{len(self.values)} value models but {len(self.weights)} weights")
        for i, w in enumerate(self.weights, start=1):
            check_number(w, f"weight {i}")
        check_number(self.beta, "beta", gt=0)
        check_number(alpha, "alpha")

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        values: Sequence[str] = (),
        *,
        proxy: tuple[str, str] | None = None,
        device="cpu",
        dtype=torch.float32,
        trust_remote_code: bool = False,
        device_map=None,
        value_device=None,
        **kwargs,
    ) -> ComposedModel:
        """Load by name or path: a base, value directories, and an optional (tuned, untuned) proxy pair.

        `dtype` is a torch dtype or "auto" (each checkpoint's own). `device_map` (e.g. "auto": accelerate spreads
        the base and the proxy models over the visible devices) replaces `device` for those models; value models
        go to `value_device` (default `device`). Logits are composed on the base's logits' device."""
        placed = dict(device_map=device_map) if device_map is not None else dict(device=device)
        base_model, tok = load_base(base, dtype=dtype, trust_remote_code=trust_remote_code, **placed)
        value_device = value_device if value_device is not None else device
        value_models = [ValueModel.load(v, device=value_device, dtype=dtype) for v in values]
        proxy_models = None
        if proxy is not None:
            fp = vocab_fingerprint(tok)
            proxy_models = []
            for name in proxy:
                model, ptok = load_base(name, dtype=dtype, trust_remote_code=trust_remote_code, **placed)
                if vocab_fingerprint(ptok) != fp:
                    raise VocabularyMismatchError(
                        f"proxy model '{name}' does not share the vocabulary of base '{base}'")
                proxy_models.append(model)
        return cls(base_model, tok, value_models, proxy=proxy_models, base_name=base, **kwargs)

    def overlap_pool(self):
        """With `overlap`, a thread pool (one thread per model after the base) for decoding steps: the value
        and proxy models run while the base runs, each in its own thread, and torch's threads are split between
        the models (the caller's thread keeps its share; benchmarks/overlap.py measures when this pays). None
        without it."""
        if not self.overlap or len(self.models) < 2:
            return None
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            share = max(1, torch.get_num_threads() // len(self.models))
            torch.set_num_threads(share)
            self._pool = ThreadPoolExecutor(max_workers=len(self.models) - 1, thread_name_prefix="transfertune-overlap",
                                            initializer=torch.set_num_threads, initargs=(share,))
        return self._pool

    @property
    def models(self) -> list:
        return [self.base, *self.values, *(self.proxy or ())]

    @property
    def device(self) -> torch.device:
        """Where token ids and the composition live: the base's input device."""
        return input_device(self.base)

    @property
    def context_length(self) -> int | None:
        """Tokens (prompt + generated) every model can attend over; None when no config says."""
        limits = [context_length(m) or context_length(getattr(m, "model", None)) for m in self.models]
        return min((n for n in limits if n), default=None)

    @property
    def composition(self) -> Composition:
        return Composition(tuple(self.weights), self.beta, self.alpha, self.real_vocab_size)

    def compose(self, step_logits: Sequence[torch.Tensor], *, weights=None, beta=None) -> torch.Tensor:
        """Composed logits from one logits tensor per model, in the order of `models`.

        `weights` / `beta` override the model's own: a list and a float for the whole batch, or tensors
        [B, n_values] / [B] giving each row its own (requests with different settings batched together).
        """
        n = len(self.values)
        base, values, rest = step_logits[0], step_logits[1 : 1 + n], step_logits[1 + n :]
        weights = self.weights if weights is None else weights
        beta = self.beta if beta is None else beta
        common = dict(proxy=tuple(rest) if self.proxy is not None else None, alpha=self.alpha,
                      real_vocab_size=self.real_vocab_size)
        if isinstance(weights, torch.Tensor) or isinstance(beta, torch.Tensor):
            rows = base.shape[0]
            if not isinstance(weights, torch.Tensor):
                weights = torch.tensor([list(weights)] * rows, dtype=torch.float64)
            if not isinstance(beta, torch.Tensor):
                beta = torch.full((rows,), float(beta), dtype=torch.float64)
            return compose_logits_per_row(base, values, weights=weights, beta=beta, **common)
        return compose_logits(base, values, weights=weights, beta=beta, **common)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, add_eos: bool = False,
        max_length: int | None = None, **kwargs,
    ) -> list[torch.Tensor]:
        """Per-token log-probs of each response given its prompt, under the composed distribution."""
        feats, _ = self.encode(prompts, responses, add_eos=add_eos, max_length=max_length)
        return self.score_features(feats, **kwargs)

    def encode(
        self, prompts: Sequence[str], responses: Sequence[str], *, add_eos: bool = False, max_length: int | None = None,
    ) -> tuple[list[dict], list[int]]:
        """(features to score, indices of the examples whose prompt lost tokens from the left to fit).

        `max_length` defaults to the context length. A response that does not fit with one prompt token is a
        ContextLengthError: scoring a cut response would report a number for text it never saw."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        limit = max_length or self.context_length
        feats, truncated = [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            feat = encode_example(self.tokenizer, {"prompt": p, "response": r}, None, add_eos=add_eos)
            n = len(feat["input_ids"])
            if limit is not None and n > limit:
                n_response = sum(1 for x in feat["labels"] if x != IGNORE_INDEX)
                if n_response > limit - 1:
                    raise ContextLengthError(
                        f"example {i + 1}: the response is {n_response} tokens; with a prompt token it does not "
                        f"fit in the context of {limit} tokens", index=i)
                feat = {k: v[n - limit:] for k, v in feat.items()}
                truncated.append(i)
            feats.append(feat)
        return feats, truncated
    def score_ids(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """Per-token log-probs of exact token ids (no re-tokenisation)."""
        feat = {"input_ids": list(prompt_ids) + list(response_ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)}
        return self.score_features([feat])[0]

    @torch.no_grad()
    def score_features(
        self, feats: list[dict], *, batch_size: int = 8, progress: bool = False, with_greedy: bool = False,
        chunk_size: int | None = None,
    ) -> list:
        """Log-probs of the labelled tokens of each feature dict; with_greedy also returns, per token, whether
        it is the composed argmax (lm-evaluation-harness's `is_greedy`). The vocabulary-wide work runs
        `chunk_size` response positions at a time (default: sequence.CHUNK_BYTES of logits), so memory does not
        grow with batch x length x vocabulary."""
        collate = RightPadCollator(pad_id_of(self.tokenizer))
        out: list = []
        for start in tqdm(range(0, len(feats), batch_size), desc="scoring", disable=not progress):
            batch = {k: t.to(self.device) for k, t in collate(feats[start : start + batch_size]).items()}
            res = composed_response_logprobs(
                self.base, self.values, **batch, composition=self.composition, proxy=self.proxy,
                chunk_size=chunk_size,
            )
            logp, greedy, rows = res.logprobs.cpu(), res.greedy.cpu(), res.rows.cpu()
            for row in range(len(batch["input_ids"])):
                sel = rows == row
                out.append((logp[sel], greedy[sel]) if with_greedy else logp[sel])
        return out

    def chat_template(self) -> tuple[str, list[str]]:
        """(template, notes): how to render chats for this composition, and one line per thing the user should
        know about that choice (`chat_template_of`)."""
        return chat_template_of(self.tokenizer, self.value_models, self.base_name)

    def chat_templates(self, choice: str = "trained") -> tuple[str, str | None, list[str]]:
        """(base side's template, value side's template or None = the same, notes) for a CHAT_TEMPLATE_CHOICES
        choice: "trained" renders the whole prompt with `chat_template()`; "base" with the base's own template
        (plain 'role: content' lines without one); "split" the value models' side with the template they were
        trained with and the base's side as "base" does."""
        if choice not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(f"chat template choice must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, got {choice!r}")
        trained, notes = self.chat_template()
        if choice == "trained":
            return trained, None, notes
        from transfertune.io.data import PLAIN_CHAT, template_text

        own = template_text(getattr(self.tokenizer, "chat_template", None)) or PLAIN_CHAT
        if choice == "base" or trained == own:
            return own, None, []
        return own, trained, []

    def generator(self):
        from transfertune.inference.generator import ComposedGenerator

        return ComposedGenerator(self)


CHAT_TEMPLATE_CHOICES = ("trained", "split", "base")  # generate --chat-template
OTHER_RENDERINGS = ("`generate --chat-template split` renders the value model's side with its template and the "
                    "base's with {base_side}, `--chat-template base` renders both so")


def chat_template_of(tokenizer, value_models: Sequence, base_name: str = "base") -> tuple[str, list[str]]:
    """(template, notes): how to render chats for a base (its tokenizer) composed with `value_models`
    (ValueModels), and one line per thing the user should know about that choice.

    The template is the one the first value model was trained with (its directory saves the training base's
    template, or records that chats were rendered as plain lines), else the base's, else data.PLAIN_CHAT."""
    from transfertune.io.data import PLAIN_CHAT, template_text

    base_template = template_text(getattr(tokenizer, "chat_template", None))
    notes, trained, source = [], None, None
    for value in value_models:
        name = value.directory or "the value model"
        if value.config.chat_format == "plain":
            mine = PLAIN_CHAT
        else:
            mine = template_text(getattr(value.tokenizer, "chat_template", None))
        if mine is None:
            notes.append(f"note: value directory {name} saves no chat template (trained before transfertune "
                         f"recorded it)")
        elif trained is None:
            trained, source = mine, name
        elif mine != trained:
            notes.append(f"warning: value models {source} and {name} were trained with different chat "
                         f"templates; rendering with the first one's")
    if trained == PLAIN_CHAT:
        notes.append(f"note: value model {source} was trained on chats rendered as plain 'role: content' lines "
                     f"(its training base has no chat template); rendering chats the same way")
        return trained, notes
    if trained is not None:
        if base_template is not None and base_template != trained:
            other = OTHER_RENDERINGS.format(base_side="its own")
            notes.append(f"warning: the chat template of base '{base_name}' differs from the one value "
                         f"model {source} was trained with; rendering chats with the trained template ({other})")
        elif base_template is None:
            other = OTHER_RENDERINGS.format(base_side="plain 'role: content' lines")
            notes.append(f"warning: base '{base_name}' has no chat template; rendering the whole prompt "
                         f"with the chat template value model {source} was trained with, so the base reads its "
                         f"markers as plain text. Other choices: {other}; or give prompts already rendered: "
                         f"`generate` without --chat, `score` rows with \"prompt\"/\"response\", or the "
                         f"server's /v1/completions")
        return trained, notes
    if base_template is not None:
        if value_models:
            notes.append(f"note: rendering chats with the chat template of base '{base_name}'")
        return base_template, notes
    where = "in the value directories or " if value_models else ""
    notes.append(f"note: no chat template {where}in base '{base_name}': rendering chats as plain "
                 f"'role: content' lines ending in 'assistant: ' (what `transfertune train` does for such bases)")
    return PLAIN_CHAT, notes
