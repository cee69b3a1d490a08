"""Sliding-window bases (Gemma-3, Mistral, Qwen-2.5 with `use_sliding_window`) in the server's decode batch.

Rows join and leave a `DecodeBatch` between steps; a sliding-window KV cache layer keeps only a row's last
`sliding_window - 1` slots and counts the rest (`inference/generator.batch_layers`). Every model here has a window
of 8 tokens and the prompts are longer, so the window decides the numbers; a row must decode as it would alone,
and as transformers' own `generate` decodes it. The last test serves a tiny Gemma-3 with a value model of another
vocabulary through `transfertune serve --vocab-map auto` and the official openai client (issue #30).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from cli_helpers import wait_until_serving
from decode_helpers import join_and_leave

from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm
from transfertune.vocab.token_map import CrossVocabValue, VocabMap

WINDOW = 8
PROMPTS = ["The cat sat on the mat. The dog ran to the park", "It was the best of times, it was", "Answer:"]


def sliding_model(arch: str, vocab: int, eos: int, seed: int, window: int = WINDOW):
    """A tiny model whose attention reaches back `window` tokens (Gemma-3: in its sliding layers only)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos, bos_token_id=eos,
                 pad_token_id=1)
    torch.manual_seed(seed)
    if arch == "qwen2":
        config = Qwen2Config(**sizes, use_sliding_window=True, sliding_window=window, max_window_layers=1)
        return Qwen2ForCausalLM(config).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**sizes, sliding_window=window)).eval()
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(**sizes, head_dim=8, sliding_window=window,
                                              layer_types=layer_types)).eval()


def cache_kinds(model, ids) -> set[str]:
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    return {type(layer).__name__ for layer in cache.layers}


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral", "qwen2"])
def test_sliding_window_rows_join_and_leave_like_solo_runs(tokenizer, arch):
    """Row 1 (10 prompt tokens) and row 0 (22) start together, row 2 (3) joins at step 3, row 0 leaves after
    step 4; 14 steps take every row past the window. Each row's composed logits equal its solo run's."""
    base = sliding_model(arch, len(tokenizer), tokenizer.eos_token_id, seed=1)
    value = sliding_model(arch, len(tokenizer), tokenizer.eos_token_id, seed=2)
    cm = ComposedModel(base, tokenizer, [value], beta=0.8)
    gen = cm.generator()
    gen.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len(ids[0]) > 2 * WINDOW and len(ids[1]) > WINDOW
    assert "DynamicSlidingWindowLayer" in cache_kinds(base, ids[0])

    def solo(prompt_ids, steps, composed=cm):
        g = composed.generator()
        g.eos_ids = set()
        return torch.stack([lg[0] for _, lg in g.decode_steps([prompt_ids], steps, SamplingParams())])

    seen = join_and_leave(cm, gen, ids, 14)
    for r, n in ((0, 5), (1, 14), (2, 11)):
        torch.testing.assert_close(torch.stack(seen[r]), solo(ids[r], n), atol=1e-4, rtol=1e-4)

    # the window matters: the same weights reaching back over the whole prompt give other numbers
    wide = [sliding_model(arch, len(tokenizer), tokenizer.eos_token_id, seed=s, window=256) for s in (1, 2)]
    unwindowed = solo(ids[0], 5, ComposedModel(wide[0], tokenizer, [wide[1]], beta=0.8))
    assert (unwindowed - torch.stack(seen[0])).abs().max() > 1e-3


def test_sliding_window_batch_decodes_what_hf_generate_decodes(tokenizer):
    """Greedy decoding of the base alone, a left-padded batch, equals transformers' generate token for token."""
    base = sliding_model("gemma3_text", len(tokenizer), tokenizer.eos_token_id, seed=1)
    gen = ComposedModel(base, tokenizer, []).generator()
    gen.eos_ids = set()
    ours = gen.generate(PROMPTS, max_new_tokens=16).token_ids
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    theirs = base.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert ours == theirs[:, enc.input_ids.shape[1]:].tolist()


def test_the_engine_serves_a_sliding_window_base_with_rows_joining_and_leaving(tokenizer, other_tokenizer,
                                                                                model_dir):
    """The server's engine (driven by hand, no thread): a Gemma-3 base and a value model of another vocabulary;
    rows admitted at steps 0 and 6 with different lengths decode exactly what `generate` gives each alone."""
    pytest.importorskip("fastapi")
    from transfertune.serving import Engine, Row

    base = sliding_model("gemma3_text", len(tokenizer), tokenizer.eos_token_id, seed=1)
    value = CrossVocabValue(load_causal_lm(model_dir("llama", seed=10, tok=other_tokenizer)), other_tokenizer,
                            tokenizer, VocabMap.exact(tokenizer, other_tokenizer))
    cm = ComposedModel(base, tokenizer, [value], beta=0.8)
    engine = Engine(cm, max_batch=8)
    engine.check_batching()
    first = [Row(encode_prompt(tokenizer, PROMPTS[i]), n, ignore_eos=True) for i, n in ((0, 5), (1, 14))]
    later = [Row(encode_prompt(tokenizer, PROMPTS[i]), n, ignore_eos=True) for i, n in ((2, 9), (0, 7))]
    engine.submit(first)
    engine._admit()
    for step in range(40):
        if step == 6:
            engine.submit(later)
            engine._admit()
        if not engine._rows:
            break
        engine._step()
    gen = cm.generator()
    gen.eos_ids = set()
    for row, (i, n) in zip(first + later, ((0, 5), (1, 14), (2, 9), (0, 7))):
        assert row.text.tokens == gen.generate([PROMPTS[i]], max_new_tokens=n).token_ids[0]


@pytest.fixture()
def gemma_and_other_vocab_value(tmp_path, tokenizer, other_tokenizer, model_dir):
    gemma = tmp_path / "gemma"
    sliding_model("gemma3_text", len(tokenizer), tokenizer.eos_token_id, seed=1).save_pretrained(gemma)
    tokenizer.save_pretrained(gemma)
    torch.manual_seed(10)
    value = ValueModel.create(f"random:{model_dir('llama', seed=10, tok=other_tokenizer)}", tokenizer=other_tokenizer,
                              zero_init_head=False, beta=0.8)
    value.save(tmp_path / "value")
    return str(gemma), str(tmp_path / "value")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_a_sliding_window_base_with_another_vocabulary_through_the_openai_client(gemma_and_other_vocab_value):
    """`transfertune serve --base GEMMA --value V --vocab-map auto` (V: another tokenizer) in a subprocess; four
    concurrent requests of different lengths (rows join and leave) each get the text `generate` gives alone."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    gemma, value = gemma_and_other_vocab_value
    port = free_port()
    argv = ["serve", "--base", gemma, "--value", value, "--vocab-map", "auto", "--port", str(port),
            "--served-model-name", "g"]
    proc = subprocess.Popen([sys.executable, "-m", "transfertune.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_serving(proc, port, 90, lambda: proc.stdout.read().decode())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        asks = [(PROMPTS[0], 12), (PROMPTS[1], 4), (PROMPTS[2], 9), (PROMPTS[0], 2)]

        def ask(prompt_and_n):
            prompt, n = prompt_and_n
            return client.completions.create(model="g", prompt=prompt, max_tokens=n, temperature=0).choices[0]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, asks))
    finally:
        proc.terminate()
        proc.wait(20)
    cm = ComposedModel.from_pretrained(gemma, [value], vocab_map="auto")
    assert isinstance(cm.values[0], CrossVocabValue)
    for (prompt, n), answer in zip(asks, answers):
        alone = cm.generator().generate([prompt], max_new_tokens=n)
        assert answer.text == alone.text[0]
        assert answer.finish_reason == ("length" if alone.finish_reason[0] == "length" else "stop")
