"""Finding and loading base models: built-in short names (`mini-l`), local dirs, GGUF files, or any HF path.

Weights load only from safetensors or GGUF (a `.gguf` file, or a directory holding exactly one, read through
transformers' `gguf_file` and dequantized to the requested dtype: `transfertune convert` writes a safetensors
copy once, which loads in a second); pickled weights are refused. Remote code runs only when the caller asks.
"""
from __future__ import annotations

import contextvars
import copy
import functools
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from transfertune.io.locations import builtin_models_dir
from transfertune.io.validate import PICKLE_SUFFIXES, InputError, check_weight_files, read_json_file


def builtin_model_names() -> list[str]:
    root = builtin_models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


class UnknownModelError(InputError):
    """A model name that is not built in, not a directory and not in the local Hugging Face cache."""


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A built-in short name becomes its directory, a cached Hugging Face id its snapshot directory, a path
    stays a path. Anything else fails at once (transfertune never downloads, so no hub retries)."""
    name = str(name_or_path)
    builtin = builtin_models_dir() / name
    if "/" not in name and (builtin / "config.json").is_file():
        return str(builtin)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    cached = _hub_cache_snapshot(name)
    if cached:
        return cached
    names = ", ".join(builtin_model_names()) or f"none found in {builtin_models_dir()}"
    raise UnknownModelError(f"unknown model '{name}': not a built-in name ({names}), an existing directory, or a "
                            f"Hugging Face id in the local cache (transfertune does not download models)")


def _hub_cache_snapshot(name: str) -> str | None:
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: huggingface_hub raises several unrelated types
        return None


def portable_name(name_or_path: str) -> str:
    """How a value directory records a model: a built-in or hub name as is, a local path made absolute, so
    loading never depends on the current directory."""
    name = str(name_or_path)
    if "/" not in name and (builtin_models_dir() / name / "config.json").is_file():
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def context_length(model) -> int | None:
    """Positions the model can attend over (max_position_embeddings / n_positions), if its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- GGUF ----------------------------------------------------------------------------------------------
GGUF_MAGIC = b"GGUF"


def find_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file a model name stands for: a `.gguf` file, or a directory without a safetensors model that
    holds exactly one `.gguf` file. None for anything else (a model directory, a built-in or hub name).
    A directory with several `.gguf` files, or a `.gguf` path that is not a GGUF file, is an InputError."""
    path = Path(resolve_model(name_or_path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            return None
        check_gguf(path)
        return path
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise InputError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:5])}): "
                         f"name the one to load (e.g. {found[0]})")
    if found:
        check_gguf(found[0])
        return found[0]
    return None


def check_gguf(path: str | Path) -> None:
    """A readable GGUF file: the magic bytes, and a header the `gguf` package can parse (it needs installing)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise InputError(f"cannot read {path} ({err.strerror})") from None
    if magic != GGUF_MAGIC:
        raise InputError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"loading {path.name} needs the `gguf` package: pip install gguf")
    _gguf_header(str(path), path.stat().st_size, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _gguf_header(path: str, size: int, mtime_ns: int) -> str:
    """The file's architecture, read from its header once per version of the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # the reader raises ValueError, KeyError, IndexError, struct errors on bad files
        raise InputError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}): "
                         f"it is truncated or corrupt") from None


def _gguf_args(path: Path) -> tuple[str, dict]:
    return str(path.parent), {"gguf_file": path.name}


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, size: int, mtime_ns: int) -> PreTrainedTokenizerBase:
    """Building a tokenizer from GGUF metadata takes seconds (tens for a 262k vocabulary): once per process."""
    where, extra = _gguf_args(Path(path))
    return AutoTokenizer.from_pretrained(where, **extra)


def drop_quantization(model) -> None:
    """Forget that a model came from a quantized checkpoint once its weights are plain tensors: transformers
    keeps `hf_quantizer` / `config.quantization_config`, and then refuses to train or save the model."""
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    for config in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method


MAX_MODEL_JSON_BYTES = 64 << 20  # tokenizer_config.json lists the added tokens: megabytes for some models
MODEL_JSON_FILES = ("config.json", "tokenizer_config.json")


def check_model_json(path: str | Path) -> None:
    """A model directory's JSON files read as JSON objects: transformers would fail on a deeply nested or
    malformed one with a RecursionError or a traceback that names no file."""
    for name in MODEL_JSON_FILES:
        if Path(path, name).is_file():
            read_json_file(Path(path, name), name, max_bytes=MAX_MODEL_JSON_BYTES)


@contextmanager
def config_named(path: str | Path):
    """A config.json (or tokenizer_config.json) that transformers rejects (hidden_size not a multiple of the heads,
    a field of the wrong JSON type, ...) is an InputError naming the file, not a traceback from transformers."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except StrictDataclassError as err:
        cause = err.__cause__ or err
        raise InputError(f"{Path(path, 'config.json')} describes no valid model ({cause})") from None
    except (TypeError, KeyError, AttributeError, IndexError) as err:
        raise InputError(f"{Path(path, 'config.json')} (or tokenizer_config.json) holds a field transformers "
                         f"cannot read: {type(err).__name__}: {err}") from None


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config (from config.json, or from a GGUF file's metadata), without quantization_config."""
    from transformers import AutoConfig

    gguf = find_gguf(name_or_path)
    if gguf is not None:
        where, extra = _gguf_args(gguf)
        config = AutoConfig.from_pretrained(where, **extra)
    else:
        path = resolve_model(name_or_path)
        check_model_json(path)
        with config_named(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        st = gguf.stat()
        return copy.deepcopy(_gguf_tokenizer(str(gguf.resolve()), st.st_size, st.st_mtime_ns))
    path = resolve_model(name_or_path)
    check_model_json(path)
    with config_named(path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


_ALLOW_UNMATCHED = contextvars.ContextVar("allow_unmatched_weights", default=False)


@contextmanager
def allowing_unmatched_weights(allow: bool = True):
    """Within it, base models whose checkpoint lacks weights their config.json describes, or holds tensors it does
    not, load (missing weights initialised at random, transformers' load report as the warning) instead of being
    refused: the opt-in of `--allow-unmatched-base-weights`, for APIs that load bases further down."""
    token = _ALLOW_UNMATCHED.set(allow)
    try:
        yield
    finally:
        _ALLOW_UNMATCHED.reset(token)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    frozen: bool = True,
    strict: bool = False,
    allow_unmatched_weights: bool | None = None,
    **kwargs,
):
    """Load a causal LM from safetensors, or from a GGUF file (dequantized to `dtype`). Frozen models are put in
    eval mode with gradients off.

    The safetensors headers are checked against config.json before anything is allocated (io/weights.py):
    tensors of other shapes are refused, and so are missing and unexpected weights, naming them. A base model
    may opt in to loading those (`allow_unmatched_weights`, default: within `allowing_unmatched_weights()`);
    `strict` (value directories) never does, and also refuses non-finite values."""
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return _finish(_load_gguf_lm(gguf, dtype, **kwargs), device, frozen, kwargs)
    path = resolve_model(name_or_path)
    if Path(path).is_file():
        kind = "pickled weights, which transfertune never loads" if path.endswith(PICKLE_SUFFIXES) else "a file"
        raise InputError(f"model '{name_or_path}' is {kind}: give a model directory (safetensors) or a .gguf file")
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
        check_weight_files(path, "models")
        if allow_unmatched_weights is None:
            allow_unmatched_weights = _ALLOW_UNMATCHED.get()
        keys = strict or not allow_unmatched_weights
        fresh_output_layer = _check_checkpoint(path, trust_remote_code, strict, keys, kwargs)
    else:
        keys = fresh_output_layer = False
    from transfertune.io.load_report import held_load_report

    try:  # untying the output layer on purpose: its "MISSING" load report is not shown (load_report.py)
        with config_named(path), held_load_report(active=kwargs.get("tie_word_embeddings") is False) as report:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=keys, **kwargs
            )
            if keys:
                model, info = model
            report.settle(model)
    except OSError as err:
        hint = f" Built-in models: {', '.join(builtin_model_names()) or 'none found'}."
        raise FileNotFoundError(f"cannot load model '{name_or_path}' from safetensors: {err}.{hint}") from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise InputError(f"{path}: the weights do not have the shapes its config.json describes (the load "
                         f"report above lists them)") from None
    if keys:
        from transfertune.io.load_report import output_layer_keys
        from transfertune.io.weights import refuse_keys, size_settings

        fresh = output_layer_keys(model) if fresh_output_layer else set()
        missing = [k for k in info["missing_keys"] if k not in fresh]
        if missing or info["unexpected_keys"]:
            refuse_keys(Path(path), Path(path, "config.json"), size_settings(model.config), missing,
                        info["unexpected_keys"], base=not strict)
    return _finish(model, device, frozen, kwargs)


def _check_checkpoint(path: str, trust_remote_code: bool, strict: bool, keys: bool, kwargs: dict) -> bool:
    """The checkpoint against its config (io/weights.py), with the config changes `kwargs` make; whether the
    output layer is left to the caller (a tied checkpoint loaded untied). The config keeps its
    quantization_config (unlike load_config's): quantized checkpoints store packed shapes."""
    from transformers import AutoConfig

    from transfertune.io.weights import check_checkpoint

    check_model_json(path)
    with config_named(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    untied = kwargs.get("tie_word_embeddings") is False
    fresh_output_layer = untied and bool(getattr(config, "tie_word_embeddings", False))
    if "tie_word_embeddings" in kwargs:
        config.tie_word_embeddings = kwargs["tie_word_embeddings"]
    check_checkpoint(path, config, strict=strict, keys=keys, fresh_output_layer=fresh_output_layer,
                     trust_remote_code=trust_remote_code)
    return fresh_output_layer


def _finish(model, device, frozen: bool, kwargs: dict):
    if kwargs.get("device_map") is None:  # a device_map places (and may spread) the model itself
        model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def _load_gguf_lm(path: Path, dtype: torch.dtype, **kwargs):
    """A GGUF checkpoint as a plain model: every weight dequantized to `dtype`, no quantizer left behind."""
    from transformers.utils.quantization_config import GgufConfig

    where, extra = _gguf_args(path)
    if dtype is None or dtype == "auto":  # GGUF blocks dequantize exactly into float32
        dtype = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, quantization_config=GgufConfig(dequantize=True), **extra, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise InputError(f"cannot load {path} as a causal LM ({err})") from None
    drop_quantization(model)
    return model


def load_base(name_or_path: str, **kwargs):
    """(model, tokenizer) for a frozen base model."""
    tok = load_tokenizer(name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return load_causal_lm(name_or_path, **kwargs), tok


def real_vocab_size(tokenizer) -> int:
    """Number of real token ids (the output layer may be padded past it)."""
    return len(tokenizer)
