"""`transfertune convert`: write a GGUF model as a safetensors model directory (loads in a second)."""
from __future__ import annotations

from transfertune.io.placement import DTYPES

DESCRIPTION = ("Dequantize a GGUF checkpoint (a .gguf file, or a directory holding exactly one) "
               "once and write it as a model directory: config without quantization_config, "
               "safetensors weights, tokenizer with its chat template. Use the directory as "
               "--base / --init; the .gguf itself also works, but dequantizes on every load.")


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SRC", help="a .gguf file, or a directory holding exactly one")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write: new or empty")
    p.add_argument("--dtype", choices=[*DTYPES, *DTYPES.values()], default="fp32",
                   help="dtype of the written weights: fp32 (default: GGUF blocks dequantize exactly into it), bf16 "
                        "or fp16, spelt as everywhere else (float32 / bfloat16 / float16 are accepted too)")


def run(args) -> None:
    from transfertune.io.gguf import convert_gguf

    dtype = DTYPES.get(args.dtype, args.dtype)
    print(f"converted {convert_gguf(args.source, args.out_dir, dtype=dtype).describe()}")
