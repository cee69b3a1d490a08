"""Vocabulary identity: a fingerprint of the token->id map, and checks between models."""
from __future__ import annotations

import hashlib
import json


def vocab_fingerprint(tokenizer) -> str:
    """sha256 (first 16 hex digits) of the sorted token->id map: equal iff the vocabularies are identical."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
