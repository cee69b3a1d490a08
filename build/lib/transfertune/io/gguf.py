"""`transfertune convert`: a GGUF checkpoint (as llama.cpp and many PyPI packages ship models) written once as
a plain safetensors model directory.

Loading a `.gguf` dequantizes every weight (tens of seconds for a few hundred million parameters); the
directory this writes loads in about a second, and works everywhere a model directory does. It holds the
config (without GGUF's `quantization_config`, which would make transformers refuse to train the model), the
weights in `dtype`, the generation config and the tokenizer with its chat template, if the file has one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from transfertune.io.validate import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Converted:
    directory: Path
    source: Path
    architecture: str
    parameters: int
    vocab_size: int
    dtype: str
    chat_template: bool

    def describe(self) -> str:
        return (f"{self.directory}: {self.architecture}, {self.parameters / 1e6:.1f}M parameters ({self.dtype}), "
                f"vocabulary {self.vocab_size:,}, chat template: {'yes' if self.chat_template else 'none in the file'}")


def check_output(out: str | Path) -> Path:
    """`out` must be new or an empty directory: a conversion never replaces or mixes with other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT_DIR {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        listing = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InputError(f"OUT_DIR {out} is not empty ({listing}): choose a new or empty directory")
    return out


def convert_gguf(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32") -> Converted:
    """Write the GGUF model `source` (a .gguf file, or a directory holding exactly one) to `out` as safetensors.

    Everything is checked before the model loads: the file must be a readable GGUF, and `out` new or empty.
    The directory appears whole (written to a staging directory beside it, then renamed) or not at all."""
    from transfertune.io.loading import find_gguf, load_causal_lm, load_tokenizer
    from transfertune.io.run_dirs import _umask, check_writable, staged_directory

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = Path(source)
    if not src.exists():
        raise InputError(f"SRC {src} does not exist")
    out = check_output(out)
    gguf = find_gguf(src)
    if gguf is None:
        raise InputError(f"SRC {src} is not a .gguf file or a directory holding one")
    parent = out if out.is_dir() else out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create OUT_DIR {out} ({err.strerror})") from None
    check_writable(parent, "OUT_DIR")

    tokenizer = load_tokenizer(str(gguf))
    model = load_causal_lm(str(gguf), dtype=DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    with staged_directory(out, marker=None) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        if "quantization_config" in config:  # drop_quantization removed it; never let it reach the file
            raise RuntimeError(f"{gguf}: the converted config still has a quantization_config")
        mode = 0o666 & ~_umask()
        for path in staging.iterdir():  # transformers writes the weights 0600 (a temporary file renamed)
            os.chmod(path, mode)
    return Converted(out, gguf, type(model).__name__, sum(p.numel() for p in model.parameters()),
                     len(tokenizer), dtype, bool(getattr(tokenizer, "chat_template", None)))
