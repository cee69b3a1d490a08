"""Finding and loading base models: built-in short names (`mini-l`), local dirs, or any HF path.

Weights load only from safetensors; remote code runs only when the caller asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[2]


def builtin_models_dir() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_MODELS", REPO_ROOT / "models"))


def builtin_model_names() -> list[str]:
    root = builtin_models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A built-in short name becomes its directory; anything else is passed on unchanged."""
    name = str(name_or_path)
    builtin = builtin_models_dir() / name
    if "/" not in name and (builtin / "config.json").is_file():
        return str(builtin)
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


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
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
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
