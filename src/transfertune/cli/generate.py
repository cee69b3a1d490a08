"""`transfertune generate`: generate with a base composed with value models."""
from __future__ import annotations

import json
import sys

from transfertune.cli.common import (
    COUNT,
    NON_NEGATIVE,
    SEED,
    InputError,
    add_compose_args,
    flag_type,
    load_composed,
    placement,
    read_prompts,
    render_chats,
)

DESCRIPTION = "Generate text from the composed model. Prompt from the argument, --prompt-file or stdin."


def add_arguments(p) -> None:
    add_compose_args(p)
    p.add_argument("prompt", nargs="?", help="prompt text (else --prompt-file or standard input)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="text file: one prompt per line (\\n for newlines); .jsonl: one object per line with a "
                        "\"prompt\" (a \"response\" is ignored) or a \"messages\" chat (a last assistant message "
                        "is dropped; rendered with the chat template, as with --chat)")
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as a user message through the chat template the value model was trained "
                        "with (saved in its directory; warns when the base's differs; plain 'user: ...' lines when "
                        "there is no template anywhere, said on stderr)")
    p.add_argument("--chat-template", choices=["trained", "split", "base"], default="trained",
                   help="how chats (--chat, messages in --prompt-file) are rendered: trained (default) = the whole "
                        "prompt with the template the value model was trained with; split = the value models read "
                        "that, the base (and proxy models) its own template, or plain 'role: content' lines without "
                        "one (e.g. a SmolLM2 value on Gemma-3 from GGUF); base = the base's for every model")
    p.add_argument("--max-new-tokens", type=COUNT, default=64,
                   help="tokens to generate at most (default 64; never past the context length)")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=flag_type(integer=True, ge=0), default=0,
                   help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=flag_type(gt=0, le=1), default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=SEED, default=None, help="sampling seed for reproducible output (0 to 2**32-1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--batch-size", type=COUNT, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--draft", metavar="BASE",
                   help="speculative decoding: this smaller base (same vocabulary) drafts tokens together with the "
                        "value models and the base verifies them; the output is the composed model's. Each prompt of a "
                        "batch keeps its own accepted tokens (Llama-like models; docs/performance.md)")


def run(args) -> None:
    from transfertune.inference.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.draft and args.stream:
        raise InputError("--stream cannot be combined with --draft: speculative decoding commits several tokens "
                         "at a time")
    if args.draft and args.chat_template == "split":
        raise InputError("--chat-template split cannot be combined with --draft: the draft reads one prompt")
    items = read_prompts(args)
    chats = [[{"role": "user", "content": p}] if args.chat and isinstance(p, str) else p for p in items]
    gen = load_composed(args).generator()
    prompts, value_prompts = render_chats(gen.composed, chats, args.chat_template)
    from transfertune.core.cascade import needs_base_logits

    if value_prompts is not None and any(needs_base_logits(v) for v in gen.composed.values):
        raise InputError("--chat-template split cannot be used with a cascade value model: it reads the base's "
                         "logits over the base's prompt")
    limit = gen.composed.context_length
    if limit is not None and args.max_new_tokens >= limit:
        print(f"note: generation stops at the context of {limit} tokens (prompt + new tokens)", file=sys.stderr)
    if args.stream:
        for i, prompt in enumerate(prompts):
            value_prompt = None if value_prompts is None else value_prompts[i]
            for piece in gen.stream(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                                    value_prompt=value_prompt):
                print(piece, end="", flush=True)
            print()
        return
    if args.draft:
        speculative = _speculative_generator(args, gen.composed)
        generate = lambda batch, _: speculative.generate_texts(  # noqa: E731
            batch, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop)
    else:
        generate = lambda batch, value_batch: gen.generate(  # noqa: E731
            batch, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
            value_prompts=value_batch).text
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(prompts), args.batch_size), desc="generating",
                      disable=len(prompts) <= args.batch_size):
        rows = slice(start, start + args.batch_size)
        texts = generate(prompts[rows], None if value_prompts is None else value_prompts[rows])
        for item, text in zip(items[start : start + args.batch_size], texts):
            shown = {"prompt": item} if isinstance(item, str) else {"messages": item}
            print(json.dumps({**shown, "response": text}) if args.jsonl else text)


def _speculative_generator(args, composed):
    """--draft: the draft base, loaded where and as the target base is."""
    from transfertune.inference.speculative import SpeculativeComposedGenerator
    from transfertune.io.loading import load_base

    place = placement(args)
    draft, draft_tokenizer = load_base(args.draft, dtype=place["dtype"], device=place["device"],
                                       trust_remote_code=args.trust_remote_code)
    try:
        return SpeculativeComposedGenerator(composed, draft, draft_tokenizer)
    except ValueError as err:
        raise InputError(f"--draft {args.draft}: {err}") from None
