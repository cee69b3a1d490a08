"""lm-evaluation-harness adapter: evaluate a composed model (base + value models, or proxy-tuning).

    python -m transfertune.evaluation.lm_eval --model transfertune \\
        --model_args base=mini-l,value=runs/ag-value,beta=1 --tasks my_task --include_path my_tasks/

That is lm-eval's own command line, with the "transfertune" model registered first (the plain `lm_eval`
command cannot see models of other packages). From Python: `import transfertune.evaluation.lm_eval`, then
`lm_eval.simple_evaluate(model="transfertune", model_args="base=...,value=...")`.
model_args: base, value (several joined with ':'), weights (':'-joined), beta, proxy_tuned, proxy_untuned,
alpha, batch_size, max_length, device, trust_remote_code.
"""
from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.io.data import IGNORE_INDEX, encode_prompt


def _as_bool(x) -> bool:
    return str(x).lower() in ("1", "true", "yes")


@register_model("transfertune")
class TransfertuneLM(LM):
    def __init__(self, base: str, value: str = "", weights: str = "", beta=None, proxy_tuned: str = "",
                 proxy_untuned: str = "", alpha=1.0, batch_size=8, max_length=None, device: str = "cpu",
                 trust_remote_code=False, composed: ComposedModel | None = None, **_):
        super().__init__()
        proxy = (proxy_tuned, proxy_untuned) if proxy_tuned else None
        self.cm = composed or ComposedModel.from_pretrained(
            base, [v for v in str(value).split(":") if v], proxy=proxy,
            weights=[float(w) for w in str(weights).split(":")] if weights else None,
            beta=float(beta) if beta is not None else None, alpha=float(alpha), device=device,
            trust_remote_code=_as_bool(trust_remote_code),
        )
        self.tokenizer = self.cm.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        ctx = getattr(self.cm.base.config, "max_position_embeddings", 2048)
        self.max_length = int(max_length) if max_length else ctx

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        feats = []
        for ctx, cont in pairs:
            ids = (ctx + cont)[-self.max_length :]
            n_ctx = len(ids) - len(cont)
            feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_ctx + ids[n_ctx:]})
        scored = self.cm.score_features(feats, batch_size=self.batch_size, with_greedy=True)
        return [(float(lp.sum()), bool(g.all())) for lp, g in scored]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            context, continuation = req.args
            # a trailing space of the context belongs to the continuation's first token, as in lm-eval's HFLM
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = encode_prompt(self.tokenizer, context)
            whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            plain_ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = whole[len(plain_ctx):] if whole[: len(plain_ctx)] == plain_ctx else \
                self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            pairs.append((ctx, cont))
        out = []
        for i in tqdm(range(0, len(pairs), 64), disable=disable_tqdm, desc="loglikelihood"):
            out.extend(self._score(pairs[i : i + 64]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(ids, prefix, self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        gen = self.cm.generator()
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = req.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            res = gen.generate([context], max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                               sampling=SamplingParams(temperature=temperature), stop=until, truncate_prompts=True)
            out.append(res.text[0])
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
