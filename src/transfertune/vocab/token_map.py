"""Composing a value model with a base whose tokenizer is different.

`VocabMap` says, for each base token, which value token's logit it takes, or none. A base token with no
counterpart takes a *neutral* value: the mean of the mapped values at that position. (Value logits only mean
something relative to each other, so 0 is not neutral: where the mapped values average -0.4, a 0 would raise
every unmapped token above the average token.)
  exact  the value token with the same bytes, after normalising leading-space markers (byte-level `Ġ`,
         sentencepiece `▁`, `<0xNN>` byte fallback). Special tokens go by what they do (`special_pairs`):
         chat markers to their counterparts (`<|im_start|>` / `<|im_end|>` <-> `<start_of_turn>` /
         `<end_of_turn>`), end of sequence to end of sequence, and bos / pad / unk to their namesakes only
         when neither side's token is a chat marker (SmolLM2's bos is `<|im_start|>` and its pad `<|im_end|>`).
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
boundary, the value model sees one token less than the base. Base chat markers reach the value model as its
own markers' text (Gemma's `<start_of_turn>` as `<|im_start|>` for a SmolLM2 value model).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transfertune.core.compose import VocabularyMismatchError
from transfertune.core.response_logits import cached_forward
from transfertune.io.fingerprint import vocab_fingerprint

log = logging.getLogger(__name__)
MAP_PREFIX = "vocab_map-"


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
    special = special_ids(tokenizer)
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


# Chat-template markers of common families (ChatML, Gemma, Llama 3, Granite, Phi), by what they do.
CHAT_START = ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|start_of_role|>", "<|turn>")
CHAT_END = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_role|>", "<turn|>", "<|end|>")
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BEGIN_OF_TEXT = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens: the roles' and added tokens marked special (e.g. chat markers)."""
    return set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}


def special_kinds(tokenizer) -> dict[str, int]:
    """What the tokenizer's special tokens do: kind -> token id, for "chat_start" / "chat_end" (markers, by
    name), "eos" (the role), "end_of_text" (the eos if named so, else by name), and "bos" / "pad" / "unk" (the
    role's token, left out when it is a chat marker or an end of sequence: SmolLM2-Instruct's bos is
    `<|im_start|>`, its pad `<|im_end|>`; a bos role held by a marker falls back to a token named like a bos)."""
    vocab, special = tokenizer.get_vocab(), special_ids(tokenizer)

    def named(names) -> int | None:  # only special tokens: Gemma also has "</s>" and "<s>" as plain text
        return next((vocab[n] for n in names if vocab.get(n) in special), None)

    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ends_text = eos is not None and tokenizer.convert_ids_to_tokens(eos) in END_OF_TEXT
    kinds = {"chat_start": named(CHAT_START), "chat_end": named(CHAT_END), "eos": eos,
             "end_of_text": eos if eos_ends_text else named(END_OF_TEXT)}
    taken = {i for i in kinds.values() if i is not None}
    markers = {kinds["chat_start"], kinds["chat_end"]} - {None}
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos in taken:
        bos = named(BEGIN_OF_TEXT)
    kinds["bos"] = bos if bos not in markers else None
    taken.add(kinds["bos"])
    for role in ("pad", "unk"):
        i = getattr(tokenizer, f"{role}_token_id", None)
        kinds[role] = i if i not in taken else None
        taken.add(kinds[role])
    return {k: v for k, v in kinds.items() if v is not None}


def special_pairs(base_tok, value_tok) -> dict[int, int]:
    """Base special token id -> value special token id: chat markers to their counterparts, end of sequence to
    end of sequence (the base's eos takes the value's eos: a value model trained on chat data says "stop" with
    its end-of-turn marker), end of text, bos, pad and unk to theirs; then remaining special tokens by name.
    bos, pad and unk never take a chat marker (by role alone, SmolLM2's bos would be `<|im_start|>`)."""
    base, value = special_kinds(base_tok), special_kinds(value_tok)
    pairs: dict[int, int] = {}
    for kind in ("chat_start", "chat_end", "eos", "end_of_text", "bos", "pad", "unk"):
        if kind in base and kind in value:
            pairs.setdefault(base[kind], value[kind])
    value_special = {value_tok.convert_ids_to_tokens(i): i for i in special_ids(value_tok)}
    for i in sorted(special_ids(base_tok)):
        name = base_tok.convert_ids_to_tokens(i)
        if name in value_special:
            pairs.setdefault(i, value_special[name])
    return pairs


def marker_texts(base_tok, value_tok) -> dict[int, str]:
    """Base chat-marker id -> the text of the value tokenizer's counterpart (what the value model reads)."""
    base, value = special_kinds(base_tok), special_kinds(value_tok)
    return {base[k]: value_tok.convert_ids_to_tokens(value[k]) for k in ("chat_start", "chat_end")
            if k in base and k in value}


# -- the map ------------------------------------------------------------------------------------------
@dataclass
class VocabMap:
    """index[b] = the value token id whose logit base token b takes, or -1 (the neutral value: the mean of the
    mapped values at that position)."""

    index: torch.Tensor
    kind: str
    base_fingerprint: str
    value_fingerprint: str
    stats: dict = field(default_factory=dict)

    def __call__(self, value_logits: torch.Tensor) -> torch.Tensor:
        """Value logits [..., V_value] -> [..., V_base]: one gather. An unmapped base token takes the mean of the
        mapped base tokens' values at its position (each value token counted once per base token mapping to
        it), computed on the value vocabulary and appended as an extra column, so no base-sized temporary."""
        n_value = value_logits.shape[-1]
        idx, counts, n_mapped = self._gather_plan(n_value, value_logits.device)
        if n_mapped == 0:
            return value_logits.new_zeros((*value_logits.shape[:-1], len(self.index)))
        mean = (value_logits.float() @ counts) / n_mapped
        extended = torch.cat([value_logits, mean.to(value_logits.dtype)[..., None]], dim=-1)
        return extended.index_select(-1, idx)

    def _gather_plan(self, n_value: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(index into [value logits, mean], base tokens per value token, mapped base tokens), cached."""
        key = (n_value, str(device))
        plan = getattr(self, "_plan", None)
        if plan is None or plan[0] != key:
            top = int(self.index.max()) if self.index.numel() else -1
            if top >= n_value:
                raise VocabularyMismatchError(
                    f"the vocabulary map points at value token {top}, but the value model has "
                    f"{n_value} logits")
            mapped = self.index >= 0
            counts = torch.bincount(self.index[mapped], minlength=n_value).to(torch.float32)
            idx = torch.where(mapped, self.index, torch.full_like(self.index, n_value))
            plan = (key, idx.to(device), counts.to(device), int(mapped.sum()))
            self._plan = plan
        return plan[1], plan[2], plan[3]

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
                f"{self.base_vocab_size} base tokens mapped ({self.coverage:.1%}), {self.unmapped} take the mean "
                f"mapped value"
                + (f" [{detail}]" if detail else ""))

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def exact(cls, base_tok, value_tok) -> VocabMap:
        index, n = _exact_index(base_tok, value_tok)
        return cls(index, "exact", vocab_fingerprint(base_tok), vocab_fingerprint(value_tok), {"exact": n})

    @classmethod
    def align(cls, base_tok, value_tok, texts: Iterable[str], max_tokens: int = 256) -> VocabMap:
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

        from transfertune.io.run_dirs import write_atomic

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
    def load(cls, path: str | Path) -> VocabMap:
        from safetensors import safe_open

        from transfertune.io.validate import InputError, check_safetensors

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
    def saved(cls, directory: str | Path) -> list[VocabMap]:
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
    for b, v in special_pairs(base_tok, value_tok).items():
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
    logits: torch.Tensor | None
    cache: CrossVocabCache | None = None
    last_hidden_state: torch.Tensor | None = None

    @property
    def past_key_values(self) -> CrossVocabCache | None:
        """`cache` under the name transformers used before it."""
        return self.cache


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
        self.markers = marker_texts(base_tokenizer, value_tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _text(self, ids: Sequence[int]) -> str:
        """The text of base tokens as the value model reads it: special tokens dropped, except chat markers,
        which become the value tokenizer's own (decoded piecewise around them)."""
        ids = list(ids)
        if not self.markers or not any(i in self.markers for i in ids):
            return self.base_tokenizer.decode(ids, skip_special_tokens=True)
        parts, run = [], []
        for i in ids + [None]:
            if i is None or i in self.markers:
                if run:
                    parts.append(self.base_tokenizer.decode(run, skip_special_tokens=True))
                    run = []
                if i is not None:
                    parts.append(self.markers[i])
            else:
                run.append(i)
        return "".join(parts)

    def _value_ids(self, text: str) -> list[int]:
        return self.value_tokenizer(text, add_special_tokens=True)["input_ids"]

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False, past_key_values=None,
                **_) -> _Output:
        """`cache` (`past_key_values`: its older name, still accepted) is a CrossVocabCache, or None to start."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if use_cache:
            return self._step(input_ids, mask, cache if cache is not None else past_key_values)
        return self._teacher_forced(input_ids, mask)

    def _teacher_forced(self, input_ids: torch.Tensor, mask: torch.Tensor) -> _Output:
        """Logits [B, T, V_base]; position t uses the value state after the text of base tokens <= t."""
        inputs, plans = self._value_batch(input_ids, mask)
        v_logits = self.model(**inputs, use_cache=False).logits
        return _Output(self.vocab_map(self._at_base_positions(v_logits, plans, input_ids.shape[1])))

    def _value_batch(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, list]:
        """(the value model's inputs for a batch of base rows, plans): a row's plan says which value position
        each of its base positions reads (-1: none yet), for `_at_base_positions`."""
        plans = []
        for row in range(input_ids.shape[0]):
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
        v_ids = torch.zeros(len(plans), v_width, dtype=torch.long)
        v_mask = torch.zeros_like(v_ids)
        for row, (_, ids, _) in enumerate(plans):
            v_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            v_mask[row, : len(ids)] = 1
        return {"input_ids": v_ids.to(self.device), "attention_mask": v_mask.to(self.device)}, plans

    @staticmethod
    def _at_base_positions(per_value_position: torch.Tensor, plans: list, width: int) -> torch.Tensor:
        """[B, T_value, D] -> [B, T_base, D]: each base position takes its value position's row (zeros where the
        value model has read no token yet)."""
        batch, _, dim = per_value_position.shape
        out = per_value_position.new_zeros(batch, width, dim)
        for row, (cols, _, targets) in enumerate(plans):
            keep = [(c, t) for c, t in zip(cols, targets) if t >= 0]
            if keep:
                c_idx, t_idx = (torch.tensor(x, device=out.device) for x in zip(*keep))
                out[row, c_idx] = per_value_position[row, t_idx]
        return out

    # sequence.composed_response_logprobs scores in chunks of positions when a model splits into a body (one
    # hidden state per base position) and an output layer; this one's output layer is the value model's,
    # followed by the map, so scoring never holds [batch, length, base vocabulary] values.
    config = None  # no logit scaling of its own: the value model's is inside get_output_embeddings

    def get_decoder(self) -> nn.Module:
        return _AlignedBody(self)

    def get_output_embeddings(self) -> nn.Module | None:
        from transfertune.core.response_logits import _head_function

        layer = self.model.get_output_embeddings()
        if getattr(layer, "bias", None) is not None:  # the zero state of unread positions would not give 0
            return None
        return _MappedHead(_head_function(self.model), self.vocab_map)

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
                if keep < len(rs.fed) and keep > 0:
                    try:
                        keep_first(rs.cache, keep)
                    except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window: start over
                        keep = 0
                if keep == 0:
                    rs.cache = None
                out, rs.cache = cached_forward(self.model, rs.cache if rs.cache is not None else DynamicCache(),
                                               input_ids=torch.tensor([ids[keep:]], device=self.device),
                                               logits_to_keep=1)
                rs.fed, rs.logits = ids, out.logits[0, -1]
            elif not ids:
                rs.cache, rs.fed, rs.logits = None, [], None
            vocab = vocab or (rs.logits.shape[-1] if rs.logits is not None else None)
        vocab = vocab or len(self.value_tokenizer)
        logits = torch.stack([rs.logits if rs.logits is not None else torch.zeros(vocab, device=self.device)
                              for rs in state.rows])[:, None]
        return _Output(self.vocab_map(logits), state)


class _AlignedBody(nn.Module):
    """The value model's transformer body, its last hidden states moved to the base positions."""

    def __init__(self, value: CrossVocabValue):
        super().__init__()
        object.__setattr__(self, "value", value)  # not a submodule: no cycle in the module tree

    def forward(self, input_ids, attention_mask=None, **_):
        value = self.value
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        inputs, plans = value._value_batch(input_ids, mask)
        hidden = value.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return _Output(None, last_hidden_state=value._at_base_positions(hidden, plans, input_ids.shape[1]))


class _MappedHead(nn.Module):
    """hidden [n, H_value] -> values [n, V_base]: the value model's output layer, then the vocabulary map."""

    def __init__(self, head, vocab_map: VocabMap):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.vocab_map = vocab_map

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab_map(self.head(hidden))


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
    from transfertune.core.value_model import ValueModel

    if not isinstance(value, ValueModel):
        return value
    same_vocab = vocab_fingerprint(base_tokenizer) == value.config.vocab_fingerprint
    if value.config.scheme == "cascade":
        from transfertune.core.cascade import CascadeValue

        if not same_vocab:
            raise VocabularyMismatchError(
                f"value model {value.directory or ''} uses the cascade scheme (it reads the base's next-token "
                f"distribution), which needs a base with its own vocabulary; '{base_name}' has another")
        return CascadeValue(value.model)
    if same_vocab:
        return value.model
    if vocab_map is None:
        try:
            value.check_compatible(base_tokenizer, base_name)
        except VocabularyMismatchError as err:
            raise VocabularyMismatchError(f"{err} Or compose through a token map: vocab_map='auto'.") from None
    vmap = resolve_vocab_map(value, base_tokenizer, vocab_map)
    log.info("value model -> %s: %s", base_name, vmap.describe())
    return CrossVocabValue(value.model, value.tokenizer, base_tokenizer, vmap)
