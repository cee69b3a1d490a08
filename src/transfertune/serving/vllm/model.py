"""A composed model as one vLLM model: the base's stack and each value model's stack side by side.

`TransferTuneComposedForCausalLM` is registered by transfertune's vLLM plugin (entry point
`vllm.general_plugins` -> `transfertune.serving.vllm.plugin:register`) and opens directories written by
`transfertune export --engine vllm` (export.py). Each stack is vLLM's own model class for its
architecture (LlamaForCausalLM, Qwen2ForCausalLM, ...), built from its own config under its own prefix
(`base.`, `value_<i>.`), so every attention layer of every stack registers with vLLM and gets its own paged
KV cache: continuous batching, prefix caching, chunked prefill and tensor parallelism treat the pair as one
model. `forward` runs every stack on the same tokens and positions and returns their final hidden states side
by side; `compute_logits` turns each into that model's logits (gathered over tensor-parallel ranks by vLLM's
LogitsProcessor) and returns `compose.compose_logits` of them, so vLLM's sampler, logprobs and the OpenAI
server see the composed distribution. The composition math is compose.py's; nothing here re-implements it.

An export may hold several named value models. By default every request composes all of them at the export's
weights and beta; with the logits processor of mix_processor.py, each request picks its own value models,
weights and beta (value_mix.py), and `compute_logits` composes each row with its own
(`compose.compose_logits_per_row`). Every value model still runs on every row: the model sees flattened tokens,
not requests, and all stacks share the KV cache's blocks (docs/serving.md).

Stacks of different shapes (hidden size, heads, head_dim) are fine: their layers' KV caches differ in page
size, and vLLM's KV-cache manager groups all full-attention layers into one group
(UniformTypeKVCacheSpecs) with one block table.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

from transfertune.core.compose import compose_logits, compose_logits_per_row
from transfertune.io.validate import check_number
from transfertune.serving.vllm.export import ARCHITECTURE, BETA_OVERRIDE, META_KEY, VALUE_PREFIX, WEIGHTS_OVERRIDE
from transfertune.serving.vllm.value_mix import ExportMix, MixError, register_names, take_step

logger = logging.getLogger("vllm.transfertune")  # under vLLM's logger, so its handler prints it


def _sub_config(config_dict: dict):
    """A transformers config from a config.json dict, patched the way vLLM patches the configs it loads."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = dict(config_dict)
    model_type = data.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{ARCHITECTURE}: a stack's config has model_type {model_type!r}, which this version of "
                         f"transformers does not know")
    hf_config = CONFIG_MAPPING[model_type].from_dict(data)
    try:
        from vllm.transformers_utils.config import patch_rope_parameters

        patch_rope_parameters(hf_config)
    except ImportError:  # older vLLM: nothing to patch
        pass
    return hf_config


def _sub_vllm_config(vllm_config, hf_config, keep_quant: bool):
    """vllm_config with the model config of one stack. Everything else (cache, parallel, compilation config and
    its static forward context, where every attention layer registers) is shared with the composed model."""
    model_config = copy.copy(vllm_config.model_config)
    model_config.hf_config = hf_config
    model_config.hf_text_config = hf_config.get_text_config()
    if hasattr(model_config, "get_model_arch_config"):
        model_config.model_arch_config = model_config.get_model_arch_config()
    sub = copy.copy(vllm_config)
    sub.model_config = model_config
    if not keep_quant:
        sub.quant_config = None  # value weights are written unquantised, whatever the base is
    return sub


def _build_stack(vllm_config, config_dict: dict, prefix: str, tag: str, keep_quant: bool) -> nn.Module:
    from vllm.compilation.backends import set_model_tag
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.models.registry import ModelRegistry

    hf_config = _sub_config(config_dict)
    sub = _sub_vllm_config(vllm_config, hf_config, keep_quant)
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs or ARCHITECTURE in archs:
        raise ValueError(f"{ARCHITECTURE}: stack '{prefix}' names no architecture of its own ({archs})")
    model_class, _ = ModelRegistry.resolve_model_cls(archs, model_config=sub.model_config)
    with set_model_tag(tag):  # separate torch.compile caches for stacks of the same class (as the draft model)
        return initialize_model(sub, prefix=prefix, model_class=model_class, model_config=sub.model_config)


def _check_tensor_parallel(config_dict: dict, name: str, tp: int) -> None:
    """vLLM shards every stack over the same tensor-parallel ranks; its own check is a bare assert deep inside the
    attention layer, so say here which model does not divide."""
    if tp <= 1:
        return
    text = config_dict.get("text_config", config_dict)
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads", heads)
    inter = text.get("intermediate_size")
    problems = []
    if isinstance(heads, int) and heads % tp:
        problems.append(f"{heads} attention heads")
    if isinstance(kv, int) and kv % tp and tp % kv:
        problems.append(f"{kv} key/value heads")
    if isinstance(inter, int) and inter % tp:
        problems.append(f"an MLP of {inter}")
    if problems:
        raise ValueError(f"{ARCHITECTURE}: tensor_parallel_size={tp} does not divide the {name}'s "
                         f"{' and '.join(problems)}; both models are sharded over the same ranks, so pick a size "
                         f"that divides the heads of each")


def _check_attention(stack: nn.Module, name: str) -> None:
    """Refuse at load time a head size the attention backend cannot run (vLLM's CPU backend only fails at the
    first forward pass: `Unsupported CPU attention configuration: head_dim=16 ...`)."""
    for module in stack.modules():
        backend, head_size = getattr(module, "attn_backend", None), getattr(module, "head_size", None)
        supports = getattr(backend, "supports_head_size", None)
        if callable(supports) and isinstance(head_size, int) and not supports(head_size):
            raise ValueError(
                f"{ARCHITECTURE}: the {name} has head_dim {head_size}, which vLLM's {backend.get_name()} attention "
                f"backend does not support (it supports {backend.get_supported_head_sizes()}); compose with models "
                f"whose head_dim it supports")


def _hidden_size(hf_config) -> int:
    return int(hf_config.get_text_config().hidden_size)


class TransferTuneComposedForCausalLM(nn.Module):
    """log_softmax(base logits) + sum_i w_i * value_i logits / beta, as vLLM's logits."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import maybe_prefix

        hf_config = vllm_config.model_config.hf_config
        meta = getattr(hf_config, META_KEY, None)
        if not isinstance(meta, dict) or "base" not in meta or not meta.get("values"):
            raise ValueError(f"{ARCHITECTURE}: config.json has no \"{META_KEY}\" section: write the directory "
                             f"with `transfertune export --engine vllm`")
        if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
            raise ValueError(f"{ARCHITECTURE} does not take prompt embeddings (enable_prompt_embeds): every stack "
                             f"embeds the token ids itself")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(
                f"{ARCHITECTURE} does not support pipeline parallelism (pipeline_parallel_size="
                f"{vllm_config.parallel_config.pipeline_parallel_size}): use tensor parallelism")
        self.config = hf_config
        try:
            self.mix = ExportMix.from_meta(meta, beta=getattr(hf_config, BETA_OVERRIDE, None),  # hf_overrides win
                                           weights=getattr(hf_config, WEIGHTS_OVERRIDE, None))
        except MixError as err:
            raise ValueError(f"{ARCHITECTURE}: {err} ({WEIGHTS_OVERRIDE})") from None
        check_number(self.mix.beta, "beta", gt=0)
        for i, w in enumerate(self.mix.weights, start=1):
            check_number(w, f"weight {i}")
        self.step_key = vllm_config.instance_id  # where mix_processor.py publishes each step's rows
        register_names(self.mix.names)
        if not any("ValueMixProcessor" in str(p) for p in vllm_config.model_config.logits_processors or ()):
            logger.info("%s: every request composes %s at beta %g; for per-request value models and beta, add the "
                        "logits processor transfertune.serving.vllm.mix_processor:ValueMixProcessor",
                        ARCHITECTURE, dict(zip(self.mix.names, self.mix.weights)), self.mix.beta)
        self.real_vocab_size = meta.get("real_vocab_size")
        tp = vllm_config.parallel_config.tensor_parallel_size
        _check_tensor_parallel(meta["base"]["config"], "base", tp)
        for i, v in enumerate(meta["values"]):
            _check_tensor_parallel(v["config"], f"value model {i}", tp)

        self.base = _build_stack(vllm_config, meta["base"]["config"], maybe_prefix(prefix, "base"),
                                 "transfertune_base", keep_quant=True)
        self.values = []  # modules value_0, value_1, ...: a layer name must hold one integer (the layer's)
        for i, v in enumerate(meta["values"]):
            name = VALUE_PREFIX.format(i)[:-1]
            setattr(self, name, _build_stack(vllm_config, v["config"], maybe_prefix(prefix, name),
                                             f"transfertune_{name}", keep_quant=False))
            self.values.append(getattr(self, name))
        _check_attention(self.base, "base")
        for i, value in enumerate(self.values):
            _check_attention(value, f"value model {i}")
        self.hidden_sizes = [_hidden_size(m.config) for m in (self.base, *self.values)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if input_ids is None or inputs_embeds is not None:
            raise NotImplementedError(f"{ARCHITECTURE} needs token ids: every stack embeds them itself "
                                      f"(prompt embeddings are not supported)")
        hidden = [self.base(input_ids, positions, intermediate_tensors, None)]
        hidden += [value(input_ids, positions, intermediate_tensors, None) for value in self.values]
        return torch.cat(hidden, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each row composed with its request's weights and beta (value_mix.take_step), or the export's default.
        A value model no row weighs is left out (its output layer is not run; its stack ran in forward, as the KV
        cache it shares with the others needs)."""
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        base_logits = self.base.compute_logits(parts[0])
        step = take_step(self.step_key, hidden_states.shape[0])
        if step is None:
            used = [i for i, w in enumerate(self.mix.weights) if w != 0]
        else:
            used = torch.nonzero(step.weights.ne(0).any(0)).flatten().tolist()
        value_logits = [self.values[i].compute_logits(parts[1 + i]) for i in used]
        if base_logits is None or any(v is None for v in value_logits):
            return None  # a tensor-parallel rank that does not hold the gathered logits
        if step is None:
            return compose_logits(base_logits, value_logits, weights=[self.mix.weights[i] for i in used],
                                  beta=self.mix.beta, real_vocab_size=self.real_vocab_size)
        return compose_logits_per_row(base_logits, value_logits, weights=step.weights[:, used], beta=step.beta,
                                      real_vocab_size=self.real_vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Value tensors are named value_<i>.*; every other tensor is the base's, under its own name."""
        from vllm.model_executor.models.utils import AutoWeightsLoader

        value_names = tuple(VALUE_PREFIX.format(i) for i in range(len(self.values)))

        def named():
            for name, tensor in weights:
                yield (name if name.startswith(value_names) else "base." + name), tensor

        return AutoWeightsLoader(self).load_weights(named())
