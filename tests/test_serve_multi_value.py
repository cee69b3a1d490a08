"""One base, several value models chosen per request (issue 29): the routed batch, the model ids, run-time
load / unload, and the official openai client against a server holding two value models.

Every greedy answer is checked against `ComposedGenerator` with that request's value model(s) alone, which is
what `transfertune generate --base B --value DIR` runs.
"""
from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from cli_helpers import cli  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import running  # noqa: E402

from transfertune.core.compose import compose_logits  # noqa: E402
from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.inference.sampling import SamplingParams  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.serving import Engine, Row, create_app  # noqa: E402
from transfertune.serving.routed_batch import RoutedBatch  # noqa: E402

PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:", "The dog ran to the park"]


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"


def _value_dir(model_dir, tokenizer, tmp_path_factory, seed: int, beta: float, chat_template=None, **kw) -> str:
    if chat_template:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    value = ValueModel.create(f"random:{model_dir('llama', seed=seed, tok=tokenizer)}", tokenizer=tokenizer,
                              zero_init_head=False, beta=beta, training_base="mv-base", **kw)
    path = tmp_path_factory.mktemp(f"mv-value{seed}") / "v"
    value.save(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(model_dir, tokenizer, other_tokenizer, tmp_path_factory):
    """A base and value directories: qa, style and extra share its vocabulary (betas 0.8, 0.5, 1.0; extra was
    trained with a chat template), casc is a cascade value model, foreign was trained on another vocabulary."""
    base = model_dir("llama", name="mv-base", hidden=48, seed=1)
    return {
        "base": base,
        "qa": _value_dir(model_dir, tokenizer, tmp_path_factory, 10, 0.8),
        "style": _value_dir(model_dir, tokenizer, tmp_path_factory, 11, 0.5),
        "extra": _value_dir(model_dir, tokenizer, tmp_path_factory, 12, 1.0, chat_template=CHAT_TEMPLATE),
        "casc": _value_dir(model_dir, tokenizer, tmp_path_factory, 13, 0.7, scheme="cascade"),
        "foreign": _value_dir(model_dir, other_tokenizer, tmp_path_factory, 14, 1.0),
    }


@pytest.fixture(scope="module")
def alone(dirs):
    """ComposedModel of the base with these value directories (what `generate` builds), cached."""
    cache = {}

    def get(*names, **kw):
        key = (names, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = ComposedModel.from_pretrained(dirs["base"], [dirs[n] for n in names], **kw)
        return cache[key]

    return get


def generate(cm, prompt: str, n: int) -> list[int]:
    gen = cm.generator()
    gen.eos_ids = set()
    return gen.generate([prompt], max_new_tokens=n).token_ids[0]


def generated_text(cm, prompt: str, n: int) -> str:
    """What the server answers for n greedy tokens (end-of-sequence ignored), as `generate` decodes them."""
    return cm.tokenizer.decode(generate(cm, prompt, n), skip_special_tokens=True)


# -- the routed batch ------------------------------------------------------------------------------------
class Counting(torch.nn.Module):
    """A model that records how many rows each of its calls ran on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.rows = model, model.config, []

    def forward(self, **kwargs):
        self.rows.append(kwargs["input_ids"].shape[0])
        return self.model(**kwargs)


def test_each_value_model_runs_on_its_rows_only_and_rows_decode_as_alone(alone, tokenizer):
    """Rows naming qa, style, both or neither join at different steps and leave; each value model's calls and KV
    cache hold only its rows, and every row's logits are those of the base with its value models alone."""
    two = alone("qa", "style")
    modules = {"qa": Counting(two.values[0]), "style": Counting(two.values[1])}
    batch = RoutedBatch([two.base], two.device, 1, lambda names: [modules[n] for n in names])
    plan = [(0, ("qa",)), (0, ()), (1, ("style",)), (2, ("qa", "style")), (2, ("qa",))]  # (joins at step, values)
    ids = [encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(len(plan))]
    seen = {i: [] for i in range(len(plan))}
    alive, expected_rows = [], {"qa": 0, "style": 0}
    for step in range(6):
        joining = [i for i, (at, _) in enumerate(plan) if at == step]
        batch.join(joining, [ids[i] for i in joining], [plan[i][1] for i in joining])
        alive += joining
        for name in expected_rows:
            expected_rows[name] += sum(name in plan[i][1] for i in alive)
        base_logits, values = batch.step()
        for name, (rows, logits) in values.items():
            assert sorted(alive[r] for r in rows.tolist()) == sorted(i for i in alive if name in plan[i][1])
            assert logits.shape[0] == len(rows)
        for pos, i in enumerate(alive):
            vals = [values[n][1][values[n][0].tolist().index(pos)] for n in plan[i][1]]
            seen[i].append(compose_logits(base_logits[0][pos:pos + 1], [v[None] for v in vals]))
        for name, group in batch.groups.items():  # each group's KV cache holds its own rows, nothing else
            cache = group.batch.caches[0]
            assert cache.layers[0].keys.shape[0] == len(group.rows) == sum(name in plan[i][1] for i in alive)
        keep = [p for p, i in enumerate(alive) if not (step == 3 and i == 0)]  # row 0 leaves after step 3
        alive = [alive[p] for p in keep]
        batch.keep(keep)
        tokens = torch.stack([seen[i][-1][0].argmax() for i in alive])
        batch.feed(tokens)
    assert set(batch.groups) == {"qa", "style"}
    assert {name: sum(m.rows) for name, m in modules.items()} == expected_rows  # never a row that is not theirs
    for i, (_, names) in enumerate(plan):
        cm = ComposedModel(two.base, two.tokenizer, [modules[n].model for n in names])
        steps = len(seen[i])
        ref = [lg[0] for _, lg in cm.generator().decode_steps([ids[i]], steps, SamplingParams())]
        torch.testing.assert_close(torch.cat(seen[i]), torch.stack(ref), atol=1e-4, rtol=1e-4)


def test_an_emptied_group_drops_its_cache(alone, tokenizer):
    two = alone("qa", "style")
    batch = RoutedBatch([two.base], two.device, 1, lambda names: [dict(zip(("qa", "style"), two.values))[n]
                                                                   for n in names])
    batch.join(["a", "b"], [encode_prompt(tokenizer, p) for p in PROMPTS[:2]], [("qa",), ("style",)])
    batch.step()
    batch.keep([1])
    assert set(batch.groups) == {"style"}


def test_engine_rows_with_different_value_models_match_generate(dirs, alone):
    """The engine, driven by hand: five rows with their own value models and settings admitted together."""
    two = alone("qa", "style")
    engine = Engine(two)  # names from the directories: both are called "v", so the second is "v-2"
    qa, style = engine.registry.names()
    settings = [((qa,), None, None, ("qa",)), ((style,), None, None, ("style",)), ((), None, None, ()),
                ((style, qa), (0.5, 1.0), 0.3, ("style", "qa")), (None, None, None, ("qa", "style"))]
    rows = [Row(encode_prompt(two.tokenizer, PROMPTS[i % 4]), 7, values=v, weights=w, beta=b, ignore_eos=True)
            for i, (v, w, b, _) in enumerate(settings)]
    engine.submit(rows)
    engine._admit()
    while engine._rows:
        engine._step()
    for i, ((_, weights, beta, names), row) in enumerate(zip(settings, rows)):
        ref = alone(*names, **({"weights": list(weights)} if weights else {}), **({"beta": beta} if beta else {}))
        assert row.text.tokens == generate(ref, PROMPTS[i % 4], 7), names


# -- the server, with the official client -------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(alone):
    return create_app(alone("qa", "style"), model_name="both", value_names=["qa", "style"])


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_alone_and_each_value_model(client, alone, dirs):
    base = dirs["base"]
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["both", base, f"{base}+qa", f"{base}+style"]
    assert models[f"{base}+qa"].model_extra["beta"] == pytest.approx(0.8)  # the value model's own beta
    assert models["both"].model_extra["value"] == {"qa": 1.0, "style": 1.0}


def test_interleaved_concurrent_requests_each_equal_their_own_generate(client, alone, dirs):
    """Requests for qa, style, the base alone, the default pair and a `value` combination, sent concurrently and
    decoded in one batch: each greedy answer is `generate` with that request's value models alone."""
    base = dirs["base"]
    kinds = [(f"{base}+qa", {}, ("qa",), {}), (f"{base}+style", {}, ("style",), {}), (base, {}, (), {}),
             ("both", {}, ("qa", "style"), {}),
             (base, {"value": {"style": 0.5, "qa": 1.0}, "beta": 0.4}, ("style", "qa"),
              {"weights": [0.5, 1.0], "beta": 0.4}),
             (f"{base}+style", {"beta": 2.0}, ("style",), {"beta": 2.0})]
    jobs = [(kinds[i % len(kinds)], PROMPTS[i % len(PROMPTS)]) for i in range(18)]

    def ask(job):
        (model, extra, _, _), prompt = job
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True, **extra})
        return out.model, out.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    texts = {}
    for ((model, _, names, kw), prompt), (answered, text) in zip(jobs, answers):
        assert answered == model
        ref = alone(*names, **kw)
        assert text == generated_text(ref, prompt, 10), (model, names)
        texts.setdefault(prompt, set()).add(text)
    assert all(len(t) > 2 for t in texts.values()), "the value models must change the answers"
    engine = client.models.list()  # the server is still fine
    assert engine.data


def test_chats_render_with_the_chosen_value_models_template(alone, dirs):
    """A chat for base+extra renders with the template extra was trained with (as `generate --chat` with it);
    for base+qa, trained without one on a base without one, chats are refused as before."""
    messages = [{"role": "user", "content": "Is the review positive?"}]
    with TestClient(create_app(alone("qa", "extra"), value_names=["qa", "extra"])) as c:
        out = c.post("/v1/chat/completions", json={"model": f"{dirs['base']}+extra", "messages": messages,
                                                    "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert out.status_code == 200, out.text
        ref = alone("extra")
        assert out.json()["choices"][0]["message"]["content"] == generated_text(
            ref, "<user> Is the review positive? <assistant>", 6)
        refused = c.post("/v1/chat/completions", json={"model": f"{dirs['base']}+qa", "messages": messages})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_chat_template"
        models = {m["id"]: m["chat_template"] for m in c.get("/v1/models").json()["data"]}
        assert models[f"{dirs['base']}+extra"] == "model" and models[f"{dirs['base']}+qa"] == "none"


def test_unknown_models_are_404_and_bad_choices_400(client, dirs):
    base = dirs["base"]
    for model in ("gpt-4", f"{base}+nope", "qa"):
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model=model, prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="`nope`"):
        client.completions.create(model=base, prompt="x", max_tokens=1, extra_body={"value": {"nope": 1.0}})
    with pytest.raises(openai.BadRequestError, match="weights"):
        client.completions.create(model=f"{base}+qa", prompt="x", max_tokens=1, extra_body={"weights": [1.0, 1.0]})
    with pytest.raises(openai.BadRequestError, match="either"):
        client.completions.create(model=base, prompt="x", max_tokens=1,
                                  extra_body={"value": {"qa": 1.0}, "weights": [1.0]})


# -- load and unload at run time ---------------------------------------------------------------------------
class Gated(torch.nn.Module):
    """A value model whose calls wait at `gate` once `closed`: its rows are certainly still decoding."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.gate, self.closed, self.waiting = threading.Event(), False, threading.Event()

    def forward(self, **kwargs):
        if self.closed:
            self.waiting.set()
            assert self.gate.wait(30)
        return self.model(**kwargs)


def test_load_and_unload_under_load(dirs, alone):
    """extra is loaded while other requests decode and answers as `generate` with it; style is unloaded while a
    row of it is decoding: new requests for it get 409 at once, its running row finishes all its tokens, requests
    for other models all succeed, and once it is gone it is a 404 and no longer listed."""
    base = dirs["base"]
    app = create_app(alone("qa", "style"), model_name="both", value_names=["qa", "style"])
    server = app.state.server
    style = server.registry.get("style")
    gated = style.module = Gated(style.module)
    with running(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        admin = httpx.Client(base_url=url, timeout=60)
        background, failures = [], []
        stop = threading.Event()

        def traffic():  # requests for qa and the base alone, all the time
            while not stop.is_set():
                for model in (f"{base}+qa", base):
                    try:
                        out = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                   extra_body={"ignore_eos": True})
                        background.append((model, out.choices[0].text))
                    except Exception as err:  # noqa: BLE001 (counted: there must be none)
                        failures.append(repr(err))

        workers = [threading.Thread(target=traffic) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            loaded = admin.post("/v1/load_value", json={"name": "extra", "path": dirs["extra"]})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["id"] == f"{base}+extra" and loaded.json()["beta"] == 1.0
            out = c.completions.create(model=f"{base}+extra", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
            ref = alone("extra")
            assert out.choices[0].text == generated_text(ref, PROMPTS[1], 8)

            gated.closed = True
            long = ThreadPoolExecutor(1).submit(
                lambda: c.completions.create(model=f"{base}+style", prompt=PROMPTS[2], max_tokens=12,
                                             temperature=0, extra_body={"ignore_eos": True}))
            assert gated.waiting.wait(30)
            unload = ThreadPoolExecutor(1).submit(admin.post, "/v1/unload_value", json={"name": "style"})
            deadline = time.monotonic() + 10
            while not style.unloading:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.ConflictError, match="being unloaded"):
                c.completions.create(model=f"{base}+style", prompt="x", max_tokens=1)
            with pytest.raises(openai.ConflictError):  # the default model composes style too
                c.completions.create(model="both", prompt="x", max_tokens=1)
            assert not unload.done()  # it waits for the row
            gated.gate.set()
            done = unload.result(30)
            assert done.status_code == 200 and done.json()["loaded"] is False
            out = long.result(30)
            assert out.usage.completion_tokens == 12
            ref = alone("style")
            assert out.choices[0].text == generated_text(ref, PROMPTS[2], 12)
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model=f"{base}+style", prompt="x", max_tokens=1)
            ids = [m.id for m in c.models.list().data]
            assert ids == [base, f"{base}+qa", f"{base}+extra"]  # the default pair went with style
            assert server.registry.names() == ["qa", "extra"]
            assert httpx.post(f"{url}/v1/unload_value", json={"name": "style"}).status_code == 404
        finally:
            stop.set()
            gated.gate.set()
            for w in workers:
                w.join(60)
    assert not failures and len(background) >= 4
    refs = {model: alone(*(("qa",) if model.endswith("+qa") else ())) for model, _ in background}
    for model, text in background:
        assert text == generated_text(refs[model], PROMPTS[0], 6)


@pytest.fixture(scope="module")
def admin_app(alone):
    return create_app(alone("qa", "style"), model_name="both", value_names=["qa", "style"])


@pytest.mark.parametrize("body,status,words", [
    ({"name": "x", "path": "/nonexistent/value"}, 400, "does not exist"),
    ({"name": "x", "path": "BASE"}, 400, "is not a value directory"),
    ({"name": "x", "path": "foreign"}, 400, "does not share"),
    ({"name": "qa", "path": "extra"}, 400, "already loaded"),
    ({"name": "no/slash", "path": "extra"}, 400, "letters, digits"),
    ({"name": "x"}, 400, "path"),
])
def test_bad_value_dirs_are_refused_with_the_reason(admin_app, dirs, body, status, words):
    if "path" in body:
        body = {**body, "path": dirs["base"] if body["path"] == "BASE" else dirs.get(body["path"], body["path"])}
    with TestClient(admin_app) as c:
        resp = c.post("/v1/load_value", json=body)
        assert resp.status_code == status and words in resp.json()["error"]["message"], resp.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]][-1].endswith("+style")  # nothing was added


def test_foreign_vocabulary_is_refused_naming_both_and_the_flag(admin_app, dirs):
    with TestClient(admin_app) as c:
        msg = c.post("/v1/load_value", json={"name": "f", "path": dirs["foreign"]}).json()["error"]["message"]
    assert "fingerprint" in msg and "--vocab-map" in msg and dirs["foreign"] in msg


def test_a_cascade_value_model_loads_and_decodes_as_alone(alone, dirs):
    """A cascade value model reads the base's logits: its group runs the base on its rows too."""
    app = create_app(alone("qa"), model_name="qa", value_names=["qa"])
    with TestClient(app) as c:
        assert c.post("/v1/load_value", json={"name": "casc", "path": dirs["casc"]}).status_code == 200
        for model, names in ((f"{dirs['base']}+casc", ("casc",)), ("qa", ("qa",))):
            out = c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[3], "max_tokens": 8,
                                                  "temperature": 0, "ignore_eos": True}).json()
            ref = alone(*names)
            assert out["choices"][0]["text"] == generated_text(ref, PROMPTS[3], 8)


def test_admin_routes_need_the_api_key(alone, dirs):
    app = create_app(alone("qa"), model_name="qa", value_names=["qa"], api_key="k")
    with TestClient(app) as c:
        assert c.post("/v1/load_value", json={"name": "e", "path": dirs["extra"]}).status_code == 401
        assert c.post("/v1/unload_value", json={"name": "qa"}).status_code == 401
        ok = c.post("/v1/unload_value", json={"name": "qa"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


# -- the command line ----------------------------------------------------------------------------------------
def test_serve_names_values_and_refuses_clashing_names(capsys, dirs, monkeypatch):
    import transfertune.serving.app as app_module

    served = []
    monkeypatch.setattr(app_module, "serve", lambda composed, **kw: served.append((composed, kw)))
    assert cli(capsys, "serve", "--base", dirs["base"], "--value", f"qa={dirs['qa']}", "--value",
               dirs["style"])[0] == 0
    composed, kw = served[-1]
    assert kw["value_names"] == ["qa", "v"] and kw["model_name"] == f"{dirs['base']}+qa+v"
    assert len(composed.values) == 2 and kw["hand_over"]
    code, err = cli(capsys, "serve", "--base", dirs["base"], "--value", dirs["qa"], "--value", dirs["style"])
    assert code == 2 and "the name 'v' is taken" in err and "NAME=DIR" in err
