"""Issue #13: nothing a user owns is lost, every bad input gets a clear error (exit 2, no traceback).

Each test is a case of docs/reliability.md. Only the tiny in-process models of conftest.py are used.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, no_model_loads
from filelock import FileLock
from safetensors.torch import load_file

from transfertune.cli.main import main
from transfertune.core.compose import VocabularyMismatchError
from transfertune.core.value_model import LoraSettings, ValueConfig, ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import DataFormatError
from transfertune.io.run_dirs import LOCK_NAME, RUN_NAME, latest_checkpoint, read_run, staged_directory
from transfertune.io.validate import ContextLengthError, InputError
from transfertune.training.value_trainer import ValueTrainer, train_value_model
from transfertune.vocab.token_map import CrossVocabValue, VocabMap

FAST = dict(max_steps=2, learning_rate=1e-2, batch_size=8, logging_steps=1000, disable_tqdm=True)


# -- data loss and wrong results ---------------------------------------------------------------------------
def test_retraining_a_dir_of_the_other_kind_leaves_no_stale_weights(tmp_path, base, yes_no_records):
    out = tmp_path / "value"
    train_value_model(base, yes_no_records, str(out), lora=LoraSettings(r=2, alpha=4), **FAST)
    assert (out / "adapter_config.json").is_file()
    train_value_model(base, yes_no_records, str(out), overwrite=True, **FAST)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not ValueModel.load(out).is_lora
    train_value_model(base, yes_no_records, str(out), lora=LoraSettings(r=2, alpha=4), overwrite=True, **FAST)
    assert not (out / "model.safetensors").exists() and ValueModel.load(out).is_lora
    # the Python API's save over a directory of the other kind removes the stale weights too
    ValueModel.load(out).save(tmp_path / "copy")
    ValueModel.create(base).save(tmp_path / "copy")
    assert not (tmp_path / "copy" / "adapter_config.json").exists()


def test_a_stale_adapter_config_in_an_old_full_dir_is_refused(tmp_path, base):
    out = tmp_path / "old"
    ValueModel.create(base).save(out)
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="adapter_config.json .*would be loaded instead"):
        ValueModel.load(out)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_the_base_model_dir_is_refused(tmp_path, model_dir, data_file, capsys, where):
    src = Path(model_dir("llama", seed=3))
    mybase = tmp_path / "mybase"
    shutil.copytree(src, mybase)
    before = {p.name: p.stat().st_mtime_ns for p in mybase.iterdir()}
    out = mybase if where == "same" else mybase / "value"
    code, err = cli(capsys, "train", "--base", mybase, "--data", data_file, "--output", out, "--max-steps", "1")
    assert code == 2 and "model directory of --base" in err
    assert {p.name: p.stat().st_mtime_ns for p in mybase.iterdir()} == before


def test_resume_takes_the_last_complete_checkpoint_of_this_run(tmp_path, base, yes_no_records, monkeypatch):
    """An interrupted run resumes from its own last complete checkpoint: not a higher-numbered one of another
    run, not one cut short by a kill; the result equals an uninterrupted run."""
    steps = dict(FAST, max_steps=4)
    straight = train_value_model(base, yes_no_records, str(tmp_path / "straight"), **steps)

    other = tmp_path / "other"
    train_value_model(base, yes_no_records, str(other), save_steps=1, **dict(FAST, max_steps=5, learning_rate=0.1))

    out = tmp_path / "run"
    original_step = ValueTrainer.training_step

    class Killed(Exception):
        pass

    def step_then_die(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise Killed
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(ValueTrainer, "training_step", step_then_die)
    with pytest.raises(Killed):
        train_value_model(base, yes_no_records, str(out), save_steps=2, **steps)
    monkeypatch.undo()
    run_id = read_run(out)["run_id"]
    assert not read_run(out)["finished"]
    shutil.copytree(other / "checkpoint-5", out / "checkpoint-5")  # an earlier run's higher-numbered checkpoint
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")  # a checkpoint a kill cut short
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    assert latest_checkpoint(out, run_id) == str(out / "checkpoint-2")

    with pytest.raises(InputError, match="unfinished training run: pass --resume"):
        train_value_model(base, yes_no_records, str(out), save_steps=2, **steps)
    with pytest.raises(InputError, match="other settings .*learning_rate"):
        train_value_model(base, yes_no_records, str(out), save_steps=2, resume=True, **dict(steps, learning_rate=0.5))
    resumed = train_value_model(base, yes_no_records, str(out), save_steps=2, resume=True, **steps)
    assert read_run(out)["finished"]
    for name, w in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], w, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="already finished"):
        train_value_model(base, yes_no_records, str(out), resume=True, **steps)


def test_a_second_writer_is_refused(tmp_path, base, yes_no_records, monkeypatch):
    out = tmp_path / "busy"
    out.mkdir()
    holder = FileLock(str(out / LOCK_NAME))
    holder.acquire()
    try:
        no_model_loads(monkeypatch)
        with pytest.raises(InputError, match="being written by another transfertune process"):
            train_value_model(base, yes_no_records, str(out), **FAST)
    finally:
        holder.release()


def test_non_empty_output_is_refused_and_overwrite_removes_only_our_files(tmp_path, base, data_file, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "README.md").write_text("my notes")
    for extra in ([], ["--overwrite"]):
        code, err = cli(capsys, "train", "--base", base, "--data", data_file, "--output", user, "--max-steps", "1",
                        *extra)
        assert code == 2 and ("is not empty" in err or "also holds README.md, config.json" in err)
    assert (user / "config.json").read_text() == '{"mine": true}' and (user / "README.md").read_text() == "my notes"

    out = tmp_path / "value"
    argv = ["train", "--base", base, "--data", data_file, "--output", out, "--max-steps", "1", "--logging-steps", "9"]
    assert cli(capsys, *argv)[0] == 0
    code, err = cli(capsys, *argv)
    assert code == 2 and "already holds a value model: pass --overwrite" in err
    (out / "vocab_map-0000-exact.safetensors").write_bytes(b"stale")
    assert cli(capsys, *argv, "--overwrite")[0] == 0
    assert not (out / "vocab_map-0000-exact.safetensors").exists()
    (out / "notes.txt").write_text("keep me")
    code, err = cli(capsys, *argv, "--overwrite")
    assert code == 2 and "also holds notes.txt" in err and (out / "transfertune.json").is_file()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "also here         notes.txt (not part of the value model)" in info
    files = [line for line in info.splitlines() if line.startswith("files")][0]
    assert "notes.txt" not in files and RUN_NAME not in files


def test_output_that_is_a_file_or_not_creatable_is_refused_before_any_model_loads(tmp_path, base, yes_no_records,
                                                                                 monkeypatch):
    no_model_loads(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        train_value_model(base, yes_no_records, str(a_file), **FAST)
    with pytest.raises(InputError, match="cannot create --output"):
        train_value_model(base, yes_no_records, str(a_file / "value"), **FAST)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_is_found_before_training(tmp_path, base, yes_no_records, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    no_model_loads(monkeypatch)
    try:
        with pytest.raises(InputError, match="not writable"):
            train_value_model(base, yes_no_records, str(out), **FAST)
    finally:
        out.chmod(0o700)


def test_score_output_may_not_be_the_data(tmp_path, base, data_file, capsys):
    before = data_file.read_bytes()
    code, err = cli(capsys, "score", "--base", base, "--data", data_file, "--output", data_file)
    assert code == 2 and "is the --data file" in err and data_file.read_bytes() == before


def test_a_killed_save_leaves_the_old_value_dir_or_none(tmp_path, base, monkeypatch):
    out = tmp_path / "value"
    old = ValueModel.create(base)
    old.save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    new = ValueModel.create(base, lora=LoraSettings(r=2, alpha=4))

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(new.tokenizer, "save_pretrained", killed)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            new.save(target)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["value"]
    with staged_directory(tmp_path / "fresh", marker=None) as staging:
        (staging / "a").write_text("1")
    assert (tmp_path / "fresh" / "a").read_text() == "1"


# -- vocabulary maps ---------------------------------------------------------------------------------------
@pytest.fixture()
def other_vocab_value(tmp_path, model_dir, other_tokenizer):
    value = ValueModel.create("random:" + model_dir("llama", name="rel-xv", tok=other_tokenizer),
                              tokenizer=other_tokenizer, training_base="other", zero_init_head=False)
    value.save(tmp_path / "v")
    return tmp_path / "v"


def test_saved_maps_are_never_replaced_silently(tmp_path, model_dir, other_vocab_value, capsys):
    from conftest import TEXT

    base = model_dir("llama", name="xv-base", seed=1)
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT.replace(". ", ".\n\n"))
    argv = ["vocab-map", "--value", other_vocab_value, "--base", base, "--kind", "align", "--texts", texts]
    assert cli(capsys, *argv)[0] == 0
    align_file = next(other_vocab_value.glob("vocab_map-*-align.safetensors"))
    saved = align_file.read_bytes()
    assert cli(capsys, "generate", "--base", base, "--value", other_vocab_value, "--vocab-map", "exact",
               "--max-new-tokens", "2", "The cat")[0] == 0
    assert align_file.read_bytes() == saved
    assert sorted(m.kind for m in VocabMap.saved(other_vocab_value)) == ["align", "exact"]
    code, err = cli(capsys, *argv)
    assert code == 2 and "already holds an align map" in err and "--overwrite" in err
    assert cli(capsys, *argv, "--overwrite")[0] == 0 and len(VocabMap.saved(other_vocab_value)) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = cli(capsys, "vocab-map", "--value", other_vocab_value, "--base", base, "--kind", "align",
                    "--texts", empty, "--overwrite")
    assert code == 2 and "no text to align" in err and align_file.read_bytes() != b""


def test_cross_vocab_decoding_recrops_the_value_cache(model_dir, other_tokenizer):
    """A value token that grows as base tokens arrive (" c" -> " ca" -> " cat") makes the value cache drop
    positions: transformers 5's crop takes a negative count. Every step equals a fresh run of the value model."""
    from conftest import make_tokenizer

    char_tok = make_tokenizer(262)  # almost byte-level: many base tokens per value token
    value_tok = other_tokenizer
    model = ValueModel.create("random:" + model_dir("llama", name="crop-value", tok=value_tok), tokenizer=value_tok,
                              zero_init_head=False).model.eval()
    vmap = VocabMap.exact(char_tok, value_tok)
    xv = CrossVocabValue(model, value_tok, char_tok, vmap)
    ids = char_tok("The cat sat on the mat. It was the best of times", add_special_tokens=False)["input_ids"]
    state, crops = None, 0
    with torch.no_grad():
        for t in range(len(ids)):
            fed = list(state.rows[0].fed) if state else []
            out = xv(torch.tensor([[ids[t]]]), use_cache=True, past_key_values=state)
            state = out.past_key_values
            now = state.rows[0].fed
            crops += bool(fed) and now[: len(fed)] != fed
            fresh = model(input_ids=torch.tensor([now])).logits[0, -1]
            torch.testing.assert_close(out.logits[0, 0], vmap(fresh), atol=1e-4, rtol=1e-4)
    assert crops > 0, "the text must make the value tokenisation change a token it already fed"


# -- context length ----------------------------------------------------------------------------------------
def test_context_length_is_enforced(tmp_path, base, yes_no_records, data_file, capsys):
    with pytest.raises(InputError, match="more than the context of base .* \\(256 tokens\\)"):
        train_value_model(base, yes_no_records, str(tmp_path / "v"), max_length=512, **FAST)
    from transfertune.io.loading import load_causal_lm
    from transfertune.training.value_trainer import fit_context

    assert fit_context(None, {"base": load_causal_lm(base)}) == 256
    long_prompt = "The cat sat on the mat. " * 60
    code, err = cli(capsys, "generate", "--base", base, long_prompt)
    assert code == 2 and "prompt 1 is" in err and "context of these models is 256 tokens" in err
    cm = ComposedModel.from_pretrained(base)
    gen = cm.generator()
    gen.eos_ids = set()
    out = gen.generate(["The cat"], max_new_tokens=1_000_000)
    assert len(out.token_ids[0]) == 256 - len(cm.tokenizer("The cat")["input_ids"])
    cut = gen.generate([long_prompt], max_new_tokens=4, truncate_prompts=True)  # evaluation's choice: cut the left
    assert len(cut.token_ids[0]) == 4
    with pytest.raises(ContextLengthError, match="example 1: the response is"):
        cm.score(["Q"], [long_prompt])
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "response": " no"}) + "\n\n"
                    + json.dumps({"prompt": "Q", "response": long_prompt}) + "\n")
    code, err = cli(capsys, "score", "--base", base, "--data", data)
    assert code == 2 and f"{data}: line 3: the response is" in err


def test_score_reports_truncated_prompts(tmp_path, base, capsys):
    rows = [{"prompt": "The cat sat on the mat. " * 60, "response": " yes"}, {"prompt": "Q", "response": " no"}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["score", "--base", base, "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["truncated_prompts"] == 1
    assert "1 prompt lost tokens from the left" in captured.err and "lines 1)" in captured.err


# -- security ----------------------------------------------------------------------------------------------
def test_pickled_lora_weights_are_refused(tmp_path, base):
    out = tmp_path / "lora"
    ValueModel.create(base, lora=LoraSettings(r=2, alpha=4)).save(out)
    state = load_file(str(out / "adapter_model.safetensors"))
    torch.save(state, out / "adapter_model.bin")
    with pytest.raises(InputError, match=r"pickled weights \(adapter_model.bin\).*safetensors only"):
        ValueModel.load(out)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="pickled weights"):
        ValueModel.load(out)


def test_the_vocab_fingerprint_is_checked_against_the_dirs_own_tokenizer(tmp_path, base):
    out = tmp_path / "v"
    ValueModel.create(base).save(out)
    cfg = json.loads((out / "transfertune.json").read_text())
    cfg["vocab_fingerprint"] = "0123456789abcdef"
    (out / "transfertune.json").write_text(json.dumps(cfg))
    with pytest.raises(VocabularyMismatchError, match="records vocabulary fingerprint 0123456789abcdef"):
        ValueModel.load(out)


def test_info_escapes_control_characters_and_refuses_huge_files(tmp_path, base, capsys):
    out = tmp_path / "v"
    ValueModel.create(base).save(out)
    cfg = json.loads((out / "transfertune.json").read_text())
    cfg["training_base"] = "evil\x1b[2J\x1b]0;owned\x07\nfake line\u202e"
    (out / "transfertune.json").write_text(json.dumps(cfg))
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "evil\\x1b[2J" in text and "\\x0afake line" in text
    cfg["training_base"] = "x" * (2 << 20)
    (out / "transfertune.json").write_text(json.dumps(cfg))
    code, err = cli(capsys, "info", out)
    assert code == 2 and "too large to be a transfertune.json" in err


def test_lora_dirs_record_an_absolute_base_and_never_read_the_current_dir(tmp_path, model_dir, monkeypatch):
    shutil.copytree(model_dir("llama", seed=3), tmp_path / "mybase")
    monkeypatch.chdir(tmp_path)
    ValueModel.create("mybase", lora=LoraSettings(r=2, alpha=4)).save(tmp_path / "lora")
    cfg = ValueConfig.load(tmp_path / "lora")
    assert cfg.init == str((tmp_path / "mybase").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert ValueModel.load(tmp_path / "lora").is_lora
    legacy = json.loads((tmp_path / "lora" / "transfertune.json").read_text())
    legacy["init"] = "mybase"  # as older versions wrote it: relative to wherever training ran
    (tmp_path / "lora" / "transfertune.json").write_text(json.dumps(legacy))
    monkeypatch.chdir(tmp_path)  # "mybase" exists here, but not next to the value directory's files
    with pytest.raises(InputError, match="LoRA adapter's base 'mybase'"):
        ValueModel.load(tmp_path / "lora")
    shutil.copytree(tmp_path / "mybase", tmp_path / "lora" / "mybase")
    assert ValueModel.load(tmp_path / "lora").is_lora


# -- clear errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "nan", "argument --beta: must be a finite number, got nan"),
    ("--beta", "inf", "argument --beta: must be a finite number, got inf"),
    ("--beta", "0", "argument --beta: must be > 0"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--batch-size", "-3", "argument --batch-size: must be >= 1, got -3"),
    ("--grad-accum", "0", "argument --grad-accum: must be >= 1, got 0"),
    ("--max-length", "1", "argument --max-length: must be >= 2, got 1"),
    ("--epochs", "0", "argument --epochs: must be > 0, got 0.0"),
    ("--lr", "nan", "argument --lr: must be a finite number"),
    ("--max-steps", "0.5", "argument --max-steps: expected an integer, got '0.5'"),
])
def test_bad_training_flags_exit_2_naming_the_flag(capsys, flag, value, message):
    code, err = cli(capsys, "train", "--base", "b", "--data", "d", "--output", "o", flag, value)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "-1", "argument --max-new-tokens: must be >= 1, got -1"),
    ("--temperature", "nan", "argument --temperature: must be a finite number"),
    ("--weight", "nan", "argument --weight: must be a finite number"),
    ("--top-p", "0", "argument --top-p: must be > 0"),
])
def test_bad_generation_flags_exit_2_naming_the_flag(capsys, flag, value, message):
    code, err = cli(capsys, "generate", "--base", "b", flag, value, "hi")
    assert code == 2 and message in err


def test_the_python_api_refuses_the_same_numbers(base, tokenizer, yes_no_records, tmp_path):
    for bad in (dict(beta=float("nan")), dict(batch_size=0), dict(grad_accum=0), dict(max_length=1),
                dict(epochs=0), dict(max_steps=0)):
        with pytest.raises(InputError):
            train_value_model(base, yes_no_records, str(tmp_path / "v"), **{**FAST, **bad})
    assert not (tmp_path / "v").exists()
    from transfertune.inference.sampling import SamplingParams

    with pytest.raises(InputError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("nan"))
    cm = ComposedModel.from_pretrained(base)
    with pytest.raises(ValueError, match="weight 1 must be a finite number"):
        ComposedModel(cm.base, tokenizer, [cm.base], weights=[float("inf")])
    with pytest.raises(ValueError, match="beta must be a finite number, got -inf"):
        ComposedModel(cm.base, tokenizer, [cm.base], beta=float("-inf"))
    with pytest.raises(InputError, match="max_new_tokens must be >= 0"):
        cm.generator().generate("hi", max_new_tokens=-1)


def test_prompt_files_empty_prompt_only_and_non_utf8(tmp_path, base, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, err = cli(capsys, "generate", "--base", base, "--prompt-file", empty)
    assert code == 2 and f"--prompt-file {empty} holds no prompts" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The cat"}) + "\n" + json.dumps({"prompt": "The dog"}) + "\n")
    assert cli(capsys, "generate", "--base", base, "--prompt-file", prompts, "--max-new-tokens", "2")[0] == 0
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ["x"]}) + "\n")
    code, err = cli(capsys, "generate", "--base", base, "--prompt-file", prompts)
    assert code == 2 and "line 2: expected a \"prompt\" string or a \"messages\" list (prompt is list)" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    code, err = cli(capsys, "generate", "--base", base, "--prompt-file", latin1)
    assert code == 2 and f"{latin1}: line 2 is not UTF-8 text (byte 0xe9)" in err


def test_closed_stdin_is_a_clear_error(base):
    res = subprocess.run(f"{sys.executable} -m transfertune.cli.main generate --base {base} <&-", shell=True,
                         capture_output=True, text=True, executable="/bin/bash")
    assert res.returncode == 2, res.stderr
    assert "standard input is closed" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "a", "response": ["b"]}', "line 2: response must be a string, got list"),
    (b'{"prompt": 3, "completion": "b"}', "line 2: prompt must be a string, got int"),
    (b'{"prompt": "caf\xe9", "response": "b"}', "line 2 is not UTF-8 text (byte 0xe9 at column 16)"),
])
def test_bad_training_data_names_file_and_line_before_any_model_loads(tmp_path, capsys, monkeypatch, line, message):
    no_model_loads(monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n' + line + b"\n")
    code, err = cli(capsys, "train", "--base", "no-such-model", "--data", data, "--output", tmp_path / "o")
    assert code == 2 and f"{data}: {message}" in err
    assert not (tmp_path / "o").exists()


def test_corrupt_weights_and_malformed_config_name_the_file(tmp_path, base, capsys):
    out = tmp_path / "v"
    ValueModel.create(base).save(out)
    weights_file = out / "model.safetensors"
    blob = weights_file.read_bytes()
    weights_file.write_bytes(blob[: len(blob) // 2])
    code, err = cli(capsys, "generate", "--base", base, "--value", out, "hi")
    assert code == 2 and f"{weights_file} is not a readable safetensors file" in err and "truncated" in err
    mybase = tmp_path / "mybase"
    shutil.copytree(base, mybase)
    (mybase / "model.safetensors").write_bytes(b"\x00" * 64)
    code, err = cli(capsys, "generate", "--base", mybase, "hi")
    assert code == 2 and f"{mybase / 'model.safetensors'} is not a readable safetensors file" in err
    (mybase / "model.safetensors").rename(mybase / "pytorch_model.bin")
    code, err = cli(capsys, "generate", "--base", mybase, "hi")
    assert code == 2 and "holds only pickled weights (pytorch_model.bin)" in err
    weights_file.write_bytes(blob)
    config = out / "transfertune.json"
    config.write_text('{"beta": 1.0,, }')
    code, err = cli(capsys, "info", out)
    assert code == 2 and f"{config} is not valid JSON (line 1, column 14: Expecting property name" in err
    config.write_text('{"beta": "strong"}')
    code, err = cli(capsys, "info", out)
    assert code == 2 and '"beta" has the wrong type (str' in err
    config.write_text('{"beta": 1.0, "lora": {"rank": 3}}')
    code, err = cli(capsys, "info", out)
    assert code == 2 and 'malformed "lora" settings' in err


def test_unknown_base_names_fail_fast_and_list_the_built_ins(tmp_path, model_dir, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "mini-s").symlink_to(model_dir("llama", seed=3))
    monkeypatch.setenv("TRANSFERTUNE_MODELS", str(models))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    code, err = cli(capsys, "generate", "--base", "mini-q", "hi")
    assert code == 2 and "unknown model 'mini-q': not a built-in name (mini-s)" in err
    code, err = cli(capsys, "generate", "--base", "someone/not-cached-anywhere", "hi")
    assert code == 2 and "unknown model 'someone/not-cached-anywhere'" in err
    assert time.monotonic() - start < 10


def test_eval_refuses_unknown_tasks_and_a_file_as_output(tmp_path, capsys, model_dir):
    src = model_dir("llama", seed=3)
    code, err = cli(capsys, "eval", "--source", src, "--targets", src, "--tasks", "bogus",
                    "--cache-dir", tmp_path / "c")
    assert code == 2 and "unknown tasks: bogus; built-in tasks:" in err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    code, err = cli(capsys, "eval", "--source", src, "--targets", src, "--output", a_file)
    assert code == 2 and f"--output {a_file} is a file" in err


def test_data_errors_are_data_format_errors(tmp_path):
    from transfertune.io.data import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_text('{"messages": "hi"}\n')
    with pytest.raises(DataFormatError, match="line 1"):
        read_jsonl(path)
