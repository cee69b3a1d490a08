"""How logits are composed. Every other module calls into this one; nothing else does this math.

    composed = log_softmax(base) + sum_i w_i * value_i / beta                     (value models)
             + alpha * (log_softmax(tuned) - log_softmax(untuned))               (proxy-tuning / EFT)

softmax(composed) is the composed next-token distribution. With beta = 1 and one value model this is
the residual scheme of Inverse Value Learning and eq. 6 of Portable Reward Tuning.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VocabMap = Callable[[torch.Tensor], torch.Tensor]
"""Maps value logits [..., V_value] to the base vocabulary [..., V_base]. None means identity."""


class VocabularyMismatchError(ValueError):
    """Two models whose output spaces differ were asked to be composed."""


def match_vocab_size(logits: torch.Tensor, size: int, real_vocab_size: int | None = None) -> torch.Tensor:
    """Pad or truncate the last dimension to `size`, touching only the padded tail.

    Checkpoints often pad the output layer past the tokenizer's vocabulary (e.g. 151,936 vs 152,064 rows).
    Rows at index >= real_vocab_size are padding: they may be cut, and padding added here gets value 0.
    Cutting or adding a row below real_vocab_size would shift real tokens, so it is refused.
    """
    have = logits.shape[-1]
    if have == size:
        return logits
    real = real_vocab_size if real_vocab_size is not None else min(have, size)
    if real > min(have, size):
        raise VocabularyMismatchError(
            f"output layers of {have} and {size} rows cannot be matched: the real vocabulary has {real} tokens"
        )
    if have > size:
        return logits[..., :size]
    return F.pad(logits, (0, size - have), value=0.0)


@dataclass(frozen=True)
class Composition:
    """The composition's settings, passed as one: value weights w_i (default 1 each), beta, the proxy strength
    alpha, and the base's real vocabulary size (output-layer rows past it are padding)."""

    weights: tuple[float, ...] | None = None
    beta: float = 1.0
    alpha: float = 1.0
    real_vocab_size: int | None = None

    def logits(self, base_logits: torch.Tensor, value_logits: Sequence[torch.Tensor] = (), *,
               vocab_maps=None, proxy=None) -> torch.Tensor:
        """`compose_logits` with these settings."""
        return compose_logits(base_logits, value_logits, weights=self.weights, beta=self.beta,
                              vocab_maps=vocab_maps, proxy=proxy, alpha=self.alpha,
                              real_vocab_size=self.real_vocab_size)


def compose_logits(
    base_logits: torch.Tensor,
    value_logits: Sequence[torch.Tensor] = (),
    *,
    weights: Sequence[float] | None = None,
    beta: float = 1.0,
    vocab_maps: Sequence[VocabMap | None] | None = None,
    proxy: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 1.0,
    real_vocab_size: int | None = None,
) -> torch.Tensor:
    """Composed logits over the base vocabulary, in float32. See the module docstring for the formula.

    `proxy` is a (tuned_logits, untuned_logits) pair of a small model after and before fine-tuning.
    """
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    weights = [1.0] * len(value_logits) if weights is None else list(weights)
    if len(weights) != len(value_logits):
        raise ValueError(f"{len(value_logits)} value models but {len(weights)} weights")
    scales = [w / beta for w in weights]
    return _compose(base_logits, value_logits, scales, vocab_maps, proxy, alpha, real_vocab_size)


def compose_logits_per_row(
    base_logits: torch.Tensor,
    value_logits: Sequence[torch.Tensor] = (),
    *,
    weights: torch.Tensor | Sequence[Sequence[float]],
    beta: torch.Tensor | Sequence[float],
    vocab_maps: Sequence[VocabMap | None] | None = None,
    proxy: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 1.0,
    real_vocab_size: int | None = None,
) -> torch.Tensor:
    """`compose_logits` with its own beta [B] and value weights [B, n_values] for each batch row (a server
    mixing requests with different steering strengths in one batch)."""
    rows, n = base_logits.shape[0], len(value_logits)
    beta = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(rows, n)
    if beta.numel() != rows:
        raise ValueError(f"{rows} rows but {beta.numel()} betas")
    if not bool(((beta > 0) & torch.isfinite(beta)).all()):
        raise ValueError(f"beta must be positive finite numbers, got {beta.tolist()}")
    # w / beta in float64 then float32: the same number a Python scalar w / beta becomes in compose_logits
    shape = (rows,) + (1,) * (base_logits.dim() - 1)
    scales = [(weights[:, i] / beta).float().reshape(shape).to(base_logits.device) for i in range(n)]
    return _compose(base_logits, value_logits, scales, vocab_maps, proxy, alpha, real_vocab_size)


def _compose(base_logits, value_logits, scales, vocab_maps, proxy, alpha, real_vocab_size) -> torch.Tensor:
    """The formula itself; each scale (w / beta) is a float or a tensor broadcasting over the rows."""
    vocab_maps = [None] * len(value_logits) if vocab_maps is None else list(vocab_maps)
    size = base_logits.shape[-1]

    composed = F.log_softmax(base_logits.float(), dim=-1)
    device = composed.device  # models may run on other devices: the composition happens on the base's logits'
    # values are added in place (one [N, V] buffer less per value model) unless log_softmax's backward needs its
    # output untouched, i.e. the base's logits carry a graph
    in_place = not composed.requires_grad
    for v, scale, vmap in zip(value_logits, scales, vocab_maps):
        v = v.float() if vmap is None else vmap(v.float())
        v = match_vocab_size(v.to(device), size, real_vocab_size)
        # scale * v, then the sum, for scalar and per-row scales alike: a row's result is bit-identical whether it
        # is composed alone or batched with rows of other scales (add_'s alpha= would round differently)
        composed = composed.add_(scale * v) if in_place else composed + scale * v
    if proxy is not None:
        tuned, untuned = (match_vocab_size(x.to(device).float(), size, real_vocab_size) for x in proxy)
        composed = composed + alpha * (F.log_softmax(tuned, dim=-1) - F.log_softmax(untuned, dim=-1))
    return composed


def composed_log_probs(*args, **kwargs) -> torch.Tensor:
    """log p_composed: `compose_logits` normalised over the vocabulary."""
    return F.log_softmax(compose_logits(*args, **kwargs), dim=-1)


def composed_cross_entropy(
    base_logits: torch.Tensor,
    value_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    weights: Sequence[float] | None = None,
    beta: float = 1.0,
    real_vocab_size: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `targets` [N] under `compose_logits(base_logits [N, V], value_logits)`, fused.

    The same numbers as `F.cross_entropy(compose_logits(...), targets, reduction="sum")`, but one float32 [N, V]
    buffer serves the log-softmax of the base, the composition, the softmax and the gradient (the unfused graph
    keeps four or five). Gradients flow into the value logits only: the base's are treated as constants."""
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    weights = [1.0] * len(value_logits) if weights is None else list(weights)
    if len(weights) != len(value_logits):
        raise ValueError(f"{len(value_logits)} value models but {len(weights)} weights")
    scales = tuple(w / beta for w in weights)
    return _ComposedCrossEntropy.apply(base_logits.detach(), targets, scales, real_vocab_size, *value_logits)


class _ComposedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_logits, targets, scales, real_vocab_size, *value_logits):
        size = base_logits.shape[-1]
        composed = F.log_softmax(base_logits.float(), dim=-1)
        device = composed.device
        for v, scale in zip(value_logits, scales):
            composed.add_(match_vocab_size(v.float().to(device), size, real_vocab_size), alpha=scale)
        targets = targets.to(device)
        lse = torch.logsumexp(composed, dim=-1)
        loss = (lse - composed.gather(-1, targets[:, None]).squeeze(-1)).sum()
        # d loss / d composed = softmax(composed) - onehot(target), written over the composed logits
        composed.sub_(lse[:, None]).exp_()
        composed[torch.arange(len(targets), device=device), targets] -= 1.0
        ctx.save_for_backward(composed)
        ctx.scales = scales
        ctx.shapes = [(v.shape[-1], v.dtype, v.device) for v in value_logits]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_composed,) = ctx.saved_tensors
        size = grad_composed.shape[-1]
        needs = ctx.needs_input_grad[4:]
        last = max((i for i, n in enumerate(needs) if n), default=-1)
        grads = []
        for i, ((have, dtype, device), scale) in enumerate(zip(ctx.shapes, ctx.scales)):
            if not needs[i]:
                grads.append(None)
                continue
            # the last one reuses the buffer (a second backward through this graph then fails loudly)
            g = grad_composed.mul_(grad_loss * scale) if i == last else grad_composed * (grad_loss * scale)
            g = g[..., :have] if have <= size else F.pad(g, (0, have - size))  # padding rows get no gradient
            grads.append(g.to(device=device, dtype=dtype))
        return (None, None, None, None, *grads)


def deferral_kl(
    base_logits: torch.Tensor,
    value_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    real_vocab_size: int | None = None,
) -> torch.Tensor:
    """Summed KL(p_base || p_composed) over positions [N, V] where the base is left to decide (data.deferred_tail).

    Zero exactly when the value logits are constant over the vocabulary there, so minimising it teaches the value
    model to leave the base's distribution unchanged; its gradient in v is (p_composed - p_base) / beta."""
    base_log_probs = F.log_softmax(base_logits.detach().float(), dim=-1)
    composed = composed_log_probs(base_logits.detach(), [value_logits], beta=beta, real_vocab_size=real_vocab_size)
    return (base_log_probs.exp() * (base_log_probs - composed)).sum()


def l1_penalty(value_logits: torch.Tensor) -> torch.Tensor:
    """IVL's norm regulariser: mean |v|_1 / V over positions, i.e. the mean absolute value logit."""
    return value_logits.float().abs().mean()


def value_entropy(value_logits: torch.Tensor) -> torch.Tensor:
    """PRT's entropy term: mean entropy of softmax(v). Maximising it pulls values toward a constant."""
    logp = F.log_softmax(value_logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
