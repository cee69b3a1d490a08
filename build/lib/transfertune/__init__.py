"""transfertune: train a value model once against a small frozen base, compose it with any base at inference."""
__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so `import transfertune.cli.main` and `transfertune --help`
# do not pay for torch and transformers.
_EXPORTS = {
    "VocabularyMismatchError": "core.compose", "compose_logits": "core.compose",
    "Composition": "core.compose",
    "ComposedModel": "inference.composed_model",
    "ComposedGenerator": "inference.generator",
    "SamplingParams": "inference.sampling",
    "ValueTrainer": "training.value_trainer", "train_value_model": "training.value_trainer",
    "ValueRecipe": "training.recipe",
    "LoraSettings": "core.value_model", "ValueConfig": "core.value_model", "ValueModel": "core.value_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transfertune' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"transfertune.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
