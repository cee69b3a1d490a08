"""Issue #30: value directories whose weights do not fit their config, non-finite weights, damaged checkpoints,
and JSON that Python's reader cannot take (deep nesting, lone surrogates).

Each test is a case of docs/reliability.md ("Weights that do not fit, and JSON Python cannot read"). Only the
tiny in-process models of conftest.py are used.
"""
from __future__ import annotations

import json
import logging
import re
import resource
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from transfertune.core.value_model import LoraSettings, ValueModel
from transfertune.io.data import DataFormatError, read_jsonl
from transfertune.io.loading import load_causal_lm
from transfertune.io.run_dirs import latest_checkpoint, read_run
from transfertune.io.validate import InputError, read_json_file
from transfertune.training.value_trainer import ValueTrainer

NESTED = "[" * 100_000


@pytest.fixture(scope="module")
def saved_value(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("values") / "v"
    ValueModel.create(base).save(out)
    return out


@pytest.fixture()
def value(saved_value, tmp_path):
    """A fresh copy of a full-weights value directory, to damage."""
    return Path(shutil.copytree(saved_value, tmp_path / "v"))


def edit_weights(directory: Path, change, name: str = "model.safetensors") -> None:
    path = directory / name
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def generate(capsys, base, value) -> tuple[int, str]:
    return cli(capsys, "generate", "--base", base, "--value", value, "--max-new-tokens", 2, "hi")


# -- W1: missing and unexpected weights ----------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("missing", r"1 weight\(s\) that config.json describes are not in the checkpoint "
                r"\(model.layers.1.mlp.up_proj.weight\)"),
    ("unexpected", r"1 tensor\(s\) in the checkpoint are not in the model config.json describes "
                   r"\(model.layers.9.mlp.extra.weight\)"),
    ("40 layers", r"num_hidden_layers 40.*: 342 weight\(s\) that config.json describes are not in the checkpoint "
                  r"\(model.layers.2.input_layernorm.weight, .* and 337 more\)"),
])
def test_a_value_dir_missing_weights_or_holding_others_is_refused(value, base, capsys, case, message):
    if case == "missing":
        edit_weights(value, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "unexpected":
        edit_weights(value, lambda w: w.update({"model.layers.9.mlp.extra.weight": torch.zeros(4, 4)}))
    else:
        edit_config(value, num_hidden_layers=40)
    with pytest.raises(InputError, match=message):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and f"{value}: the weights do not match {value / 'config.json'}" in err
    assert "Traceback" not in err


def test_value_dirs_of_tied_and_lora_models_still_load(model_dir, tmp_path):
    """The strict check knows tied weights (a GPT-2 base ties its output layer), and LoRA adapters."""
    gpt2 = model_dir("gpt2", seed=1)
    ValueModel.create(gpt2).save(tmp_path / "full")
    ValueModel.create(gpt2, zero_init_head=False).save(tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    for name in ("full", "tied"):
        ValueModel.load(tmp_path / name)
    ValueModel.create(gpt2, lora=LoraSettings(r=2, alpha=4)).save(tmp_path / "lora")
    assert ValueModel.load(tmp_path / "lora").is_lora


def test_a_lora_adapter_missing_weights_is_refused(base, tmp_path):
    out = tmp_path / "lora"
    ValueModel.create(base, lora=LoraSettings(r=2, alpha=4)).save(out)
    name = next(k for k in load_file(str(out / "adapter_model.safetensors")) if "lora_A" in k)
    edit_weights(out, lambda w: w.pop(name), "adapter_model.safetensors")
    with pytest.raises(InputError, match="adapter_model.safetensors lacks weights its adapter_config.json describes"):
        ValueModel.load(out)


# -- W2: non-finite weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_in_a_value_dir_are_refused(value, base, capsys, bad):
    def poison(w):
        w["model.norm.weight"][3] = bad
    edit_weights(value, poison)
    kind = "1 NaN, 0 infinite" if bad != bad else "0 NaN, 1 infinite"
    message = rf"1 tensor\(s\) hold NaN or infinite values: model.norm.weight \({kind} of 32\)"
    with pytest.raises(InputError, match=message):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and f"{value / 'model.safetensors'}: 1 tensor(s) hold NaN or infinite values" in err


def test_non_finite_lora_weights_are_refused(base, tmp_path):
    out = tmp_path / "lora"
    ValueModel.create(base, lora=LoraSettings(r=2, alpha=4)).save(out)

    def poison(w):
        next(t for k, t in w.items() if "lora_B" in k).fill_(float("nan"))
    edit_weights(out, poison, "adapter_model.safetensors")
    with pytest.raises(InputError, match="adapter_model.safetensors: 1 tensor.* hold NaN or infinite values"):
        ValueModel.load(out)


# -- C5: another size in config.json, a tensor of another shape ----------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=64), r"21 tensor\(s\) do not have the shapes .*hidden_size 64.*: lm_head.weight is \[320, 32\], "
                           r"the config's \[320, 64\]"),
    (dict(vocab_size=400), r"2 tensor\(s\) do not have the shapes .*vocab_size 400.*: lm_head.weight is \[320, 32\], "
                           r"the config's \[400, 32\]; model.embed_tokens.weight is \[320, 32\]"),
    ("tensor", r"1 tensor\(s\) do not have the shapes .*: model.norm.weight is \[31\], the config's \[32\]"),
])
def test_a_config_of_another_size_or_a_tensor_of_another_shape_names_file_and_tensor(value, base, capsys, change,
                                                                                     message):
    if change == "tensor":
        edit_weights(value, lambda w: w.update({"model.norm.weight": torch.ones(31)}))
    else:
        edit_config(value, **change)
    with pytest.raises(InputError, match=message):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and f"error: {value / 'model.safetensors'}: " in err and "Traceback" not in err


def test_a_config_that_transformers_rejects_names_the_file(value, base, capsys):
    edit_config(value, num_attention_heads=5)
    message = f"{value / 'config.json'} describes no valid model (The hidden size (32) is not a multiple of the number"
    with pytest.raises(InputError, match=re.escape(message)):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_base_with_a_tensor_of_another_shape_is_refused(base, tmp_path):
    mybase = Path(shutil.copytree(base, tmp_path / "mybase"))
    edit_weights(mybase, lambda w: w.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(65, 32)}))
    message = (rf"{mybase / 'model.safetensors'}: 1 tensor\(s\) do not have the shapes "
               r".*model.layers.0.mlp.gate_proj.weight is \[65, 32\], the config's \[64, 32\]")
    with pytest.raises(InputError, match=message):
        load_causal_lm(str(mybase))


# -- C6: a config that would allocate far more than the checkpoint holds --------------------------------------
def test_a_huge_intermediate_size_is_refused_before_anything_is_allocated(value, base, capsys, monkeypatch):
    edit_config(value, intermediate_size=10_000_000)  # 7.7 GB of float32 weights if the model were built
    real = AutoModelForCausalLM.from_pretrained.__func__

    def guarded(cls, path, *args, **kwargs):
        assert Path(path) != value, "the value model was built before its config was checked"
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(guarded))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"intermediate_size 10000000.*model.layers.0.mlp.down_proj.weight is "
                                         r"\[32, 64\], the config's \[32, 10000000\]"):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and "intermediate_size 10000000" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20  # KiB: less than 1 GiB more


# -- C7: a damaged checkpoint is skipped on --resume ---------------------------------------------------------
def test_resume_skips_a_checkpoint_with_a_truncated_file(tmp_path, base, yes_no_records, capsys, caplog,
                                                         monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    out = tmp_path / "run"
    argv = ["train", "--base", base, "--data", data, "--output", out, "--max-steps", 6, "--save-steps", 2,
            "--batch-size", 8, "--lr", 0.01]
    original_step = ValueTrainer.training_step

    class Killed(Exception):
        pass

    def step_then_die(self, *args, **kwargs):
        if self.state.global_step >= 4:
            raise Killed
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(ValueTrainer, "training_step", step_then_die)
    with pytest.raises(Killed):
        cli(capsys, *argv)
    monkeypatch.undo()
    run_id = read_run(out)["run_id"]
    assert latest_checkpoint(out, run_id) == str(out / "checkpoint-4")

    weights = out / "checkpoint-4" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])
    with caplog.at_level(logging.WARNING, logger="transfertune.io.run_dirs"):
        assert latest_checkpoint(out, run_id) == str(out / "checkpoint-2")
    assert f"skipping {out / 'checkpoint-4'}: {weights} is not a readable safetensors file" in caplog.text

    weights.write_bytes(whole)
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transfertune.io.run_dirs"):
        assert latest_checkpoint(out, run_id) == str(out / "checkpoint-2")
    assert f"{optimizer} is not a whole torch.save file" in caplog.text

    weights.write_bytes(whole[: len(whole) // 2])
    code, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert read_run(out)["finished"] and ValueModel.load(out).config.extra["run_id"] == run_id


# -- C1: nesting deeper than Python's JSON reader goes -------------------------------------------------------
def test_deeply_nested_json_names_the_file_and_line(tmp_path, value, base, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": ' + NESTED + "\n")
    with pytest.raises(DataFormatError, match=rf"{data}: line 2 is nested 100,001 levels deep, too deep to read"):
        read_jsonl(data)
    code, err = cli(capsys, "train", "--base", base, "--data", data, "--output", tmp_path / "o")
    assert code == 2 and f"{data}: line 2 is nested 100,001 levels deep" in err and not (tmp_path / "o").exists()
    code, err = cli(capsys, "generate", "--base", base, "--prompt-file", data)
    assert code == 2 and f"{data}: line 2 is nested 100,001 levels deep" in err

    marker = value / "transfertune.json"
    saved = marker.read_text()
    marker.write_text('{"beta": 1.0,\n "extra": ' + NESTED + "\n")
    code, err = cli(capsys, "info", value)
    assert code == 2 and f"{marker}: line 2 is nested 100,001 levels deep, too deep to read: not a " in err
    marker.write_text(saved)

    config = value / "config.json"
    config.write_text(NESTED)
    with pytest.raises(InputError, match=rf"{config}: line 1 is nested 100,000 levels deep"):
        ValueModel.load(value)
    code, err = generate(capsys, base, value)
    assert code == 2 and f"{config}: line 1 is nested 100,000 levels deep" in err
    mybase = Path(shutil.copytree(base, tmp_path / "mybase"))
    (mybase / "config.json").write_text(NESTED)
    code, err = cli(capsys, "generate", "--base", mybase, "hi")
    assert code == 2 and f"{mybase / 'config.json'}: line 1 is nested 100,000 levels deep" in err


# -- C2: lone surrogates -------------------------------------------------------------------------------------
def test_a_lone_surrogate_names_the_file_and_line(tmp_path, value, base, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a \\ud83d\\ude00", "response": "b"}\n{"prompt": "a \\ud800", "response": "b"}\n')
    with pytest.raises(DataFormatError, match=rf"{data}: line 2 holds a lone surrogate \(\\ud800\)"):
        read_jsonl(data)
    data.write_text('{"prompt": "a \\ud83d\\ude00", "response": "b"}\n')
    assert read_jsonl(data)[0]["prompt"] == "a \U0001F600"  # a pair is one character
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "x\\uDC00"}\n')
    code, err = cli(capsys, "train", "--base", base, "--data", data, "--output", tmp_path / "o")
    assert code == 2 and f"{data}: line 2 holds a lone surrogate (\\udc00): not valid Unicode text" in err
    code, err = cli(capsys, "generate", "--base", base, "--prompt-file", data)
    assert code == 2 and f"{data}: line 2 holds a lone surrogate" in err

    marker = value / "transfertune.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()), indent=2).replace(
        '"training_base": null', '"training_base": "x\\ud800"'))
    line = next(n for n, text in enumerate(marker.read_text().splitlines(), 1) if "training_base" in text)
    with pytest.raises(InputError, match=rf"line {line} holds a lone surrogate"):
        read_json_file(marker, "transfertune.json")
    code, err = cli(capsys, "info", value)
    assert code == 2 and f"{marker}: line {line} holds a lone surrogate (\\ud800)" in err
