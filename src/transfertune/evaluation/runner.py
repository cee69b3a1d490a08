"""`transfertune eval`: every way of getting a post-trained target, measured side by side on the same data.

For a small source base S, target bases T and tasks, the methods are
  target          T alone                         source          S alone
  source_ft       S fine-tuned (full)             source+value    S + value model (the training pair)
  target+value    T + value model (per beta)      proxy           T + alpha (S_ft - S), three models
  diff_vector     T + (S_ft - S) in weight space (same architecture only)
  target_ft       T fine-tuned (full)             target_lora     T fine-tuned with LoRA (the oracles)
Metrics: held-out response NLL, accuracy (classification) or exact match (qa), inference seconds per token,
and gap closed = (metric(method) - metric(T)) / (metric(T_ft) - metric(T)).
Trained artifacts and per-(target, task, method) results are cached under `cache_dir`, so re-runs are cheap;
every entry is keyed on what changes it (all settings, the models' files, the task data).

Tasks are built-in names or a user's JSONL files / directories (`tasks.load_user_task`: split by example or
template with a seeded held-out fraction, kind and labels from the data or the config), read and checked
before any model loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from transfertune.evaluation.config import LABEL_METHOD, EvalConfig, check_config
from transfertune.evaluation.report import add_gap_closed, format_markdown, metric_of, plot, write_docs
from transfertune.io.run_dirs import write_atomic
from transfertune.io.validate import InputError

__all__ = ["EvalConfig", "EvalRunner", "format_markdown", "run_eval"]

# value models made before these options
_DEFAULT_RECIPE = {"init": None, "scheme": "residual", "head": "zero", "defer": True}
# config fields that reach the cache keys another way (the user task's identity, the target's own map)
_NOT_SETTINGS = ("targets", "tasks", "methods", "betas", "alphas", "cache_dir", "vocab_maps", "split_by",
                 "heldout_fraction", "split_seed", "kind", "labels", "shifted")




def legacy_value_settings(recipe) -> dict:
    """The value recipe as the flat keys results were cached under before the recipe existed (value_steps, ...),
    so existing caches stay valid; the defaults of options added later are left out."""
    settings = {"value_steps": recipe.max_steps, "value_lr": recipe.learning_rate, "value_init": recipe.init,
                "value_scheme": recipe.scheme, "value_head": recipe.head, "value_defer": recipe.defer,
                "l1_coef": recipe.l1_coef, "entropy_coef": recipe.entropy_coef}
    for f, before in _OPTIONS_ADDED_LATER.items():
        if getattr(recipe, f) != before:
            settings[f"value_{f}"] = getattr(recipe, f)
    return settings


# recipe fields results were cached without, and the value they had then
_OPTIONS_ADDED_LATER = {"beta": 1.0, "lora": False, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                        "lora_head": "lora", "epochs": 1.0, "grad_accum": 1, "augment": 0}


def _slug(name: str) -> str:
    return Path(name).name if "/" in name else name


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def model_identity(name: str) -> str:
    """A digest of a model directory's config and weight files (name, size, mtime): a rebuilt model gets new
    cache entries."""
    from transfertune.io.loading import resolve_model

    path = Path(resolve_model(name))
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")) if path.is_dir() else [path]
    return _digest([name] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def task_identity(task, splits: list[str]) -> str:
    """A digest of the task's data files (their bytes). A user task (`tasks.UserTask`): of the files it was read
    from and how it was split, typed and labelled."""
    from transfertune.evaluation.tasks import UserTask, tasks_dir

    if isinstance(task, UserTask):
        return _digest([files_digest([(str(i), f) for i, f in enumerate(task.files)]), task.recipe])
    return files_digest([(split, tasks_dir() / task / f"{split}.jsonl") for split in splits])


def files_digest(named_files) -> str:
    h = hashlib.sha256()
    for name, path in named_files:
        h.update(name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()[:16]


class EvalRunner:
    def __init__(self, cfg: EvalConfig):
        from transfertune.io.loading import resolve_model

        check_config(cfg)
        self.cfg = cfg
        self.cache = Path(cfg.cache_dir)
        self.user = {}  # name -> tasks.UserTask
        self.tasks = self._read_tasks()  # names, in the order given
        for name in [cfg.source, *cfg.targets]:
            resolve_model(name)
        if cfg.value.init not in (None, "random"):
            resolve_model(cfg.value.init)
        if self.cache.exists() and not self.cache.is_dir():
            raise InputError(f"--cache-dir {self.cache} is a file, not a directory")

    def _read_tasks(self) -> list[str]:
        """Task names: built-in ones checked, user files read, split and checked (UserTask in self.user)."""
        from transfertune.evaluation.tasks import (
            TASKS,
            is_user_task,
            load_user_task,
            tasks_dir,
        )

        c = self.cfg
        unknown = [t for t in c.tasks if not is_user_task(t) and t not in TASKS]
        if unknown:
            raise InputError(f"unknown tasks: {', '.join(unknown)}; built-in tasks: "
                             f"{', '.join(TASKS) or f'none found in {tasks_dir()}'} (or give JSONL files or a "
                             f"directory of them)")
        names: dict[str, str] = {}  # name -> the --tasks value it came from
        for arg in c.tasks:
            if is_user_task(arg):
                task = load_user_task(arg, split_by=c.split_by, heldout_fraction=c.heldout_fraction,
                                      seed=c.split_seed, kind=c.kind, labels=c.labels, split=c.split)
                self.user[task.name] = task
                name = task.name
            else:
                name = arg
                for split in ("train", c.split, *([c.shifted] if c.shifted else [])):
                    if not (tasks_dir() / arg / f"{split}.jsonl").is_file():
                        raise InputError(f"task '{arg}' has no '{split}' split ({tasks_dir() / arg / split}.jsonl)")
            if name in names:
                raise InputError(f"two tasks are named '{name}' ({names[name]} and {arg}): rename one")
            names[name] = arg
        return list(names)

    # -- tasks: built-in or the user's ---------------------------------------------------------------
    def rows(self, task: str, split: str) -> list[dict]:
        from transfertune.evaluation.tasks import load_task

        return self.user[task].splits[split] if task in self.user else load_task(task, split)

    def train_rows(self, task: str) -> list[dict]:
        """The task's training rows, with the recipe's reworded copies (training/augment.py): every trained
        method (value model, fine-tuning, LoRA, proxy's source) learns from the same rows."""
        from transfertune.training.augment import augment_prompts

        return augment_prompts(self.rows(task, "train"), self.cfg.value.augment, seed=self.cfg.seed)

    def kind(self, task: str) -> str:
        from transfertune.evaluation.tasks import TASKS

        return self.user[task].kind if task in self.user else TASKS[task]["kind"]

    def heldout(self, task: str) -> str:
        return self.user[task].heldout if task in self.user else self.cfg.split

    def identity(self, task: str, splits: list[str]) -> str:
        return task_identity(self.user.get(task, task), splits)

    def where(self, task: str, split: str, index: int) -> str:
        if task in self.user:
            return self.user[task].where[split][index]
        return f"task {task}, {split} example {index + 1}"

    def vocab_map_for(self, target: str) -> str:
        return self.cfg.vocab_maps.get(target, self.cfg.vocab_map)

    def _settings(self, target: str) -> dict:
        """Everything in the config that can change a trained model or a measured cell of `target` (dtype, device
        and the value model's recipe only when not the defaults, so caches made before they existed stay valid)."""
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in _NOT_SETTINGS and k != "value"}
        settings.update(legacy_value_settings(self.cfg.value))
        for key, default in (("dtype", "auto"), ("device", "cpu"), ("value_init", None),
                             ("value_scheme", "residual"), ("value_head", "zero"), ("value_defer", True),
                             ("target_lr", None)):
            if settings[key] == default:
                del settings[key]
        return {**settings, "vocab_map": self.vocab_map_for(target)}

    def _placement(self) -> dict:
        import torch

        from transfertune.io.placement import resolve_dtype

        device = torch.device(self.cfg.device)
        return {"device": device, "dtype": resolve_dtype(self.cfg.dtype, device.type != "cpu")}

    # -- trained artifacts ----------------------------------------------------------------------------
    def _artifact(self, kind: str, model: str, task: str, steps: int, train, **settings) -> str:
        """Train once into the cache, under a name keyed on the model, the task data and every setting passed;
        trained in a staging directory and renamed, so an interrupted run leaves nothing that looks done."""
        c = self.cfg
        key = _digest({"kind": kind, "model": model_identity(model), "task": self.identity(task, ["train"]),
                       "steps": steps, "seed": c.seed, "batch_size": c.batch_size, "max_length": c.max_length,
                       **settings})
        path = self.cache / "artifacts" / f"{kind}-{_slug(model)}-{task}-{steps}-{key}"
        # a model has config.json; a LoRA value directory holds adapters and transfertune.json only
        if not any((path / done).is_file() for done in ("config.json", "transfertune.json")):
            staging = path.with_name(f".staging-{path.name}")
            for stale in (staging, path):
                if stale.exists():
                    shutil.rmtree(stale)
            train(str(staging))
            os.rename(staging, path)
        return str(path)

    def value_dir(self, task: str) -> str:
        from transfertune.training.value_trainer import train_value_recipe

        c, v = self.cfg, self.cfg.value
        steps = v.max_steps
        init = None if v.init is None else f"random:{c.source}" if v.init == "random" else v.init
        recipe = v.with_changes(init=init, batch_size=c.batch_size, max_length=c.max_length, seed=c.seed, augment=0,
                                warmup_steps=max(1, steps // 20), weight_decay=0.0, logging_steps=max(1, steps // 5))
        keyed = {"init": init, "scheme": v.scheme, "head": v.head, "defer": v.defer}
        keyed = {k: x for k, x in keyed.items() if x != _DEFAULT_RECIPE[k]}  # defaults keep the old cache keys
        keyed.update({f: getattr(v, f) for f, before in _OPTIONS_ADDED_LATER.items()
                      if f != "augment" and getattr(v, f) != before})  # LoRA, beta, epochs, ...: when not default
        return self._artifact("value", c.source, task, steps, lambda out: train_value_recipe(
            c.source, self.train_rows(task), out, recipe,
        ), lr=v.learning_rate, l1_coef=v.l1_coef, entropy_coef=v.entropy_coef, **keyed, **self._augment_key())

    def _augment_key(self) -> dict:
        return {"augment": self.cfg.value.augment} if self.cfg.value.augment else {}

    def finetuned(self, model: str, task: str, steps: int, lora: bool = False, lr: float | None = None) -> str:
        from transfertune.core.value_model import LoraSettings
        from transfertune.training.sft import finetune_base

        c = self.cfg
        lr = lr if lr is not None else c.lora_lr if lora else c.finetune_lr
        return self._artifact("lora" if lora else "ft", model, task, steps, lambda out: finetune_base(
            model, self.train_rows(task), out, lora=LoraSettings() if lora else None, max_steps=steps,
            learning_rate=lr, batch_size=c.batch_size, max_length=c.max_length,
            seed=c.seed, warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 5),
        ), lr=lr, lora=asdict(LoraSettings()) if lora else None, **self._augment_key())

    def aligned_map(self, value_dir: str, base: str, task: str) -> None:
        """Build (once) IVL's aligned token map from the task's training texts, saved in the value dir."""
        from transfertune.io.fingerprint import vocab_fingerprint
        from transfertune.io.loading import load_tokenizer
        from transfertune.vocab.token_map import VocabMap

        base_tok, value_tok = load_tokenizer(base), load_tokenizer(value_dir)
        fp = vocab_fingerprint(base_tok)
        if fp == vocab_fingerprint(value_tok) or any(
                m.base_fingerprint == fp and m.kind == "align" for m in VocabMap.saved(value_dir)):
            return
        texts = [e["prompt"] + e["response"] for e in self.rows(task, "train")]
        VocabMap.align(base_tok, value_tok, texts).save(value_dir)

    # -- one (target, task, method) cell -------------------------------------------------------------
    def composed_for(self, method: str, target: str, task: str, knob: float):
        """The model `method` evaluates on `target` (evaluation/methods.py), trained first if need be."""
        from transfertune.evaluation.methods import BUILDERS

        return BUILDERS[method](self, target, task, knob, self._placement())

    def cell(self, method: str, target: str, task: str, knob: float, split: str | None = None) -> dict:
        from transfertune.core.compose import VocabularyMismatchError
        from transfertune.evaluation.metrics import evaluate_task
        from transfertune.training.weight_diff import ArchitectureMismatchError

        c = self.cfg
        split = split or self.heldout(task)
        label = f"{method}@{knob:g}" if method in ("target+value", "proxy", "diff_vector") else method
        key = _digest({"method": method, "knob": knob, "task": task, "settings": self._settings(target),
                       "target": model_identity(target), "source": model_identity(c.source),
                       "data": self.identity(task, ["train", split])})
        path = self.cache / "results" / _slug(target) / task / f"{label}-{split}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        row = {"target": target, "task": task, "method": method, "label": label, "knob": knob}
        if method == LABEL_METHOD:
            return self._label_reward_cell(row, target, task, split, key, path)
        try:
            cm = self.composed_for(method, target, task, knob)
        except (ArchitectureMismatchError, VocabularyMismatchError) as err:
            row["skipped"] = str(err)
        else:
            examples = self.rows(task, split)[: c.eval_examples]
            truncated = self.truncated_prompts(cm, task, split, examples)
            row.update(evaluate_task(cm, examples, self.kind(task), max_length=c.max_length))
            row["truncated_prompts"] = truncated
            row["seconds_per_token"] = seconds_per_token(cm, examples[:16], c.max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(row, indent=2) + "\n")
        return row

    def _label_reward_cell(self, row: dict, target: str, task: str, split: str, key: str, path: Path) -> dict:
        from transfertune.evaluation.label_method import NotApplicable, label_reward_metrics

        examples = self.rows(task, split)[: self.cfg.eval_examples]
        try:
            row.update(label_reward_metrics(self, target, task, examples, key))
        except NotApplicable as err:
            row["skipped"] = str(err)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(row, indent=2) + "\n")
        return row

    def truncated_prompts(self, cm, task: str, split: str, examples: list[dict]) -> int:
        """How many prompts lose tokens from the left to fit the context; a response that cannot fit at all is
        an error naming its file and line."""
        from transfertune.io.validate import ContextLengthError

        try:
            _, cut = cm.encode([e["prompt"] for e in examples], [e["response"] for e in examples], add_eos=True,
                               max_length=self.cfg.max_length)
        except ContextLengthError as err:
            context = cm.context_length
            hint = (f"raise --max-length (now {self.cfg.max_length}; the models' context is {context} tokens)"
                    if context is None or self.cfg.max_length < context else
                    f"the models' context is {context} tokens: shorten the responses or use a model with a longer one")
            raise InputError(f"{self.where(task, split, err.index)}: {str(err).split(': ', 1)[1]}: {hint}") from None
        return len(cut)

    def describe_tasks(self) -> dict:
        described = {}
        for t in self.tasks:
            built_in = {"kind": self.kind(t), "split": self.cfg.split, "built_in": True}
            described[t] = self.user[t].summary() if t in self.user else built_in
            if any(r.get("deferred") for r in self.rows(t, "train")):
                described[t]["deferred"] = True  # rows leave an answer tail to the base (data.deferred_tail)
        return described

    def plan(self) -> list[tuple[str, str, str, float]]:
        """(method, target, task, knob) of every cell, in table order."""
        c, cells = self.cfg, []
        for target in c.targets:
            for task in self.tasks:
                for method in c.methods:
                    knobs = c.betas if method == "target+value" else c.alphas if method in ("proxy", "diff_vector") \
                        else [1.0]
                    cells += [(method, target, task, k) for k in knobs]
        return cells

    def has_shifted(self, task: str) -> bool:
        from transfertune.evaluation.tasks import tasks_dir

        return bool(self.cfg.shifted) and task not in self.user and \
            (tasks_dir() / task / f"{self.cfg.shifted}.jsonl").is_file()

    def run(self) -> dict:
        c = self.cfg
        plan = self.plan()
        shifted = [p for p in plan if self.has_shifted(p[2])]
        todo = [(p, None) for p in plan] + [(p, c.shifted) for p in shifted]
        measured = [self.cell(*p, split=split) for p, split in tqdm(todo, desc="eval cells")]
        rows = measured[: len(plan)]
        for row, shifted_row in zip([r for r, p in zip(rows, plan) if p in shifted], measured[len(plan):]):
            add_shifted(row, shifted_row, c.shifted)
        add_gap_closed(rows)
        return {"config": asdict(c), "tasks": self.describe_tasks(), "rows": rows}


def add_shifted(row: dict, shifted: dict, split: str) -> None:
    """The same cell measured on the prompt-shifted split, beside it: its metric, and the share kept
    (shifted / in distribution)."""
    row["shifted_split"] = split
    if "skipped" in row or "skipped" in shifted:
        return
    for key in ("accuracy", "exact_match", "nll"):
        if key in shifted:
            row[f"shifted_{key}"] = shifted[key]
    metric = metric_of(row)
    if metric and f"shifted_{metric[0]}" in row and metric[1] > 0:
        row["share_kept"] = round(row[f"shifted_{metric[0]}"] / metric[1], 4)


def seconds_per_token(cm, examples: list[dict], max_length: int) -> float:
    """Wall-clock of scoring a few examples (every model's forward pass) per token processed."""
    from transfertune.io.data import encode_example

    feats = [encode_example(cm.tokenizer, e, max_length, add_eos=True) for e in examples]
    start = time.perf_counter()
    cm.score_features(feats, batch_size=8)
    return (time.perf_counter() - start) / sum(len(f["input_ids"]) for f in feats)














RESULT_FILES = ("results.json", "results.md", "results.png")
TABLE_HEAD = "| target | task | method |"  # how format_markdown's table starts


def run_eval(cfg: EvalConfig, out: str | None = None, docs: str | None = None, section: str = "main",
             title: str | None = None, overwrite: bool = False) -> dict:
    """Run, then write results.json, results.md and results.png to `out`; with `docs`, also write the table as
    section `section` of that markdown file (other sections are kept) and the plot beside it. Before anything
    trains: `docs` may not be an input or an output of the run, nor a file transfertune did not write
    (report.check_doc_file); results files in `out` that transfertune did not write are replaced only with
    `overwrite` (check_results_dir). Files are written to a temporary file and renamed."""
    import io

    from transfertune.evaluation.report import check_doc_file

    flag = "--output" if out else "--cache-dir"
    out_dir = Path(out or cfg.cache_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{flag} {out_dir} is a file, not a directory")
    runner = EvalRunner(cfg)
    if docs:
        target = Path(docs).resolve()
        for f in [f for task in runner.user.values() for f in task.files]:
            if Path(f).resolve() == target:
                raise InputError(f"--docs {docs} is an input of this evaluation (--tasks {f}): the report would be "
                                 f"written into the task's data; choose a markdown file")
        for name in RESULT_FILES:
            if (out_dir / name).resolve() == target:
                raise InputError(f"--docs {docs} is the {name} that eval writes to {flag} {out_dir}: choose another "
                                 f"file")
        check_doc_file(Path(docs), section, overwrite=overwrite)
    check_results_dir(out_dir, flag, overwrite)
    result = runner.run()
    check_results_dir(out_dir, flag, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
    table = format_markdown(result)
    write_atomic(out_dir / "results.md", table + "\n")
    image = io.BytesIO()
    plot(result, image)
    write_atomic(out_dir / "results.png", image.getvalue())
    if docs:
        write_docs(result, table, Path(docs), out_dir / "results.png", section, title, overwrite=overwrite)
    return result


def check_results_dir(out_dir: Path, flag: str, overwrite: bool = False) -> None:
    """Refuse results.json / results.md / results.png in `out_dir` that transfertune did not write, unless
    `overwrite`. Its own: a results.json holding "config" and "rows", with the results.md (a table starting
    TABLE_HEAD) and results.png written beside it."""
    if overwrite or not out_dir.is_dir():
        return
    present = [out_dir / name for name in RESULT_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    ours = _is_results_json(out_dir / "results.json")
    foreign = [p for p in present if not ours or (p.name == "results.md" and not _starts_with(p, TABLE_HEAD))]
    if foreign:
        raise InputError(f"{flag} {out_dir} holds {', '.join(p.name for p in foreign)}, which transfertune did not "
                         f"write (its results.json holds \"config\" and \"rows\"; results.md and results.png are "
                         f"written with it): pass --overwrite to replace them, or choose another {flag}")


def _is_results_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"config", "rows"} <= set(data)


def _starts_with(path: Path, head: str) -> bool:
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(len(head.encode())) == head.encode()
    except OSError:
        return False








