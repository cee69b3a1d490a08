"""`serve --draft`: speculative decoding inside the server's continuous batching (issue 28).

Two servers on the same models, one of them with a draft base (the base with its weights slightly perturbed:
about half the drafted tokens are accepted, so rounds both commit several tokens and reject). With the official
openai client, concurrent requests of different lengths, stop strings and settings get the same answers from
both: their rows join and leave the speculative batch between rounds and often end inside a round. Requests for
other value models, and seeded sampling, decode plainly in the same server.
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from cli_helpers import cli  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from scipy.stats import chisquare  # noqa: E402
from test_serve import running  # noqa: E402

from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.inference.sampling import SamplingParams, filter_logits  # noqa: E402
from transfertune.inference.speculative import SpeculativeComposedGenerator  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.io.loading import load_causal_lm  # noqa: E402
from transfertune.serving import Row, create_app  # noqa: E402
from transfertune.serving.engine import Draft  # noqa: E402

NAME = "tiny"
PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:", "The dog ran to the park and"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def dirs(model_dir, tokenizer, tmp_path_factory):
    """A base (with a chat template), two value directories (qa, style) and a draft: the base perturbed."""
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    base = model_dir("llama", name="spec-base", hidden=48, seed=1, tok=chat_tok)
    out = {"base": base}
    for name, seed, beta in (("qa", 10, 0.8), ("style", 11, 0.5)):
        torch.manual_seed(seed)
        value = ValueModel.create(f"random:{model_dir('llama', seed=seed)}", tokenizer=tokenizer,
                                  zero_init_head=False, beta=beta, training_base="spec-base")
        out[name] = str(tmp_path_factory.mktemp(f"spec-{name}") / name)
        value.save(out[name])
    draft = load_causal_lm(base)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.004)
    out["draft"] = str(tmp_path_factory.mktemp("spec-draft") / "draft")
    draft.save_pretrained(out["draft"])
    chat_tok.save_pretrained(out["draft"])
    return out


def composed(dirs) -> ComposedModel:
    return ComposedModel.from_pretrained(dirs["base"], [dirs["qa"], dirs["style"]], weights=[1.0, 0.5])


def draft(dirs, **options) -> Draft:
    return Draft(load_causal_lm(dirs["draft"]), options=options)


@pytest.fixture(scope="module")
def servers(dirs):
    """(plain server, speculative server, the speculative server's app): each its own copy of the models."""
    names = ["qa", "style"]
    spec_app = create_app(composed(dirs), model_name=NAME, value_names=names, draft=draft(dirs))
    with running(create_app(composed(dirs), model_name=NAME, value_names=names)) as plain, running(spec_app) as spec:
        yield plain, spec, spec_app


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(url: str, requests: list[dict], threads: int = 6) -> list[tuple]:
    """Send completion requests concurrently; (texts, finish reasons, completion tokens, log-probs) of each."""
    c = client(url)

    def one(body):
        body = dict(body)
        extra = {k: body.pop(k) for k in ("beta", "weights", "value", "ignore_eos", "top_k") if k in body}
        out = c.completions.create(model=body.pop("model", NAME), extra_body=extra or None, **body)
        lps = [(ch.logprobs.tokens, ch.logprobs.token_logprobs) if ch.logprobs else None for ch in out.choices]
        return ([ch.text for ch in out.choices], [ch.finish_reason for ch in out.choices],
                out.usage.completion_tokens, lps)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, requests))


def speculative_stats(url: str) -> dict:
    health = httpx.get(f"{url}/health").json()
    return {**health["speculative"], "tokens": health["tokens"]}


def same_answers(got: list[tuple], expected: list[tuple]) -> None:
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a[:3] == b[:3], f"request {i}"
        for lp_a, lp_b in zip(a[3], b[3]):
            if lp_b is not None:
                assert lp_a[0] == lp_b[0], f"request {i}: log-prob tokens"
                assert lp_a[1] == pytest.approx(lp_b[1], abs=1e-4), f"request {i}: log-probs"


def test_speculative_rows_equal_plain_rows(servers):
    """Greedy requests of different lengths, with stop strings, per-request beta / weights and log-probs, sent
    concurrently: the speculative server answers as the plain one, with multi-token rounds, and rows that end
    inside a round (their round's later tokens dropped)."""
    plain, spec, _ = servers
    free = ask(plain, [{"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}])[0][0][0]
    stop = free[3:6]
    requests = [{"prompt": PROMPTS[i % 4], "max_tokens": n, "temperature": 0, "ignore_eos": True}
                for i, n in enumerate((3, 17, 5, 24, 1, 11, 8, 2))]
    requests += [
        {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "stop": [stop]},
        {"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, "stop": [stop, "zzz"]},
        {"prompt": PROMPTS[2], "max_tokens": 14, "temperature": 0, "beta": 0.3},
        {"prompt": PROMPTS[3], "max_tokens": 9, "temperature": 0, "weights": [0.0, 2.0], "logprobs": 3},
        {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "logprobs": 2, "ignore_eos": True},
        {"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "value": {"qa": 1.0, "style": -1.0}},
        {"prompt": [PROMPTS[0], PROMPTS[3]], "max_tokens": 7, "temperature": 0},
    ]
    before = speculative_stats(spec)
    expected = ask(plain, requests)
    got = ask(spec, requests)
    same_answers(got, expected)
    assert expected[8][1] == ["stop"] and any(r[1][0] == "length" for r in expected)
    after = speculative_stats(spec)
    rows, tokens = sum(len(r[0]) for r in got), sum(r[2] for r in got)
    committed, rounds = after["committed"] - before["committed"], after["rounds"] - before["rounds"]
    assert after["tokens"] - before["tokens"] == tokens  # every request decoded speculatively
    assert after["accepted"] > before["accepted"] and rounds < tokens - rows
    assert rows + committed > tokens  # some rows ended inside a round


def test_chat_and_streaming_requests_equal_plain_ones(servers):
    plain, spec, _ = servers
    answers = []
    for url in (plain, spec):
        c = client(url)
        chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "The cat"}],
                                         max_tokens=9, temperature=0)
        stream = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=13, temperature=0, stream=True)
        chunks = list(stream)
        answers.append((chat.choices[0].message.content, "".join(ch.choices[0].text for ch in chunks if ch.choices),
                        chunks[-1].choices[0].finish_reason))
    assert answers[0] == answers[1]


def test_sampling_requests_decode_speculatively_and_seeded_ones_plainly(servers):
    """Unseeded sampling rows (several per request, with top-p / top-k) decode speculatively beside greedy
    rows and end as asked; a seeded request decodes plainly, so it gives the plain server's text."""
    plain, spec, _ = servers
    sampled = [{"prompt": PROMPTS[i % 4], "max_tokens": 6 + i, "temperature": 0.9, "top_p": 0.9, "n": 3,
                "ignore_eos": True} for i in range(4)]
    sampled += [{"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 1.2, "top_k": 5},
                {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1.2}]
    greedy = [{"prompt": PROMPTS[i], "max_tokens": 15, "temperature": 0} for i in range(2)]
    seeded = [{"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2}]
    before = speculative_stats(spec)
    got = ask(spec, greedy + seeded + sampled)
    after = speculative_stats(spec)
    same_answers(got[:3], ask(plain, greedy + seeded))
    for body, (texts, reasons, tokens, _) in zip(sampled, got[3:]):
        assert len(texts) == body.get("n", 1) and all(r in ("length", "stop") for r in reasons)
        assert tokens <= body["max_tokens"] * len(texts)
        if body.get("ignore_eos"):
            assert reasons == ["length"] * 3 and tokens == body["max_tokens"] * 3
    assert len({t for texts, *_ in got[3:7] for t in texts}) > 4  # the samples differ
    speculative_rows = 2 + sum(body.get("n", 1) for body in sampled)
    speculative_tokens = sum(r[2] for r in got[:2] + got[3:])
    # every speculative row's tokens but its first (drawn at prefill) came from rounds
    assert after["committed"] - before["committed"] >= speculative_tokens - speculative_rows


def test_requests_for_other_value_models_decode_plainly_beside(servers, dirs):
    """Rows composing the default model's value models speculate (any weights, beta), others do not; their
    answers are the plain server's either way."""
    plain, spec, spec_app = servers
    engine = spec_app.state.server.engine
    base = dirs["base"]
    routed = {("qa", "style"): True, ("style", "qa"): False, ("qa",): False, (): False}
    for values, speculates in routed.items():
        assert engine.speculates(Row([1], 4, values=values)) is speculates
    assert not engine.speculates(Row([1], 4, values=("qa", "style"), sampling=SamplingParams(1.0, seed=3)))
    assert engine.speculates(Row([1], 4, values=("qa", "style"), sampling=SamplingParams(0.0, seed=3)))
    requests = [{"prompt": PROMPTS[i % 4], "max_tokens": 8 + i, "temperature": 0, "model": model}
                for i, model in enumerate([NAME, f"{base}+qa", base, NAME, f"{base}+style", NAME])]
    requests.append({"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "value": {"style": 1.0, "qa": 0.5}})
    before = speculative_stats(spec)
    got = ask(spec, requests)
    same_answers(got, ask(plain, requests))
    after = speculative_stats(spec)
    assert after["committed"] - before["committed"] >= sum(got[i][2] for i in (0, 3, 5)) - 3


def test_unloading_a_value_model_of_the_draft_turns_speculation_off(dirs):
    with TestClient(create_app(composed(dirs), model_name=NAME, value_names=["qa", "style"],
                               draft=draft(dirs, draft_engine="transformers"))) as c:
        engine = c.app.state.server.engine
        body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
        assert c.post("/v1/completions", json={**body, "model": NAME}).status_code == 200
        assert engine.speculative.stats.rounds > 0
        assert c.post("/v1/unload_value", json={"name": "style"}).status_code == 200
        answer = c.post("/v1/completions", json={**body, "model": f"{dirs['base']}+qa"})
        assert answer.status_code == 200 and engine.speculative is None  # its memory went with it
        assert c.post("/v1/completions", json={**body, "model": NAME}).status_code == 404


def test_rows_with_their_own_settings_sample_from_their_own_composition(dirs, tokenizer):
    """Chi-square test of the first two sampled tokens (top-k 3) of rows at two settings (beta, weights) in one
    speculative batch, against each setting's composed distribution: the draft and the verifier compose each
    row at its own settings."""
    target = composed(dirs)
    spec = SpeculativeComposedGenerator(target, load_causal_lm(dirs["draft"]), draft_len=2, adaptive=False)
    params = SamplingParams(temperature=1.0, top_k=3)
    prompt = encode_prompt(tokenizer, "The cat")
    settings = [((1.0, 0.5), 0.8), ((2.0, -1.0), 0.3)]

    def probs(prefix, weights, beta):
        ids = torch.tensor([prompt + prefix])
        with torch.no_grad():
            logits = [m(input_ids=ids).logits[0, -1].float()[None] for m in (target.base, *target.values)]
        return filter_logits(target.compose(logits, weights=list(weights), beta=beta)[0], params).softmax(-1)

    torch.manual_seed(0)
    counts = [{}, {}]
    for _ in range(4):
        batch = spec.new_batch()
        rows = 300
        firsts = batch.join([prompt] * 2 * rows, params, [w for w, _ in settings for _ in range(rows)],
                            [b for _, b in settings for _ in range(rows)])
        seconds = batch.round(1)
        for r, (first, more) in enumerate(zip(firsts, seconds)):
            key = (first, more[0])
            counts[r // rows][key] = counts[r // rows].get(key, 0) + 1
    assert 0.05 < spec.stats.acceptance_rate < 0.95
    for (weights, beta), seen in zip(settings, counts):
        p1 = probs([], weights, beta)
        expected = {(a, b): float(p1[a] * p) for a in p1.nonzero()[:, 0].tolist()
                    for b, p in enumerate(probs([a], weights, beta)) if p > 0}
        assert set(seen) <= set(expected)
        keys = sorted(expected)
        f_exp = torch.tensor([expected[k] for k in keys], dtype=torch.float64)
        f_exp = f_exp / f_exp.sum() * sum(seen.values())
        _, p_value = chisquare([seen.get(k, 0) for k in keys], f_exp.tolist())
        assert p_value > 1e-3


# -- the command line ----------------------------------------------------------------------------------------
def test_serve_draft_flag(capsys, dirs, monkeypatch, model_dir, other_tokenizer):
    import transfertune.serving.app as app_module

    apps = []
    server_only = ("host", "port", "timeout_keep_alive", "timeout_header", "timeout_body", "max_connections")
    monkeypatch.setattr(app_module, "serve", lambda composed, **kw: apps.append(
        app_module.create_app(composed, **{k: v for k, v in kw.items() if k not in server_only})))
    assert cli(capsys, "serve", "--base", dirs["base"], "--value", dirs["qa"], "--draft", dirs["draft"])[0] == 0
    assert apps[-1].state.server.engine.speculative is not None
    code, err = cli(capsys, "serve", "--base", dirs["base"], "--value", dirs["qa"], "--draft",
                    model_dir("llama", seed=4, tok=other_tokenizer))
    assert code == 2 and "--draft" in err and "vocabulary" in err
    code, err = cli(capsys, "serve", "--base", dirs["base"], "--draft", dirs["draft"], "--engine", "vllm")
    assert code == 2 and "--draft needs the native engine" in err
