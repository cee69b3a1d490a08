"""Tiny models and tokenizers built in-process: no downloads, a few seconds in all."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TEXT = (
    "The cat sat on the mat. The dog ran to the park and back again. "
    "Question: is the review positive? Answer: yes. Answer: no. Sports, Business, World, Science. "
    "It was the best of times, it was the worst of times, it was the age of wisdom. "
) * 20

EOS = "<|endoftext|>"


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token="<|pad|>")


def make_model(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, eos_id: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos_id,
            bos_token_id=eos_id, pad_token_id=1,
        )
        return LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos_id,
            bos_token_id=eos_id, pad_token_id=1,
        )
        return Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, eos_token_id=eos_id,
            bos_token_id=eos_id, pad_token_id=1,
        )
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer(320)


@pytest.fixture(scope="session")
def other_tokenizer():
    return make_tokenizer(300)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """save(arch, name, hidden=..., seed=...) -> path of a saved tiny model sharing `tokenizer`."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def save(arch="llama", name=None, hidden=32, layers=2, seed=0, tok=None, vocab_pad=0):
        tok = tok or tokenizer
        key = (arch, name, hidden, layers, seed, id(tok), vocab_pad)
        if key not in cache:
            path = root / (name or f"{arch}-{hidden}-{layers}-{seed}-{len(tok)}-{vocab_pad}")
            make_model(arch, len(tok) + vocab_pad, hidden, layers, seed, tok.eos_token_id).save_pretrained(path)
            tok.save_pretrained(path)
            cache[key] = str(path)
        return cache[key]

    return save


@pytest.fixture(scope="session")
def yes_no_records():
    return [
        {"prompt": f"Review {i}: the movie was {'great' if i % 2 else 'awful'}. Positive?",
         "response": " yes" if i % 2 else " no"}
        for i in range(24)
    ]


@pytest.fixture(scope="module")
def base(model_dir):
    """A tiny llama base (the CLI and reliability tests)."""
    return model_dir("llama", seed=3)


@pytest.fixture()
def data_file(tmp_path, yes_no_records):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    return path
