"""`transfertune serve`: serve the composed model over an OpenAI-compatible HTTP API."""
from __future__ import annotations

import os
from pathlib import Path

from transfertune.cli.common import add_compose_args, load_composed

DESCRIPTION = ("OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
               "/health) with continuous batching; requests may set `beta` and `weights`.")


def add_arguments(p) -> None:
    add_compose_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("TRANSFERTUNE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $TRANSFERTUNE_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model id clients send (default: base+value names)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most (default 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences allowed to wait; past it requests get 429 (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens at most (default: the models' context window)")
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="native = transfertune's server (default); vllm = vLLM's OpenAI server on a composed export "
                        "(--base an export, or --base + --value exported first; needs vLLM installed)")
    p.add_argument("--export-dir", default=None, help="--engine vllm: where to export --base + --value (default: a "
                                                      "cache directory, reused while the inputs are unchanged)")
    p.add_argument("--vllm-args", default="", help="--engine vllm: more `vllm serve` arguments, one string "
                                                   "(e.g. \"--tensor-parallel-size 2 --dtype float32\")")


def run(args) -> None:
    if args.engine == "vllm":
        return _serve_vllm(args)
    try:
        from transfertune.serving import serve
    except ImportError as err:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install 'transfertune[serve]' ({err})") from None

    name = args.served_model_name or "+".join([args.base, *(Path(v).name for v in args.value)])
    serve(load_composed(args), host=args.host, port=args.port, api_key=args.api_key, model_name=name,
          max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len)


def _serve_vllm(args) -> None:
    from transfertune.serving.vllm.launch import serve_vllm

    if args.proxy_tuned or args.proxy_untuned or args.vocab_map != "none":
        raise ValueError("--engine vllm composes value models over the base's own vocabulary: proxy-tuning and "
                         "--vocab-map need the native engine")
    if args.weight is not None and args.value and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    name = args.served_model_name or "+".join([args.base, *(Path(v).name for v in args.value)])
    serve_vllm(args.base, args.value, export_dir=args.export_dir, host=args.host, port=args.port,
               api_key=args.api_key, served_model_name=name, max_model_len=args.max_model_len,
               max_num_seqs=args.max_batch, beta=args.beta, weights=args.weight,
               trust_remote_code=args.trust_remote_code, extra_args=args.vllm_args)
