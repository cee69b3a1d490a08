"""transfertune: train a value model once against a small frozen base, compose it with any base at inference."""
__version__ = "0.1.0"

from .compose import VocabularyMismatchError, compose_logits
from .composed import ComposedModel
from .generation import ComposedGenerator
from .sampling import SamplingParams
from .trainer import ValueTrainer, train_value_model
from .value_model import LoraSettings, ValueConfig, ValueModel

__all__ = [
    "ComposedGenerator", "ComposedModel", "LoraSettings", "SamplingParams", "ValueConfig", "ValueModel",
    "ValueTrainer", "VocabularyMismatchError", "compose_logits", "train_value_model",
]
