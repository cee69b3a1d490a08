"""`transfertune eval`'s configuration: which methods, bases, tasks and splits, and how each is trained (the
value model by a ValueRecipe, the same recipe `transfertune train` uses)."""
from __future__ import annotations

from dataclasses import dataclass, field

from transfertune.io.validate import InputError
from transfertune.training.recipe import ValueRecipe

DEFAULT_METHODS = ("target", "source", "source_ft", "source+value", "target+value", "proxy", "diff_vector",
                   "target_ft", "target_lora")
LABEL_METHOD = "target+label_reward"  # classification tasks with one label set (evaluation/label_method.py)
METHODS = (*DEFAULT_METHODS, LABEL_METHOD)
EVAL_VALUE_RECIPE = ValueRecipe(max_steps=200, learning_rate=2e-3)  # 2e-3: also the budget sweep's choice


@dataclass
class EvalConfig:
    source: str = "mini-s"
    targets: list[str] = field(default_factory=lambda: ["mini-m", "mini-l", "mini-m-v2"])
    tasks: list[str] = field(default_factory=lambda: ["people_qa", "arithmetic"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    split: str = "heldout_example"
    # also measure every cell on this prompt-shifted split of the built-in tasks (shifted_dev / shifted_test),
    # beside `split`, with the share kept; tasks without it show n/a
    shifted: str | None = None
    eval_examples: int = 80
    # the value model's recipe; its init may also be "random" (the source's config, fresh weights). Batch size,
    # max length and seed are the eval's own (below), shared by every trained method
    value: ValueRecipe = field(default_factory=lambda: EVAL_VALUE_RECIPE)
    finetune_steps: int = 200  # source fine-tuning (proxy-tuning, weight diff)
    target_steps: int = 200  # the compute budget of the target oracles
    # rates from the budget-fair sweep (scripts/design_study.py budget; docs/results.md#budget): each the best of a
    # small grid on a dev split, 300 steps, mini-s -> mini-l on people_qa
    finetune_lr: float = 2e-4  # the source's full fine-tune (proxy-tuning, weight diff)
    lora_lr: float = 1e-3
    target_lr: float | None = 5e-5  # full fine-tuning of the target oracle (None: finetune_lr)
    batch_size: int = 16
    max_length: int = 256
    betas: list[float] = field(default_factory=lambda: [1.0])
    alphas: list[float] = field(default_factory=lambda: [1.0])
    seed: int = 0
    cache_dir: str = "outputs/eval"
    vocab_map: str = "exact"  # for targets with another tokenizer: "exact" or "align" (IVL, on the task texts)
    vocab_maps: dict[str, str] = field(default_factory=dict)  # per-target overrides of vocab_map
    # user data (tasks given as JSONL files or directories); built-in tasks ignore these
    split_by: str = "example"  # or "template" (rows carry a "template" field)
    heldout_fraction: float = 0.2
    split_seed: int = 0
    kind: str | None = None  # classification / qa / generation; None = from the data
    labels: list[str] | None = None  # the label set of classification rows without "choices"
    dtype: str = "auto"  # of the evaluated models: auto (fp32 on CPU, the checkpoint's on an accelerator), bf16, ...
    device: str = "cpu"  # where the evaluated models run


VOCAB_MAPS = ("exact", "align")


def parse_vocab_maps(values: list[str] | None) -> tuple[str, dict[str, str]]:
    """(map for every target, per-target maps) from `--vocab-map` values: KIND, or TARGET=KIND (repeatable)."""
    every, per_target = [], {}
    for value in values or []:
        target, _, kind = value.rpartition("=")
        if kind not in VOCAB_MAPS:
            raise InputError(f"--vocab-map {value}: give exact or align, for every target or as TARGET=exact|align")
        if target in per_target:
            raise InputError(f"--vocab-map: two maps for target {target}")
        if target:
            per_target[target] = kind
        else:
            every.append(kind)
    if len(every) > 1:
        raise InputError(f"--vocab-map: {len(every)} maps for every target ({', '.join(every)}): give one, and "
                         f"TARGET=KIND for the others")
    return (every[0] if every else "exact"), per_target


def check_config(cfg: EvalConfig) -> None:
    """Every setting in range and every name known (InputError naming it); the tasks are checked when read."""
    from transfertune.evaluation.tasks import KINDS, SPLIT_BY, SPLITS
    from transfertune.io.validate import check_number

    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    for key in ("eval_examples", "finetune_steps", "target_steps", "batch_size"):
        check_number(getattr(cfg, key), key, integer=True, ge=1)
    check_number(cfg.max_length, "max_length", integer=True, ge=2)
    for key in ("finetune_lr", "lora_lr"):
        check_number(getattr(cfg, key), key, ge=0)
    if cfg.target_lr is not None:
        check_number(cfg.target_lr, "target_lr", gt=0)
    try:
        cfg.value.check()
    except InputError as err:
        raise InputError(f"value {err}") from None
    if cfg.value.max_steps < 1:
        raise InputError(f"value max_steps must be >= 1, got {cfg.value.max_steps}")
    for beta in cfg.betas:
        check_number(beta, "beta", gt=0)
    for alpha in cfg.alphas:
        check_number(alpha, "alpha")
    if cfg.shifted is not None and (cfg.shifted not in SPLITS or cfg.shifted == "train"):
        raise InputError(f"shifted split must be a held-out split ({', '.join(SPLITS[1:])}), got {cfg.shifted!r}")
    check_number(cfg.heldout_fraction, "heldout_fraction", gt=0, lt=1)
    check_number(cfg.split_seed, "split_seed", integer=True)
    if cfg.split_by not in SPLIT_BY:
        raise InputError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {cfg.split_by!r}")
    if cfg.kind is not None and cfg.kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.labels is not None and (len(set(cfg.labels)) < 2 or len(set(cfg.labels)) < len(cfg.labels)):
        raise InputError(f"--labels must be at least 2 different labels, got {' '.join(cfg.labels)}")
    for target, kind in {"": cfg.vocab_map, **cfg.vocab_maps}.items():
        if kind not in VOCAB_MAPS:
            raise InputError(f"vocab map for {target or 'every target'} must be exact or align, got {kind!r}")
    unknown = [t for t in cfg.vocab_maps if t not in cfg.targets]
    if unknown:
        raise InputError(f"--vocab-map names {', '.join(unknown)}, not among --targets ({', '.join(cfg.targets)})")
