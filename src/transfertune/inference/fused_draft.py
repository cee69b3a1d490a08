"""The draft side of speculative decoding run as one network: Llama models of the same shape stacked.

A speculative draft step runs the small base and every value model on one token. Through transformers each
of them is a module tree of small ops, and on a CPU (or a GPU without graphs) the per-op cost, not the
arithmetic, sets the step time of models this small. Here the same Llama forward pass is written out once
for a stack of models: every weight of n same-shape models is stacked into one tensor, so the n models cost
the ops of one (batched matmuls), and the KV cache is a preallocated tensor (grown when full) that rolls back
by moving a length; rows drop slots of their own through the attention mask (ragged_cache.py). Models of another
shape form their own stack.

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
    The weights are stacked once; each batch of rows gets its own cache (`new_cache`).

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
        self.cos = self.sin = self.head.new_zeros(0, self.head_dim)  # RoPE tables [positions, d], grown as needed

    def new_cache(self, batch: int, capacity: int) -> StackedCache:
        """An empty KV cache for `batch` rows, room for `capacity` slots (it grows when more are fed)."""
        dev, dtype = self.head.device, self.head.dtype
        shape = (self.n * batch, self.kv_heads, max(1, capacity), self.head_dim)
        return StackedCache(self.n, [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers],
                            [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers])

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if needed > len(self.cos):
            size = max(needed, 2 * len(self.cos), 64)
            cos, sin = self.rotary(self.head, torch.arange(size, device=self.head.device)[None])
            self.cos, self.sin = cos[0], sin[0]
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, T, 1, d]

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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: StackedCache) -> list[torch.Tensor]:
        """Run `ids` [B, T] (at `positions` [B, T]) after the `cache.length` cached slots; `mask` [B, length + T]
        marks the slots a token may attend to (0: left padding, or a slot its row dropped). Returns each model's
        logits at the last position, [B, V] in float32."""
        n, (B, T) = self.n, ids.shape
        start, end = cache.length, cache.length + T
        cache.reserve(end)
        x = self.embeddings[:, ids.flatten()]  # [n, B*T, hidden]
        cos, sin = self._rope(positions)
        heads, kv, qk = self.heads, self.kv_heads, self.heads + self.kv_heads
        attn_mask = None
        if T > 1 or not bool(mask.all()):
            slots, fed = torch.arange(end, device=ids.device), torch.arange(start, end, device=ids.device)
            allowed = (slots[None, :] <= fed[:, None]) & mask[:, None, :end].bool()  # [B, T, end]
            allowed |= slots[None, :] == fed[:, None]  # a padding query sees itself: no row without a key
            attn_mask = allowed[:, None].repeat(n, 1, 1, 1)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
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
        cache.length = end
        last = x.view(n, B, T, self.hidden)[:, :, -1]
        return list(torch.bmm(self._norm(last), self.head).float().unbind(0))


class StackedCache:
    """The KV cache of one StackedLlama: per layer a [n*B, kv, capacity, d] tensor (model-major rows) whose first
    `length` slots hold fed tokens. Rolling back is moving `length`; `select`, `pad_left` and `take` rearrange
    rows and slots."""

    def __init__(self, n: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0):
        self.n, self.keys, self.values, self.length = n, keys, values, length

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        """Room for `length` slots: the tensors double when they are too short."""
        if length > self.capacity:
            self._rebuild(lambda t: t[:, :, : self.length], max(length, 2 * self.capacity))

    def select(self, rows: torch.Tensor, first: int) -> None:
        """Keep `rows` [B'] (in this order), their slots from `first` on."""
        def pick(t):
            return t.view(self.n, -1, *t.shape[1:])[:, rows.to(t.device), :, first : self.length].flatten(0, 1)
        self._rebuild(pick, self.capacity)
        self.length -= first

    def pad_left(self, n: int) -> None:
        """n empty slots before the others."""
        self._rebuild(lambda t: F.pad(t[:, :, : self.length], (0, 0, n, 0)), max(self.capacity, self.length + n))
        self.length += n

    def take(self, slots: torch.Tensor) -> None:
        """Each row's slots `slots` [B, W'] (in this order)."""
        def pick(t):
            per_model = t.view(self.n, -1, *t.shape[1:])  # [n, B, kv, cap, d]
            index = slots.to(t.device)[None, :, None, :, None].expand(self.n, -1, t.shape[1], -1, t.shape[3])
            return per_model.gather(3, index).flatten(0, 1)
        self._rebuild(pick, self.capacity)
        self.length = slots.shape[1]

    def concat(self, other: StackedCache) -> None:
        """Append the rows of a cache holding as many slots."""
        assert self.length == other.length, "left-pad the narrower cache first (pad_left)"
        def cat(a, b):
            return torch.cat([a.view(self.n, -1, *a.shape[1:])[:, :, :, : self.length],
                              b.view(self.n, -1, *b.shape[1:])[:, :, :, : self.length]], 1).flatten(0, 1)
        self.keys = [cat(a, b) for a, b in zip(self.keys, other.keys)]
        self.values = [cat(a, b) for a, b in zip(self.values, other.values)]

    def _rebuild(self, content, capacity: int) -> None:
        def rebuilt(t):
            kept = content(t)
            out = kept.new_zeros(*kept.shape[:2], capacity, kept.shape[3])
            out[:, :, : kept.shape[2]] = kept
            return out
        self.keys, self.values = [rebuilt(t) for t in self.keys], [rebuilt(t) for t in self.values]


class FusedDraft:
    """Draft base + value models, each group of same-shape Llama models one StackedLlama.

    The weights are copied (stacked) here, once; `start` begins a batch of rows with empty caches (`FusedRun`,
    the draft side of speculative decoding)."""

    def __init__(self, models: list):
        nets = [_unwrap(m) for m in models]
        groups: dict[tuple, list[int]] = {}
        for i, net in enumerate(nets):
            groups.setdefault(_shape_key(net), []).append(i)
        self.stacks = [(idx, StackedLlama([nets[i] for i in idx])) for idx in groups.values()]
        self.count = len(models)

    def start(self, batch: int, capacity: int) -> FusedRun:
        return FusedRun(self, [stack.new_cache(batch, capacity) for _, stack in self.stacks])


class FusedRun:
    """The caches of one batch of rows through a FusedDraft, with the interface of every KV store of speculative
    decoding (ragged_cache.py)."""

    def __init__(self, draft: FusedDraft, caches: list[StackedCache]):
        self.draft, self.caches = draft, caches

    @property
    def width(self) -> int:
        return self.caches[0].length

    @torch.no_grad()
    def run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int = 1) -> list[torch.Tensor]:
        """Each model's logits [B, 1, V] at the last of `ids` (only the last position is computed: keep=1)."""
        if keep != 1:
            raise ValueError("a fused draft computes the logits of the last position only")
        out: list = [None] * self.draft.count
        for (idx, stack), cache in zip(self.draft.stacks, self.caches):
            dev = stack.head.device
            for i, logits in zip(idx, stack.forward(ids.to(dev), mask.to(dev), positions.to(dev), cache)):
                out[i] = logits.to(mask.device)[:, None]
        return out

    def crop(self, width: int) -> None:
        for cache in self.caches:
            cache.length = width

    def select(self, rows: torch.Tensor, first: int) -> None:
        for cache in self.caches:
            cache.select(rows, first)

    def pad_left(self, n: int) -> None:
        for cache in self.caches:
            cache.pad_left(n)

    def take(self, slots: torch.Tensor) -> None:
        for cache in self.caches:
            cache.take(slots)

    def concat(self, other: FusedRun) -> None:
        for cache, more in zip(self.caches, other.caches):
            cache.concat(more)

    def empty(self, batch: int, capacity: int) -> FusedRun:
        return self.draft.start(batch, capacity)
