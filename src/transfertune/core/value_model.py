"""The value model: any HF causal LM whose output over the vocabulary is read as per-token values.

A *value directory* holds only what was trained: full weights (safetensors) or a LoRA adapter, the
tokenizer, and `transfertune.json` (beta, scheme, regularisers, training base, vocabulary fingerprint).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from transfertune import __version__
from transfertune.core.compose import VocabularyMismatchError
from transfertune.io.fingerprint import vocab_fingerprint
from transfertune.io.loading import load_causal_lm, load_config, load_tokenizer, portable_name
from transfertune.io.validate import InputError, check_number, check_weight_files, pickled_weights, read_json_file

CONFIG_NAME = "transfertune.json"
from transfertune.core.choices import LORA_HEADS  # noqa: E402,F401 (re-exported)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class ValueConfig:
    """What a value directory records about how its value model was made and must be composed."""

    beta: float = 1.0
    scheme: str = "residual"
    l1_coef: float = 0.0
    entropy_coef: float = 0.0
    init: str = "random"
    zero_init_head: bool = True
    lora: LoraSettings | None = None
    lora_head: str | None = None  # LoRA only: "lora" (a low-rank adapter on the output layer) or "full"
    training_base: str | None = None
    vocab_fingerprint: str | None = None
    vocab_size: int | None = None
    transfertune_version: str = __version__
    # how chat rows were rendered in training: "template" (the saved chat template) or "plain" ("role: content"
    # lines); None for value models trained before it was recorded
    chat_format: str | None = None
    extra: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # what the directory holds: the rest is not this model's

    def save(self, directory: str | Path) -> None:
        data = asdict(self)
        Path(directory, CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ValueConfig:
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            hint = " (a save was interrupted?)" if Path(directory).is_dir() and any(
                Path(directory).glob("*.safetensors")) else ""
            raise FileNotFoundError(f"{directory} is not a value directory: {CONFIG_NAME} is missing{hint}")
        data = read_json_file(path, CONFIG_NAME)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        lora = known.pop("lora", None)
        expected = {"beta": (int, float), "scheme": str, "init": str, "training_base": (str, type(None)),
                    "vocab_fingerprint": (str, type(None)), "vocab_size": (int, type(None)), "extra": dict,
                    "files": list, "lora": (dict, type(None)), "l1_coef": (int, float), "entropy_coef": (int, float),
                    "lora_head": (str, type(None)), "chat_format": (str, type(None))}
        for key, types in expected.items():
            value = lora if key == "lora" else known.get(key)
            if (key in known or key == "lora") and (isinstance(value, bool) or not isinstance(value, types)):
                raise InputError(f"{path}: \"{key}\" has the wrong type ({type(value).__name__}: {value!r})")
        check_number(known.get("beta", 1.0), f"{path}: \"beta\"", gt=0)
        if known.get("chat_format") is None and isinstance(known.get("extra"), dict):
            known["chat_format"] = known["extra"].pop("chat_format", None)  # where it was kept before
        if lora and known.get("lora_head") is None:
            known["lora_head"] = "full"  # written before the choice existed: the whole output layer was trained
        from transfertune.core.cascade import SCHEMES

        if known.get("scheme", "residual") not in SCHEMES:
            raise InputError(f"{path}: \"scheme\" must be one of {', '.join(SCHEMES)}, got {known['scheme']!r}")
        if known.get("lora_head") not in (None, *LORA_HEADS):
            raise InputError(
                f"{path}: \"lora_head\" must be one of {', '.join(LORA_HEADS)}, got {known['lora_head']!r}")
        try:
            return cls(**known, lora=LoraSettings(**lora) if lora else None)
        except TypeError as err:
            raise InputError(f"{path}: malformed \"lora\" settings ({err})") from None


def _zero_output_head(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


class ValueModel(nn.Module):
    """Wraps a causal LM (optionally PEFT/LoRA) whose logits are the values v(x, y_<t)."""

    def __init__(self, model: nn.Module, tokenizer, config: ValueConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.directory: str | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        init: str,
        *,
        tokenizer=None,
        zero_init_head: bool = True,
        lora: LoraSettings | None = None,
        lora_head: str = "lora",
        trust_remote_code: bool = False,
        **config_kwargs,
    ) -> ValueModel:
        """A new value model from a pretrained LM (`init` = name or path), or random weights from
        `init="random:<name or path>"` (that model's config, fresh weights).

        zero_init_head zeroes the output layer (untied from the input embeddings first), so training starts
        exactly at the base distribution instead of double-counting the base logits.

        With `lora`, `lora_head` says how the output layer trains: "lora" (default) adds a rank-r adapter to
        the frozen layer, whose output starts at zero (peft starts B at zero) and stays low-rank, so the
        directory holds only adapters; "full" trains the whole layer and saves it (vocabulary x hidden).
        """
        if lora is not None and lora_head not in LORA_HEADS:
            raise InputError(f"lora_head must be one of {', '.join(LORA_HEADS)}, got {lora_head!r}")
        random_init = init.startswith("random:")
        source = init.split(":", 1)[1] if random_init else init
        tokenizer = tokenizer or load_tokenizer(source, trust_remote_code=trust_remote_code)
        head_adapter = lora is not None and lora_head == "lora"
        overrides = {"tie_word_embeddings": False} if zero_init_head and not head_adapter else {}
        if random_init:
            if lora is not None:
                raise ValueError("LoRA needs pretrained weights to adapt; use full training with random init")
            hf_config = load_config(source, trust_remote_code=trust_remote_code)
            for k, v in overrides.items():
                setattr(hf_config, k, v)
            # float32 whatever dtype the config records (fp16 weights on disk would make fp16 training diverge)
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
        else:
            model = load_causal_lm(source, frozen=False, trust_remote_code=trust_remote_code, **overrides)
        if head_adapter:
            _untie_output_head(model)
        if zero_init_head:
            _zero_output_head(model)
        model.train().requires_grad_(True)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            head = _head_name(model)
            peft_config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=_with_head(model, lora.target_modules, head) if head_adapter else lora.target_modules,
                modules_to_save=None if head_adapter else [head],
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_config)
        config = ValueConfig(
            init=("random:" if random_init else "") + portable_name(source),
            zero_init_head=zero_init_head,
            lora=lora,
            lora_head=lora_head if lora is not None else None,
            vocab_fingerprint=vocab_fingerprint(tokenizer),
            vocab_size=len(tokenizer),
            **config_kwargs,
        )
        return cls(model, tokenizer, config)

    # -- inference ----------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def is_lora(self) -> bool:
        return self.config.lora is not None

    def check_compatible(self, tokenizer, base_name: str = "base") -> None:
        """Refuse a base whose vocabulary differs from the one this value model was trained on."""
        theirs = vocab_fingerprint(tokenizer)
        if theirs != self.config.vocab_fingerprint:
            raise VocabularyMismatchError(
                f"vocabulary mismatch: the value model was trained on the vocabulary of "
                f"'{self.config.training_base}' ({self.config.vocab_size} tokens, fingerprint "
                f"{self.config.vocab_fingerprint}), but '{base_name}' has {len(tokenizer)} tokens, "
                f"fingerprint {theirs}. Compose only with bases that share the tokenizer."
            )

    # -- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the value directory atomically (see outputs.staged_directory): weights of the other kind
        (a LoRA adapter over full weights, or the reverse) left by an earlier save are removed."""
        from transfertune.io.run_dirs import manifest, staged_directory

        directory = Path(directory)
        stale = manifest(directory) | {"model.safetensors", "model.safetensors.index.json", "adapter_config.json",
                                        "adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin"}
        # a LoRA output layer is only its adapter: peft would otherwise add the whole (frozen) output and input
        # embedding matrices, since an embedding-named module is among its targets
        extra = {"save_embedding_layers": False} if self.config.lora_head == "lora" else {}
        with staged_directory(directory, replaces=stale) as staging:
            self.model.save_pretrained(staging, safe_serialization=True, **extra)
            self.tokenizer.save_pretrained(staging)
            self.config.files = sorted(p.name for p in staging.iterdir()) + [CONFIG_NAME]
            self.config.save(staging)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> ValueModel:
        directory = Path(directory)
        config = ValueConfig.load(directory)
        _check_files(directory, config)
        tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
        found = vocab_fingerprint(tokenizer)
        if config.vocab_fingerprint is not None and found != config.vocab_fingerprint:
            raise VocabularyMismatchError(
                f"{directory}: {CONFIG_NAME} records vocabulary fingerprint {config.vocab_fingerprint}, but the "
                f"directory's own tokenizer has {found} ({len(tokenizer)} tokens): the files do not belong together")
        if config.lora is not None:
            from peft import PeftModel

            head_adapter = config.lora_head == "lora"
            overrides = {"tie_word_embeddings": False} if config.zero_init_head and not head_adapter else {}
            backbone = load_causal_lm(
                _lora_base(config.init, directory), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                **overrides,
            )
            if head_adapter:  # the frozen layer under the head's adapter, as create() left it
                _untie_output_head(backbone)
                if config.zero_init_head:
                    _zero_output_head(backbone)
            model = _load_adapter(PeftModel, backbone, directory)
        else:
            model = load_causal_lm(str(directory), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                   strict=True)
        model.to(device).eval().requires_grad_(False)
        value = cls(model, tokenizer, config)
        value.directory = str(directory)
        return value


def _check_files(directory: Path, config: ValueConfig) -> None:
    """The weights must be safetensors, readable, and of the kind transfertune.json records."""
    pickles = pickled_weights(directory)
    if pickles:
        raise InputError(f"{directory} holds pickled weights ({', '.join(pickles)}): transfertune loads value "
                         f"models from safetensors only (pickles can run code when loaded)")
    check_weight_files(directory, "value models")
    if config.lora is not None:
        need, stale = ["adapter_model.safetensors", "adapter_config.json"], None
    else:
        need = ["model.safetensors.index.json" if (directory / "model.safetensors.index.json").is_file()
                else "model.safetensors", "config.json"]
        stale = "adapter_config.json" if (directory / "adapter_config.json").exists() else None
    missing = [n for n in need if not (directory / n).is_file()]
    if missing:
        kind = "a LoRA adapter" if config.lora is not None else "full weights"
        raise InputError(f"{directory}: {CONFIG_NAME} records {kind}, but {', '.join(missing)} is missing")
    if stale:
        raise InputError(f"{directory}: {CONFIG_NAME} records full weights, but the directory also holds "
                         f"{stale} (left by an earlier LoRA training?): remove it, it would be loaded instead")


def _load_adapter(peft_model, backbone: nn.Module, directory: Path) -> nn.Module:
    """The LoRA adapter in `directory` on `backbone`: non-finite values, or adapter weights missing from the
    file (peft would leave them at their initial values, with a warning), are refused."""
    import warnings

    from transfertune.io.weights import check_finite

    check_finite(directory / "adapter_model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft_model.from_pretrained(backbone, str(directory))
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise InputError(f"{directory / 'adapter_model.safetensors'} lacks weights its adapter_config.json "
                             f"describes: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def _lora_base(init: str, directory: Path) -> str:
    """The model a LoRA adapter applies to: a built-in name, an absolute path, a path relative to the value
    directory (never to the current one), or a Hugging Face id in the local cache."""
    from transfertune.io.loading import _hub_cache_snapshot, builtin_models_dir

    path = Path(init).expanduser()
    if path.is_absolute():
        return str(path)
    if "/" not in init and (builtin_models_dir() / init / "config.json").is_file():
        return init
    if (directory / path).exists():
        return str(directory / path)
    cached = _hub_cache_snapshot(init)
    if cached:
        return cached
    raise InputError(f"{directory}: the LoRA adapter's base '{init}' is not a built-in model, a path relative to "
                     f"the value directory or a cached Hugging Face id; set \"init\" in {CONFIG_NAME} to its "
                     f"absolute path")


def _untie_output_head(model: nn.Module) -> None:
    """Give the output layer its own copy of the weight it shares with the input embeddings (if it does), so
    that zeroing or adapting it leaves the embeddings alone; a pretrained head keeps its values."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=embeddings.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _with_head(model: nn.Module, target_modules, head: str):
    """peft's `target_modules` plus the output layer ("all-linear" leaves the output layer out)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return rf"(?:{target_modules})|(?:.*\.)?{head}"  # a regular expression over full module names
    if target_modules == "all-linear":
        from transformers.pytorch_utils import Conv1D

        output = model.get_output_embeddings()
        target_modules = {name.split(".")[-1] for name, m in model.named_modules()
                          if isinstance(m, (nn.Linear, Conv1D)) and m is not output}
    return sorted({*target_modules, head})


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name.split(".")[-1]
    raise ValueError("the value model has no output embedding layer")
