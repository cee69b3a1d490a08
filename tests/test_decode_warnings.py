"""Decoding passes KV caches the way the installed transformers takes them: no deprecation warning per step.

transformers renamed the cache keyword `past_key_values` to `cache` (the old name warns, once per call, that it
will be removed); `core.response_logits.cached_forward` passes whichever name each model's forward takes.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from transfertune.core.cascade import CascadeValue
from transfertune.core.response_logits import cache_keyword, cached_forward
from transfertune.core.value_model import LoraSettings, ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.inference.speculative import SpeculativeComposedGenerator
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm
from transfertune.serving.engine import Engine, Row
from transfertune.vocab.token_map import CrossVocabValue, VocabMap

PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]


@contextmanager
def no_deprecation_warnings():
    """Fails when the block raises a DeprecationWarning or FutureWarning, or transformers logs a deprecation
    (`past_key_values` read from an output is logged once per process: the once-cache is cleared first)."""
    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        library.removeHandler(handler)
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    deprecations += [f"log: {r.getMessage()}" for r in logged if "deprecat" in r.getMessage().lower()]
    assert not deprecations, "\n".join(deprecations)


def composed(model_dir, tokenizer, arch="llama", values=None):
    base = load_causal_lm(model_dir(arch, hidden=48, seed=1))
    values = values if values is not None else [load_causal_lm(model_dir(arch, seed=10))]
    return ComposedModel(base, tokenizer, values, beta=0.8)


def greedy_steps(cm, prompts, n):
    """(tokens [B, n], composed logits [B, n, V]) of plain greedy decoding."""
    gen = cm.generator()
    gen.eos_ids = set()
    steps = list(gen.decode_steps([encode_prompt(cm.tokenizer, p) for p in prompts], n, SamplingParams()))
    return torch.stack([t for t, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_composed_decoding_does_not_warn(model_dir, tokenizer, arch):
    cm = composed(model_dir, tokenizer, arch)
    with no_deprecation_warnings():
        out = cm.generator().generate(PROMPTS, max_new_tokens=4)
        list(cm.generator().stream(PROMPTS[0], max_new_tokens=4))
    assert all(len(tokens) <= 4 for tokens in out.token_ids)


def test_cascade_and_cross_vocab_values_do_not_warn(model_dir, tokenizer, other_tokenizer):
    cascade = CascadeValue(load_causal_lm(model_dir("llama", seed=10)))
    cross = CrossVocabValue(load_causal_lm(model_dir("llama", seed=11, tok=other_tokenizer)), other_tokenizer,
                            tokenizer, VocabMap.exact(tokenizer, other_tokenizer))
    for value in (cascade, cross):
        cm = composed(model_dir, tokenizer, values=[value])
        with no_deprecation_warnings():
            greedy_steps(cm, PROMPTS, 4)


@pytest.mark.parametrize("engine", ["transformers", "fused"])
def test_speculative_decoding_does_not_warn(model_dir, tokenizer, engine):
    cm = composed(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(cm, load_causal_lm(model_dir("llama", seed=2)), draft_len=3,
                                        draft_engine=engine)
    with no_deprecation_warnings():
        spec.generate_batch([encode_prompt(tokenizer, p) for p in PROMPTS], 6)
        spec.generate_ids(encode_prompt(tokenizer, PROMPTS[0]), 6, SamplingParams(temperature=1.0, seed=0))


def test_server_engine_steps_do_not_warn(model_dir, tokenizer):
    """Rows join, decode and leave (their caches are selected, trimmed and merged) without warnings."""
    cm = composed(model_dir, tokenizer)
    engine = Engine(cm, max_batch=2)
    rows = [Row(encode_prompt(tokenizer, p), n, ignore_eos=True) for p, n in zip(PROMPTS, (3, 5, 4))]
    with no_deprecation_warnings():
        engine.check_batching()
        engine.submit(rows)
        while engine._rows or engine._waiting:
            engine._admit()
            engine._step()
    assert [row.generated for row in rows] == [3, 5, 4]


def test_a_lora_value_model_gets_its_cache_through_peft(model_dir, tokenizer):
    """peft passes the cache keyword on to the model it wraps: its adapters start at zero, so decoding through it
    equals decoding the wrapped model, step by step."""
    value = ValueModel.create(model_dir("llama", seed=10), tokenizer=tokenizer, zero_init_head=False,
                              lora=LoraSettings(r=2))
    with no_deprecation_warnings():
        tokens, logits = greedy_steps(composed(model_dir, tokenizer, values=[value.model]), PROMPTS, 6)
    ref_tokens, ref_logits = greedy_steps(composed(model_dir, tokenizer, values=[value.model.get_base_model()]),
                                          PROMPTS, 6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits)


@dataclass
class _LegacyOutput:
    logits: torch.Tensor
    past_key_values: object = None


class _LegacyNamed(nn.Module):
    """A model whose forward still takes and returns its cache as `past_key_values` (earlier transformers 5.x
    releases, remote code written for them)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def get_input_embeddings(self):
        return self.net.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        assert use_cache, "only decoding runs this model"
        out, cache = cached_forward(self.net, past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, logits_to_keep=logits_to_keep)
        return _LegacyOutput(out.logits, cache)


def test_a_model_with_the_old_keyword_gets_its_cache_under_that_name(model_dir, tokenizer):
    value = load_causal_lm(model_dir("llama", seed=10))
    legacy = _LegacyNamed(value)
    assert cache_keyword(legacy) == "past_key_values"
    assert cache_keyword(CascadeValue(value)) == cache_keyword(value)  # a wrapper answers for the model inside
    tokens, logits = greedy_steps(composed(model_dir, tokenizer, values=[legacy]), PROMPTS, 6)
    ref_tokens, ref_logits = greedy_steps(composed(model_dir, tokenizer, values=[value]), PROMPTS, 6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits)
