"""ValueTrainer: a `transformers.Trainer` whose loss is the SFT cross-entropy of the *composed* model.

    loss = CE(log_softmax(log p_base + v / beta), y)  on response tokens
         + l1_coef * mean|v|  -  entropy_coef * mean H(softmax(v))

Only the value model is trained; the base is frozen, in eval mode, under no_grad. Everything else
(accelerate/DeepSpeed/FSDP, checkpoints, resume, logging) is the stock Trainer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch
import torch.nn.functional as F
from transformers import Trainer

from .compose import l1_penalty, value_entropy
from .sequence import composed_response_logits
from .value_model import ValueModel


class ValueTrainer(Trainer):
    def __init__(self, value_model: ValueModel, base_model, *args, **kwargs):
        super().__init__(value_model.model, *args, **kwargs)
        self.value_model = value_model
        self.base_model = base_model.eval().requires_grad_(False)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the token count of the whole step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.value_model.config
        if self.base_model.device != inputs["input_ids"].device:
            self.base_model.to(inputs["input_ids"].device)
        res = composed_response_logits(
            self.base_model, [model], inputs["input_ids"], inputs["attention_mask"], inputs["labels"], beta=cfg.beta,
            real_vocab_size=cfg.vocab_size,
        )
        n_tokens = num_items_in_batch if num_items_in_batch is not None else res.targets.numel()
        loss = F.cross_entropy(res.composed, res.targets, reduction="sum") / max(int(n_tokens), 1)
        # the regularisers are per-token means, weighted like the CE by this micro-batch's share of tokens
        share = res.targets.numel() / max(int(n_tokens), 1)
        value = res.values[0]
        if cfg.l1_coef:
            loss = loss + share * cfg.l1_coef * l1_penalty(value)
        if cfg.entropy_coef:
            loss = loss - share * cfg.entropy_coef * value_entropy(value)
        if self._tokens_counted_across_processes(num_items_in_batch):
            # n_tokens counts every process's tokens and DDP averages the gradients over processes: undo the mean
            loss = loss * self.accelerator.num_processes
        return (loss, {"composed_logits": res.composed}) if return_outputs else loss

    def _tokens_counted_across_processes(self, num_items_in_batch) -> bool:
        """Whether the Trainer summed `num_items_in_batch` over all processes (as it does before its own loss)."""
        return (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints and the final save are value directories (weights or adapter + transfertune.json)."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.value_model.save(output_dir)


def train_value_model(
    base: str,
    data,
    output_dir: str,
    *,
    init: str | None = None,
    zero_init_head: bool = True,
    lora=None,
    beta: float = 1.0,
    l1_coef: float = 0.0,
    entropy_coef: float = 0.0,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    save_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    base_model=None,
    **training_args,
) -> ValueModel:
    """Train a value model against frozen `base` on `data` (a JSONL path or a list of records) and save it
    to `output_dir` as a value directory. `init` defaults to the base itself (the papers' default);
    `max_length` to the base's context (at most 512 tokens).

    `output_dir` must be new or empty; `resume=True` continues the unfinished run recorded there (from its
    last complete checkpoint), `overwrite=True` replaces a directory transfertune wrote (see outputs.py).
    Everything is checked before any model loads."""
    from transformers import set_seed

    from .data import RightPadCollator, SFTDataset, pad_id_of
    from .loading import load_base, portable_name, resolve_model
    from .outputs import claim_output

    check_training_numbers(beta=beta, l1_coef=l1_coef, entropy_coef=entropy_coef, epochs=epochs,
                           max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                           grad_accum=grad_accum, max_length=max_length, logging_steps=logging_steps,
                           save_steps=save_steps)
    records = load_records(data)
    args = build_training_args(
        output_dir, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
        learning_rate=learning_rate, logging_steps=logging_steps, save_steps=save_steps, seed=seed,
        **training_args,
    )
    check_distributed(args)
    init = init or base
    init_source = init.split(":", 1)[1] if init.startswith("random:") else init
    reads = {"--base": resolve_model(base), "--init": resolve_model(init_source)}
    settings = {
        "base": portable_name(base), "init": init if init.startswith("random:") else portable_name(init),
        "data_sha256": records_digest(records), "lora": asdict(lora) if lora is not None else None,
        "zero_init_head": zero_init_head, "beta": beta, "l1_coef": l1_coef, "entropy_coef": entropy_coef,
        "learning_rate": learning_rate, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_length": max_length, "seed": seed,
    }
    with claim_output(output_dir, settings=settings, overwrite=overwrite, resume=resume, reads=reads) as claim:
        set_seed(seed)
        if base_model is None:
            base_model, tokenizer = load_base(base, trust_remote_code=trust_remote_code)
        else:
            from .loading import load_tokenizer

            tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        value = ValueModel.create(
            init, zero_init_head=zero_init_head, lora=lora, trust_remote_code=trust_remote_code,
            beta=beta, l1_coef=l1_coef, entropy_coef=entropy_coef, training_base=portable_name(base),
        )
        value.config.extra["run_id"] = claim.run_id
        value.check_compatible(tokenizer, base)
        max_length = fit_context(max_length, {f"base '{base}'": base_model, f"init '{init}'": value.model})
        dataset = SFTDataset(records, tokenizer, max_length)
        trainer = ValueTrainer(
            value, base_model, args=args, train_dataset=dataset, data_collator=RightPadCollator(pad_id_of(tokenizer))
        )
        trainer.train(resume_from_checkpoint=claim.resume_from)
        value.model.eval()
        if args.should_save:
            value.save(output_dir)
            claim.finish(processes=args.world_size)
    return value


def check_distributed(args) -> None:
    """Refuse a launch of several processes that the Trainer does not train together: each would train
    alone and write the same --output. `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs
    need ACCELERATE_USE_CPU=true to train over gloo."""
    import os

    from .validate import InputError

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise InputError(f"launched as {launched} processes, but the Trainer found no way to train them together "
                         f"(world size {args.world_size}): on CPUs set ACCELERATE_USE_CPU=true (gloo backend); "
                         f"otherwise every process would write the same --output")


DEFAULT_MAX_LENGTH = 512


def fit_context(max_length: int | None, models: dict) -> int:
    """`max_length`, or by default the shortest context of `models` (at most DEFAULT_MAX_LENGTH); a value past
    a model's context is refused (positions past it are garbage, or an index error)."""
    from .loading import context_length
    from .validate import InputError

    limits = {name: context_length(m) for name, m in models.items() if context_length(m)}
    if max_length is None:
        return min([DEFAULT_MAX_LENGTH, *limits.values()])
    for name, limit in limits.items():
        if max_length > limit:
            raise InputError(f"max_length {max_length} is more than the context of {name} ({limit} tokens): "
                             f"use --max-length {limit} or less")
    return max_length


def check_training_numbers(*, beta, l1_coef, entropy_coef, epochs, max_steps, learning_rate, batch_size,
                           grad_accum, max_length, logging_steps, save_steps) -> None:
    from .validate import InputError, check_number, check_optional

    check_number(beta, "beta", gt=0)
    check_number(l1_coef, "l1_coef", ge=0)
    check_number(entropy_coef, "entropy_coef", ge=0)
    check_number(epochs, "epochs", gt=0)
    check_number(max_steps, "max_steps", integer=True, ge=-1)
    if max_steps == 0:
        raise InputError("max_steps must be >= 1 (or -1: use epochs), got 0")
    check_number(learning_rate, "learning_rate", ge=0)
    check_number(batch_size, "batch_size", integer=True, ge=1)
    check_number(grad_accum, "grad_accum", integer=True, ge=1)
    check_optional(max_length, "max_length", integer=True, ge=2)
    check_number(logging_steps, "logging_steps", integer=True, ge=1)
    check_optional(save_steps, "save_steps", integer=True, ge=1)


def records_digest(records: list[dict]) -> str:
    blob = json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def load_records(data) -> list[dict]:
    """A JSONL path, or a list of records in any of the accepted formats."""
    from .data import read_jsonl, to_prompt_response

    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return read_jsonl(data)
    return [to_prompt_response(r) for r in data]


def build_training_args(
    output_dir: str, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int, learning_rate: float,
    logging_steps: int, save_steps: int | None, seed: int, **training_args,
):
    """TrainingArguments with transfertune's defaults: cosine schedule, no reporting, CPU-friendly loading."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=training_args.pop("lr_scheduler_type", "cosine"),
        warmup_steps=training_args.pop("warmup_steps", 0),
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=training_args.pop("report_to", "none"),
        seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=training_args.pop("dataloader_pin_memory", False),
        **training_args,
    )
