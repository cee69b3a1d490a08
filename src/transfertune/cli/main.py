"""`transfertune` command line: train, generate, score, serve, export, eval, info, vocab-map, convert, models."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transfertune.io.validate import InputError, flag_type

NUMBER = flag_type()
POSITIVE = flag_type(gt=0)
NON_NEGATIVE = flag_type(ge=0)
COUNT = flag_type(integer=True, ge=1)


def _add_compose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: built-in short name (e.g. mini-l), local dir or HF id")
    p.add_argument("--value", action="append", default=[], metavar="DIR",
                   help="value directory to compose with the base (repeat for several)")
    p.add_argument("--weight", action="append", type=NUMBER, default=None, metavar="W",
                   help="weight of each --value, in order (default 1 each)")
    p.add_argument("--beta", type=POSITIVE, default=None,
                   help="divide value logits by beta (default: the beta stored in the value directory); "
                        "smaller beta = stronger post-training effect")
    p.add_argument("--proxy-tuned", metavar="MODEL", help="proxy-tuning: the small fine-tuned model")
    p.add_argument("--proxy-untuned", metavar="MODEL", help="proxy-tuning: the small model before fine-tuning")
    p.add_argument("--alpha", type=NUMBER, default=1.0, help="proxy-tuning strength (default 1)")
    p.add_argument("--vocab-map", choices=["none", "auto", "exact", "align"], default="none",
                   help="compose a value model trained on another vocabulary through a token map: auto = a map "
                        "saved in the value directory, else exact string matching (default none: refuse)")
    _add_device_args(p)
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto = spread the base (and proxy models) over the visible GPUs with accelerate, for a base "
                        "larger than one device; value models go to --value-device, logits are composed on the "
                        "base's device")
    p.add_argument("--value-device", default=None, metavar="DEV",
                   help="device of the value models (default: --device)")
    p.add_argument("--overlap", action="store_true",
                   help="decoding: run value (and proxy) models in threads of their own, beside the base, the cores "
                        "split between them; meant for models on different devices (--value-device): on one CPU "
                        "it was slower than the default (docs/performance.md#base-and-value-overlapped)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code (off by default)")


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _add_device_args(p: argparse.ArgumentParser, what: str = "models",
                     default: str = "cpu; with --device-map auto, the first GPU") -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help=f"weights of the {what}: auto (default) = the checkpoint's torch_dtype on a GPU or other "
                        f"accelerator, fp32 on CPU; bf16, fp16 or fp32 = that type (logits are composed in fp32)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help=f"torch device: cpu, cuda, cuda:1, mps, ... (default {default})")


def check_device(flag: str, text: str):
    """The torch.device `text` names, if this machine has it; else an InputError naming the flag."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type in ("cpu",):
        return device
    if device.type == "meta":
        raise InputError(f"{flag} meta holds no data: give a device to compute on (cpu, cuda, ...)")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = torch.backends.mps
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise InputError(f"{flag} {text}: this machine (torch {torch.__version__}) has no {device.type} device")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise InputError(f"{flag} {text}: there {'is' if count == 1 else 'are'} only {count} {device.type} "
                         f"device{'s' if count != 1 else ''} (indices 0-{count - 1})")
    return device


def accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def resolve_dtype(choice: str, on_accelerator: bool):
    """--dtype as from_pretrained takes it: "auto" (the checkpoint's) on an accelerator, else a torch dtype."""
    import torch

    if choice == "auto":
        return "auto" if on_accelerator else torch.float32
    return getattr(torch, DTYPES[choice])


def _placement(args) -> dict:
    """device, value_device, device_map and dtype for ComposedModel.from_pretrained, checked."""
    device_map = getattr(args, "device_map", None)
    if args.device is not None:
        device = check_device("--device", args.device)
    elif device_map and accelerator_available():
        import torch

        device = torch.device("cuda", 0) if torch.cuda.is_available() else check_device("--device", "mps")
    else:
        device = check_device("--device", "cpu")
    value_device = getattr(args, "value_device", None)
    value_device = check_device("--value-device", value_device) if value_device else device
    on_accelerator = device.type != "cpu" if not device_map else accelerator_available()
    return dict(device=device, value_device=value_device, device_map=device_map,
                dtype=resolve_dtype(args.dtype, on_accelerator))


def _load_composed(args):
    from transfertune.inference.composed_model import ComposedModel

    proxy = None
    if bool(args.proxy_tuned) != bool(args.proxy_untuned):
        raise ValueError("proxy-tuning needs both --proxy-tuned and --proxy-untuned")
    if args.proxy_tuned:
        proxy = (args.proxy_tuned, args.proxy_untuned)
    if args.weight is not None and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    return ComposedModel.from_pretrained(
        args.base, args.value, proxy=proxy, weights=args.weight, beta=args.beta, alpha=args.alpha,
        trust_remote_code=args.trust_remote_code, vocab_map=None if args.vocab_map == "none" else args.vocab_map,
        overlap=args.overlap, **_placement(args),
    )


def cmd_train(args) -> None:
    from transfertune.training.value_trainer import train_value_model
    from transfertune.core.value_model import LoraSettings

    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha) if args.lora else None
    placement = _train_placement(args)
    train_value_model(
        args.base, args.data, args.output, init=args.init, scheme=args.scheme,
        zero_init_head=not args.no_zero_init_head, lora=lora,
        beta=args.beta, l1_coef=args.l1, entropy_coef=args.entropy, epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        seed=args.seed, save_steps=args.save_steps, resume=args.resume, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, logging_steps=args.logging_steps, lora_head=args.lora_head,
        eval_data=args.eval_data, eval_steps=args.eval_steps, defer=not args.no_defer, **placement,
    )
    from transfertune.io.run_dirs import is_main_process

    if is_main_process():
        print(f"value model saved to {args.output}")


def _train_placement(args) -> dict:
    """train_value_model arguments for --device and --dtype. The Trainer puts the models on the accelerator when
    there is one (--device cpu keeps them on the CPU); --dtype is the frozen base's (the value model trains in
    fp32)."""
    import torch

    extra, on_accelerator = {}, accelerator_available()
    if args.device is not None:
        device = check_device("--device", args.device)
        if device.index is not None:
            raise InputError(f"--device {args.device}: training runs on the devices accelerate gives it; choose "
                             f"the GPU with CUDA_VISIBLE_DEVICES={device.index} and --device {device.type}")
        if device.type == "cpu":
            extra["use_cpu"], on_accelerator = True, False
    dtype = resolve_dtype(args.dtype, on_accelerator)
    if dtype != torch.float32:
        from transfertune.io.loading import load_base

        extra["base_model"] = load_base(args.base, dtype=dtype, trust_remote_code=args.trust_remote_code)[0]
    return extra


def _read_prompts(args) -> list[str | list[dict]]:
    """Prompt texts, or chats (lists of messages) from a `messages` JSONL."""
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            from transfertune.io.data import read_prompts

            prompts = read_prompts(path)
        else:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in _text_lines(path) if line.strip()]
        if not prompts:
            raise InputError(f"--prompt-file {path} holds no prompts")
        return prompts
    if sys.stdin is None or sys.stdin.closed:
        raise InputError("no prompt: give one as an argument or with --prompt-file (standard input is closed)")
    if sys.stdin.isatty():
        raise InputError("give a prompt as an argument, with --prompt-file, or on standard input")
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError:
        raise InputError("standard input is not UTF-8 text") from None
    if not text.strip():
        raise InputError("standard input is empty: no prompt to generate from")
    return [text]


def _text_lines(path: Path) -> list[str]:
    from transfertune.io.data import DataFormatError

    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: line {n} is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    return lines


def cmd_generate(args) -> None:
    from transfertune.inference.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.draft and args.stream:
        raise InputError("--stream cannot be combined with --draft: speculative decoding commits several tokens "
                         "at a time")
    items = _read_prompts(args)
    chats = [[{"role": "user", "content": p}] if args.chat and isinstance(p, str) else p for p in items]
    gen = _load_composed(args).generator()
    prompts = _render_chats(gen.composed, chats)
    limit = gen.composed.context_length
    if limit is not None and args.max_new_tokens >= limit:
        print(f"note: generation stops at the context of {limit} tokens (prompt + new tokens)", file=sys.stderr)
    if args.stream:
        for prompt in prompts:
            for piece in gen.stream(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop):
                print(piece, end="", flush=True)
            print()
        return
    if args.draft:
        speculative = _speculative_generator(args, gen.composed)
        generate = lambda batch: speculative.generate_texts(  # noqa: E731
            batch, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop)
    else:
        generate = lambda batch: gen.generate(  # noqa: E731
            batch, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop).text
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(prompts), args.batch_size), desc="generating", disable=len(prompts) <= args.batch_size):
        texts = generate(prompts[start : start + args.batch_size])
        for item, text in zip(items[start : start + args.batch_size], texts):
            shown = {"prompt": item} if isinstance(item, str) else {"messages": item}
            print(json.dumps({**shown, "response": text}) if args.jsonl else text)


def _speculative_generator(args, composed):
    """--draft: the draft base, loaded where and as the target base is."""
    from transfertune.io.loading import load_base
    from transfertune.inference.speculative import SpeculativeComposedGenerator

    placement = _placement(args)
    draft, draft_tokenizer = load_base(args.draft, dtype=placement["dtype"], device=placement["device"],
                                       trust_remote_code=args.trust_remote_code)
    try:
        return SpeculativeComposedGenerator(composed, draft, draft_tokenizer)
    except ValueError as err:
        raise InputError(f"--draft {args.draft}: {err}") from None


def _render_chats(cm, items: list) -> list[str]:
    """Prompt texts: chats rendered with the template the value model was trained with (ComposedModel.
    chat_template; its notes go to stderr, one line each), other prompts as they are."""
    if all(isinstance(item, str) for item in items):
        return list(items)
    from transfertune.io.data import render_chat_prompt

    template, notes = cm.chat_template()
    for note in notes:
        print(note, file=sys.stderr)
    return [item if isinstance(item, str) else render_chat_prompt(cm.tokenizer, item, template) for item in items]


def cmd_score(args) -> None:
    from transfertune.io.data import DataFormatError, iter_jsonl, read_jsonl, render_chat
    from transfertune.io.validate import ContextLengthError

    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise InputError(f"--output {out} is a directory: give a file to write")
        if out.exists() and Path(args.data).exists() and out.samefile(args.data):
            raise InputError(f"--output {out} is the --data file: scoring would overwrite its input")
    records = read_jsonl(args.data)
    lines = [n for n, r in iter_jsonl(args.data)]
    cm = _load_composed(args)
    if any("messages" in r for r in records):
        template, notes = cm.chat_template()
        for note in notes:
            print(note, file=sys.stderr)
    pairs = [render_chat(cm.tokenizer, r["messages"], template) if "messages" in r else (r["prompt"], r["response"])
             for r in records]
    try:
        limit = min((n for n in (args.max_length, cm.context_length) if n), default=None)
        feats, truncated = cm.encode([p for p, _ in pairs], [r for _, r in pairs], add_eos=args.add_eos,
                                     max_length=limit)
    except ContextLengthError as err:
        raise DataFormatError(f"{args.data}: line {lines[err.index]}: {str(err).split(': ', 1)[1]}") from None
    if truncated:
        print(f"note: {len(truncated)} prompt{'s' if len(truncated) > 1 else ''} lost tokens from the left to fit "
              f"{'--max-length' if limit == args.max_length else 'the context'} of {limit} tokens (lines "
              f"{', '.join(str(lines[i]) for i in truncated[:10])}"
              f"{', ...' if len(truncated) > 10 else ''})", file=sys.stderr)
    logps = cm.score_features(feats, batch_size=args.batch_size, progress=True)
    rows = [{"logprob": float(lp.sum()), "tokens": lp.numel(), "nll": float(-lp.mean()) if lp.numel() else 0.0,
             "token_logprobs": [round(float(x), 5) for x in lp]} for lp in logps]
    n = sum(r["tokens"] for r in rows)
    mean_nll = -sum(r["logprob"] for r in rows) / max(n, 1)
    if args.output:
        from transfertune.io.run_dirs import write_atomic

        write_atomic(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"examples": len(rows), "tokens": n, "mean_nll": round(mean_nll, 5),
                      "truncated_prompts": len(truncated)}))


def cmd_info(args) -> None:
    """Describe a value directory. Every string from it is printed with control characters escaped."""
    from safetensors import safe_open

    from transfertune.vocab.token_map import MAP_PREFIX, VocabMap
    from transfertune.io.run_dirs import manifest
    from transfertune.io.validate import check_safetensors, printable as clean
    from transfertune.core.value_model import ValueConfig

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


def _read_texts(paths: list[str]) -> list[str]:
    """Texts for alignment: JSONL examples (prompt + response, or chat messages) or plain-text paragraphs."""
    from transfertune.io.data import read_jsonl

    texts = []
    for path in paths:
        if path.endswith(".jsonl"):
            texts += ["".join(m["content"] for m in r["messages"]) if "messages" in r else r["prompt"] + r["response"]
                      for r in read_jsonl(path)]
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--texts file not found: {path}")
            texts += [t for t in "".join(_text_lines(Path(path))).split("\n\n") if t.strip()]
    return texts


def cmd_vocab_map(args) -> None:
    from transfertune.vocab.token_map import VocabMap
    from transfertune.io.loading import load_tokenizer
    from transfertune.core.value_model import ValueConfig

    from transfertune.io.fingerprint import vocab_fingerprint

    ValueConfig.load(args.value)
    texts = []
    if args.kind == "align":
        if not args.texts:
            raise InputError("--kind align needs --texts FILE [FILE ...] to tokenise with both tokenizers")
        texts = _read_texts(args.texts)[: args.max_texts]
        if not texts:
            raise InputError(f"--texts {' '.join(args.texts)}: no text to align")
    value_tok = load_tokenizer(args.value)
    base_tok = load_tokenizer(args.base, trust_remote_code=args.trust_remote_code)
    base_fp = vocab_fingerprint(base_tok)
    same = [m for m in VocabMap.saved(args.value) if m.base_fingerprint == base_fp and m.kind == args.kind]
    if same and not args.overwrite:
        raise InputError(f"{args.value} already holds an {args.kind} map for this base ({same[0].describe()}): "
                         f"pass --overwrite to replace it")
    if args.kind == "align":
        vmap = VocabMap.align(base_tok, value_tok, tqdm_texts(texts))
        if not vmap.stats["aligned"]:
            raise InputError(f"--texts {' '.join(args.texts)}: the alignment matched no tokens; nothing saved")
    else:
        vmap = VocabMap.exact(base_tok, value_tok)
    path = vmap.save(args.value, overwrite=args.overwrite)
    print(vmap.describe())
    print(f"saved {path}")


def tqdm_texts(texts: list[str]):
    from tqdm.auto import tqdm

    return tqdm(texts, desc="aligning", unit="text")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cmd_convert(args) -> None:
    from transfertune.io.gguf import convert_gguf

    print(f"converted {convert_gguf(args.source, args.out_dir, dtype=args.dtype).describe()}")


def cmd_models(args) -> None:
    from transfertune.io.loading import builtin_model_names, builtin_models_dir

    names = builtin_model_names()
    if not names:
        print(f"no built-in models found under {builtin_models_dir()}")
        return
    card = builtin_models_dir() / "family.json"
    family = json.loads(card.read_text()).get("models", {}) if card.is_file() else {}
    print(f"{'model':10s} {'params':>8s} {'vocab':>6s} {'knows v1':>9s} {'knows v2':>9s} {'adds':>6s} "
          f"{'in story':>8s}  "
          f"(knowledge probe, held-out addition and addition after a word problem, untuned: "
          f"{builtin_models_dir() / 'MODEL_CARD.md'})")
    for name in names:
        m = family.get(name, {})
        cells = [f"{m['parameters'] / 1e6:.2f}M" if "parameters" in m else "-", str(m.get("vocab_size", "-"))]
        cells += [f"{m[k]:.3f}" if k in m else "-" for k in ("probe_v1", "probe_v2", "addition", "addition_in_story")]
        print(f"{name:10s} {cells[0]:>8s} {cells[1]:>6s} {cells[2]:>9s} {cells[3]:>9s} {cells[4]:>6s} {cells[5]:>8s}")


def cmd_eval(args) -> None:
    from transfertune.evaluation.runner import EvalConfig, format_markdown, parse_vocab_maps, run_eval, truncation_notes

    vocab_map, vocab_maps = parse_vocab_maps(args.vocab_map)
    cfg = EvalConfig(
        source=args.source, targets=args.targets, tasks=args.tasks, methods=args.methods, split=args.split,
        eval_examples=args.examples, value_steps=args.value_steps, value_lr=args.value_lr, l1_coef=args.l1,
        entropy_coef=args.entropy, value_init=args.value_init, value_scheme=args.value_scheme,
        value_head=args.value_head, value_defer=not args.no_value_defer, finetune_lr=args.finetune_lr,
        lora_lr=args.lora_lr, target_lr=args.target_lr,
        finetune_steps=args.finetune_steps, target_steps=args.target_steps,
        batch_size=args.batch_size, max_length=args.max_length, betas=args.beta, alphas=args.alpha, seed=args.seed,
        cache_dir=args.cache_dir, vocab_map=vocab_map, vocab_maps=vocab_maps, split_by=args.split_by,
        dtype=args.dtype, device=str(check_device("--device", args.device or "cpu")),
        heldout_fraction=args.heldout_fraction, split_seed=args.split_seed, kind=args.kind, labels=args.labels,
    )
    result = run_eval(cfg, out=args.output, docs=args.docs, section=args.docs_section, title=args.docs_title)
    print(format_markdown(result))
    for note in truncation_notes(result["rows"]):
        print(f"note: {note}", file=sys.stderr)
    print(f"\nwrote results.json, results.md and results.png to {args.output or args.cache_dir}")


def cmd_serve(args) -> None:
    if args.engine == "vllm":
        return _serve_vllm(args)
    try:
        from transfertune.serving import serve
    except ImportError as err:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install 'transfertune[serve]' ({err})") from None

    name = args.served_model_name or "+".join([args.base, *(Path(v).name for v in args.value)])
    serve(_load_composed(args), host=args.host, port=args.port, api_key=args.api_key, model_name=name,
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


def cmd_export(args) -> None:
    from transfertune.serving.vllm.export import describe, export_vllm

    if args.weight is not None and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    out = export_vllm(args.base, args.value, args.output, weights=args.weight, beta=args.beta,
                      overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"wrote {out}: {describe(out)}\nserve it with `transfertune serve --engine vllm --base {out}` "
          f"(vLLM's server) or open it with vllm.LLM('{out}')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfertune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a value model against a frozen base",
                       description="Train a value model with the composed SFT loss (response tokens only).")
    p.add_argument("--base", required=True, help="frozen training base (short name, dir or HF id)")
    p.add_argument("--data", required=True, help='JSONL of {"prompt","response"}, {"prompt","completion"} or {"messages"}')
    p.add_argument("--output", required=True,
                   help="value directory to write: new or empty (see --overwrite, --resume)")
    p.add_argument("--init", default=None,
                   help="LM the value model starts from (default: the base itself); 'random:MODEL' = MODEL's config, fresh weights")
    p.add_argument("--scheme", choices=["residual", "cascade"], default="residual",
                   help="how the value model connects to the base: residual = it reads only the tokens (default, "
                        "runs beside the base); cascade = its input also adds softmax(base logits) @ embeddings "
                        "(Inverse Value Learning; runs after the base, no speculative decoding or vLLM)")
    p.add_argument("--no-zero-init-head", action="store_true",
                   help="keep the init LM's output layer (default zeroes it so training starts at the base distribution)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (+ the output layer) instead of all weights")
    _add_device_args(p, what="frozen base (the value model trains in fp32)",
                     default="the accelerator when there is one, else cpu; cpu or cuda, GPUs chosen with "
                             "CUDA_VISIBLE_DEVICES")
    p.add_argument("--lora-head", choices=["lora", "full"], default="lora",
                   help="with --lora, how the output layer trains: lora = a rank-r adapter, so the directory holds "
                        "only adapters (default); full = the whole layer (vocabulary x hidden) is trained and saved")
    p.add_argument("--lora-r", type=COUNT, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=COUNT, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--beta", type=POSITIVE, default=1.0, help="value scale used in training and stored as the default (1)")
    p.add_argument("--l1", type=NON_NEGATIVE, default=0.0, help="IVL norm penalty coefficient on mean |value logit| (0 = off)")
    p.add_argument("--entropy", type=NON_NEGATIVE, default=0.0, help="PRT entropy bonus coefficient on softmax(values) (0 = off)")
    p.add_argument("--no-defer", action="store_true",
                   help='train on whole responses, also on the "deferred" tail a row leaves to the base (by default '
                        "the value model learns to leave the base's distribution unchanged there)")
    p.add_argument("--epochs", type=POSITIVE, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=flag_type(integer=True, ge=-1), default=-1,
                   help="stop after this many optimiser steps (overrides --epochs; -1 = off)")
    p.add_argument("--lr", type=NON_NEGATIVE, default=1e-4, help="peak learning rate, cosine schedule (default 1e-4)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="examples per device per step (default 8)")
    p.add_argument("--grad-accum", type=COUNT, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--max-length", type=flag_type(integer=True, ge=2), default=None,
                   help="truncate examples to this many tokens (default: the base's context, at most 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--save-steps", type=COUNT, default=None, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --output from its last complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what transfertune wrote in a non-empty --output (other files are refused)")
    p.add_argument("--logging-steps", type=COUNT, default=10,
                   help="log the loss and tokens/s every N steps (default 10)")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out JSONL (formats as --data): its composed loss is logged as eval_loss every "
                        "--eval-steps steps and at the end")
    p.add_argument("--eval-steps", type=COUNT, default=None,
                   help="evaluate --eval-data every N steps (default: --logging-steps)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate with a base composed with value models",
                       description="Generate text from the composed model. Prompt from the argument, --prompt-file or stdin.")
    _add_compose_args(p)
    p.add_argument("prompt", nargs="?", help="prompt text (else --prompt-file or standard input)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="text file: one prompt per line (\\n for newlines); .jsonl: one object per line with a "
                        "\"prompt\" (a \"response\" is ignored) or a \"messages\" chat (a last assistant message "
                        "is dropped; rendered with the chat template, as with --chat)")
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as a user message through the chat template the value model was trained "
                        "with (saved in its directory; warns when the base's differs; plain 'user: ...' lines when "
                        "there is no template anywhere, said on stderr)")
    p.add_argument("--max-new-tokens", type=COUNT, default=64,
                   help="tokens to generate at most (default 64; never past the context length)")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=flag_type(integer=True, ge=0), default=0,
                   help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=flag_type(gt=0, le=1), default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--batch-size", type=COUNT, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--draft", metavar="BASE",
                   help="speculative decoding: this smaller base (same vocabulary) drafts tokens together with the "
                        "value models and the base verifies them; the output is the composed model's. Pays at "
                        "--batch-size 1 (see docs/performance.md)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="per-token log-probs of responses under the composed model",
                       description="Score each JSONL example's response given its prompt under the composed model.")
    _add_compose_args(p)
    p.add_argument("--data", required=True, help="JSONL of prompt/response (or completion, or messages)")
    p.add_argument("--output", help="write per-example log-probs here (JSONL; not the --data file)")
    p.add_argument("--add-eos", action="store_true", help="also score the end-of-sequence token after each response")
    p.add_argument("--batch-size", type=COUNT, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--max-length", type=flag_type(integer=True, ge=2), default=None,
                   help="tokens per example at most: longer prompts lose tokens from the left (default: the "
                        "models' context). Log-probs are computed a chunk of response positions at a time, so "
                        "memory grows with batch x length x hidden size, not x vocabulary")
    p.set_defaults(func=cmd_score)

    from transfertune.evaluation.runner import METHODS, EvalConfig

    d = EvalConfig()
    p = sub.add_parser("eval", help="compare transfer with every baseline on built-in tasks or your JSONL data",
                       description="Evaluate target alone, source (+ fine-tuning / + value), target + value, "
                                   "proxy-tuning, weight-diff transfer and target fine-tuning (full, LoRA) on "
                                   "held-out task data. Results and trained models are cached in --cache-dir.")
    _add_device_args(p, "evaluated models (training runs where the Trainer puts it)", "cpu")
    p.add_argument("--source", default=d.source, help=f"small base the value model is trained on (default {d.source})")
    p.add_argument("--targets", nargs="+", default=d.targets, help="target bases (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=d.tasks, metavar="TASK",
                   help="built-in task names, JSONL files or directories of them (a directory holding train.jsonl "
                        "is used as already split; default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"methods to run (default all: {', '.join(METHODS)})")
    p.add_argument("--split", default=d.split, choices=["heldout_example", "heldout_template", "heldout_new"],
                   help="held-out split of built-in tasks and already split directories (default heldout_example)")
    p.add_argument("--split-by", choices=["example", "template"], default=d.split_by,
                   help="JSONL tasks: hold out examples (rows sharing an \"example\" id stay together) or templates "
                        "(rows need a \"template\" field); default example")
    p.add_argument("--heldout-fraction", type=flag_type(gt=0, lt=1), default=d.heldout_fraction,
                   help="JSONL tasks: fraction of examples / templates held out (default %(default)s)")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="JSONL tasks: seed of the split (default 0)")
    p.add_argument("--kind", choices=["classification", "qa", "generation"], default=None,
                   help="JSONL tasks: what to measure besides NLL (default: classification when rows carry "
                        "\"choices\"/\"label\" or --labels is given, else generation = NLL only; qa = exact match "
                        "of the greedy answer)")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="JSONL tasks: the label set of classification rows without \"choices\" (default: their "
                        "labels / responses)")
    p.add_argument("--examples", type=COUNT, default=d.eval_examples, help="held-out examples per task (default %(default)s)")
    p.add_argument("--value-steps", type=COUNT, default=d.value_steps, help="value-model training steps (default %(default)s)")
    p.add_argument("--value-lr", type=NON_NEGATIVE, default=d.value_lr, help="value-model learning rate (default %(default)s)")
    p.add_argument("--value-init", default=None, metavar="MODEL|random",
                   help="what the value model starts from (default: the source itself; random = the source's config "
                        "with fresh weights; or another model sharing the vocabulary)")
    p.add_argument("--value-scheme", choices=["residual", "cascade"], default=d.value_scheme,
                   help="how the value model connects to the base (default residual; see `train --scheme`)")
    p.add_argument("--value-head", choices=["zero", "copy"], default=d.value_head,
                   help="the init's output layer: zero (training starts at the base distribution, default) or copy "
                        "(kept: the sum starts at twice the base logits, as in IVL's release)")
    p.add_argument("--no-value-defer", action="store_true",
                   help='train the value model on whole responses, also on the "deferred" tail a row leaves to the '
                        "base (see `train --no-defer`)")
    p.add_argument("--l1", type=NON_NEGATIVE, default=0.0, help="IVL L1 regulariser coefficient (default 0)")
    p.add_argument("--entropy", type=NON_NEGATIVE, default=0.0, help="PRT entropy regulariser coefficient (default 0)")
    p.add_argument("--finetune-lr", type=POSITIVE, default=d.finetune_lr,
                   help="learning rate of full fine-tuning: the source, and the target unless --target-lr (default %(default)s)")
    p.add_argument("--lora-lr", type=POSITIVE, default=d.lora_lr,
                   help="learning rate of LoRA fine-tuning (default %(default)s)")
    p.add_argument("--target-lr", type=POSITIVE, default=d.target_lr,
                   help="learning rate of the target's full fine-tuning (default: --finetune-lr)")
    p.add_argument("--finetune-steps", type=COUNT, default=d.finetune_steps,
                   help="fine-tuning steps of the source (proxy-tuning, weight diff; default %(default)s)")
    p.add_argument("--target-steps", type=COUNT, default=d.target_steps,
                   help="compute budget of the target fine-tuning oracles, in steps (default %(default)s)")
    p.add_argument("--batch-size", type=COUNT, default=d.batch_size, help="training batch size (default %(default)s)")
    p.add_argument("--max-length", type=flag_type(integer=True, ge=2), default=d.max_length,
                   help="tokens per example (default %(default)s)")
    p.add_argument("--beta", type=POSITIVE, nargs="+", default=d.betas, help="beta values to sweep for target + value")
    p.add_argument("--alpha", type=NUMBER, nargs="+", default=d.alphas, help="alpha values for proxy / weight diff")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=d.cache_dir, help="trained models and per-cell results (default %(default)s)")
    p.add_argument("--output", default=None, help="where results.json/.md/.png go (default: --cache-dir)")
    p.add_argument("--docs", default=None, metavar="MD", help="also write the report to this markdown file")
    p.add_argument("--docs-section", default="main", metavar="NAME",
                   help="section of --docs to write (other sections are kept; default main)")
    p.add_argument("--docs-title", default=None, help="heading of that section")
    p.add_argument("--vocab-map", action="append", default=None, metavar="[TARGET=]exact|align",
                   help="token map for targets with another tokenizer (default exact; align = IVL alignment on "
                        "the task's training texts); TARGET=KIND sets one target's map (repeat for several)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe a value directory")
    p.add_argument("value_dir", help="value directory written by `transfertune train`")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("vocab-map", help="build and save a token map from a base's vocabulary to a value model's",
                       description="Build the map that lets a value model trained on one vocabulary be composed "
                                   "with a base that has another, and save it in the value directory.")
    p.add_argument("--value", required=True, metavar="DIR", help="value directory")
    p.add_argument("--base", required=True, help="base model whose tokenizer the map starts from")
    p.add_argument("--kind", choices=["exact", "align"], default="exact",
                   help="exact string match, or IVL's DTW alignment over --texts (default exact)")
    p.add_argument("--texts", nargs="+", metavar="FILE", help="JSONL or text files to align (for --kind align)")
    p.add_argument("--max-texts", type=COUNT, default=5000, help="align at most this many texts (default 5000)")
    p.add_argument("--overwrite", action="store_true", help="replace a saved map of this kind for this base")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_vocab_map)

    p = sub.add_parser("serve", help="serve the composed model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health) with continuous batching; requests may set `beta` and `weights`.")
    _add_compose_args(p)
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a composed model as a directory vLLM opens",
                       description="Write base + value models as one directory that `vllm serve DIR` and "
                                   "vllm.LLM(DIR) open through transfertune's vLLM plugin (LoRA value models are "
                                   "merged). The base's weight files are hard-linked when possible, else copied.")
    p.add_argument("--engine", choices=["vllm"], default="vllm", help="target engine (vllm)")
    p.add_argument("--base", required=True, help="base model: built-in short name, local dir or cached HF id")
    p.add_argument("--value", action="append", required=True, metavar="DIR",
                   help="value directory (repeat for several)")
    p.add_argument("--weight", action="append", type=NUMBER, default=None, metavar="W",
                   help="weight of each --value, in order (default 1 each)")
    p.add_argument("--beta", type=POSITIVE, default=None, help="default: the beta stored in the first value directory")
    p.add_argument("--output", required=True, help="directory to write (new, empty, or an export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="write a GGUF model as a safetensors model directory (loads in a second)",
                       description="Dequantize a GGUF checkpoint (a .gguf file, or a directory holding exactly one) "
                                   "once and write it as a model directory: config without quantization_config, "
                                   "safetensors weights, tokenizer with its chat template. Use the directory as "
                                   "--base / --init; the .gguf itself also works, but dequantizes on every load.")
    p.add_argument("source", metavar="SRC", help="a .gguf file, or a directory holding exactly one")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write: new or empty")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written weights (default float32: GGUF blocks dequantize exactly into it)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list the built-in models")
    p.set_defaults(func=cmd_models)
    return parser


PYTHON_SPELLINGS = [("vocab_map='auto'", "--vocab-map auto")]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transfertune.core.compose import VocabularyMismatchError
    from transfertune.io.data import DataFormatError

    try:
        args.func(args)
    except (DataFormatError, VocabularyMismatchError, ValueError, OSError) as err:
        from transfertune.io.validate import printable

        message = "\n".join(printable(line) for line in str(err).splitlines())
        for python, flag in PYTHON_SPELLINGS:  # messages written for the Python API, in the words of the CLI
            message = message.replace(python, flag)
        print(f"transfertune {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
