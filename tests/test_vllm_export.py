"""`transfertune export --engine vllm` and the `--engine vllm` branch of `transfertune serve`, without vLLM.

The export is checked by rebuilding the composed logits from the exported files alone (transformers models
from the configs it records, weights from its safetensors, compose_logits) and comparing them with
ComposedModel's. What vLLM does with the directory is tests/test_vllm.py's (make test-vllm).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from transfertune.cli import main as cli
from transfertune.core.compose import VocabularyMismatchError, compose_logits
from transfertune.core.value_model import LoraSettings, ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.validate import InputError
from transfertune.serving.vllm.export import ARCHITECTURE, META_KEY, VALUE_FILE, VALUE_PREFIX, export_vllm, is_export


def _randomise_head(value: ValueModel, seed: int, std: float = 0.3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        value.model.get_output_embeddings().weight.normal_(0, std)


@pytest.fixture(scope="module")
def dirs(model_dir, tokenizer, tmp_path_factory):
    """A base, a full value model (another shape) and a LoRA value model, each with a non-zero head."""
    base = model_dir("llama", name="export-base", hidden=64, seed=3)
    root = tmp_path_factory.mktemp("export-values")
    full = ValueModel.create(f"random:{model_dir('llama', hidden=32, seed=4)}", tokenizer=tokenizer, beta=0.7,
                             training_base="export-base")
    _randomise_head(full, 5)
    full.save(root / "full")
    lora = ValueModel.create(base, tokenizer=tokenizer, lora=LoraSettings(r=4, alpha=8), beta=1.5,
                             training_base="export-base")
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # peft starts B at zero: make the adapter change the weights
    _randomise_head(lora, 7)
    lora.save(root / "lora")
    return base, str(root / "full"), str(root / "lora")


def _hf_model(config: dict, tensors: dict, prefix: str = ""):
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings), missing
    if missing:
        model.tie_weights()
    return model


def _exported_logits(out, ids: torch.Tensor) -> torch.Tensor:
    """Composed logits of the last position, from the export's files only."""
    config = json.loads((out / "config.json").read_text())
    meta = config[META_KEY]
    base_tensors = {}
    for f in out.glob("*.safetensors"):
        if not f.name.startswith("transfertune-value-"):
            base_tensors.update(load_file(f))
    with torch.no_grad():
        base = _hf_model(meta["base"]["config"], base_tensors)(input_ids=ids).logits[:, -1]
        values = []
        for i, v in enumerate(meta["values"]):
            tensors = load_file(out / VALUE_FILE.format(i))
            assert all(k.startswith(VALUE_PREFIX.format(i)) for k in tensors)
            values.append(_hf_model(v["config"], tensors, VALUE_PREFIX.format(i))(input_ids=ids).logits[:, -1])
    return compose_logits(base, values, weights=[v["weight"] for v in meta["values"]], beta=meta["beta"],
                          real_vocab_size=meta["real_vocab_size"])


def test_export_recomposes_like_composed_model(dirs, tmp_path, tokenizer):
    base, full, lora = dirs
    out = export_vllm(base, [full, lora], tmp_path / "export", weights=[1.0, 0.5])
    config = json.loads((out / "config.json").read_text())
    assert is_export(out) and config["architectures"] == [ARCHITECTURE]
    meta = config[META_KEY]
    assert meta["beta"] == 0.7 and [v["weight"] for v in meta["values"]] == [1.0, 0.5]  # beta: the first value's
    assert not meta["beta_fixed"] and [v["beta"] for v in meta["values"]] == [0.7, 1.5]
    assert [v["name"] for v in meta["values"]] == ["full", "lora"]  # the directories' names
    assert [v["lora_merged"] for v in meta["values"]] == [False, True]
    assert os.path.samefile(out / "model.safetensors", os.path.join(base, "model.safetensors")) or \
        (out / "model.safetensors").read_bytes() == open(os.path.join(base, "model.safetensors"), "rb").read()
    assert (out / "tokenizer.json").is_file()

    cm = ComposedModel.from_pretrained(base, [full, lora], weights=[1.0, 0.5])
    ids = torch.tensor([tokenizer("The cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        step = [m(input_ids=ids).logits[:, -1] for m in cm.models]
    want = cm.compose(step)
    got = _exported_logits(out, ids)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the LoRA value model matters: without it the composition differs
    assert not torch.allclose(cm.compose(step[:2] + [torch.zeros_like(step[2])]), want, atol=1e-3)


def test_export_refusals(dirs, tmp_path, model_dir, other_tokenizer):
    base, full, lora = dirs
    out = export_vllm(base, [full], tmp_path / "e")
    with pytest.raises(InputError, match="--overwrite"):
        export_vllm(base, [full], out)
    export_vllm(base, [full, lora], out, overwrite=True, beta=2.0, names=["qa", "style"])
    meta = json.loads((out / "config.json").read_text())[META_KEY]
    assert meta["beta"] == 2.0 and meta["beta_fixed"] and len(meta["values"]) == 2
    assert [v["name"] for v in meta["values"]] == ["qa", "style"]
    assert {p.name for p in out.iterdir()} >= {VALUE_FILE.format(0), VALUE_FILE.format(1)}
    export_vllm(base, [full], out, overwrite=True)  # a stale value file of the longer export is removed
    assert not (out / VALUE_FILE.format(1)).exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_vllm(base, [full], tmp_path / "other")
    with pytest.raises(InputError, match="already a vLLM export"):
        export_vllm(str(out), [full], tmp_path / "again")
    with pytest.raises(InputError, match="at least one --value"):
        export_vllm(base, [], tmp_path / "none")
    with pytest.raises(InputError, match="weights"):
        export_vllm(base, [full], tmp_path / "w", weights=[1.0, 2.0])
    with pytest.raises(InputError, match="beta"):
        export_vllm(base, [full], tmp_path / "b", beta=0.0)
    with pytest.raises(InputError, match="two value models are named 'a'"):
        export_vllm(base, [full, lora], tmp_path / "n", names=["a", "a"])
    with pytest.raises(InputError, match="value model name 'a b' must be"):
        export_vllm(base, [full], tmp_path / "n", names=["a b"])
    with pytest.raises(InputError, match="1 value models but 2 names"):
        export_vllm(base, [full], tmp_path / "n", names=["a", "b"])
    foreign = model_dir("llama", name="export-foreign", tok=other_tokenizer)
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        export_vllm(foreign, [full], tmp_path / "v")
    assert not (tmp_path / "v").exists() and not (tmp_path / "w").exists() and not (tmp_path / "n").exists()


def test_export_command(dirs, tmp_path, capsys):
    base, full, lora = dirs
    assert cli.main(["export", "--engine", "vllm", "--base", base, "--value", f"qa={full}", "--value", lora,
                     "--weight", "1", "--weight", "0", "--beta", "0.5", "--output", str(tmp_path / "cli")]) == 0
    assert "serve --engine vllm" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cli" / "config.json").read_text())[META_KEY]
    assert meta["beta"] == 0.5 and [(v["name"], v["weight"]) for v in meta["values"]] == [("qa", 1.0), ("lora", 0.0)]
    assert cli.main(["export", "--base", base, "--value", f"x={full}", "--value", f"x={lora}",
                     "--output", str(tmp_path / "twice")]) == 2
    assert "name them apart" in capsys.readouterr().err
    assert cli.main(["export", "--base", base, "--value", full, "--output", str(tmp_path / "cli")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_serve_engine_vllm_exports_then_runs_vllm_serve(dirs, tmp_path, monkeypatch):
    """`transfertune serve --engine vllm` exports base + value once and hands vLLM's `serve` the settings."""
    from transfertune.serving.vllm import launch as vllm_engine

    base, full, _ = dirs
    calls = []
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: "0.32.0")
    monkeypatch.setattr(vllm_engine, "run_vllm_cli", lambda argv: calls.append(list(argv)) or 0)
    monkeypatch.setenv("TRANSFERTUNE_CACHE", str(tmp_path / "cache"))
    args = ["serve", "--engine", "vllm", "--base", base, "--value", full, "--beta", "0.4", "--weight", "2",
            "--port", "8123", "--api-key", "k", "--max-batch", "4", "--max-model-len", "128",
            "--vllm-args", "--dtype float32 --enforce-eager"]
    assert cli.main(args) == 0
    argv = calls[0]
    export = argv[1]
    assert argv[0] == "serve" and is_export(export) and export.startswith(str(tmp_path / "cache"))
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--port"] == "8123" and flags["--host"] == "127.0.0.1" and flags["--api-key"] == "k"
    assert flags["--max-num-seqs"] == "4" and flags["--max-model-len"] == "128"
    assert flags["--logits-processors"] == "transfertune.serving.vllm.mix_processor:ValueMixProcessor"
    assert json.loads(flags["--hf-overrides"]) == {"transfertune_beta": 0.4, "transfertune_weights": [2.0]}
    assert argv[-3:] == ["--dtype", "float32", "--enforce-eager"]
    mtime = os.stat(os.path.join(export, "config.json")).st_mtime_ns
    assert cli.main(args) == 0 and calls[1][1] == export  # unchanged inputs: the cached export is reused
    assert os.stat(os.path.join(export, "config.json")).st_mtime_ns == mtime
    assert cli.main(["serve", "--engine", "vllm", "--base", export]) == 0 and calls[2][1] == export
    assert cli.main(["serve", "--engine", "vllm", "--base", export, "--weight", "1", "--weight", "2"]) == 2
    assert cli.main(["serve", "--engine", "vllm", "--base", base]) == 2  # nothing to compose
    assert cli.main(["serve", "--engine", "vllm", "--base", base, "--value", full, "--vocab-map", "exact"]) == 2


def test_serve_engine_vllm_without_vllm_says_how_to_get_it(dirs, capsys):
    from transfertune.serving.vllm.launch import vllm_version

    if vllm_version() is not None:
        pytest.skip("vLLM is installed here")
    base, full, _ = dirs
    assert cli.main(["serve", "--engine", "vllm", "--base", base, "--value", full]) == 2
    assert "make vllm-venv" in capsys.readouterr().err


def test_tensor_parallel_sizes_that_do_not_divide_a_stack_are_named():
    from transfertune.serving.vllm.model import _check_tensor_parallel

    llama = {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 256}
    _check_tensor_parallel(llama, "base", 2)  # one KV head is replicated over 2 ranks
    _check_tensor_parallel({"num_attention_heads": 3}, "value model 0", 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the value model 0's 3 attention"):
        _check_tensor_parallel({"num_attention_heads": 3, "num_key_value_heads": 3}, "value model 0", 2)


def test_sharded_base_gets_an_index_naming_the_value_tensors(dirs, tmp_path, tokenizer):
    base, full, _ = dirs
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    out = export_vllm(str(tmp_path / "sharded"), [full], tmp_path / "export")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == set(shards) | {VALUE_FILE.format(0)}
    assert {k for k, f in index.items() if f == VALUE_FILE.format(0)} == set(load_file(out / VALUE_FILE.format(0)))
    cm = ComposedModel.from_pretrained(base, [full])
    ids = torch.tensor([tokenizer("It was the best of times")["input_ids"]])
    with torch.no_grad():
        want = cm.compose([m(input_ids=ids).logits[:, -1] for m in cm.models])
    assert torch.allclose(_exported_logits(out, ids), want, atol=1e-5)


def test_request_mixes_resolve_like_the_native_value_field():
    """value_mix: which weights and beta a request's transfertune_* arguments give, against an export of qa
    (weight 1.5, beta 0.7) and style (weight 0, beta 0.5); without transfertune_beta the first named value
    model's own beta, unless the export fixed one."""
    from transfertune.serving.vllm.value_mix import ExportMix, MixError, parse_request

    meta = {"beta": 0.7, "values": [{"name": "qa", "weight": 1.5, "beta": 0.7},
                                    {"name": "style", "weight": 0.0, "beta": 0.5}]}
    export = ExportMix.from_meta(meta)

    def resolve(xargs, on=export):
        return on.resolve(parse_request(xargs))

    assert parse_request(None) is None and parse_request({"other_plugin": 1}) is None
    assert resolve({"transfertune_value": "style"}) == ((0.0, 1.0), 0.5)
    assert resolve({"transfertune_value": ["style", "qa"], "transfertune_weights": [0.5, 2]}) == ((2.0, 0.5), 0.5)
    assert resolve({"transfertune_value": []}) == ((0.0, 0.0), 0.7)
    assert resolve({"transfertune_weights": [1, 1], "transfertune_beta": 3}) == ((1.0, 1.0), 3.0)
    assert resolve({"transfertune_beta": 3}) == ((1.5, 0.0), 3.0)
    fixed = ExportMix.from_meta(meta, beta=0.35, weights=[1.0, 1.0])  # hf_overrides at load time
    assert fixed.weights == (1.0, 1.0) and resolve({"transfertune_value": "style"}, fixed) == ((0.0, 1.0), 0.35)
    assert resolve({"transfertune_value": "style"}, ExportMix.from_meta({**meta, "beta_fixed": True}))[1] == 0.7
    for xargs, message in [
        ({"transfertune_value": "math"}, "no value model named 'math' in this export \\(it holds qa, style\\)"),
        ({"transfertune_weights": [1.0]}, "one weight per value model of the export \\(2: qa, style\\), got 1"),
        ({"transfertune_value": ["qa", "qa"]}, "twice"),
        ({"transfertune_value": ["qa"], "transfertune_weights": [1, 2]}, "names 1 value models but"),
        ({"transfertune_value": 3}, "a value model's name or a list of names"),
        ({"transfertune_weights": [1, True]}, "transfertune_weights\\[1\\] must be a number"),
        ({"transfertune_weights": [101, 0]}, "from -100 to 100"),
        ({"transfertune_beta": "0.5"}, "transfertune_beta must be a number from 0.001 to 1000"),
        ({"transfertune_beta": 1e4}, "transfertune_beta must be a number"),
        ({"transfertune_weight": [1]}, "unknown argument\\(s\\) transfertune_weight"),
    ]:
        with pytest.raises(MixError, match=message):
            resolve(xargs)
