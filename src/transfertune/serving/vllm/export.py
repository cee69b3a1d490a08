"""`transfertune export --engine vllm`: a composed model as one directory that vLLM opens (`vllm serve DIR`,
`LLM(DIR)`), through the model class in model.py that transfertune's vLLM plugin registers.

The directory is the base checkpoint with its architecture renamed, plus the value models' weights:

    config.json       the base's config; "architectures": ["TransferTuneComposedForCausalLM"]; under "transfertune":
                      the base's own config, each value model's name, config, weight and own beta, the default
                      beta (and whether it was fixed with --beta), the real vocabulary size
    *.safetensors     the base's weight files, unchanged (hard links when the file system allows, else copies)
    transfertune-value-<i>.safetensors
                      value model i, every tensor named "value_<i>." + its Hugging Face name; a LoRA value model
                      is merged into its backbone first
    tokenizer files, generation_config.json: the base's

Nothing here imports vLLM: a directory can be exported where vLLM is not installed. Exporting never loads the
base's weights (a 70B base exports in the time its files take to link), only its config and tokenizer.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from transfertune.io.validate import InputError, check_number, read_json_file

ARCHITECTURE = "TransferTuneComposedForCausalLM"
META_KEY = "transfertune"
FORMAT = 1
VALUE_FILE = "transfertune-value-{}.safetensors"
VALUE_PREFIX = "value_{}."  # vLLM wants one integer per layer name: "value_0.model.layers.3", not "values.0..."
INDEX = "model.safetensors.index.json"
# flat config keys vLLM's hf_overrides can set at load time (a dict override would replace all of "transfertune")
BETA_OVERRIDE = "transfertune_beta"
WEIGHTS_OVERRIDE = "transfertune_weights"
MAX_CONFIG_BYTES = 16 << 20


def is_export(directory: str | Path) -> bool:
    """Whether `directory` holds a composed model exported for vLLM."""
    path = Path(directory, "config.json")
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ARCHITECTURE in (config.get("architectures") or [])


def _raw_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(f"{directory} is not a model directory: it has no config.json")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a model config")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return config


def _context(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _base_weight_files(base_dir: Path) -> tuple[list[str], dict | None]:
    """(safetensors files of the base, its index or None)."""
    index_path = base_dir / INDEX
    if index_path.is_file():
        index = read_json_file(index_path, INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        index, files = None, sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{base_dir} holds no safetensors weights: the vLLM export reads the base from "
                         f"safetensors only")
    for name in files:
        if "/" in name or "\\" in name or not (base_dir / name).is_file():
            raise InputError(f"{base_dir}: weight file '{name}' is missing")
        if name.startswith("transfertune-value-"):
            raise InputError(f"{base_dir} already holds transfertune value weights ({name}): export from the "
                             f"original base, not from an exported directory")
    return files, index


def _value_names(values: Sequence[str], names: Sequence[str] | None) -> list[str]:
    from transfertune.serving.value_registry import check_value_name

    names = [Path(v).name for v in values] if names is None else list(names)
    if len(names) != len(values):
        raise InputError(f"{len(values)} value models but {len(names)} names")
    for name, path in zip(names, values):
        try:
            check_value_name(name, "value model name")
        except InputError as err:
            raise InputError(f"{err} (value model {path}; name it: --value NAME=DIR)") from None
    taken = sorted({n for n in names if names.count(n) > 1})
    if taken:
        raise InputError(f"two value models are named {taken[0]!r}: name them apart (--value NAME=DIR)")
    return names


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _value_tensors(value, prefix: str) -> tuple[dict, dict]:
    """({prefixed name: tensor}, the HF config dict) of a loaded ValueModel; a LoRA adapter is merged."""
    model = value.model
    if value.is_lora:
        model = model.merge_and_unload()
    config = model.config.to_dict()
    tied = bool(config.get("tie_word_embeddings", False))
    state = model.state_dict()
    tensors = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue  # vLLM ties it to the embedding itself, as save_pretrained does
        tensors[prefix + name] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, config


def export_vllm(
    base: str,
    values: Sequence[str],
    output: str | Path,
    *,
    names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    beta: float | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write `output`: the base composed with the value directories, for vLLM. Returns its path.

    `names` (one per value model, default each directory's name) are what a request picks them by
    (value_mix.py); `weights` (one per value model, default 1 each) and `beta` (default: the first value model's)
    make the default composition, which vLLM can override at load time with
    `hf_overrides={"transfertune_beta": B, "transfertune_weights": [w, ...]}` (see docs/serving.md)."""
    from safetensors.torch import save_file

    from transfertune.core.value_model import ValueModel
    from transfertune.io.fingerprint import vocab_fingerprint
    from transfertune.io.loading import load_tokenizer, portable_name, real_vocab_size, resolve_model
    from transfertune.io.run_dirs import staged_directory

    if not values:
        raise InputError("a vLLM export needs at least one --value (a plain base runs in vLLM as it is)")
    weights = [1.0] * len(values) if weights is None else [float(w) for w in weights]
    if len(weights) != len(values):
        raise InputError(f"{len(values)} value models but {len(weights)} weights")
    names = _value_names(values, names)
    for i, w in enumerate(weights, start=1):
        check_number(w, f"weight {i}")

    output = Path(output)
    base_dir = Path(resolve_model(base))
    if output.exists() and output.resolve() == base_dir.resolve():
        raise InputError(f"--output {output} is the base model's own directory")
    previous: set[str] = set()
    if output.exists():
        if not output.is_dir():
            raise InputError(f"--output {output} exists and is not a directory")
        listing = list(output.iterdir())
        if listing and not is_export(output):
            raise InputError(f"--output {output} is not empty and is not a vLLM export: choose a new directory")
        if listing and not overwrite:
            raise InputError(f"--output {output} already holds a vLLM export: pass --overwrite to replace it")
        previous = {p.name for p in listing}

    base_config = _raw_config(base_dir)
    if ARCHITECTURE in (base_config.get("architectures") or []):
        raise InputError(f"{base_dir} is already a vLLM export: export from the original base")
    if not base_config.get("architectures"):
        raise InputError(f"{base_dir}/config.json names no architecture: vLLM could not build the base")
    files, index = _base_weight_files(base_dir)
    tokenizer = load_tokenizer(str(base_dir), trust_remote_code=trust_remote_code)

    value_models = [ValueModel.load(v, trust_remote_code=trust_remote_code) for v in values]
    fingerprint = vocab_fingerprint(tokenizer)
    for path, v in zip(values, value_models):
        if v.config.scheme != "residual":
            raise InputError(f"{path}: a {v.config.scheme} value model reads the base's logits at its input; the "
                             f"vLLM model runs base and values side by side (residual scheme only)")
        if v.config.vocab_fingerprint != fingerprint:
            v.check_compatible(tokenizer, base)  # raises VocabularyMismatchError naming both vocabularies
    beta_fixed = beta is not None
    if beta is None:
        beta = value_models[0].config.beta
    check_number(beta, "beta", gt=0)

    contexts = [_context(base_config)]
    value_meta, value_files = [], []
    for i, (path, name, v, w) in enumerate(zip(values, names, value_models, weights)):
        tensors, config = _value_tensors(v, VALUE_PREFIX.format(i))
        if not config.get("architectures"):
            raise InputError(f"{path}: the value model's config names no architecture")
        contexts.append(_context(config))
        value_meta.append({"name": name, "source": portable_name(path), "weight": w, "beta": float(v.config.beta),
                           "config": config, "training_base": v.config.training_base, "lora_merged": v.is_lora})
        value_files.append((VALUE_FILE.format(i), tensors))
    del value_models

    config = dict(base_config)
    config["architectures"] = [ARCHITECTURE]
    known = [c for c in contexts if c]
    if known and "max_position_embeddings" in config:
        config["max_position_embeddings"] = min(known)  # vLLM's default max_model_len: what every model can attend
    config[META_KEY] = {
        "format": FORMAT,
        "base": {"source": portable_name(base), "config": base_config},
        "values": value_meta,
        "beta": float(beta),
        "beta_fixed": beta_fixed,
        "real_vocab_size": real_vocab_size(tokenizer),
        "vocab_fingerprint": fingerprint,
    }
    from transfertune import __version__

    config[META_KEY]["transfertune_version"] = __version__

    with staged_directory(output, marker="config.json", replaces=previous) as staging:
        for name in files:
            _link_or_copy(base_dir / name, staging / name)
        for name, tensors in value_files:
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
        if index is not None:
            new_index = dict(index)
            weight_map = dict(index["weight_map"])
            for name, tensors in value_files:
                weight_map.update({key: name for key in tensors})
            new_index["weight_map"] = weight_map
            (staging / INDEX).write_text(json.dumps(new_index, indent=2) + "\n")
        tokenizer.save_pretrained(staging)
        if (base_dir / "generation_config.json").is_file():
            shutil.copyfile(base_dir / "generation_config.json", staging / "generation_config.json")
        (staging / "config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    return output


def describe(directory: str | Path) -> str:
    """One line about an export: its base, value models, weights and beta."""
    meta = _raw_config(Path(directory)).get(META_KEY, {})
    values = ", ".join(f"{v.get('name', i)}={v.get('source')} (weight {v.get('weight')})"
                       for i, v in enumerate(meta.get("values", [])))
    beta = meta.get("beta")
    beta = beta if isinstance(beta, (int, float)) and math.isfinite(beta) else "?"
    return f"{meta.get('base', {}).get('source')} + {values}, beta {beta}"
