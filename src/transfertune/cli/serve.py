"""`transfertune serve`: serve the composed model over an OpenAI-compatible HTTP API."""
from __future__ import annotations

import os
from pathlib import Path

from transfertune.cli.common import COUNT, POSITIVE, InputError, add_compose_args, flag_type, load_composed

# the server's defaults, without importing fastapi / uvicorn for `serve --help` (tests check they agree)
TIMEOUT_KEEP_ALIVE, TIMEOUT_HEADER, TIMEOUT_BODY, MAX_CONNECTIONS = 5.0, 10.0, 30.0, 512

DESCRIPTION = ("OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
               "/health) with continuous batching; one base with several value models (--value NAME=DIR, repeated), "
               "chosen per request (`model`: BASE+NAME, or `value`), loaded and unloaded while it runs "
               "(/v1/load_value, /v1/unload_value); requests may set `beta` and `weights`.")


def add_arguments(p) -> None:
    add_compose_args(p)
    for action in p._actions:
        if action.dest == "value":
            action.metavar = "[NAME=]DIR"
            action.help = ("value directory, repeat for several: each is served alone as BASE+NAME (NAME: the "
                           "directory's name unless given as NAME=DIR), and all of them together, at --weight, as "
                           "the default model (--served-model-name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=flag_type(integer=True, ge=0, le=65535), default=8000,
                   help="port, 1 to 65535 (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("TRANSFERTUNE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every path but /health, /docs and /openapi.json "
                        "included (default: $TRANSFERTUNE_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model id clients send (default: base+value names)")
    p.add_argument("--max-batch", type=COUNT, default=32, help="sequences decoded together at most (default 32)")
    p.add_argument("--max-queue", type=COUNT, default=256,
                   help="sequences allowed to wait; past it requests get 429 (default 256)")
    p.add_argument("--max-model-len", type=COUNT, default=None,
                   help="prompt + completion tokens at most, up to the models' context window (default: that "
                        "window)")
    p.add_argument("--timeout-keep-alive", type=POSITIVE, default=TIMEOUT_KEEP_ALIVE, metavar="SECONDS",
                   help="native engine: close a kept-alive connection idle this long (default %(default)g)")
    p.add_argument("--timeout-header", type=POSITIVE, default=TIMEOUT_HEADER, metavar="SECONDS",
                   help="native engine: a request's headers must arrive within this many seconds of the connection "
                        "opening (or of the request's first byte), else 408 and the connection is closed "
                        "(default %(default)g)")
    p.add_argument("--timeout-body", type=POSITIVE, default=TIMEOUT_BODY, metavar="SECONDS",
                   help="native engine: then its body within this many seconds, else the connection is closed "
                        "(default %(default)g)")
    p.add_argument("--max-connections", type=COUNT, default=MAX_CONNECTIONS,
                   help="native engine: open connections at most; more get 503 and are closed (default "
                        "%(default)s)")
    p.add_argument("--draft", metavar="BASE", default=None,
                   help="native engine: speculative decoding with this smaller base (same vocabulary), which drafts "
                        "tokens with the default model's value models while --base verifies them; requests for the "
                        "default model decode so (same text when greedy), others decode plainly (docs/serving.md)")
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
        from transfertune.serving.openai_serving import context_window
    except ImportError as err:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install 'transfertune[serve]' ({err})") from None

    names, args.value = named_values(args.value)
    _check_max_model_len(args)
    _check_full_attention(args)
    name = args.served_model_name or "+".join([args.base, *names])
    composed = load_composed(args)
    draft = _load_draft(args)
    window = context_window(composed)
    if args.max_model_len and window and args.max_model_len > window:
        raise InputError(f"--max-model-len {args.max_model_len} is more than the composed models' context window "
                         f"({window} tokens, the shortest max_position_embeddings among them)")
    serve(composed, host=args.host, port=args.port, api_key=args.api_key, model_name=name, value_names=names,
          beta=args.beta, vocab_map=None if args.vocab_map == "none" else args.vocab_map, hand_over=True,
          max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
          timeout_keep_alive=args.timeout_keep_alive, timeout_header=args.timeout_header,
          timeout_body=args.timeout_body, max_connections=args.max_connections, draft=draft)


def _load_draft(args):
    """--draft: the draft base, loaded where and as the base is (None without the flag)."""
    if not args.draft:
        return None
    from transfertune.cli.common import placement
    from transfertune.io.loading import load_base
    from transfertune.serving.engine import Draft

    place = placement(args)
    model, tokenizer = load_base(args.draft, dtype=place["dtype"], device=place["device"],
                                 trust_remote_code=args.trust_remote_code)
    return Draft(model, tokenizer, name=f"--draft {args.draft}")


def named_values(values: list[str]) -> tuple[list[str], list[str]]:
    """(names, directories) of the --value flags: NAME=DIR, or DIR named by its directory's name."""
    from transfertune.serving.value_registry import NAME_PATTERN

    names, dirs = [], []
    for given in values:
        name, sep, directory = given.partition("=")
        if not (sep and NAME_PATTERN.fullmatch(name) and directory) or Path(given).exists():
            name, directory = Path(given).name, given
            if not NAME_PATTERN.fullmatch(name) or len(name) > 64:
                raise InputError(f"--value {given}: its directory's name {name!r} cannot name a model (1 to 64 "
                                 f"letters, digits, '.', '_' or '-'); name it: --value NAME={given}")
        if name in names:
            raise InputError(f"--value {given}: the name {name!r} is taken by another --value; name them apart: "
                             f"--value NAME=DIR")
        names.append(name)
        dirs.append(directory)
    return names, dirs


def _check_max_model_len(args) -> None:
    """--max-model-len against the base's context window, from its config.json alone, before any model loads
    (a GGUF base, and the other models, are checked once loaded)."""
    if args.max_model_len is None:
        return
    from transfertune.io.loading import find_gguf, load_config

    if find_gguf(args.base) is not None:
        return
    config = load_config(args.base, trust_remote_code=args.trust_remote_code)
    window = getattr(config, "max_position_embeddings", None)
    if isinstance(window, int) and 0 < window < args.max_model_len:
        raise InputError(f"--max-model-len {args.max_model_len} is more than the context window of base "
                         f"'{args.base}' ({window} tokens)")


def _check_full_attention(args) -> None:
    """Refuse, from the configs alone and before any weights load, models whose KV cache layers rows cannot join
    or leave in the engine's decode batch (linear-attention or other recurrent state): full-attention and
    sliding-window layers can (inference/generator.batch_layers, applied here to the cache transformers builds
    from the config)."""
    from transformers.cache_utils import DynamicCache

    from transfertune.inference.generator import batch_layers
    from transfertune.io.loading import load_config

    models = [("base", args.base), ("--proxy-tuned model", args.proxy_tuned),
              ("--proxy-untuned model", args.proxy_untuned)]
    for role, model in models:
        if not model:
            continue
        config = load_config(model, trust_remote_code=args.trust_remote_code)
        try:
            batch_layers(DynamicCache(config=config))
        except NotImplementedError as err:
            raise InputError(
                f"{role} '{model}' cannot be served by the native engine: it has layers other than full-attention "
                f"and sliding-window ones, whose state the server's decode batch cannot split between requests "
                f"({err}). `transfertune generate` decodes such models") from None
        except Exception:  # noqa: BLE001 (a config transformers builds no cache from: the engine checks once loaded)
            continue


def _serve_vllm(args) -> None:
    from transfertune.serving.vllm.launch import serve_vllm

    if args.draft:
        raise InputError("--draft needs the native engine: drop --engine vllm (or --draft)")
    if args.proxy_tuned or args.proxy_untuned or args.vocab_map != "none":
        raise ValueError("--engine vllm composes value models over the base's own vocabulary: proxy-tuning and "
                         "--vocab-map need the native engine")
    if args.weight is not None and args.value and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    names, args.value = named_values(args.value)
    name = args.served_model_name or "+".join([args.base, *names])
    serve_vllm(args.base, args.value, names=names, export_dir=args.export_dir, host=args.host, port=args.port,
               api_key=args.api_key, served_model_name=name, max_model_len=args.max_model_len,
               max_num_seqs=args.max_batch, beta=args.beta, weights=args.weight,
               trust_remote_code=args.trust_remote_code, extra_args=args.vllm_args)
