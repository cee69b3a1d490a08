"""Issue #30: flags refused at parse time naming the flag, the server's read deadlines, connection cap and API key
over its docs, and its 400s in the API's own words. Each test is a case of docs/reliability.md ("Flags and the
server (issue 30)"). Only the tiny in-process models of conftest.py are used.
"""
from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cli_helpers import cli, wait_until_serving
from fastapi.testclient import TestClient  # noqa: E402

from transfertune.cli.main import main  # noqa: E402
from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.loading import load_causal_lm  # noqa: E402
from transfertune.io.validate import InputError  # noqa: E402
from transfertune.serving import create_app  # noqa: E402
from transfertune.training.recipe import ValueRecipe  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture()
def nothing_loads(monkeypatch):
    """`serve` must refuse before loading a model or starting a server."""
    import transfertune.cli.serve as serve_cli
    import transfertune.serving.app as app

    def refuse(*_, **__):
        raise AssertionError("got past the checks")

    monkeypatch.setattr(serve_cli, "load_composed", refuse)
    monkeypatch.setattr(app, "serve", refuse)


# -- flags refused at parse time -------------------------------------------------------------------------
@pytest.mark.parametrize("value,problem", [("70000", "must be <= 65535"), ("-1", "must be >= 0"),
                                           ("80.5", "expected an integer")])
def test_serve_port_out_of_range_is_refused_naming_the_flag(capsys, base, nothing_loads, value, problem):
    code, err = cli(capsys, "serve", "--base", base, "--port", value)
    assert code == 2 and "argument --port" in err and problem in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_serve_max_model_len_below_one_is_refused(capsys, base, nothing_loads, value):
    code, err = cli(capsys, "serve", "--base", base, "--max-model-len", value)
    assert code == 2 and "argument --max-model-len: must be >= 1" in err


def test_serve_max_model_len_past_the_base_context_is_refused_before_loading(capsys, base, nothing_loads):
    code, err = cli(capsys, "serve", "--base", base, "--max-model-len", 70000)
    assert code == 2
    assert "--max-model-len 70000 is more than the context window of base" in err and "(256 tokens)" in err


def test_serve_max_model_len_past_a_value_models_context_is_refused_after_loading(capsys, base, tokenizer,
                                                                                 tmp_path, monkeypatch):
    """The base allows 256 positions, the value model 64: the loaded composition's window decides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import transfertune.serving.app as app

    short = tmp_path / "short"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, eos_token_id=0, bos_token_id=0,
                                 pad_token_id=1)).save_pretrained(short)
    tokenizer.save_pretrained(short)
    ValueModel.create(f"random:{short}", tokenizer=tokenizer).save(tmp_path / "value")
    served = []
    monkeypatch.setattr(app, "serve", lambda composed, **kw: served.append(kw))
    code, err = cli(capsys, "serve", "--base", base, "--value", tmp_path / "value", "--max-model-len", 128)
    assert code == 2 and not served
    assert "--max-model-len 128 is more than the composed models' context window (64 tokens" in err
    assert cli(capsys, "serve", "--base", base, "--value", tmp_path / "value", "--max-model-len", 64)[0] == 0
    assert served[-1]["max_model_len"] == 64


def test_serve_connection_flags_reach_the_server(capsys, base, monkeypatch):
    import transfertune.cli.serve as serve_cli
    import transfertune.serving.app as app

    served = []
    monkeypatch.setattr(app, "serve", lambda composed, **kw: served.append(kw))
    assert cli(capsys, "serve", "--base", base)[0] == 0
    defaults = served[-1]
    assert (defaults["timeout_keep_alive"], defaults["timeout_header"], defaults["timeout_body"],
            defaults["max_connections"]) == (app.TIMEOUT_KEEP_ALIVE, app.TIMEOUT_HEADER, app.TIMEOUT_BODY,
                                             app.MAX_CONNECTIONS)
    assert (serve_cli.TIMEOUT_KEEP_ALIVE, serve_cli.TIMEOUT_HEADER, serve_cli.TIMEOUT_BODY,
            serve_cli.MAX_CONNECTIONS) == (app.TIMEOUT_KEEP_ALIVE, app.TIMEOUT_HEADER, app.TIMEOUT_BODY,
                                           app.MAX_CONNECTIONS)
    assert cli(capsys, "serve", "--base", base, "--timeout-keep-alive", 2, "--timeout-header", 3,
               "--timeout-body", 4, "--max-connections", 5)[0] == 0
    assert {k: served[-1][k] for k in ("timeout_keep_alive", "timeout_header", "timeout_body", "max_connections")} \
        == {"timeout_keep_alive": 2, "timeout_header": 3, "timeout_body": 4, "max_connections": 5}
    for flag, value in [("--timeout-header", 0), ("--timeout-body", -1), ("--max-connections", 0),
                        ("--max-batch", 0), ("--max-queue", -5)]:
        code, err = cli(capsys, "serve", "--base", base, flag, value)
        assert code == 2 and f"argument {flag}" in err


@pytest.mark.parametrize("flag,value,problem", [
    ("--lora-r", "99999999999999999999", "must be <= 65536"),
    ("--batch-size", "99999999999999999999", "must be <= 2147483647"),
    ("--grad-accum", "99999999999999999999", "must be <= 2147483647"),
    ("--max-steps", "99999999999999999999", "must be <= 2147483647"),
    ("--seed", "-1", "must be >= 0"),
    ("--seed", "1e20", "expected an integer"),
    ("--seed", "99999999999", "must be <= 4294967295"),
])
def test_train_count_and_seed_flags_are_bounded(capsys, base, data_file, tmp_path, flag, value, problem):
    code, err = cli(capsys, "train", "--base", base, "--data", data_file, "--output", tmp_path / "v", "--lora",
                    flag, value)
    assert code == 2 and f"argument {flag}: {problem}" in err and "Traceback" not in err
    assert not (tmp_path / "v").exists()


def test_recipe_bounds_hold_for_the_python_api():
    with pytest.raises(InputError, match="lora_r must be <= 65536"):
        ValueRecipe(lora_r=10**20).check()
    with pytest.raises(InputError, match="seed must be >= 0"):
        ValueRecipe(seed=-1).check()
    ValueRecipe(seed=2**32 - 1, lora_r=65536, batch_size=2**31 - 1).check()


@pytest.mark.parametrize("value,problem", [("-1", "must be >= 0"), ("1e20", "expected an integer"),
                                           ("4294967296", "must be <= 4294967295")])
def test_generate_and_eval_seeds_are_bounded(capsys, base, value, problem):
    code, err = cli(capsys, "generate", "--base", base, "--seed", value, "hi")
    assert code == 2 and f"argument --seed: {problem}" in err
    code, err = cli(capsys, "eval", "--seed", value)
    assert code == 2 and f"argument --seed: {problem}" in err


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size"])
def test_generate_counts_are_bounded(capsys, base, flag):
    code, err = cli(capsys, "generate", "--base", base, flag, "99999999999999999999", "hi")
    assert code == 2 and f"argument {flag}: must be <= 2147483647" in err


# -- generate: standard input ------------------------------------------------------------------------------
def test_generate_refuses_non_utf8_standard_input(capsys, base, monkeypatch):
    import transfertune.cli.generate as generate_cli

    monkeypatch.setattr(generate_cli, "load_composed", lambda *_: pytest.fail("loaded before reading stdin"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"The cat \xff\xfe sat")))
    code, err = cli(capsys, "generate", "--base", base)
    assert code == 2
    assert "standard input is not UTF-8 text (byte 0xff at offset 8)" in err and "Traceback" not in err


def test_generate_accepts_a_byte_order_mark_on_standard_input(capsys, base, monkeypatch):
    args = ["generate", "--base", base, "--max-new-tokens", "4"]
    capsys.readouterr()
    assert main([*args, "The cat sat"]) == 0
    from_argument = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfThe cat sat")))
    assert main(args) == 0
    assert capsys.readouterr().out == from_argument and from_argument.strip()


# -- the server: API key, 400 messages, chat template ------------------------------------------------------

@pytest.fixture(scope="module")
def plain_cm(model_dir, tokenizer):
    return ComposedModel(load_causal_lm(model_dir("llama", seed=1)), tokenizer, [])


@pytest.fixture(scope="module")
def test_client(plain_cm):
    with TestClient(create_app(plain_cm, model_name="tiny")) as c:
        yield c


def test_api_key_covers_the_docs_and_the_schema(plain_cm):
    with TestClient(create_app(plain_cm, model_name="tiny", api_key="s3cret")) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            resp = c.get(path)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert c.get("/nothing").status_code == 401  # no route listing without the key
        assert c.get("/health").status_code == 200
    with TestClient(create_app(plain_cm, model_name="tiny")) as c:  # without a key they stay open
        assert all(c.get(path).status_code == 200 for path in ("/docs", "/redoc", "/openapi.json"))


@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form"
                                                                                          "-urlencoded"}])
def test_a_body_without_json_content_type_is_a_clear_400(test_client, headers):
    resp = test_client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers=headers)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == ("the request body must be a JSON object, sent with "
                                               "`Content-Type: application/json`")


BAD_PROMPTS = [
    ([-1], "prompt must be a string, a list of strings, a list of token ids (integers >= 0) or a list of token-id "
           "lists, got [-1]"),
    (None, "prompt must be a string, a list of strings, a list of token ids (integers >= 0) or a list of token-id "
           "lists, got null"),
    ("\ud800", "the prompt is not valid Unicode text: character 0 is a lone surrogate (\\ud800), which cannot be "
               "encoded"),
    (["ok", "x\ud800"], "the prompt is not valid Unicode text: character 1 is a lone surrogate"),
]


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS)
def test_bad_prompts_are_explained_in_the_apis_terms(test_client, prompt, message):
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    resp = test_client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    text = resp.json()["error"]["message"]
    assert text.startswith(message)
    assert not any(internal in text for internal in ("TextEncodeInput", "got keys", ".str:", "Input should"))
    assert resp.json()["error"]["param"] == "prompt"


def test_other_union_fields_and_bodies_are_explained(test_client):
    def post(route, body: bytes):
        return test_client.post(route, content=body, headers={"content-type": "application/json"}).json()["error"]

    assert post("/v1/completions", b'{"prompt": "x", "stop": 5}')["message"] == \
        "stop must be a string or a list of strings, got 5"
    chat = post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}')
    assert chat["message"].startswith("messages.0.content must be a string or a list of text parts")
    assert post("/v1/completions", b"[1, 2]")["message"].startswith("the request body must be a JSON object")
    assert post("/v1/completions", b'{"prompt": ')["message"].startswith("the request body is not valid JSON")
    assert post("/v1/completions", b'{"prompt": "\xff"}')["message"].startswith(
        "the request body is not UTF-8 text (byte 12)")


def test_a_byte_order_mark_before_the_body_is_accepted(test_client):
    body = json.dumps({"prompt": "The cat", "max_tokens": 4, "temperature": 0}).encode()
    plain = test_client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    bom = test_client.post("/v1/completions", content=b"\xef\xbb\xbf" + body,
                           headers={"content-type": "application/json; charset=utf-8"})
    assert plain.status_code == bom.status_code == 200, bom.text
    assert bom.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_models_says_how_chats_are_rendered(model_dir, tokenizer, plain_cm, test_client, tmp_path):
    """"model": a chat template; "plain": `role: content` lines, as the value model was trained (its base had no
    template); "none": chat is a 400 no_chat_template."""
    assert test_client.get("/v1/models").json()["data"][0]["chat_template"] == "none"
    resp = test_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "no_chat_template"

    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    templated = ComposedModel(load_causal_lm(model_dir("llama", seed=1)), chat_tok, [])
    with TestClient(create_app(templated)) as c:
        assert c.get("/v1/models").json()["data"][0]["chat_template"] == "model"

    torch.manual_seed(12)
    value = ValueModel.create(f"random:{model_dir('llama', seed=12)}", tokenizer=tokenizer, zero_init_head=False)
    value.config.chat_format = "plain"  # what `transfertune train` records on a base without a template
    value.save(tmp_path / "v")
    cm = ComposedModel.from_pretrained(model_dir("llama", seed=1), [str(tmp_path / "v")])
    with TestClient(create_app(cm)) as c:
        assert c.get("/v1/models").json()["data"][0]["chat_template"] == "plain"
        resp = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    expected = cm.generator().generate(["user: hi\nassistant: "], max_new_tokens=4).text[0]
    assert resp.json()["choices"][0]["message"]["content"] == expected


# -- the server's connections (a real `transfertune serve` process, raw sockets) ---------------------------
TIMEOUT = 1.5  # --timeout-header and --timeout-body of the server below
SLACK = 3.0  # a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`transfertune serve` with short read deadlines, a cap of 4 connections and a 1 s keep-alive."""
    pytest.importorskip("httpx")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transfertune.cli.main", "serve", "--base", model_dir("llama", seed=1),
             "--port", str(port), "--served-model-name", "tiny", "--timeout-header", str(TIMEOUT),
             "--timeout-body", str(TIMEOUT), "--timeout-keep-alive", "1", "--max-connections", "4"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_serving(proc, port, 90, log.read_text)
        yield port, proc, log
    finally:
        proc.terminate()
        proc.wait(20)


def _wait_closed(sock: socket.socket, drip: bytes | None, limit: float) -> tuple[float, bytes]:
    """(seconds until the server closed `sock`, what it sent), sending `drip` every 0.25 s meanwhile."""
    start, received = time.monotonic(), b""
    sock.settimeout(0.25)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(4096)
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start, received
        if drip is not None:
            try:
                sock.sendall(drip)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, received
    raise AssertionError(f"still open after {limit} s; got {received!r}")


def test_a_client_dripping_its_headers_is_cut_off(server):
    port = server[0]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        seconds, got = _wait_closed(sock, b"X-Drip: 1\r\n", TIMEOUT + SLACK)
    assert TIMEOUT - 0.3 < seconds < TIMEOUT + SLACK
    assert got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got


def test_a_connection_that_sends_nothing_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        seconds, got = _wait_closed(sock, None, TIMEOUT + SLACK)
    assert TIMEOUT - 0.3 < seconds < TIMEOUT + SLACK and got.startswith(b"HTTP/1.1 408 ")


def test_a_client_dripping_its_body_is_cut_off(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        sock.sendall(head)
        seconds, _ = _wait_closed(sock, b"a", TIMEOUT + SLACK)
    assert TIMEOUT - 0.3 < seconds < TIMEOUT + SLACK


def test_an_idle_kept_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, got = _wait_closed(sock, None, 1 + SLACK)
    assert got.startswith(b"HTTP/1.1 200 ") and seconds < 1 + SLACK


def test_connections_past_the_limit_get_503_and_the_server_keeps_serving(server):
    openai = pytest.importorskip("openai")
    port, proc, log = server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            _, got = _wait_closed(extra, None, SLACK)
        assert got.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in got
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1 and proc.poll() is None
    assert "Traceback" not in log.read_text()
