"""Composing a value model with a base whose tokenizer is different.

`VocabMap` says, for each base token, which value token's logit it takes (or none: a neutral value 0):
  exact  the value token with the same bytes, after normalising leading-space markers (byte-level `Ġ`,
         sentencepiece `▁`, `<0xNN>` byte fallback); special tokens by role (eos, bos, pad, unk) or by name.
  align  Inverse Value Learning's map: tokenise the same texts with both tokenizers, align the two token
         sequences by dynamic time warping with an edit-distance cost, count co-occurring (base, value) pairs
         and keep the most frequent value token per base token. Base tokens the texts never show fall back to
         the exact match.
A map is built once and saved in the value directory (`vocab_map-<base fingerprint>-<kind>.safetensors`); a
saved map is never replaced silently.

`CrossVocabValue` makes such a value model look like a same-vocabulary one to the rest of the library: it
decodes the base tokens to text, runs the value model on its own tokenisation of that text (one KV cache per
row when decoding), and gathers its logits onto the base vocabulary. The value at a base position is the
one after the last value token that ends at or before that position's text; when a value token straddles the
boundary, the value model sees one token less than the base.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .compose import VocabularyMismatchError
from .vocab import vocab_fingerprint

log = logging.getLogger(__name__)
MAP_PREFIX = "vocab_map-"
SPECIAL_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


# -- token strings ------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id spells (None for special tokens), leading-space markers normalised to b' '."""
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    out: list[bytes | None] = []
    if _is_byte_level(tokenizer):
        table = _bytes_to_unicode()
        for i, tok in enumerate(tokens):
            if tok is None or i in special or any(ch not in table for ch in tok):
                out.append(None if tok is None or i in special else tok.encode("utf-8"))
            else:
                out.append(bytes(table[ch] for ch in tok))
        return out
    for i, tok in enumerate(tokens):
        if tok is None or i in special:
            out.append(None)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("▁", " ").encode("utf-8"))
    return out


def _special_pairs(base_tok, value_tok) -> dict[int, int]:
    """Base special token id -> value special token id, by role first, then by identical name."""
    pairs = {}
    for role in SPECIAL_ROLES:
        b, v = getattr(base_tok, f"{role}_id", None), getattr(value_tok, f"{role}_id", None)
        if b is not None and v is not None:
            pairs.setdefault(b, v)
    value_special = {value_tok.convert_ids_to_tokens(i): i for i in value_tok.all_special_ids}
    for i in base_tok.all_special_ids:
        name = base_tok.convert_ids_to_tokens(i)
        if name in value_special:
            pairs.setdefault(i, value_special[name])
    return pairs


# -- the map ------------------------------------------------------------------------------------------
@dataclass
class VocabMap:
    """index[b] = the value token id whose logit base token b takes, or -1 (value 0)."""

    index: torch.Tensor
    kind: str
    base_fingerprint: str
    value_fingerprint: str
    stats: dict = field(default_factory=dict)

    def __call__(self, value_logits: torch.Tensor) -> torch.Tensor:
        """Value logits [..., V_value] -> [..., V_base]: a gather, with 0 where nothing maps."""
        idx = self.index.to(value_logits.device)
        gathered = value_logits.index_select(-1, idx.clamp(min=0))
        return torch.where(idx >= 0, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))

    @property
    def base_vocab_size(self) -> int:
        return len(self.index)

    @property
    def unmapped(self) -> int:
        return int((self.index < 0).sum())

    @property
    def coverage(self) -> float:
        return 1.0 - self.unmapped / max(1, len(self.index))

    def describe(self) -> str:
        detail = ", ".join(f"{k} {v}" for k, v in self.stats.items())
        return (f"{self.kind} map to base {self.base_fingerprint}: {self.base_vocab_size - self.unmapped}/"
                f"{self.base_vocab_size} base tokens mapped ({self.coverage:.1%}), {self.unmapped} get value 0"
                + (f" [{detail}]" if detail else ""))

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def exact(cls, base_tok, value_tok) -> "VocabMap":
        index, n = _exact_index(base_tok, value_tok)
        return cls(index, "exact", vocab_fingerprint(base_tok), vocab_fingerprint(value_tok), {"exact": n})

    @classmethod
    def align(cls, base_tok, value_tok, texts: Iterable[str], max_tokens: int = 256) -> "VocabMap":
        """IVL's co-occurrence map from DTW alignments of `texts`; unseen base tokens fall back to exact."""
        counts = align_counts(base_tok, value_tok, texts, max_tokens=max_tokens)
        index, _ = _exact_index(base_tok, value_tok)
        best: dict[int, tuple[int, int]] = {}
        for (b, v), c in counts.items():
            if c > best.get(b, (0, -1))[0]:
                best[b] = (c, v)
        for b, (_, v) in best.items():
            index[b] = v
        n_exact = int((index >= 0).sum()) - len(best)
        stats = {"aligned": len(best), "exact_fallback": n_exact, "aligned_pairs": sum(counts.values())}
        return cls(index, "align", vocab_fingerprint(base_tok), vocab_fingerprint(value_tok), stats)

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save as `vocab_map-<base fingerprint>-<kind>.safetensors` (written to a temporary file, then renamed).
        A saved map of the same base and kind is replaced only with overwrite=True (FileExistsError otherwise);
        maps of other kinds are kept."""
        from safetensors.torch import save as save_bytes

        from .outputs import write_atomic

        same = [p for p, m in _saved_with_paths(directory)
                if m.base_fingerprint == self.base_fingerprint and m.kind == self.kind]
        if same and not overwrite:
            raise FileExistsError(f"{same[0]} already holds {self.kind} map for this base; replacing it needs "
                                  f"overwrite (`transfertune vocab-map ... --overwrite`)")
        path = Path(directory) / f"{MAP_PREFIX}{self.base_fingerprint}-{self.kind}.safetensors"
        meta = {"kind": self.kind, "base_fingerprint": self.base_fingerprint,
                "value_fingerprint": self.value_fingerprint, "stats": json.dumps(self.stats)}
        write_atomic(path, save_bytes({"index": self.index.to(torch.int64).contiguous()}, metadata=meta))
        for old in same:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VocabMap":
        from safetensors import safe_open

        from .validate import InputError, check_safetensors

        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "index" not in f.keys() or not {"kind", "base_fingerprint", "value_fingerprint"} <= set(meta):
                raise InputError(f"{path} is not a transfertune vocabulary map (no index or metadata)")
            index = f.get_tensor("index")
        try:
            stats = json.loads(meta.get("stats", "{}"))
        except ValueError:
            stats = {}
        return cls(index, meta["kind"], meta["base_fingerprint"], meta["value_fingerprint"], stats)

    @classmethod
    def saved(cls, directory: str | Path) -> list["VocabMap"]:
        return [m for _, m in _saved_with_paths(directory)]


def _saved_with_paths(directory: str | Path | None) -> list[tuple[Path, VocabMap]]:
    if not directory or not Path(directory).is_dir():
        return []
    return [(p, VocabMap.load(p)) for p in sorted(Path(directory).glob(f"{MAP_PREFIX}*.safetensors"))]


def _exact_index(base_tok, value_tok) -> tuple[torch.Tensor, int]:
    value_ids: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes(value_tok)):
        if b is not None:
            value_ids.setdefault(b, i)
    base_bytes = token_bytes(base_tok)
    index = torch.full((max(len(base_tok), len(base_bytes)),), -1, dtype=torch.long)
    for i, b in enumerate(base_bytes):
        if b is not None and b in value_ids:
            index[i] = value_ids[b]
    for b, v in _special_pairs(base_tok, value_tok).items():
        if b < len(index):
            index[b] = v
    return index, int((index >= 0).sum())


# -- alignment ----------------------------------------------------------------------------------------
def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone alignment of two sequences (steps: both, first only, second only)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        row, prev, c = acc[i], acc[i - 1], cost[i - 1]
        diag_up = c + np.minimum(prev[:-1], prev[1:])
        for j in range(1, m + 1):
            left = c[j - 1] + row[j - 1]
            row[j] = diag_up[j - 1] if diag_up[j - 1] <= left else left
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        moves = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
        step = int(np.argmin(moves))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return path[::-1]


def _token_texts(ids: Sequence[int], table: list[bytes | None]) -> list[str]:
    return [(table[i] or b"").decode("utf-8", errors="replace") for i in ids]


def align_counts(base_tok, value_tok, texts: Iterable[str], max_tokens: int = 256) -> Counter:
    """Counter of (base id, value id) pairs matched by DTW over each text's two tokenisations."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    base_table, value_table = token_bytes(base_tok), token_bytes(value_tok)
    counts: Counter = Counter()
    for text in texts:
        b_ids = base_tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        v_ids = value_tok(text, add_special_tokens=False)["input_ids"][: max_tokens + max_tokens // 2]
        if not b_ids or not v_ids:
            continue
        b_txt, v_txt = _token_texts(b_ids, base_table), _token_texts(v_ids, value_table)
        cost = cdist(b_txt, v_txt, scorer=Levenshtein.normalized_distance, dtype=np.float32)
        for i, j in dtw_path(np.asarray(cost, dtype=np.float64)):
            counts[(b_ids[i], v_ids[j])] += 1
    return counts


# -- composing through the map -----------------------------------------------------------------------
@dataclass
class _RowState:
    base_ids: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    cache: object = None
    logits: torch.Tensor | None = None


@dataclass
class CrossVocabCache:
    """Decoding state of a CrossVocabValue: per row, the base ids seen, value ids fed and the value KV cache."""

    rows: list[_RowState]


@dataclass
class _Output:
    logits: torch.Tensor
    past_key_values: CrossVocabCache | None = None


class CrossVocabValue(nn.Module):
    """A value model with its own tokenizer, called like a model over the base's token ids."""

    def __init__(self, model: nn.Module, value_tokenizer, base_tokenizer, vocab_map: VocabMap):
        super().__init__()
        if vocab_map.base_vocab_size < len(base_tokenizer):
            raise VocabularyMismatchError(
                f"vocabulary map covers {vocab_map.base_vocab_size} base tokens, the base has {len(base_tokenizer)}")
        self.model = model
        self.value_tokenizer = value_tokenizer
        self.base_tokenizer = base_tokenizer
        self.vocab_map = vocab_map

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _text(self, ids: Sequence[int]) -> str:
        return self.base_tokenizer.decode(list(ids), skip_special_tokens=True)

    def _value_ids(self, text: str) -> list[int]:
        return self.value_tokenizer(text, add_special_tokens=True)["input_ids"]

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **_) -> _Output:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if use_cache:
            return self._step(input_ids, mask, past_key_values)
        return self._teacher_forced(input_ids, mask)

    def _teacher_forced(self, input_ids: torch.Tensor, mask: torch.Tensor) -> _Output:
        """Logits [B, T, V_base]; position t uses the value state after the text of base tokens <= t."""
        batch, width = input_ids.shape
        plans = []
        for row in range(batch):
            cols = mask[row].nonzero().squeeze(-1).tolist()
            ids = input_ids[row, cols].tolist()
            text = self._text(ids)
            enc = self.value_tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ends = [e for _, e in enc["offset_mapping"]]
            targets = []
            for t in range(len(ids)):
                prefix = self._text(ids[: t + 1])
                cut = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
                targets.append(bisect.bisect_right(ends, cut) - 1)
            plans.append((cols, enc["input_ids"], targets))
        v_width = max(1, max(len(p[1]) for p in plans))
        v_ids = torch.zeros(batch, v_width, dtype=torch.long)
        v_mask = torch.zeros_like(v_ids)
        for row, (_, ids, _) in enumerate(plans):
            v_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            v_mask[row, : len(ids)] = 1
        v_logits = self.model(input_ids=v_ids.to(self.device), attention_mask=v_mask.to(self.device),
                              use_cache=False).logits
        out = torch.zeros(batch, width, v_logits.shape[-1], dtype=v_logits.dtype, device=v_logits.device)
        for row, (cols, _, targets) in enumerate(plans):
            keep = [(c, t) for c, t in zip(cols, targets) if t >= 0]
            if keep:
                c_idx, t_idx = (torch.tensor(x, device=out.device) for x in zip(*keep))
                out[row, c_idx] = v_logits[row, t_idx]
        return _Output(self.vocab_map(out))

    def _step(self, input_ids: torch.Tensor, mask: torch.Tensor, state: CrossVocabCache | None) -> _Output:
        """Incremental decoding: re-tokenise each row's text, keep the value cache up to the common prefix."""
        from transformers import DynamicCache

        new_mask = mask[:, -input_ids.shape[1]:]
        state = state or CrossVocabCache([_RowState() for _ in range(len(input_ids))])
        vocab = None
        for row, rs in enumerate(state.rows):
            rs.base_ids += input_ids[row][new_mask[row].bool()].tolist()
            ids = self._value_ids(self._text(rs.base_ids))
            common = 0
            for a, b in zip(rs.fed, ids):
                if a != b:
                    break
                common += 1
            if ids and (common < len(ids) or rs.logits is None or common < len(rs.fed)):
                keep = min(common, len(ids) - 1)
                if keep == 0:
                    rs.cache = None
                elif keep < len(rs.fed):
                    keep_first(rs.cache, keep)
                out = self.model(input_ids=torch.tensor([ids[keep:]], device=self.device),
                                 past_key_values=rs.cache if rs.cache is not None else DynamicCache(),
                                 use_cache=True, logits_to_keep=1)
                rs.cache, rs.fed, rs.logits = out.past_key_values, ids, out.logits[0, -1]
            elif not ids:
                rs.cache, rs.fed, rs.logits = None, [], None
            vocab = vocab or (rs.logits.shape[-1] if rs.logits is not None else None)
        vocab = vocab or len(self.value_tokenizer)
        logits = torch.stack([rs.logits if rs.logits is not None else torch.zeros(vocab, device=self.device)
                              for rs in state.rows])[:, None]
        return _Output(self.vocab_map(logits), state)


def keep_first(cache, length: int) -> None:
    """Crop a KV cache to its first `length` positions. transformers 5 `crop` takes the number of positions to
    drop as a negative int (a positive one is refused); 4.x read a negative int the same way."""
    drop = cache.get_seq_length() - length
    if drop < 0:
        raise ValueError(f"cannot keep {length} positions of a cache holding {cache.get_seq_length()}")
    if drop:
        cache.crop(-drop)


def resolve_vocab_map(value, base_tokenizer, how: str | VocabMap | None) -> VocabMap:
    """The map for composing `value` (a ValueModel) with a base: `how` is "auto" (a map saved in the value
    directory, else exact), "exact", "align" (must have been built, e.g. by `transfertune vocab-map`), or a
    VocabMap."""
    if isinstance(how, VocabMap):
        return how
    base_fp = vocab_fingerprint(base_tokenizer)
    directory = getattr(value, "directory", None)
    saved = {m.kind: m for m in VocabMap.saved(directory) if m.base_fingerprint == base_fp}
    if how == "auto" and saved:
        return saved.get("align") or saved.get("exact") or next(iter(saved.values()))
    if how in saved:
        return saved[how]
    if how == "align":
        raise VocabularyMismatchError(
            f"no aligned vocabulary map for this base in {directory}: build one with "
            f"`transfertune vocab-map --value {directory} --base BASE --kind align --texts FILE`")
    if how not in ("auto", "exact"):
        raise ValueError(f"vocab_map must be 'auto', 'exact', 'align' or a VocabMap, got {how!r}")
    vmap = VocabMap.exact(base_tokenizer, value.tokenizer)
    if directory:
        try:
            vmap.save(directory)
        except OSError as err:
            log.warning("could not save the vocabulary map in %s: %s", directory, err)
    return vmap


def attach_value(value, base_tokenizer, base_name: str = "base", vocab_map: str | VocabMap | None = None):
    """The module to run for a value model next to this base: the model itself when the vocabularies match,
    a CrossVocabValue when they differ and a map is allowed, else a VocabularyMismatchError."""
    from .value_model import ValueModel

    if not isinstance(value, ValueModel):
        return value
    if vocab_fingerprint(base_tokenizer) == value.config.vocab_fingerprint:
        return value.model
    if vocab_map is None:
        try:
            value.check_compatible(base_tokenizer, base_name)
        except VocabularyMismatchError as err:
            raise VocabularyMismatchError(f"{err} Or compose through a token map: vocab_map='auto'.") from None
    vmap = resolve_vocab_map(value, base_tokenizer, vocab_map)
    log.info("value model -> %s: %s", base_name, vmap.describe())
    return CrossVocabValue(value.model, value.tokenizer, base_tokenizer, vmap)
