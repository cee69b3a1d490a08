"""`transfertune score`: per-token log-probs of responses under the composed model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from transfertune.cli.common import (
    COUNT,
    InputError,
    add_compose_args,
    flag_type,
    load_composed,
)

DESCRIPTION = "Score each JSONL example's response given its prompt under the composed model."


def add_arguments(p) -> None:
    add_compose_args(p)
    p.add_argument("--data", required=True, help="JSONL of prompt/response (or completion, or messages)")
    p.add_argument("--output", help="write per-example log-probs here (JSONL; not the --data file, not inside a model "
                                    "directory read; an existing file only if score wrote it, see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file that score did not write")
    p.add_argument("--add-eos", action="store_true", help="also score the end-of-sequence token after each response")
    p.add_argument("--batch-size", type=COUNT, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--max-length", type=flag_type(integer=True, ge=2), default=None,
                   help="tokens per example at most: longer prompts lose tokens from the left (default: the "
                        "models' context). Log-probs are computed a chunk of response positions at a time, so "
                        "memory grows with batch x length x hidden size, not x vocabulary")


def run(args) -> None:
    from transfertune.io.data import (
        DataFormatError,
        iter_jsonl,
        read_jsonl,
        render_chat,
    )
    from transfertune.io.validate import ContextLengthError

    if args.output:
        check_output(args)
    records = read_jsonl(args.data)
    lines = [n for n, r in iter_jsonl(args.data)]
    cm = load_composed(args)
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

        check_output(args)  # again: scoring took a while
        write_atomic(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"examples": len(rows), "tokens": n, "mean_nll": round(mean_nll, 5),
                      "truncated_prompts": len(truncated)}))


ROW_KEYS = {"logprob", "tokens", "nll", "token_logprobs"}  # what every row of --output holds


def check_output(args) -> None:
    """Refuse an --output that is the data, lies in a model directory being read, or is an existing file score
    did not write (one whose first line is not a row of ROW_KEYS; an empty file is replaced), unless --overwrite."""
    from transfertune.io.loading import resolve_model

    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"--output {out} is a directory: give a file to write")
    if out.exists() and Path(args.data).exists() and out.samefile(args.data):
        raise InputError(f"--output {out} is the --data file: scoring would overwrite its input")
    where = out.parent.resolve()
    for flag, names in (("--base", [args.base]), ("--value", args.value), ("--proxy-tuned", [args.proxy_tuned]),
                        ("--proxy-untuned", [args.proxy_untuned])):
        for name in filter(None, names):
            try:
                model = Path(resolve_model(name)).resolve()
            except InputError:
                continue  # an unknown model is reported when the models load
            if model.is_dir() and (where == model or model in where.parents):
                raise InputError(f"--output {out} is inside the model directory of {flag} ({name}): scoring would "
                                 f"write into a model it reads; choose a file elsewhere")
    if out.exists() and not args.overwrite and not written_by_score(out):
        raise InputError(f"--output {out} exists and was not written by `transfertune score` (its first line is "
                         f"not a row of {', '.join(sorted(ROW_KEYS))}): pass --overwrite to replace it, or choose a "
                         f"new file")


def written_by_score(path: Path) -> bool:
    if not path.is_file():  # a device, a pipe
        return False
    try:
        if path.stat().st_size == 0:
            return True
        with path.open("rb") as f:
            row = json.loads(f.readline(64 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(row, dict) and set(row) == ROW_KEYS
