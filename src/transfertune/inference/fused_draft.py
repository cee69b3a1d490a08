"""The draft side of speculative decoding run as one network: Llama models of the same shape stacked.

A speculative draft step runs the small base and every value model on one token. Through transformers each
of them is a module tree of small ops, and on a CPU (or a GPU without graphs) the per-op cost, not the
arithmetic, sets the step time of models this small. Here the same Llama forward pass is written out once
for a stack of models: every weight of n same-shape models is stacked into one tensor, so the n models cost
the ops of one (batched matmuls), and the KV cache is a preallocated tensor that rolls back by moving a
length. Models of another shape form their own stack.

Only speculative decoding uses it. The draft base's logits only propose tokens, so rounding that differs from
transformers' own forward pass changes what is accepted, not what is emitted; the value logits are reused by
the verifier, where that rounding (near 1e-6) can break a near-tie the other way (speculative.py, `exact`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _plain_llama(model) -> bool:
    from transformers import LlamaForCausalLM

    c = model.config
    # RoPE tables are computed once, so rotary embeddings that change with the sequence length are left out
    rope = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", "default")
    return (type(model) is LlamaForCausalLM and not getattr(c, "attention_bias", False)
            and not getattr(c, "mlp_bias", False) and c.hidden_act == "silu" and getattr(c, "pretraining_tp", 1) == 1
            and rope not in ("dynamic", "longrope"))


def _unwrap(model):
    """The transformers model inside a ValueModel (a plain module is returned as it is)."""
    from transfertune.core.value_model import ValueModel

    return model.model if isinstance(model, ValueModel) else model


def can_fuse(models) -> bool:
    """Whether every model is a plain Llama causal LM (full weights, no biases, SiLU MLP, RoPE independent of the
    sequence length) that can run here."""
    return all(_plain_llama(_unwrap(m)) for m in models)


def _shape_key(model) -> tuple:
    c, rotary = model.config, model.model.rotary_emb
    return (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, c.intermediate_size,
            model.lm_head.weight.shape[0], c.rms_norm_eps, tuple(rotary.inv_freq.tolist()),
            float(rotary.attention_scaling), model.lm_head.weight.device, model.lm_head.weight.dtype)


class StackedLlama:
    """n Llama models of one shape run as one: stacked weights, one KV cache tensor per layer [n*B, kv, S, d].
    The weights are stacked once; `start` gives each generation its cache.

    Each RMSNorm's weight is folded into the projection after it (norm(x) * w @ W = norm(x) @ (w * W)), and
    RoPE into the q/k projection, which also yields rotate_half(q) and rotate_half(k): rotating is then
    qk * cos + qk_rotated * sin, with cos and sin tabulated once."""

    def __init__(self, models: list):
        c = models[0].config
        self.n = len(models)
        self.rotary = models[0].model.rotary_emb
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.hidden, self.eps = c.hidden_size, c.rms_norm_eps

        def stacked(make):
            return torch.stack([make(m).detach() for m in models])

        def projections(layer):
            a = layer.self_attn
            q, k = a.q_proj.weight, a.k_proj.weight
            w = torch.cat([q, k, a.v_proj.weight, self._rotate_rows(q), self._rotate_rows(k)])
            return layer.input_layernorm.weight[:, None] * w.T

        def mlp_in(layer):
            return layer.post_attention_layernorm.weight[:, None] * torch.cat([layer.mlp.gate_proj.weight,
                                                                                 layer.mlp.up_proj.weight]).T

        with torch.no_grad():
            self.embeddings = stacked(lambda m: m.model.embed_tokens.weight)
            self.layers = [{
                "qkv": stacked(lambda m: projections(m.model.layers[i])),
                "out": stacked(lambda m: m.model.layers[i].self_attn.o_proj.weight.T),
                "gate_up": stacked(lambda m: mlp_in(m.model.layers[i])),
                "down": stacked(lambda m: m.model.layers[i].mlp.down_proj.weight.T),
            } for i in range(c.num_hidden_layers)]
            self.head = stacked(lambda m: m.model.norm.weight[:, None] * m.lm_head.weight.T)
        self.cos = self.sin = self.head.new_zeros(0, self.head_dim)  # RoPE tables [positions, d], grown by `start`
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.max_len = self.length = 0

    @torch.no_grad()
    def start(self, batch: int, max_len: int) -> None:
        """An empty KV cache for `batch` rows of at most `max_len` tokens."""
        dev, dtype = self.head.device, self.head.dtype
        if max_len > len(self.cos):
            cos, sin = self.rotary(self.head, torch.arange(max_len, device=dev)[None])
            self.cos, self.sin = cos[0], sin[0]
        self.keys = [torch.zeros(self.n * batch, self.kv_heads, max_len, self.head_dim, dtype=dtype, device=dev)
                     for _ in self.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_len, self.length = max_len, 0

    def _rotate_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Rows of a projection whose output is rotate_half of the original's, head by head."""
        heads = weight.view(-1, self.head_dim, weight.shape[-1])
        half = self.head_dim // 2
        return torch.cat([-heads[:, half:], heads[:, :half]], 1).reshape(weight.shape)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next projection), computed in float32 as Llama does."""
        if x.dtype != torch.float32:
            return self._norm(x.float()).to(x.dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Run `ids` [B, T] (at `positions` [B, T]) after the cached tokens; `mask` [B, cached + T] marks real
        tokens (0: left padding). Returns each model's logits at the last position, [B, V] in float32."""
        n, (B, T) = self.n, ids.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"the draft's KV cache holds {self.max_len} tokens; {end} were fed")
        x = self.embeddings[:, ids.flatten()]  # [n, B*T, hidden]
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, T, 1, d]
        heads, kv, qk = self.heads, self.kv_heads, self.heads + self.kv_heads
        attn_mask = None
        if T > 1 or not bool(mask.all()):
            slots, fed = torch.arange(end, device=ids.device), torch.arange(start, end, device=ids.device)
            allowed = (slots[None, :] <= fed[:, None]) & mask[:, None, :end].bool()  # [B, T, end]
            allowed |= slots[None, :] == fed[:, None]  # a padding query sees itself: no row without a key
            attn_mask = allowed[:, None].repeat(n, 1, 1, 1)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            proj = torch.bmm(self._norm(x), layer["qkv"]).view(n, B, T, -1, self.head_dim)
            rotated = proj[:, :, :, :qk] * cos + proj[:, :, :, qk + kv :] * sin  # [n, B, T, q + kv heads, d]
            q = rotated[:, :, :, :heads].reshape(n * B, T, heads, self.head_dim).transpose(1, 2)
            keys[:, :, start:end] = rotated[:, :, :, heads:].reshape(n * B, T, kv, self.head_dim).transpose(1, 2)
            values[:, :, start:end] = proj[:, :, :, qk : qk + kv].reshape(n * B, T, kv, self.head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=attn_mask,
                                                      enable_gqa=True)
            x = torch.baddbmm(x, attended.transpose(1, 2).reshape(n, B * T, -1), layer["out"])
            gate, up = torch.bmm(self._norm(x), layer["gate_up"]).chunk(2, -1)
            x = torch.baddbmm(x, F.silu(gate) * up, layer["down"])
        self.length = end
        last = x.view(n, B, T, self.hidden)[:, :, -1]
        return list(torch.bmm(self._norm(last), self.head).float().unbind(0))


class FusedDraft:
    """Draft base + value models, each group of same-shape Llama models one StackedLlama.

    The interface of speculative decoding's draft side: `forward` (one call per drafted position, or the
    prompt), `truncate` (roll every cache back to its first `length` tokens). The weights are copied (stacked)
    here, once; `start` begins each generation with empty caches."""

    def __init__(self, models: list):
        nets = [_unwrap(m) for m in models]
        groups: dict[tuple, list[int]] = {}
        for i, net in enumerate(nets):
            groups.setdefault(_shape_key(net), []).append(i)
        self.stacks = [(idx, StackedLlama([nets[i] for i in idx])) for idx in groups.values()]
        self.count = len(models)

    def start(self, batch: int, max_len: int) -> FusedDraft:
        for _, stack in self.stacks:
            stack.start(batch, max_len)
        return self

    @property
    def length(self) -> int:
        return self.stacks[0][1].length

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        out: list = [None] * self.count
        for idx, stack in self.stacks:
            dev = stack.head.device
            for i, logits in zip(idx, stack.forward(ids.to(dev), mask.to(dev), positions.to(dev))):
                out[i] = logits.to(mask.device)
        return out

    def truncate(self, length: int) -> None:
        for _, stack in self.stacks:
            stack.length = length
