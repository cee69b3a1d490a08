"""Issue #30, "what a newcomer tripped on": a value model's chat template on a base that has none is said, once;
`serve` takes a base with sliding-window layers, and refuses one with linear-attention layers before loading any
weights. Each test is a case of docs/reliability.md ("Newcomer items (issue 30)"). Only tiny in-process models are
used.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from cli_helpers import cli, no_model_loads
from test_sliding_window_serving import sliding_model

from transfertune.cli.main import main
from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import PLAIN_CHAT, encode_prompt

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
    assert "`generate --chat-template split` renders the value model's side with its template and the base's with " \
           "plain 'role: content' lines" in notes[0]
    assert cm.chat_templates("split") == (PLAIN_CHAT, VALUE_TEMPLATE, [])
    assert cm.chat_templates("base") == (PLAIN_CHAT, None, [])
    assert cm.chat_templates("trained") == (VALUE_TEMPLATE, None, notes)


def test_split_rendering_is_the_composition_of_each_side_on_its_own_prompt(base, chat_value):
    """generate(prompt, value_prompts=...) composes the base on its prompt with the value model on its own, token
    for token as full forward passes over each side's text do."""
    cm = ComposedModel.from_pretrained(base, [chat_value])
    plain, chatml = "user: Is it good?\nassistant: ", "<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"
    gen = cm.generator()
    gen.eos_ids = set()
    out = gen.generate([plain], max_new_tokens=6, value_prompts=[chatml]).token_ids[0]
    base_ids, value_ids, expected = encode_prompt(cm.tokenizer, plain), encode_prompt(cm.tokenizer, chatml), []
    with torch.no_grad():
        for _ in range(6):
            logits = [cm.base(input_ids=torch.tensor([base_ids + expected])).logits[:, -1],
                      cm.values[0](input_ids=torch.tensor([value_ids + expected])).logits[:, -1]]
            expected.append(int(cm.compose(logits).argmax(-1)))
    assert out == expected
    assert out != gen.generate([plain], max_new_tokens=6).token_ids[0] or \
        out != gen.generate([chatml], max_new_tokens=6).token_ids[0]  # the value side's prompt changes something


@pytest.mark.parametrize("choice, base_side, value_side", [
    ("split", "user: Is it good?\nassistant: ", "<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"),
    ("base", "user: Is it good?\nassistant: ", None),
])
def test_generate_chat_template_choices_render_each_side(capsys, base, chat_value, monkeypatch, choice, base_side,
                                                          value_side):
    from transfertune.inference import generator as generation

    seen = []
    original = generation.ComposedGenerator.generate
    def recording(self, prompts, **kw):
        seen.append((list(prompts), kw.get("value_prompts")))
        return original(self, prompts, **kw)

    monkeypatch.setattr(generation.ComposedGenerator, "generate", recording)
    code, err = cli(capsys, "generate", "--chat", "--chat-template", choice, "--base", base, "--value", chat_value,
                    "--max-new-tokens", "2", "Is it good?")
    assert code == 0, err
    assert no_template_lines(err) == []  # the user chose: nothing to warn about
    assert seen == [([base_side], None if value_side is None else [value_side])]
    code, err = cli(capsys, "generate", "--chat", "--chat-template", choice, "--stream", "--base", base, "--value",
                    chat_value, "--max-new-tokens", "2", "Is it good?")
    assert code == 0, err


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


# -- serve: which bases the decode batch takes, from the config ---------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3_text"])
def test_serve_passes_a_sliding_window_base_on_to_loading(capsys, tmp_path, tokenizer, monkeypatch, arch):
    """Sliding-window layers are served (tests/test_sliding_window_serving.py): the check lets them through."""
    import transfertune.cli.serve as serve_cli

    path = tmp_path / arch
    sliding_model(arch, len(tokenizer), tokenizer.eos_token_id, seed=0, window=16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded = []
    monkeypatch.setattr(serve_cli, "load_composed", lambda args: loaded.append(args.base) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        cli(capsys, "serve", "--base", path)
    assert loaded == [str(path)]


def test_serve_refuses_a_linear_attention_base_before_loading(capsys, tmp_path, tokenizer, monkeypatch):
    """A hybrid model with linear-attention layers (Qwen3-Next: a recurrent state, no per-token KV) is refused
    from its config.json, before any weights load."""
    from transformers import AutoConfig

    path = tmp_path / "qwen3-next"
    AutoConfig.for_model("qwen3_next", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    no_model_loads(monkeypatch)
    import transfertune.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "load_composed", lambda *_: pytest.fail("models were loaded"))
    code, err = cli(capsys, "serve", "--base", path)
    assert code == 2 and "Traceback" not in err
    assert f"base '{path}' cannot be served by the native engine" in err
    assert "LinearAttentionLayer" in err and "`transfertune generate`" in err


def test_serve_passes_a_full_attention_base_on_to_loading(capsys, model_dir, monkeypatch):
    import transfertune.cli.serve as serve_cli

    loaded = []
    monkeypatch.setattr(serve_cli, "load_composed", lambda args: loaded.append(args.base) or pytest.fail("stop"))
    base = model_dir("qwen2", seed=2)  # Qwen2 without use_sliding_window: full attention
    with pytest.raises(pytest.fail.Exception):
        cli(capsys, "serve", "--base", base)
    assert loaded == [base]
