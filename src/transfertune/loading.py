"""Finding and loading base models: built-in short names (`mini-l`), local dirs, or any HF path.

Weights load only from safetensors; remote code runs only when the caller asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .validate import InputError, check_weight_files

REPO_ROOT = Path(__file__).resolve().parents[2]


def builtin_models_dir() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_MODELS", REPO_ROOT / "models"))


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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    frozen: bool = True,
    **kwargs,
):
    """Load a causal LM from safetensors. Frozen models are put in eval mode with gradients off."""
    path = resolve_model(name_or_path)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
        check_weight_files(path, "models")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        hint = f" Built-in models: {', '.join(builtin_model_names()) or 'none found'}."
        raise FileNotFoundError(f"cannot load model '{name_or_path}' from safetensors: {err}.{hint}") from err
    model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def load_base(name_or_path: str, **kwargs):
    """(model, tokenizer) for a frozen base model."""
    tok = load_tokenizer(name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return load_causal_lm(name_or_path, **kwargs), tok


def real_vocab_size(tokenizer) -> int:
    """Number of real token ids (the output layer may be padded past it)."""
    return len(tokenizer)
