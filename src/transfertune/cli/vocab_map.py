"""`transfertune vocab-map`: build and save a token map from a base's vocabulary to a value model's."""
from __future__ import annotations

from pathlib import Path

from transfertune.cli.common import COUNT, InputError, text_lines

DESCRIPTION = ("Build the map that lets a value model trained on one vocabulary be composed "
               "with a base that has another, and save it in the value directory.")


def add_arguments(p) -> None:
    p.add_argument("--value", required=True, metavar="DIR", help="value directory")
    p.add_argument("--base", required=True, help="base model whose tokenizer the map starts from")
    p.add_argument("--kind", choices=["exact", "align"], default="exact",
                   help="exact string match, or IVL's DTW alignment over --texts (default exact)")
    p.add_argument("--texts", nargs="+", metavar="FILE", help="JSONL or text files to align (for --kind align)")
    p.add_argument("--max-texts", type=COUNT, default=5000, help="align at most this many texts (default 5000)")
    p.add_argument("--overwrite", action="store_true", help="replace a saved map of this kind for this base")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args) -> None:
    from transfertune.core.value_model import ValueConfig
    from transfertune.io.fingerprint import vocab_fingerprint
    from transfertune.io.loading import load_tokenizer
    from transfertune.vocab.token_map import VocabMap

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
            texts += [t for t in "".join(text_lines(Path(path))).split("\n\n") if t.strip()]
    return texts


def tqdm_texts(texts: list[str]):
    from tqdm.auto import tqdm

    return tqdm(texts, desc="aligning", unit="text")
