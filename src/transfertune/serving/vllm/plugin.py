"""transfertune's vLLM plugin: vLLM calls `register` in every process it starts (entry point
`vllm.general_plugins`), which makes the composed model class known by name. The class is imported lazily,
only in processes that build a model, so the plugin costs nothing to processes that do not."""
from __future__ import annotations

ARCHITECTURE = "TransferTuneComposedForCausalLM"  # export.ARCHITECTURE; kept here to import nothing


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"transfertune.serving.vllm.model:{ARCHITECTURE}")
