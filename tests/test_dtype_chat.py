"""The CLI surface of issue #14: --dtype / --device, memory-bounded scoring, chat templates, prompt files,
a fast --help and quiet loads."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from transfertune.cli.main import main
from transfertune.core.compose import Composition
from transfertune.core.response_logits import _HEADS, composed_response_logits, composed_response_logprobs
from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.io.data import IGNORE_INDEX, RightPadCollator, encode_prompt
from transfertune.io.loading import load_causal_lm, load_tokenizer

TEMPLATE_A = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE_B = ("{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
CHATS = [
    {"messages": [{"role": "user", "content": f"Review {i}: the movie was {'great' if i % 2 else 'awful'}."},
                  {"role": "assistant", "content": " yes" if i % 2 else " no"}]}
    for i in range(6)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# -- composed models at several dtypes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steering_value(tmp_path_factory, model_dir):
    """A value directory whose head is not zero (the init LM's own), so it moves the composed distribution."""
    base = model_dir("llama", hidden=48, seed=1)
    value = ValueModel.create(model_dir("llama", seed=5), zero_init_head=False, training_base=base)
    out = tmp_path_factory.mktemp("dtype") / "value"
    value.save(out)
    return base, str(out)


def first_step_probs(cm, prompts):
    gen = cm.generator()
    ids = [encode_prompt(cm.tokenizer, p) for p in prompts]
    _, logits = next(gen.decode_steps(ids, 1, SamplingParams()))
    return F.softmax(logits.float(), -1)


def test_bf16_composition_is_close_to_fp32(steering_value, capsys):
    base, value = steering_value
    prompts = ["The cat sat", "It was the best of times, it was"]
    fp32 = ComposedModel.from_pretrained(base, [value])
    bf16 = ComposedModel.from_pretrained(base, [value], dtype=torch.bfloat16)
    assert next(bf16.base.parameters()).dtype == torch.bfloat16
    assert next(bf16.values[0].parameters()).dtype == torch.bfloat16
    p32, p16 = first_step_probs(fp32, prompts), first_step_probs(bf16, prompts)
    assert p16.dtype == torch.float32  # composed in fp32 whatever the weights
    assert (p32 - p16).abs().sum(-1).max() < 0.05  # total variation x2: bf16 keeps ~3 significant digits
    assert not torch.allclose(p32, first_step_probs(ComposedModel.from_pretrained(base), prompts), atol=1e-3)
    # scoring too
    lp32 = fp32.score(prompts, [" on the mat.", " the worst"], add_eos=True)
    lp16 = bf16.score(prompts, [" on the mat.", " the worst"], add_eos=True)
    for a, b in zip(lp32, lp16):
        torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)
    # and through the CLI
    capsys.readouterr()
    assert main(["generate", "--base", base, "--value", value, "--dtype", "bf16", "--max-new-tokens", "3",
                 "The cat sat"]) == 0
    assert main(["generate", "--base", base, "--value", value, "--dtype", "fp16", "--device", "cpu",
                 "--max-new-tokens", "2", "The cat sat"]) == 0


def test_device_map_auto_scores_like_one_device(steering_value, tmp_path, capsys):
    """On a machine without GPUs accelerate puts everything on the CPU: the same numbers through the
    device_map code path (placement by accelerate, no .to(device))."""
    base, value = steering_value
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "The cat sat", "response": " on the mat."}] * 2)
    capsys.readouterr()
    nll = []
    for extra in ([], ["--device-map", "auto", "--value-device", "cpu"]):
        assert main(["score", "--base", base, "--value", value, "--data", str(data), *extra]) == 0
        nll.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_nll"])
    assert nll[0] == pytest.approx(nll[1], abs=1e-5)


def test_train_takes_dtype_and_device(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "The cat sat", "response": " on the mat."}] * 4)
    out = tmp_path / "v"
    assert main(["train", "--base", model_dir("llama", seed=3), "--data", str(data), "--output", str(out),
                 "--dtype", "bf16", "--device", "cpu", "--max-steps", "1", "--batch-size", "2"]) == 0
    assert ValueModel.load(out).model.dtype == torch.float32  # the value model trains in fp32


@pytest.mark.parametrize("argv, flag", [
    (["--dtype", "fp8"], "--dtype"),
    (["--dtype", "float32"], "--dtype"),
    (["--device-map", "balanced"], "--device-map"),
])
def test_a_bad_dtype_is_refused_by_argparse(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--base", "mini-s", "--data", "x.jsonl", *argv])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--device", "banana"], "--device"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--value-device", "tpu:3"], "--value-device"),
])
def test_a_bad_device_exits_2_naming_the_flag(argv, flag, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    for command in (["score", "--base", "mini-s", "--data", str(data)], ["generate", "--base", "mini-s", "hi"]):
        assert main([*command, *argv]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag} " in err and "Traceback" not in err


def test_train_refuses_a_numbered_device(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert main(["train", "--base", "mini-s", "--data", str(data), "--output", str(tmp_path / "v"),
                 "--device", "cuda:1" if torch.cuda.is_available() else "cuda"]) == 2
    assert "--device" in capsys.readouterr().err


# -- memory-bounded scoring ------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any torch operation allocated (intermediates included; views of existing
    tensors, such as a transposed weight, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def scoring_batch(tokenizer, n=4):
    collate = RightPadCollator(0)
    feats = []
    for i in range(n):
        p = encode_prompt(tokenizer, f"Review {i}: it was the best of times, it was the worst of times.")
        r = tokenizer(" The cat sat on the mat. The dog ran to the park and back again." * (1 + i % 2),
                      add_special_tokens=False)["input_ids"]
        feats.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return collate(feats)


def reference_logprobs(models, batch, **kw):
    res = composed_response_logits(models[0], models[1:2], **batch, proxy=tuple(models[2:]) or None, **kw)
    return F.log_softmax(res.composed, -1).gather(-1, res.targets[:, None]).squeeze(-1), res


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_scoring_equals_unchunked(model_dir, tokenizer, arch):
    models = [load_causal_lm(model_dir(arch, hidden=48, seed=1)), load_causal_lm(model_dir(arch, seed=2)),
              load_causal_lm(model_dir(arch, seed=3)), load_causal_lm(model_dir(arch, seed=4))]
    batch = scoring_batch(tokenizer)
    kw = dict(composition=Composition((0.7,), beta=0.8, alpha=0.5, real_vocab_size=len(tokenizer)))
    expected, res = reference_logprobs(models, batch, **kw)
    for chunk in (1, 7, None):
        got = composed_response_logprobs(models[0], models[1:2], **batch, proxy=tuple(models[2:]), chunk_size=chunk,
                                         **kw)
        torch.testing.assert_close(got.logprobs, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.rows, res.rows)
        assert torch.equal(got.greedy, res.composed.argmax(-1) == res.targets)
    assert all(_HEADS[m] is not None for m in models)  # each ran its body once and its output layer per chunk


def test_softcapped_heads_are_chunked_too(tokenizer):
    """Gemma 2/3 soft-cap their logits after the output layer: the per-chunk head must do the same."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    base = Gemma2ForCausalLM(cfg).eval()
    batch = scoring_batch(tokenizer, n=2)
    expected, _ = reference_logprobs([base], batch)
    got = composed_response_logprobs(base, [], **batch, chunk_size=5)
    torch.testing.assert_close(got.logprobs, expected, atol=1e-5, rtol=1e-5)
    assert _HEADS[base] is not None


def test_a_model_whose_head_cannot_be_split_is_run_whole(model_dir, tokenizer):
    class Whole(torch.nn.Module):  # a model with only a forward pass, like some remote code
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    base = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    batch = scoring_batch(tokenizer, n=2)
    expected, _ = reference_logprobs([base], batch)
    wrapped = Whole(base)
    got = composed_response_logprobs(wrapped, [], **batch, chunk_size=3)
    torch.testing.assert_close(got.logprobs, expected, atol=1e-5, rtol=1e-5)
    assert _HEADS[wrapped] is None


def test_chunked_scoring_bounds_the_largest_tensor(model_dir, tokenizer):
    """With a big output layer the [batch, length, vocab] logits dominate memory; chunked scoring never builds
    a tensor larger than [chunk, vocab]."""
    pad = 6000  # output layer of 6,320 rows (the tokenizer has 320 tokens)
    base = load_causal_lm(model_dir("llama", hidden=32, seed=1, vocab_pad=pad))
    value = load_causal_lm(model_dir("llama", hidden=32, seed=2, vocab_pad=pad))
    batch = scoring_batch(tokenizer)
    vocab, (rows, width) = len(tokenizer) + pad, batch["input_ids"].shape
    with torch.no_grad(), LargestTensor() as old:
        expected, _ = reference_logprobs([base, value], batch, composition=Composition(real_vocab_size=len(tokenizer)))
    chunk = 8
    with LargestTensor() as new:
        got = composed_response_logprobs(base, [value], **batch, chunk_size=chunk,
                                         composition=Composition(real_vocab_size=len(tokenizer)))
    torch.testing.assert_close(got.logprobs, expected, atol=1e-5, rtol=1e-5)
    assert old.largest >= rows * width * vocab * 4  # the full logits of one model, fp32
    assert new.largest <= chunk * vocab * 4  # one chunk of logits
    assert new.largest * 10 < old.largest


def test_score_takes_max_length_and_batch_size(steering_value, tmp_path, capsys):
    base, value = steering_value
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "It was the best of times, it was the worst of times.",
                                                "response": " The cat sat."}] * 3)
    capsys.readouterr()
    assert main(["score", "--base", base, "--value", value, "--data", str(data), "--batch-size", "2"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["score", "--base", base, "--value", value, "--data", str(data), "--max-length", "8"]) == 0
    captured = capsys.readouterr()
    cut = json.loads(captured.out.strip().splitlines()[-1])
    assert cut["truncated_prompts"] == 3 and full["truncated_prompts"] == 0
    assert "--max-length of 8 tokens" in captured.err
    assert cut["tokens"] == full["tokens"] and cut["mean_nll"] != pytest.approx(full["mean_nll"], abs=1e-4)
    assert main(["score", "--base", base, "--data", str(data), "--max-length", "2"]) == 2
    assert "line 1" in capsys.readouterr().err


# -- chat templates ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, model_dir, tokenizer):
    """Bases sharing weights and vocabulary with chat template A, template B, or none; value models trained on
    chats against A and against the template-less base."""
    from transfertune.training.value_trainer import train_value_model

    root = tmp_path_factory.mktemp("chat")
    base_a = model_dir("llama", name="chat-a", seed=3, tok=with_template(tokenizer, TEMPLATE_A))
    base_b = model_dir("llama", name="chat-b", seed=3, tok=with_template(tokenizer, TEMPLATE_B))
    base_none = model_dir("llama", seed=3)
    data = write_jsonl(root / "chats.jsonl", CHATS)
    values = {}
    for name, base in (("a", base_a), ("none", base_none)):
        values[name] = str(root / f"value-{name}")
        train_value_model(base, str(data), values[name], max_steps=2, learning_rate=3e-3, batch_size=4,
                          logging_steps=100)
    return dict(a=base_a, b=base_b, none=base_none), values, data


def test_training_saves_the_chat_template_it_rendered_with(chat_models):
    bases, values, _ = chat_models
    assert load_tokenizer(values["a"]).chat_template == TEMPLATE_A
    assert json.loads(open(f"{values['a']}/transfertune.json").read())["chat_format"] == "template"
    assert not load_tokenizer(values["none"]).chat_template
    assert json.loads(open(f"{values['none']}/transfertune.json").read())["chat_format"] == "plain"


def test_generate_chat_uses_the_trained_template_and_warns_once(chat_models, capsys, monkeypatch):
    bases, values, _ = chat_models
    from transfertune.inference import generator as generation

    seen = []
    original = generation.ComposedGenerator._encode
    monkeypatch.setattr(generation.ComposedGenerator, "_encode", lambda self, p: seen.extend(p) or original(self, p))
    capsys.readouterr()
    assert main(["generate", "--chat", "--base", bases["b"], "--value", values["a"], "--max-new-tokens", "2",
                 "Is it good?"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("warning: the chat template of base") and "differs" in err[0]
    assert seen == ["<|user|>Is it good?\n<|assistant|>"]
    # the base that trained it: no warning
    assert main(["generate", "--chat", "--base", bases["a"], "--value", values["a"], "--max-new-tokens", "2",
                 "Is it good?"]) == 0
    assert "warning" not in capsys.readouterr().err
    # without a value model the base's own template renders it
    seen.clear()
    assert main(["generate", "--chat", "--base", bases["b"], "--max-new-tokens", "1", "Hi"]) == 0
    assert seen == ["[USER] Hi\n[ASSISTANT] "]


def test_no_template_anywhere_is_said_not_silent(chat_models, capsys, tmp_path):
    bases, values, data = chat_models
    capsys.readouterr()
    assert main(["generate", "--chat", "--base", bases["none"], "--max-new-tokens", "1", "Hi"]) == 0
    err = capsys.readouterr().err
    assert "no chat template" in err and "plain" in err
    assert main(["score", "--base", bases["none"], "--value", values["none"], "--data", str(data)]) == 0
    assert "trained on chats rendered as plain" in capsys.readouterr().err


def test_score_renders_messages_with_the_trained_template(chat_models, capsys, tmp_path):
    bases, values, data = chat_models
    tok_a = with_template(load_tokenizer(bases["none"]), TEMPLATE_A)
    rendered = write_jsonl(tmp_path / "rendered.jsonl", [
        {"prompt": tok_a.apply_chat_template(c["messages"][:-1], tokenize=False, add_generation_prompt=True),
         "response": c["messages"][-1]["content"]} for c in CHATS])
    capsys.readouterr()

    def nll(path, base):
        assert main(["score", "--base", base, "--value", values["a"], "--data", str(path), "--add-eos"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_nll"]

    assert nll(data, bases["b"]) == pytest.approx(nll(rendered, bases["b"]), abs=1e-5)


# -- prompt files -------------------------------------------------------------------------------------------
def test_prompt_file_forms(chat_models, tmp_path, capsys):
    bases, values, _ = chat_models
    files = {
        "prompts.jsonl": [{"prompt": "The cat sat"}, {"prompt": "Answer:"}],
        "pairs.jsonl": [{"prompt": "The cat sat", "response": " on the mat"},
                        {"prompt": "Answer:", "completion": " yes"}],
        "chats.jsonl": [{"messages": [{"role": "user", "content": "The cat sat"}]},
                        {"messages": [{"role": "user", "content": "Answer:"}, {"role": "assistant", "content": "x"}]}],
    }
    capsys.readouterr()
    for name, rows in files.items():
        path = write_jsonl(tmp_path / name, rows)
        assert main(["generate", "--base", bases["a"], "--prompt-file", str(path), "--max-new-tokens", "2",
                     "--jsonl"]) == 0, name
        out = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert len(out) == 2 and all("response" in o for o in out)
        if name == "chats.jsonl":
            assert out[1]["messages"] == [{"role": "user", "content": "Answer:"}]
        else:
            assert [o["prompt"] for o in out] == ["The cat sat", "Answer:"]
    text = tmp_path / "prompts.txt"
    text.write_text("The cat sat\n\nAnswer:\\nyes\n")
    assert main(["generate", "--base", bases["a"], "--prompt-file", str(text), "--max-new-tokens", "1",
                 "--jsonl"]) == 0
    assert [json.loads(x)["prompt"] for x in capsys.readouterr().out.strip().splitlines()] == \
        ["The cat sat", "Answer:\nyes"]


@pytest.mark.parametrize("line, problem", [
    ('{"response": "x"}', 'expected a "prompt" string or a "messages" list'),
    ('{"prompt": 3}', "prompt is"),
    ('{"messages": [{"role": "user"}]}', '"messages" must be'),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no prompt"),
    ("not json", "not valid JSON"),
])
def test_prompt_file_errors_name_file_and_line(tmp_path, capsys, line, problem):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["generate", "--base", "mini-s", "--prompt-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: line 2" in err and problem in err and "Traceback" not in err


# -- fast help, quiet loads, CLI words ------------------------------------------------------------------------
def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nimport transfertune.cli.main as c\n"
            "for argv in (['--help'], ['score', '--help'], ['generate', '--help'], ['train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: c.main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.fixture
def hf_warnings():
    """transformers at its default verbosity (warnings shown): the demo, run earlier in the session, quiets it."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(before)


def test_untying_the_head_loads_quietly_but_other_missing_weights_are_reported(model_dir, tmp_path, caplog,
                                                                             hf_warnings):
    from safetensors.torch import load_file, save_file

    tied = model_dir("gpt2", seed=7)  # tied input and output embeddings: no lm_head.weight in the file
    caplog.clear()
    load_causal_lm(tied, tie_word_embeddings=False)
    assert "LOAD REPORT" not in caplog.text
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes(open(f"{tied}/{f}", "rb").read())
    weights = load_file(f"{tied}/model.safetensors")
    save_file({k: v for k, v in weights.items() if "h.0.ln_1" not in k},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    load_causal_lm(str(broken), tie_word_embeddings=False, allow_unmatched_weights=True)  # else refused (W1)
    assert "LOAD REPORT" in caplog.text and "h.0.ln_1" in caplog.text
    caplog.clear()
    load_causal_lm(tied)  # a load that unties nothing is left alone
    assert "LOAD REPORT" not in caplog.text


def test_vocabulary_mismatch_suggests_the_cli_flag(steering_value, model_dir, other_tokenizer, capsys):
    _, value = steering_value
    other = model_dir("llama", name="dtype-other", tok=other_tokenizer)
    assert main(["generate", "--base", other, "--value", value, "hi"]) == 2
    err = capsys.readouterr().err
    assert "--vocab-map auto" in err and "vocab_map=" not in err


def test_value_dirs_written_with_chat_format_in_extra_still_load_it(tmp_path, model_dir):
    """Value directories from before `chat_format` was a field kept it in "extra": it is read from there."""
    from transfertune.core.value_model import ValueConfig

    ValueConfig(extra={"chat_format": "plain", "run_id": "x"}).save(tmp_path)
    loaded = ValueConfig.load(tmp_path)
    assert loaded.chat_format == "plain" and loaded.extra == {"run_id": "x"}
