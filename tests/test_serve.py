"""`transfertune serve`: the OpenAI-compatible server, its continuous batching, and real clients against it.

Every server here runs in-process on 127.0.0.1 (uvicorn in a thread, or FastAPI's TestClient without
sockets), with tiny models saved to temporary directories; every load or fuzz loop is bounded.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from cli_helpers import wait_until_serving  # noqa: E402
from decode_helpers import join_and_leave  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from transfertune.core.compose import compose_logits, compose_logits_per_row  # noqa: E402
from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.inference.sampling import SamplingParams  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.io.loading import load_causal_lm  # noqa: E402
from transfertune.serving import Engine, Row, create_app  # noqa: E402
from transfertune.serving.engine import Event, Sink  # noqa: E402
from transfertune.serving.protocol import APIError  # noqa: E402
from transfertune.vocab.token_map import CrossVocabValue, VocabMap  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]
NAME = "tiny"


@pytest.fixture(scope="module")
def dirs(model_dir, tokenizer, tmp_path_factory):
    """A base (with a chat template) and two value directories, saved like `transfertune train` saves them."""
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    base = model_dir("llama", name="serve-base", hidden=48, seed=1, tok=chat_tok)
    values = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        v = ValueModel.create(f"random:{model_dir('llama', seed=seed)}", tokenizer=tokenizer, zero_init_head=False,
                              beta=0.8, training_base="serve-base")
        path = tmp_path_factory.mktemp(f"value{seed}")
        v.save(path)
        values.append(str(path))
    return base, values


@pytest.fixture(scope="module")
def cm(dirs):
    base, values = dirs
    return ComposedModel.from_pretrained(base, values, weights=[1.0, 0.5])


@contextmanager
def running(app):
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) in a thread; stop it afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def url(cm):
    with running(create_app(cm, model_name=NAME)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(cm, prompt: str, n: int, **kw):
    return cm.generator().generate([prompt], max_new_tokens=n, **kw)


# -- the batching layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "cross-vocab"])
def test_rows_join_and_leave_between_steps_like_solo_runs(model_dir, tokenizer, other_tokenizer, arch):
    """A row that joins a running batch late, or outlives rows that left, decodes as it would alone."""
    if arch == "cross-vocab":  # a value model with its own tokenizer keeps per-row state instead of a KV cache
        value = CrossVocabValue(load_causal_lm(model_dir("llama", seed=10, tok=other_tokenizer)), other_tokenizer,
                                tokenizer, VocabMap.exact(tokenizer, other_tokenizer))
        cm = ComposedModel(load_causal_lm(model_dir("llama", hidden=48, seed=1)), tokenizer, [value], beta=0.8)
    else:
        cm = ComposedModel(load_causal_lm(model_dir(arch, hidden=48, seed=1)), tokenizer,
                           [load_causal_lm(model_dir(arch, seed=10))], beta=0.8)
    gen = cm.generator()
    gen.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]

    def solo(prompt_ids, steps):
        return [lg[0] for _, lg in gen.decode_steps([prompt_ids], steps, SamplingParams())]

    seen = join_and_leave(cm, gen, ids, 8)
    for r, n in ((0, 5), (1, 8), (2, 5)):
        torch.testing.assert_close(torch.stack(seen[r]), torch.stack(solo(ids[r], n)), atol=1e-4, rtol=1e-4)


def test_per_row_composition_equals_scalar_composition():
    torch.manual_seed(0)
    base, v1, v2 = torch.randn(3, 4, 50).unbind(0)
    betas, weights = [0.5, 1.0, 2.0, 0.8], [[1.0, 0.0], [0.5, 0.5], [1.0, 2.0], [0.2, 1.0]]
    rows = compose_logits_per_row(base, [v1, v2], weights=weights, beta=betas)
    for i in range(4):
        one = compose_logits(base[i : i + 1], [v1[i : i + 1], v2[i : i + 1]], weights=weights[i], beta=betas[i])
        assert torch.equal(rows[i : i + 1], one)
    with pytest.raises(ValueError, match="beta"):
        compose_logits_per_row(base, [v1, v2], weights=weights, beta=[1.0, 0.0, 1.0, 1.0])


def test_engine_queue_is_bounded(cm):
    engine = Engine(cm, max_batch=2, max_queue=3)  # not started: nothing leaves the queue
    engine.submit([Row([1, 2], 4) for _ in range(3)])
    with pytest.raises(RuntimeError, match="busy"):
        engine.submit([Row([1, 2], 4)])


def test_engine_batches_rows_with_their_own_settings(cm):
    """Rows admitted in the same step, each with its own beta, weights, stop and length, all decode as they
    would alone (this drives the engine by hand: no thread, no HTTP)."""
    engine = Engine(cm, max_batch=8)
    settings = [(None, None, 6), (0.3, None, 9), (0.3, (0.0, 2.0), 4), (2.0, (1.0, -1.0), 7)]
    rows = [Row(encode_prompt(cm.tokenizer, PROMPTS[i % 3]), n, beta=b, weights=w, ignore_eos=True)
            for i, (b, w, n) in enumerate(settings)]
    engine.submit(rows)
    engine._admit()
    steps = 0
    while engine._rows:
        engine._step()
        steps += 1
    assert steps == 9
    for i, ((beta, weights, n), row) in enumerate(zip(settings, rows)):
        alone = ComposedModel(cm.base, cm.tokenizer, cm.values, weights=weights or cm.weights, beta=beta or cm.beta)
        gen = alone.generator()
        gen.eos_ids = set()
        assert row.text.tokens == gen.generate([PROMPTS[i % 3]], max_new_tokens=n).token_ids[0]


def test_engine_wakes_each_event_loop_once_per_step(cm):
    """Two requests (three rows) decoding together: every step hands the loop all its events in one call."""
    engine = Engine(cm, max_batch=8)
    engine.start()

    async def run():
        loop = asyncio.get_running_loop()
        calls = []
        threadsafe = loop.call_soon_threadsafe

        def counting(*args):
            calls.append(args)
            return threadsafe(*args)

        loop.call_soon_threadsafe = counting
        queues = [asyncio.Queue(), asyncio.Queue()]
        sinks = [Sink(loop, q) for q in queues]
        rows = [Row(encode_prompt(cm.tokenizer, PROMPTS[i]), 5, ignore_eos=True, index=i % 2, sink=sinks[i // 2])
                for i in range(3)]  # request 0: rows 0 and 1 (choices 0, 1); request 1: row 2
        engine.submit(rows)
        got = [[], []]
        for events, q, n in zip(got, queues, (2, 1)):
            while sum(1 for e in events if e.finish_reason) < n:
                events.extend(await q.get())
        return calls, got, rows

    try:
        calls, got, rows = asyncio.run(run())
    finally:
        engine.stop()
    assert len(calls) == 5  # one per step (the rows joined together, 5 tokens each)
    assert [len(events) for events in got] == [10, 5]
    assert [e.token for e in got[1]] == rows[2].text.tokens


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace spaces, byte fallback, a leading space stripped on decode)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([STREAM_TEXT * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


STREAM_TEXT = "The cat sat. Caf\u00e9 na\u00efve \u00fcber \U0001F600 emoji, \u4e2d\u6587 \n\n end. "


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_text_stream_decodes_incrementally_as_the_whole(tokenizer, kind):
    """TextStream decodes a short window per token; what it releases, holds back and stops on is what decoding
    the whole list each time gives, for shuffled real tokens and random ones (broken UTF-8, special tokens)."""
    import random

    from transfertune.inference.generator import TextStream

    tok = tokenizer if kind == "byte-level" else _metaspace_tokenizer()
    real = tok(STREAM_TEXT, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for trial in range(200):
        if trial % 2:
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        else:
            ids = rng.sample(real, rng.randrange(1, len(real) + 1))
        stop = rng.choice([[], ["\n"], ["at", "\u00e9"], [" c"], ["\ufffd"]])
        fast, whole = TextStream(tok, stop), TextStream(tok, stop)
        whole.incremental = False
        for t in ids:
            assert fast.push(t) == whole.push(t), (ids, stop)
            assert fast.stopped == whole.stopped and fast.text == whole.text
            if fast.stopped:
                break
        assert fast.flush() == whole.flush()
        assert fast.incremental
    # a token costs the same however long the text: the decoded windows stay short
    decoded = []
    stream = TextStream(tok)
    stream._decode = lambda ids: decoded.append(len(ids)) or TextStream._decode(stream, ids)
    for t in real * 5:
        stream.push(t)
    assert stream.text == tok.decode(real * 5, skip_special_tokens=True)
    assert max(decoded) <= 8


def test_a_stream_writes_once_per_step_and_ends_in_the_last_write(cm):
    """Each step's events go out as one write; the last step's chunk, the usage and [DONE] as one more."""
    from transfertune.serving.openai_serving import Choice, Server, _stream_completion

    server = Server.__new__(Server)
    server.model_name, server.tokenizer, server._token_text = NAME, cm.tokenizer, {}

    class Steps:  # stands in for Flight: three steps of one choice
        left = 1

        async def events(self):
            for i, (text, reason) in enumerate([("a", None), ("b", None), ("c", "length")]):
                if reason:
                    self.left = 0
                yield [Event(0, text=text, token=i, finish_reason=reason)]

    async def collect():
        choices = [Choice(server, 0, chat=False, logprobs=False)]
        return [w async for w in _stream_completion(server, Steps(), choices, False, "id", 3, True)]

    writes = asyncio.run(collect())
    assert len(writes) == 3
    chunks = [[json.loads(line[6:]) for line in w.split("\n\n") if line.startswith("data: {")] for w in writes]
    assert [[c["choices"][0]["text"] for c in w if c["choices"]] for w in chunks] == [["a"], ["b"], ["c"]]
    assert chunks[2][0]["choices"][0]["finish_reason"] == "length"
    assert chunks[2][1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert writes[2].endswith("data: [DONE]\n\n")
    assert all(set(c) >= {"id", "object", "created", "model", "choices"} for w in chunks for c in w)


class Flaky(torch.nn.Module):
    """A model whose next call fails when `fail` is set."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.fail = model, model.config, False

    def forward(self, **kwargs):
        if self.fail:
            self.fail = False
            raise RuntimeError("out of memory (simulated)")
        return self.model(**kwargs)


def test_a_failed_step_is_a_500_and_the_server_keeps_serving(cm):
    flaky = Flaky(cm.base)
    same = ComposedModel(flaky, cm.tokenizer, cm.values, weights=cm.weights, beta=cm.beta)
    with TestClient(create_app(same, model_name=NAME)) as c:
        flaky.fail = True
        resp = c.post("/v1/completions", json={"prompt": "The", "max_tokens": 4})
        assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
        ok = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == greedy(cm, PROMPTS[0], 6).text[0]


# -- real clients ------------------------------------------------------------------------------------
def test_openai_completions_match_generate_and_score(client, cm):
    for prompt in PROMPTS:
        ref = greedy(cm, prompt, 10)
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
        choice = out.choices[0]
        assert choice.text == ref.text[0]
        assert choice.finish_reason == ("length" if ref.finish_reason[0] == "length" else "stop")
        assert out.usage.prompt_tokens == len(encode_prompt(cm.tokenizer, prompt))
        assert out.usage.completion_tokens == len(ref.token_ids[0]) + (ref.finish_reason[0] == "eos")
        expected = cm.score_ids(encode_prompt(cm.tokenizer, prompt), ref.token_ids[0])
        got = torch.tensor(choice.logprobs.token_logprobs[: len(ref.token_ids[0])])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        for lp, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
            assert len(top) <= 3 and max(top.values()) == lp  # greedy: the chosen token is the top one
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == ref.text[0]
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_echo_prompt_logprobs_match_score(client, cm):
    prompt, cont = "The dog ran to the", " park and back"
    ids = encode_prompt(cm.tokenizer, prompt + cont)
    out = client.completions.create(model=NAME, prompt=prompt + cont, max_tokens=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt + cont and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    expected = cm.score_ids(ids[:1], ids[1:])
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    # token ids and a batch of prompts, as lm-evaluation-harness's local-completions sends them
    raw = httpx.post(f"{client.base_url}completions", json={"model": NAME, "prompt": [ids, ids[:4]], "max_tokens": 1,
                                                             "logprobs": 1, "echo": True, "temperature": 0}).json()
    first = raw["choices"][0]["logprobs"]["token_logprobs"]
    assert len(first) == len(ids) + 1 and len(raw["choices"][1]["logprobs"]["token_logprobs"]) == 5
    torch.testing.assert_close(torch.tensor(first[1:-1]), expected, atol=1e-4, rtol=1e-4)


def test_lm_eval_local_completions_loglikelihood(url, cm, dirs):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need lm-eval[api]
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=NAME, tokenizer_backend="huggingface",
                             tokenizer=dirs[0], max_retries=1, max_length=200)
    pairs = [("The cat sat on the", " mat."), ("Question: is the review positive? Answer:", " yes")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (ctx, cont), (logprob, _) in zip(pairs, results):
        ctx_ids = cm.tokenizer(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = cm.tokenizer(ctx + cont, add_special_tokens=False)["input_ids"][len(ctx_ids):]
        expected = float(cm.score_ids(ctx_ids, cont_ids).sum())
        assert logprob == pytest.approx(expected, abs=1e-3)


def test_openai_chat_uses_the_chat_template(client, cm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the review positive?"}]
    prompt = cm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = greedy(cm, prompt, 8)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2)
    assert out.choices[0].message.content == ref.text[0] and out.choices[0].message.role == "assistant"
    got = torch.tensor([t.logprob for t in out.choices[0].logprobs.content][: len(ref.token_ids[0])])
    torch.testing.assert_close(got, cm.score_ids(encode_prompt(cm.tokenizer, prompt), ref.token_ids[0]),
                               atol=1e-4, rtol=1e-4)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text[0]
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_per_request_beta_and_weights_mixed_in_one_batch(client, cm, dirs):
    """Concurrent requests with different beta / weights decode together; each gets its own composition."""
    settings = [(None, None), (0.2, None), (0.2, [0.0, 2.0]), (5.0, [1.0, 1.0])]
    prompt = PROMPTS[1]

    def ask(setting):
        beta, weights = setting
        extra = {k: v for k, v in (("beta", beta), ("weights", weights)) if v is not None}
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                         extra_body=extra).choices[0]

    with ThreadPoolExecutor(len(settings)) as pool:
        outs = list(pool.map(ask, settings))
    texts = set()
    for (beta, weights), out in zip(settings, outs):
        ref_cm = ComposedModel(cm.base, cm.tokenizer, cm.values, weights=weights or cm.weights,
                               beta=beta or cm.beta)
        ref = greedy(ref_cm, prompt, 12)
        assert out.text == ref.text[0]
        expected = ref_cm.score_ids(encode_prompt(cm.tokenizer, prompt), ref.token_ids[0])
        torch.testing.assert_close(torch.tensor(out.logprobs.token_logprobs[: len(expected)]), expected,
                                   atol=1e-4, rtol=1e-4)
        texts.add(out.text)
    assert len(texts) > 1, "a per-request beta / weights must change the output"


def test_sampling_is_seeded_per_request(client):
    ask = lambda seed: client.completions.create(model=NAME, prompt="The", max_tokens=8, temperature=1.0, top_p=0.9,
                                                 seed=seed, n=2)
    a, b, c = ask(7), ask(7), ask(8)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert a.choices[0].text != a.choices[1].text or a.choices[0].text != c.choices[0].text


def test_stop_strings_and_models_and_health(client, url, cm, dirs):
    ref = greedy(cm, PROMPTS[0], 12).text[0]
    stop = ref[3:5]
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == greedy(cm, PROMPTS[0], 12, stop=[stop]).text[0]
    assert out.choices[0].finish_reason == "stop"
    names = [Path(v).name for v in dirs[1]]  # each value model alone, named by its directory, and the base alone
    assert [m.id for m in client.models.list().data] == [NAME, cm.base_name, *(f"{cm.base_name}+{n}" for n in names)]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_concurrent_streaming_clients_all_complete(client, cm):
    ref = {p: greedy(cm, p, 16).text[0] for p in PROMPTS}

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        chunks = list(stream)
        return prompt, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(12)))
    assert all(text == ref[p] and reason in ("length", "stop") for p, text, reason in results)


class Gated(torch.nn.Module):
    """A model whose calls after the first `free` ones wait until `gate` is set: the request is certainly still
    decoding when its client leaves, however loaded the machine is."""

    def __init__(self, model, free: int = 2):
        super().__init__()
        self.model, self.config = model, model.config
        self.calls, self.free, self.gate = 0, free, threading.Event()

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls > self.free:
            self.gate.wait(30)
        return self.model(**kwargs)


def test_client_disconnect_frees_its_row(cm):
    base = Gated(cm.base)
    app = create_app(ComposedModel(base, cm.tokenizer, cm.values), model_name=NAME)
    engine = app.state.server.engine
    engine.eos_ids = set()
    base.calls = 0  # create_app's own batching check called it
    with running(app) as url:
        body = {"prompt": "The", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
            first = next(resp.iter_lines())
            assert engine.load["running"] == 1, first
        base.gate.set()
        deadline = time.monotonic() + 10
        while engine.load["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.load["running"] == 0 and engine.load["rows_done"] == 0
        assert engine.load["tokens"] < 40  # it left long before its 40 tokens


# -- errors, auth, overload --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_client(cm):
    with TestClient(create_app(cm, model_name=NAME, max_model_len=64)) as c:
        yield c


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 100}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, None),
    ("/v1/completions", {"prompt": "x", "beta": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "weights": [1.0]}, 400, None),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, 400, None),
    ("/v1/completions", {"prompt": [99999], "max_tokens": 1}, 400, None),
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"max_tokens": 1}, 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 400}]}, 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("route,body,status,code", BAD)
def test_bad_input_is_a_4xx_in_openai_format(test_client, route, body, status, code):
    resp = test_client.post(route, content=json.dumps(body, allow_nan=False).encode(),
                            headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    assert test_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_malformed_json_and_unknown_route(test_client):
    resp = test_client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "error" in resp.json()
    assert test_client.get("/v1/nothing").status_code == 404 and "error" in test_client.get("/v1/nothing").json()


def test_chat_uses_the_template_the_value_model_was_trained_with(dirs, model_dir, tokenizer, tmp_path):
    trained_tok = copy.deepcopy(tokenizer)
    trained_tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"
    torch.manual_seed(12)
    value = ValueModel.create(f"random:{model_dir('llama', seed=12)}", tokenizer=trained_tok, zero_init_head=False)
    value.save(tmp_path / "v")
    cm = ComposedModel.from_pretrained(dirs[0], [str(tmp_path / "v")])
    messages = [{"role": "user", "content": "Is the review positive?"}]
    prompt = "<user> Is the review positive? <assistant>"
    assert cm.chat_template()[0] == trained_tok.chat_template
    with TestClient(create_app(cm, model_name=NAME)) as c:
        resp = c.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 6,
                                                     "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == greedy(cm, prompt, 6).text[0]
    assert resp.json()["usage"]["prompt_tokens"] == len(encode_prompt(cm.tokenizer, prompt))


def test_chat_without_a_template_is_a_clear_400(model_dir, tokenizer):
    cm = ComposedModel(load_causal_lm(model_dir("llama", seed=1)), tokenizer, [])
    with TestClient(create_app(cm)) as c:
        resp = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "no_chat_template"


def test_api_key_is_required_when_set(cm):
    with TestClient(create_app(cm, model_name=NAME, api_key="s3cret")) as c:
        body = {"prompt": "x", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 401
        wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_full_queue_answers_429(cm):
    app = create_app(cm, model_name=NAME, max_queue=2)
    c = TestClient(app)  # no lifespan: the engine is not running, so the queue does not drain
    app.state.server.engine.submit([Row([1], 1), Row([1], 1)])
    resp = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "server_overloaded"
    assert resp.headers["retry-after"] == "1"


def test_fuzzed_requests_never_5xx(test_client, cm):
    """Bodies drawn from the server's own OpenAPI schema (sometimes broken): no 5xx, and it still answers right."""
    pytest.importorskip("hypothesis")
    from fuzz_strategies import requests
    from hypothesis import HealthCheck, given, settings

    statuses = []

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests(test_client.app.openapi()))
    def fuzz(case):
        route, body = case
        resp = test_client.post(route, json=body)
        statuses.append(resp.status_code)
        assert resp.status_code < 500, (body, resp.text)
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

    fuzz()
    assert len(statuses) == 200 and statuses.count(200) > 10  # the valid paths were exercised too
    out = test_client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    assert out.json()["choices"][0]["text"] == greedy(cm, PROMPTS[0], 8).text[0]


def test_serve_command_starts_a_server(dirs):
    """`transfertune serve` in a subprocess, queried by the openai client, then stopped."""
    base, values = dirs
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transfertune.cli.main", "serve",
                             "--base", base, "--value", values[0], "--port", str(port),
                             "--api-key", "k", "--served-model-name", "cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(proc, port, 60, lambda: proc.stdout.read().decode())
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = c.completions.create(model="cli", prompt="The cat", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)


def test_api_error_shape():
    err = APIError(400, "bad", param="x", code="c").body()
    assert err == {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}
