"""Issue #30, "what a newcomer tripped on": a value model's chat template on a base that has none is said, once;
`serve` refuses a base with sliding-window layers before loading any weights. Each test is a case of
docs/reliability.md ("Newcomer items (issue 30)"). Only tiny in-process models are used.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from cli_helpers import cli, no_model_loads

from transfertune.cli.main import main
from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel

VALUE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_TEMPLATE = "has no chat template; rendering the whole prompt with the chat template value model"


@pytest.fixture(scope="module")
def chat_value(tmp_path_factory, model_dir, tokenizer):
    """A value directory saved with a ChatML-like template (as one trained on SmolLM2 chats is)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = VALUE_TEMPLATE
    torch.manual_seed(7)
    value = ValueModel.create(f"random:{model_dir('llama', seed=7)}", tokenizer=tok, zero_init_head=False)
    out = tmp_path_factory.mktemp("newcomer") / "value"
    value.save(out)
    return str(out)


def no_template_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if NO_TEMPLATE in line]


def test_chat_template_notes_a_base_without_one(base, chat_value):
    cm = ComposedModel.from_pretrained(base, [chat_value])
    template, notes = cm.chat_template()
    assert template == VALUE_TEMPLATE
    assert len(notes) == 1 and notes[0].startswith(f"warning: base '{base}' has no chat template")
    assert "without --chat" in notes[0] and "/v1/completions" in notes[0]


def test_generate_chat_on_a_base_without_template_warns_once(capsys, base, chat_value, monkeypatch):
    from transfertune.inference import generator as generation

    seen = []
    original = generation.ComposedGenerator._encode
    monkeypatch.setattr(generation.ComposedGenerator, "_encode", lambda self, p: seen.extend(p) or original(self, p))
    capsys.readouterr()
    assert main(["generate", "--chat", "--base", base, "--value", chat_value, "--max-new-tokens", "2", "--jsonl",
                 "Is it good?"]) == 0
    out, err = capsys.readouterr()
    assert len(no_template_lines(err)) == 1
    assert "value model" in err and "plain text" in err
    assert seen[-1] == "<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"  # rendering unchanged
    assert len(out.strip().splitlines()) == 1 and "response" in json.loads(out)


def test_score_messages_on_a_base_without_template_warns_once(capsys, base, chat_value, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Review {i}"},
                                                     {"role": "assistant", "content": " yes"}]}) + "\n"
                            for i in range(3)))
    code, err = cli(capsys, "score", "--base", base, "--value", chat_value, "--data", data)
    assert code == 0, err
    assert len(no_template_lines(err)) == 1


def test_server_chat_on_a_base_without_template_logs_the_note_once(base, chat_value, caplog):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from transfertune.serving import create_app

    cm = ComposedModel.from_pretrained(base, [chat_value])
    with caplog.at_level(logging.WARNING), TestClient(create_app(cm, model_name="m")) as c:
        resp = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    assert len([r for r in caplog.records if NO_TEMPLATE in r.getMessage()]) == 1


# -- serve: sliding-window bases refused before loading -----------------------------------------------------
def sliding_model(arch: str, vocab: int, eos: int):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos, bos_token_id=eos,
                 pad_token_id=1)
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**sizes, use_sliding_window=True, sliding_window=16, max_window_layers=0))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**sizes, sliding_window=16))
    return Gemma3ForCausalLM(Gemma3TextConfig(**sizes, head_dim=8, sliding_window=16,
                                              layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3_text"])
def test_serve_refuses_a_sliding_window_base_before_loading(capsys, tmp_path, tokenizer, monkeypatch, arch):
    import transfertune.cli.serve as serve_cli

    path = tmp_path / arch
    sliding_model(arch, len(tokenizer), tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    no_model_loads(monkeypatch)
    monkeypatch.setattr(serve_cli, "load_composed", lambda *_: pytest.fail("models were loaded"))
    code, err = cli(capsys, "serve", "--base", path)
    assert code == 2 and "Traceback" not in err
    assert f"base '{path}' cannot be served by the native engine" in err
    assert "sliding-window" in err and "keeps full-attention KV caches only" in err
    assert "`transfertune generate`" in err and "--engine vllm" in err


def test_serve_passes_a_full_attention_base_on_to_loading(capsys, model_dir, monkeypatch):
    import transfertune.cli.serve as serve_cli

    loaded = []
    monkeypatch.setattr(serve_cli, "load_composed", lambda args: loaded.append(args.base) or pytest.fail("stop"))
    base = model_dir("qwen2", seed=2)  # Qwen2 without use_sliding_window: full attention
    with pytest.raises(pytest.fail.Exception):
        cli(capsys, "serve", "--base", base)
    assert loaded == [base]
