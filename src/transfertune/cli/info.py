"""`transfertune info`: describe a value directory."""
from __future__ import annotations

from pathlib import Path

DESCRIPTION = None


def add_arguments(p) -> None:
    p.add_argument("value_dir", help="value directory written by `transfertune train`")


def run(args) -> None:
    """Describe a value directory. Every string from it is printed with control characters escaped."""
    from safetensors import safe_open

    from transfertune.core.value_model import ValueConfig
    from transfertune.io.run_dirs import manifest
    from transfertune.io.validate import check_safetensors
    from transfertune.io.validate import printable as clean
    from transfertune.vocab.token_map import MAP_PREFIX, VocabMap

    cfg = ValueConfig.load(args.value_dir)
    directory = Path(args.value_dir)
    own = manifest(directory)
    files = sorted(p.name for p in directory.iterdir() if p.name in own)
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                    if p.name not in own and not p.name.startswith((".", MAP_PREFIX)))
    n_params = 0
    for name in files:
        if name.endswith(".safetensors"):
            check_safetensors(directory / name)
            with safe_open(str(directory / name), "pt") as f:
                n_params += sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"value directory   {clean(args.value_dir)}")
    print(f"kind              {'LoRA adapter' if cfg.lora else 'full weights'} (init: {clean(cfg.init)})")
    print(f"trained against   {clean(cfg.training_base)}")
    print(f"vocabulary        {clean(cfg.vocab_size)} tokens, fingerprint {clean(cfg.vocab_fingerprint)}")
    print(f"beta / scheme     {clean(cfg.beta)} / {clean(cfg.scheme)}")
    print(f"regularisers      l1 {clean(cfg.l1_coef)}, entropy {clean(cfg.entropy_coef)}")
    print(f"stored parameters {n_params:,}")
    print(f"files             {clean(', '.join(files))}")
    if others:
        print(f"also here         {clean(', '.join(others))} (not part of the value model)")
    for vmap in VocabMap.saved(args.value_dir):
        print(f"vocabulary map    {clean(vmap.describe())}")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
