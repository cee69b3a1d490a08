"""Issue #30, W1 for base models: a base whose checkpoint lacks weights its config.json describes, or holds tensors
it does not describe, is refused naming them, unless the user opts in (`--allow-unmatched-base-weights`,
`load_causal_lm(..., allow_unmatched_weights=True)`, `with allowing_unmatched_weights():`). Value directories stay
strict whatever the opt-in. Each test is a case of docs/reliability.md; only tiny in-process models are used.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from safetensors.torch import load_file, save_file

from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.loading import allowing_unmatched_weights, load_causal_lm
from transfertune.io.validate import InputError

MISSING = "model.layers.1.mlp.up_proj.weight"
OPT_IN = "pass --allow-unmatched-base-weights"


def damaged_base(base: str, tmp_path: Path, case: str) -> Path:
    """A copy of `base` with a weight removed, a tensor added, or config.json describing one layer of the two."""
    out = Path(shutil.copytree(base, tmp_path / f"base-{case.replace(' ', '-')}"))
    weights = load_file(str(out / "model.safetensors"))
    if case == "missing":
        weights.pop(MISSING)
    elif case == "unexpected":
        weights["model.layers.9.mlp.extra.weight"] = torch.zeros(4, 4)
    else:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


CASES = {
    "missing": rf"1 weight\(s\) that config.json describes are not in the checkpoint \({MISSING}\)",
    "unexpected": r"1 tensor\(s\) in the checkpoint are not in the model config.json describes "
                  r"\(model.layers.9.mlp.extra.weight\)",
    "1 layer of 2": r"num_hidden_layers 1.*: 9 tensor\(s\) in the checkpoint are not in the model config.json "
                    r"describes \(model.layers.1.input_layernorm.weight, .* and 4 more\)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_base_with_unmatched_weights_is_refused_unless_the_user_opts_in(base, tmp_path, capsys, case):
    mb = damaged_base(base, tmp_path, case)
    code, err = cli(capsys, "generate", "--base", mb, "--max-new-tokens", 2, "hi")
    assert code == 2 and "Traceback" not in err
    assert f"{mb}: the weights do not match {mb / 'config.json'}" in err
    assert re.search(CASES[case], err), err
    assert f"to load this base anyway, {OPT_IN}" in err
    code, err = cli(capsys, "generate", "--base", mb, "--allow-unmatched-base-weights", "--max-new-tokens", 2,
                    "--seed", 0, "hi")
    assert code == 0, err


def test_the_python_api_refuses_the_same_and_opts_in_two_ways(base, tmp_path):
    mb = damaged_base(base, tmp_path, "missing")
    with pytest.raises(InputError, match=r"pass allow_unmatched_weights=True \(or load within transfertune\.io\."
                                         r"loading\.allowing_unmatched_weights\(\)\)"):
        load_causal_lm(str(mb))
    with pytest.raises(InputError, match=MISSING):
        ComposedModel.from_pretrained(str(mb))
    model = load_causal_lm(str(mb), allow_unmatched_weights=True)
    intact = load_causal_lm(base)
    # the weights that are there are loaded; the missing one is not the checkpoint's (initialised afresh)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, intact.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, intact.model.layers[1].mlp.up_proj.weight)
    with allowing_unmatched_weights():
        cm = ComposedModel.from_pretrained(str(mb))
    assert cm.base.model.layers[1].mlp.up_proj.weight.shape == intact.model.layers[1].mlp.up_proj.weight.shape
    with pytest.raises(InputError, match=MISSING):  # the opt-in ended with the block
        load_causal_lm(str(mb))


def test_value_dirs_stay_strict_under_the_opt_in(base, tmp_path, capsys):
    value = tmp_path / "v"
    ValueModel.create(base).save(value)
    weights = load_file(str(value / "model.safetensors"))
    weights.pop(MISSING)
    save_file(weights, str(value / "model.safetensors"), metadata={"format": "pt"})
    with allowing_unmatched_weights(), pytest.raises(InputError, match=MISSING) as refused:
        ValueModel.load(value)
    assert "load this base anyway" not in str(refused.value)
    code, err = cli(capsys, "generate", "--base", base, "--value", value, "--allow-unmatched-base-weights", "hi")
    assert code == 2 and MISSING in err and OPT_IN not in err


def test_train_refuses_an_unmatched_base_and_takes_the_flag(base, tmp_path, capsys, data_file):
    mb = damaged_base(base, tmp_path, "missing")
    code, err = cli(capsys, "train", "--base", mb, "--data", data_file, "--output", tmp_path / "out",
                    "--max-steps", 1)
    assert code == 2 and MISSING in err and OPT_IN in err and "Traceback" not in err
    code, err = cli(capsys, "train", "--base", mb, "--data", data_file, "--output", tmp_path / "out2",
                    "--max-steps", 1, "--batch-size", 2, "--allow-unmatched-base-weights")
    assert code == 0, err


def test_a_tied_checkpoint_loaded_untied_is_not_missing_its_output_layer(model_dir):
    """A value model created from a tied base unties its output layer (zero-initialised head): the layer the
    checkpoint does not store is the caller's, not a missing weight."""
    gpt2 = model_dir("gpt2", seed=1)
    assert "lm_head.weight" not in load_file(str(Path(gpt2) / "model.safetensors"))
    value = ValueModel.create(gpt2)
    assert not torch.equal(value.model.lm_head.weight, value.model.transformer.wte.weight)
    with pytest.raises(InputError, match="lm_head.weight"):  # untied without saying the layer is the caller's
        from transformers import AutoConfig

        from transfertune.io.weights import check_checkpoint

        config = AutoConfig.from_pretrained(gpt2)
        config.tie_word_embeddings = False
        check_checkpoint(gpt2, config, strict=False, keys=True)
