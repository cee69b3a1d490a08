"""A causal LM as a classifier over a label set: the log-probability of each label's verbaliser after the prompt.

    score(label_j | x) = sum_t log p_LM(c_j,t | x, c_j,<t)          c_j: row x's verbaliser of label j

The prompt runs once; its KV cache is repeated for the row's choices, which then run together (so a row costs
one prompt pass, not one per label). The same pass yields the prompt's features (the hidden states of one layer,
pooled) for a label reward built on this model (labels/feature_reward.py).
Any base that can score the label strings works: another size, another tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transfertune.core.choices import POOLS
from transfertune.core.response_logits import cached_forward, input_device
from transfertune.io.data import encode_prompt
from transfertune.io.loading import context_length


@dataclass
class LabelScores:
    logprobs: torch.Tensor  # [B, L] float32: summed log-probs of each row's verbalisers
    features: torch.Tensor | None  # [B, H] float32: the prompt's last-token hidden state, when asked for


@torch.no_grad()
def score_labels(
    model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
    feature_layer: int | str | None = None, pool: str = "mean", max_length: int | None = None, progress: bool = False,
) -> LabelScores:
    """Scores of every row's choices (all rows have the same number), and features when `feature_layer` is set
    (an index into the model's hidden states, -1 the last layer, or "middle": len(hidden states) // 2), pooled
    over the prompt's tokens ("mean") or taken at its last token ("last"). A prompt too long for the context
    loses tokens from its start (the question and the label cue come last)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} rows of choices")
    limit = max_length or context_length(model)
    device = input_device(model)
    scores, feats = [], []
    for prompt, row_choices in tqdm(list(zip(prompts, choices)), desc="scoring labels", disable=not progress):
        choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in row_choices]
        if any(not ids for ids in choice_ids):
            raise ValueError(f"a choice tokenises to nothing: {list(row_choices)!r}")
        longest = max(map(len, choice_ids))
        prompt_ids = encode_prompt(tokenizer, prompt)
        if limit is not None and len(prompt_ids) + longest > limit:
            prompt_ids = prompt_ids[len(prompt_ids) + longest - limit:]
        out, cache = cached_forward(
            model, None, input_ids=torch.tensor([prompt_ids], device=device), logits_to_keep=1,
            output_hidden_states=feature_layer is not None)
        if feature_layer is not None:
            layer = len(out.hidden_states) // 2 if feature_layer == "middle" else feature_layer
            if not -len(out.hidden_states) <= layer < len(out.hidden_states):
                raise ValueError(f"feature layer {layer} does not exist: the model has {len(out.hidden_states)} "
                                 f"hidden states (embeddings and one per layer)")
            hidden = out.hidden_states[layer][0].float()
            feats.append((hidden.mean(0) if pool == "mean" else hidden[-1]).cpu())
        first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
        row = torch.stack([first[ids[0]] for ids in choice_ids])
        if longest > 1:
            row = row + _continuation_logprobs(model, cache, len(prompt_ids), choice_ids, longest, device)
        scores.append(row.cpu())
    return LabelScores(torch.stack(scores), torch.stack(feats) if feats else None)


def _continuation_logprobs(model, cache, prompt_len: int, choice_ids: list[list[int]], longest: int, device):
    """log p of each choice's tokens after its first, all choices in one batch over the repeated prompt cache."""
    n = len(choice_ids)
    cache.batch_repeat_interleave(n)
    fed = torch.zeros(n, longest - 1, dtype=torch.long)
    mask = torch.ones(n, prompt_len + longest - 1, dtype=torch.long)
    for i, ids in enumerate(choice_ids):
        fed[i, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        mask[i, prompt_len + len(ids) - 1:] = 0
    positions = torch.arange(prompt_len, prompt_len + longest - 1).expand(n, -1)
    out, _ = cached_forward(model, cache, input_ids=fed.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device))
    logp = F.log_softmax(out.logits.float(), dim=-1)
    total = torch.zeros(n, device=logp.device)
    for i, ids in enumerate(choice_ids):
        if len(ids) > 1:
            targets = torch.tensor(ids[1:], device=logp.device)
            total[i] = logp[i, : len(ids) - 1].gather(-1, targets[:, None]).sum()
    return total


def label_log_probs(scores: torch.Tensor) -> torch.Tensor:
    """The base's distribution over the label set: its verbaliser scores normalised over the labels."""
    return F.log_softmax(scores.float(), dim=-1)


def calibrate(logprobs: torch.Tensor, groups: Sequence) -> torch.Tensor:
    """Each row's label log-probs minus the mean over rows of its group (rows sharing verbalisers): the base's own
    prior over the labels, which differs from base to base, taken out (contextual calibration, estimated on the
    rows themselves; no labels needed)."""
    logprobs = label_log_probs(logprobs)
    out = logprobs.clone()
    keys = list(groups)
    for key in set(keys):
        rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
        out[rows] = logprobs[rows] - logprobs[rows].mean(0, keepdim=True)
    return out
