"""Composed models inside vLLM (`make test-vllm`, in .venv-vllm; skipped where vLLM is not installed).

Tiny random Llama models built here (head_dim 32: vLLM's CPU attention refuses 16), sharing a tokenizer
trained in-process: a base (hidden 64, 2 heads) and a value model of another shape (hidden 96, 3 heads, one
KV head, one layer) with a random, non-zero head; base logits and value logits / beta are of the same size, so
both shape every composed distribution, and the two
stacks' KV caches differ in page size; the base is saved in shards (the export's index must name the value
tensors). vLLM runs in this process (engine core and worker in-process: loads in ~20 s instead of ~60 s); the
server test starts `vllm serve` as a subprocess on 127.0.0.1 and stops it.
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


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    # the base in shards: the export then writes an index naming the value tensors too, which vLLM loads by
    base = tiny_llama(root / "base", tok, hidden=64, heads=2, kv_heads=2, layers=2, seed=0, shard="100KB")
    init = tiny_llama(root / "value-init", tok, hidden=96, heads=3, kv_heads=1, layers=1, seed=1)
    value = ValueModel.create(f"random:{init}", tokenizer=tok, beta=0.7, training_base=base)
    torch.manual_seed(2)
    with torch.no_grad():
        value.model.get_output_embeddings().weight.normal_(0, 0.1)  # values of the size of the base's logits
    value.save(root / "value")
    export = export_vllm(base, [str(root / "value")], root / "export", weights=[WEIGHT])
    return base, str(root / "value"), str(export)


@pytest.fixture(scope="module")
def cm(dirs):
    base, value, _ = dirs
    return ComposedModel.from_pretrained(base, [value], weights=[WEIGHT])


# The server test runs first: the in-process LLM below binds this process's threads to one core, which a
# subprocess started after it would inherit.
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _vllm_serve_command() -> list[str]:
    """`vllm serve`; where the installed wheel's `vllm` script cannot start (vllm-cpu 0.32.0 looks its own
    version up under the name "vllm"), the same command line through transfertune's wrapper."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return [str(Path(sys.executable).with_name("vllm")), "serve"]
    except PackageNotFoundError:
        return [sys.executable, "-m", "transfertune.serving.vllm.launch", "serve"]


def test_vllm_serve_answers_the_openai_client(dirs, cm, tmp_path):
    """`vllm serve EXPORT` (beta overridden at load time) answers completions and chat, streamed or not, with
    the tokens ComposedGenerator picks at that beta; concurrent requests all complete."""
    _, _, export = dirs
    beta = 0.35
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    cmd = _vllm_serve_command() + [
        export, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "composed", "--dtype", "float32",
        "--max-model-len", "256", "--enforce-eager", "--seed", "0", "--api-key", "k",
        "--hf-overrides", json.dumps({"transfertune_beta": beta})]
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
                      distributed_executor_backend="uni")
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
