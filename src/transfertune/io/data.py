"""Demonstration data: JSONL in three forms, tokenised with the loss on response tokens only.

    {"prompt": ..., "response": ...}
    {"prompt": ..., "completion": ...}          (t0-tasks; a trailing end-of-text marker is dropped)
    {"messages": [{"role": ..., "content": ...}, ...]}   (last message is the assistant's response)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from transfertune.io.validate import deepest_nesting, lone_surrogate, surrogate_problem

IGNORE_INDEX = -100
EOT_MARKERS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>")


class DataFormatError(ValueError):
    """A data file or one of its lines is not in a form transfertune reads."""


def iter_jsonl(path: str | Path):
    """(line number, JSON object) for each non-blank line; a missing file, bytes that are not UTF-8, bad JSON,
    nesting too deep for Python's JSON reader, a lone surrogate escape or a non-object line is a DataFormatError
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}" if not path.exists() else f"{path} is not a file")
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}: line {n} is not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                      f"column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
            except RecursionError:
                depth = deepest_nesting(line)[1]
                raise DataFormatError(f"{path}: line {n} is nested {depth:,} levels deep, too deep to read") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: line {n} is not a JSON object")
            bad = lone_surrogate(record) if "\\u" in line else None
            if bad is not None:
                raise DataFormatError(f"{path}: line {n} {surrogate_problem(bad)}")
            yield n, record


def read_jsonl(path: str | Path) -> list[dict]:
    """Examples in any accepted form, normalised by `to_prompt_response`; an empty file is an error."""
    records = []
    for n, record in iter_jsonl(path):
        try:
            records.append(to_prompt_response(record))
        except DataFormatError as err:
            raise DataFormatError(f"{path}: line {n}: {err}") from None
    if not records:
        raise DataFormatError(f"{path} has no examples")
    return records


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """Prompts of a JSONL file, one per line: a "prompt" string (a "response" or "completion", if any, is
    ignored), or a chat: a "messages" list, returned without its last message when that is the assistant's
    (the response). A line of neither form is a DataFormatError naming the file and line."""
    prompts = []
    for n, record in iter_jsonl(path):
        try:
            prompts.append(_prompt_of(record))
        except DataFormatError as err:
            raise DataFormatError(f"{path}: line {n}: {err}") from None
    return prompts


def _prompt_of(record: dict) -> str | list[dict]:
    if "messages" in record:
        msgs = record["messages"]
        check_messages(msgs)
        history = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        if not history:
            raise DataFormatError('"messages" holds only the assistant\'s reply: no prompt to generate from')
        return history
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        got = f"got keys {sorted(record)}" if prompt is None else f"prompt is {_type_name(prompt)}"
        raise DataFormatError(f'expected a "prompt" string or a "messages" list ({got})')
    return prompt


def check_messages(msgs) -> None:
    if not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in msgs
    ):
        raise DataFormatError('"messages" must be a non-empty list of {"role", "content"} objects (strings)')


def _type_name(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def to_prompt_response(record: dict) -> dict:
    """Normalise one record to {"prompt", "response", ...other fields} (a chat record keeps its "messages")."""
    if "messages" in record:
        msgs = record["messages"]
        check_messages(msgs)
        if msgs[-1]["role"] != "assistant":
            raise DataFormatError('the last of "messages" must have role "assistant"')
        deferred_tail(record)
        return {"messages": msgs, **({"deferred": record["deferred"]} if "deferred" in record else {})}
    key = "response" if "response" in record else "completion"
    response = record.get(key)
    prompt = record.get("prompt")
    if prompt is None or response is None:
        raise DataFormatError(
            'expected string fields "prompt" and "response" (or "completion"), or a "messages" list; '
            f"got keys {sorted(record)}"
        )
    for name, value in (("prompt", prompt), (key, response)):
        if not isinstance(value, str):
            raise DataFormatError(f"{name} must be a string, got {_type_name(value)}")
    for marker in EOT_MARKERS:
        if response.endswith(marker):
            response = response[: -len(marker)]
            break
    extra = {k: v for k, v in record.items() if k not in ("prompt", "response", "completion")}
    normalised = {**extra, "prompt": prompt, "response": response}
    deferred_tail(normalised)
    return normalised


PLAIN_CHAT = "transfertune:plain"
"""The chat "template" of tokenizers without one: each message as a `role: content` line, then `assistant: `."""


def render_chat(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) of a chat whose last message is the response; see `render_chat_prompt`."""
    return render_chat_prompt(tokenizer, messages[:-1], template), messages[-1]["content"]


def render_chat_prompt(tokenizer, history: list[dict], template: str | None = None) -> str:
    """The text of a chat up to where the assistant's reply begins. `template`: a chat template (jinja text),
    PLAIN_CHAT, or None = the tokenizer's own template, else PLAIN_CHAT (what training does)."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        template = PLAIN_CHAT
    if template == PLAIN_CHAT:
        return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    extra = {} if template is None else {"chat_template": template}
    return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **extra)


def template_text(template) -> str | None:
    """A tokenizer's chat_template as one jinja text: a dict of named templates gives its "default"."""
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), None)
    return template or None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; never empty, so the first response token always has a context."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start if start is not None else 0]
    return ids


def encode_example(tokenizer, example: dict, max_length: int | None = None, add_eos: bool = True,
                   defer: bool = False) -> dict:
    """input_ids = prompt ids + response ids (+ eos); labels mask the prompt with IGNORE_INDEX.

    Prompt and response are tokenised separately, exactly as generation sees them.
    A too-long example loses prompt tokens from the left first, then response tokens from the right.
    With `defer`, a row's "deferred" tail of the response (see `deferred_tail`) and the end of the response are
    taken out of `labels` and marked 1 in `deferred`: the value model is trained there to leave the base alone.
    """
    if "messages" in example:
        prompt, response = render_chat(tokenizer, example["messages"])
    else:
        prompt, response = example["prompt"], example["response"]
    p = encode_prompt(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    tail = deferred_tail(example) if defer else None
    # the rendered response of a chat may end in end-of-turn markup after the tail: that is deferred too
    if tail is not None and tail not in response:
        raise DataFormatError(f"the chat template rewrote the deferred text {tail!r}: it is not in {response!r}")
    kept = None if tail is None else _tokens_before(tokenizer, response, response.rfind(tail), len(r))
    if add_eos and tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if kept is None:
        kept = len(r)
    if max_length is not None and len(p) + len(r) > max_length:
        r = r[: max_length - 1]
        p = p[-(max_length - len(r)):]
    kept = min(kept, len(r))
    labels = [IGNORE_INDEX] * len(p) + r[:kept] + [IGNORE_INDEX] * (len(r) - kept)
    if tail is None:
        return {"input_ids": p + r, "labels": labels}
    return {"input_ids": p + r, "labels": labels, "deferred": [0] * (len(p) + kept) + [1] * (len(r) - kept)}


def deferred_tail(example: dict) -> str | None:
    """The row's "deferred" field: the end of its response that the *base* is trusted to write (an answer the
    base computes, such as a sum after "="), or None. The value model is trained on the rest of the response
    only; on the tail and the response's end it is trained to leave the base's distribution unchanged
    (compose.deferral_kl), so a bigger base's skill is not overridden by what the source base lacked."""
    tail = example.get("deferred")
    if tail is None or tail == "":
        return None
    if not isinstance(tail, str):
        raise DataFormatError(f'"deferred" must be a string, got {_type_name(tail)}')
    chat = "messages" in example
    response = example["messages"][-1].get("content") if chat else example.get("response")
    if not isinstance(response, str) or not response.endswith(tail):
        where = "the last message's content" if chat else '"response"'
        raise DataFormatError(f'"deferred" must be the end of {where}: {tail!r} does not end {response!r}')
    return tail


def _tokens_before(tokenizer, response: str, boundary: int, n_tokens: int) -> int:
    """How many of the response's tokens start before character `boundary` (a token straddling it is kept)."""
    try:
        offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return min(n_tokens, len(tokenizer(response[:boundary], add_special_tokens=False)["input_ids"]))
    return sum(1 for start, _ in offsets if start < boundary)


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict], tokenizer, max_length: int | None = 512, defer: bool = False):
        self.features = [encode_example(tokenizer, ex, max_length, defer=defer) for ex in examples]

    @classmethod
    def from_jsonl(cls, path, tokenizer, max_length: int | None = 512) -> SFTDataset:
        return cls(read_jsonl(path), tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


@dataclass
class RightPadCollator:
    """Pads input_ids with pad_id, labels with IGNORE_INDEX, and builds the attention mask."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if any("deferred" in f for f in features):
            batch["deferred"] = torch.zeros((len(features), width), dtype=torch.long)
            for i, f in enumerate(features):
                if "deferred" in f:
                    batch["deferred"][i, : len(f["deferred"])] = torch.tensor(f["deferred"])
        return batch


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0
