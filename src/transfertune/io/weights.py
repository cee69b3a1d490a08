"""A safetensors checkpoint checked against its config.json before any weight is allocated.

transformers builds the model a config describes and then fills it from the checkpoint: a tensor of another
shape fails deep in the load, after the model is allocated (a config.json saying `intermediate_size: 10000000`
allocates tens of GB first), and a weight the checkpoint lacks is initialised at random, with a warning only.
Here the config's model is built on the meta device (no memory) and compared with the safetensors headers
(shapes only, no data read). Shapes that differ are refused for every model. Missing and unexpected weights
are refused too (`keys`): always in value directories (`strict`, which hold exactly what transfertune saved, and
whose values must also be finite), and in base models unless the caller opts in (`allow_unmatched_weights`).
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from transfertune.io.validate import InputError, read_json_file

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 64 << 20
SIZE_SETTINGS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner")


@dataclass(frozen=True)
class Stored:
    file: Path
    shape: tuple[int, ...]


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files transformers loads from `directory`: model.safetensors, else the shards its index
    names; none when there is neither (transformers then reports what is missing)."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return []
    weight_map = read_json_file(index, "safetensors index", max_bytes=MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f'{index}: "weight_map" must map tensor names to file names')
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise InputError(f"{index} names shards outside its directory ({', '.join(outside[:3])})")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise InputError(f"{index} names {len(missing)} shard(s) that are missing: {', '.join(missing[:3])}")
    return [directory / n for n in names]


def stored_tensors(files: list[Path]) -> dict[str, Stored]:
    """Name -> (file, shape) of every tensor in the files, from their headers (no tensor data is read)."""
    from safetensors import safe_open

    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    found[name] = Stored(path, tuple(f.get_slice(name).get_shape()))
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
            raise InputError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt") from None
    return found


@dataclass
class Described:
    """What a config's model holds: state-dict shapes, and the parameters as groups of names sharing one
    tensor (tied weights: one name of a group in the checkpoint fills them all)."""

    shapes: dict[str, tuple[int, ...]]
    parameters: list[list[str]]
    ignore_missing: list[str]
    ignore_unexpected: list[str]
    renames: bool  # transformers renames or fuses this model's checkpoint names while loading
    output_layer: set[str]  # the output layer's parameters


def described(config, trust_remote_code: bool = False) -> Described:
    """The model `config` describes, built on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from transfertune.io.load_report import output_layer_keys

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    renames = bool(get_checkpoint_conversion_mapping(getattr(config, "model_type", None))
                   or getattr(model, "_checkpoint_conversion_mapping", None))
    return Described(
        shapes={name: tuple(t.shape) for name, t in model.state_dict().items()},
        parameters=list(groups.values()),
        ignore_missing=[*(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
                        *(getattr(model, "_keys_to_ignore_on_save", None) or ())],
        ignore_unexpected=list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
        renames=renames,
        output_layer=output_layer_keys(model),
    )


def check_checkpoint(directory: str | Path, config, *, strict: bool, keys: bool | None = None,
                     fresh_output_layer: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse weights in `directory` that do not fit `config` (see the module docstring), before loading.
    `keys` (default: `strict`) refuses missing and unexpected weights; `fresh_output_layer`: the caller sets the
    output layer itself (a tied checkpoint loaded untied), so its weights may be missing."""
    keys = strict if keys is None else keys
    directory = Path(directory)
    files = weight_files(directory)
    if not files or getattr(config, "quantization_config", None):
        return  # quantized checkpoints store packed shapes: transformers checks those itself
    stored = stored_tensors(files)
    try:
        model = described(config, trust_remote_code)
    except Exception as err:  # a config transformers cannot build a model from: its load says why
        log.debug("cannot build %s's model on the meta device: %s", directory, err)
        return
    source = directory / "config.json"
    settings = size_settings(config)
    if not model.renames:
        wrong = [(name, s) for name, s in stored.items() if name in model.shapes and model.shapes[name] != s.shape]
        if wrong:
            wrong.sort(key=lambda item: natural(item[0]))
            where = ", ".join(sorted({str(s.file) for _, s in wrong}))
            shown = "; ".join(f"{name} is {list(s.shape)}, the config's {list(model.shapes[name])}"
                              for name, s in wrong[:4])
            raise InputError(f"{where}: {len(wrong)} tensor(s) do not have the shapes {source} describes "
                             f"({settings}): {shown}{_more(wrong, 4)}")
    if not keys:
        return
    fresh = model.output_layer if fresh_output_layer else set()
    missing = [names[0] for names in model.parameters if not any(n in stored for n in names)
               and not _matches(names[0], model.ignore_missing) and names[0] not in fresh] if not model.renames else []
    unexpected = [name for name in stored if name not in model.shapes
                  and not _matches(name, model.ignore_unexpected)] if not model.renames else []
    expected = sum(_numel(model.shapes[names[0]]) for names in model.parameters if names[0] not in fresh)
    held = sum(_numel(s.shape) for s in stored.values())
    # renamed checkpoints: a few missing weights are named by transformers' load report after the load
    # (load_causal_lm refuses them then); a config describing far more than is stored is refused unbuilt
    if missing or unexpected or expected > held + held // 10:
        refuse_keys(directory, source, settings, missing, unexpected, f"{expected:,} parameters described, "
                    f"{held:,} stored", base=not strict)
    if strict:
        for path in files:
            check_finite(path)


def size_settings(config) -> str:
    """The config's sizes, as a user would look them up: "vocab_size 320, hidden_size 32, ..."."""
    return ", ".join(f"{k} {getattr(config, k)}" for k in SIZE_SETTINGS
                     if isinstance(getattr(config, k, None), int) and not isinstance(getattr(config, k), bool))


# how a base's refusal says to load it anyway (the CLI says --allow-unmatched-base-weights: cli/main.py)
LOAD_ANYWAY = ("pass allow_unmatched_weights=True (or load within "
               "transfertune.io.loading.allowing_unmatched_weights())")


def refuse_keys(directory: Path, source: Path, settings: str, missing, unexpected, counts: str = "", *,
                base: bool = False) -> None:
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) that {source.name} describes are not in the checkpoint "
                     f"({', '.join(sorted(missing, key=natural)[:5])}{_more(missing, 5)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the checkpoint are not in the model {source.name} describes "
                     f"({', '.join(sorted(unexpected, key=natural)[:5])}{_more(unexpected, 5)})")
    if not parts:
        parts.append(counts)
    why = "missing weights would be initialised at random" if missing or not unexpected else "nothing would use them"
    anyway = f"; to load this base anyway, {LOAD_ANYWAY}" if base else ""
    raise InputError(f"{directory}: the weights do not match {source} ({settings}): {'; '.join(parts)}. "
                     f"Loading anyway would be wrong ({why}): the directory is damaged or its config.json was "
                     f"edited{anyway}")


def check_finite(path: Path) -> None:
    """Every floating-point tensor in the safetensors file is finite (read one tensor at a time)."""
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                nan = int(torch.isnan(tensor).sum())
                bad.append(f"{name} ({nan:,} NaN, {int((~torch.isfinite(tensor)).sum()) - nan:,} infinite "
                           f"of {tensor.numel():,})")
    if bad:
        raise InputError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values: {'; '.join(bad[:5])}"
                         f"{_more(bad, 5)}. The weights are corrupt (a training that diverged?)")


def natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _more(items, shown: int) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""
