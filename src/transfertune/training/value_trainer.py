"""ValueTrainer: a `transformers.Trainer` whose loss is the SFT cross-entropy of the *composed* model.

    loss = CE(log_softmax(log p_base + v / beta), y)  on response tokens
         + KL(p_base || p_composed)                    on tokens a row leaves to the base ("deferred")
         + l1_coef * mean|v|  -  entropy_coef * mean H(softmax(v))

Only the value model is trained; the base is frozen, in eval mode, under no_grad. Everything else
(accelerate/DeepSpeed/FSDP, checkpoints, resume, logging) is the stock Trainer. Every training log line adds
`tokens_per_second` (non-padding input tokens over the time since the previous training log, evaluation time
left out); with held-out data, `eval_loss` is the composed NLL of the held-out responses (no regularisers) and
`eval_tokens_per_second` its speed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

import torch
from transformers import Trainer, TrainerCallback

from transfertune.core.cascade import cascade_embeddings
from transfertune.core.compose import compose_logits, composed_cross_entropy, deferral_kl, l1_penalty, value_entropy
from transfertune.core.response_logits import at_positions, logits_at_positions, response_positions
from transfertune.core.value_model import ValueModel
from transfertune.training.recipe import ValueRecipe


class ValueTrainer(Trainer):
    def __init__(self, value_model: ValueModel, base_model, *args, **kwargs):
        super().__init__(value_model.model, *args, **kwargs)
        self.value_model = value_model
        self.base_model = base_model.eval().requires_grad_(False)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the token count of the whole step
        self._window = None  # (time, tokens seen, evaluation seconds) at the previous training log
        self._eval_tokens = 0
        self._eval_seconds = 0.0
        self.add_callback(_ThroughputWindow(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The composed SFT loss. Both models run their output layer only at response positions ([N, V], not
        [B, T, V]), and the composition + cross-entropy is one fused op (compose.composed_cross_entropy): the
        numbers are those of compose_logits + F.cross_entropy, which scoring uses."""
        cfg = self.value_model.config
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if self.base_model.device != input_ids.device:
            self.base_model.to(input_ids.device)
        training = model.training
        rows, cols, targets = response_positions(inputs["labels"])
        n_trained = len(rows)
        if training and "deferred" in inputs:  # positions left to the base (data.deferred_tail), after the others
            deferred_rows, deferred_cols = (inputs["deferred"][:, 1:] != 0).nonzero(as_tuple=True)
            rows, cols = torch.cat([rows, deferred_rows]), torch.cat([cols, deferred_cols])
        value_inputs = {}
        with torch.no_grad():
            if cfg.scheme == "cascade":  # the value model reads the base's distribution at every position
                full = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                base = at_positions(full, rows, cols)
            else:
                base = logits_at_positions(self.base_model, input_ids, attention_mask, rows, cols)
        if cfg.scheme == "cascade":
            value_inputs["inputs_embeds"] = cascade_embeddings(model, input_ids, full)
            del full
        value = logits_at_positions(model, input_ids, attention_mask, rows, cols, **value_inputs)
        # evaluation: the mean over this batch's tokens (num_items_in_batch may count other processes' too)
        n_tokens = num_items_in_batch if num_items_in_batch is not None and training else targets.numel()
        loss = composed_cross_entropy(base[:n_trained], [value[:n_trained]], targets, beta=cfg.beta,
                                      real_vocab_size=cfg.vocab_size)
        if len(rows) > n_trained:
            loss = loss + deferral_kl(base[n_trained:], value[n_trained:], beta=cfg.beta,
                                      real_vocab_size=cfg.vocab_size)
        loss = loss / max(int(n_tokens), 1)
        outputs = None
        if return_outputs:
            with torch.no_grad():
                outputs = {"composed_logits": compose_logits(base[:n_trained], [value[:n_trained].detach()],
                                                             beta=cfg.beta, real_vocab_size=cfg.vocab_size)}
        del base  # [N, V]: not needed by the backward pass nor the regularisers
        if not training:  # evaluation: held-out composed NLL, the number the regularisers trade against
            self._eval_tokens = getattr(self, "_eval_tokens", 0) + int(attention_mask.sum())
            return (loss, outputs) if return_outputs else loss
        # the regularisers are per-token means, weighted like the CE by this micro-batch's share of tokens
        share = targets.numel() / max(int(n_tokens), 1)
        if cfg.l1_coef:
            loss = loss + share * cfg.l1_coef * l1_penalty(value)
        if cfg.entropy_coef:
            loss = loss - share * cfg.entropy_coef * value_entropy(value)
        if self._tokens_counted_across_processes(num_items_in_batch):
            # n_tokens counts every process's tokens and DDP averages the gradients over processes: undo the mean
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _tokens_counted_across_processes(self, num_items_in_batch) -> bool:
        """Whether the Trainer summed `num_items_in_batch` over all processes (as it does before its own loss)."""
        return (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add tokens/s to every training log line (and to evaluation lines) before the stock Trainer logs it."""
        now = time.perf_counter()
        if "eval_runtime" in logs:
            tokens = self._eval_tokens
            if self.args.world_size > 1:
                tokens = int(self.accelerator.reduce(torch.tensor(tokens, device=self.args.device), "sum"))
            logs["eval_tokens_per_second"] = round(tokens / max(logs["eval_runtime"], 1e-9), 1)
            self._eval_seconds += logs["eval_runtime"]
            self._eval_tokens = 0
        elif "loss" in logs and self._window is not None:
            started, seen, eval_seconds = self._window
            seconds = now - started - (self._eval_seconds - eval_seconds)
            logs["tokens_per_second"] = round((self.state.num_input_tokens_seen - seen) / max(seconds, 1e-9), 1)
            self._window = (now, self.state.num_input_tokens_seen, self._eval_seconds)
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints and the final save are value directories (weights or adapter + transfertune.json)."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.value_model.save(output_dir)


class _ThroughputWindow(TrainerCallback):
    """Starts ValueTrainer's tokens/s window when training (or a resumed run) begins."""

    def __init__(self, trainer: ValueTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t._window = (time.perf_counter(), state.num_input_tokens_seen, t._eval_seconds)


def train_value_model(base: str, data, output_dir: str, recipe: ValueRecipe | None = None, **kwargs) -> ValueModel:
    """Train a value model against frozen `base` on `data` (a JSONL path or a list of records) and save it to
    `output_dir` as a value directory: `train_value_recipe` with the recipe from `recipe` and the keywords that
    name ValueRecipe fields (e.g. `max_steps=400, learning_rate=2e-3`); the other keywords are train_value_recipe's
    (`resume`, `overwrite`, `eval_data`, `dtype`, `device`, ...) or extra transformers TrainingArguments."""
    from dataclasses import replace

    changes, rest = ValueRecipe.from_kwargs(**kwargs)
    given = {k: v for k, v in kwargs.items() if k not in rest}
    if recipe is None:
        recipe = changes
    elif given:
        recipe = replace(recipe, **{f: getattr(changes, f) for f in _fields_named(given)})
    return train_value_recipe(base, data, output_dir, recipe, **rest)


def _fields_named(kwargs: dict) -> list[str]:
    aliases = {"zero_init_head": ["head"], "lora": ["lora", "lora_r", "lora_alpha", "lora_dropout"]}
    return [f for k in kwargs for f in aliases.get(k, [k])]


def train_value_recipe(
    base: str,
    data,
    output_dir: str,
    recipe: ValueRecipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    base_model=None,
    eval_data=None,
    callbacks=None,
    dtype=None,
    device=None,
    device_flag: str = "device",
    lora_target_modules=None,
    **training_args,
) -> ValueModel:
    """Train a value model by `recipe` (training/recipe.py). The frozen base loads as `dtype` (default fp32;
    the value model trains in fp32) unless `base_model` is given; `device` "cpu" keeps training on the CPU when
    there is an accelerator (the Trainer places the models; a GPU index is chosen with CUDA_VISIBLE_DEVICES).

    `output_dir` must be new or empty; `resume=True` continues the unfinished run recorded there (from its
    last complete checkpoint), `overwrite=True` replaces a directory transfertune wrote (io/run_dirs.py: the
    new model trains beside it and is swapped in when saved, so the old one stays whole until then).
    `eval_data` (same formats as `data`) is held out: its composed loss is logged as `eval_loss` every
    `recipe.eval_steps` steps (default `logging_steps`) and at the end. `callbacks` are
    `transformers.TrainerCallback`s added to the Trainer (their `on_log` sees every log line, tokens/s included).
    Rows with a "deferred" tail (data.deferred_tail) leave that tail to the base unless `recipe.defer` is False,
    which trains on whole responses; `eval_loss` always scores whole responses. Everything is checked before any
    model loads."""
    from transformers import set_seed

    from transfertune.io.data import RightPadCollator, SFTDataset, pad_id_of
    from transfertune.io.loading import load_base, portable_name, resolve_model
    from transfertune.io.placement import training_placement
    from transfertune.io.run_dirs import claim_output
    from transfertune.io.validate import InputError

    recipe.check()
    r = recipe
    lora = r.lora_settings(lora_target_modules)
    init, scheme, lora_head, zero_init_head = r.init, r.scheme, r.lora_head, r.zero_init_head
    beta, defer = r.beta, r.defer
    max_length, seed = r.max_length, r.seed
    placement = training_placement(dtype, device, flags={"device": device_flag})
    training_args = {**placement.pop("training_args"), **training_args}
    from transfertune.training.augment import augment_prompts

    records = augment_prompts(load_records(data), r.augment, seed=r.seed)
    eval_records = load_records(eval_data) if eval_data is not None else None
    if eval_records is not None and not eval_records:
        raise InputError("the held-out (eval) data holds no examples")
    args = build_training_args(
        output_dir, batch_size=r.batch_size, grad_accum=r.grad_accum, epochs=r.epochs, max_steps=r.max_steps,
        learning_rate=r.learning_rate, logging_steps=r.logging_steps, save_steps=r.save_steps, seed=seed,
        eval_steps=(r.eval_steps or r.logging_steps) if eval_records is not None else None,
        warmup_steps=r.warmup_steps, weight_decay=r.weight_decay, **training_args,
    )
    check_distributed(args)
    init = init or base
    init_source = init.split(":", 1)[1] if init.startswith("random:") else init
    reads = {"--base": resolve_model(base), "--init": resolve_model(init_source)}
    settings = {
        "base": portable_name(base), "init": init if init.startswith("random:") else portable_name(init),
        "data_sha256": records_digest(records), "lora": asdict(lora) if lora is not None else None,
        "lora_head": lora_head if lora is not None else None,
        "zero_init_head": zero_init_head, **({"scheme": scheme} if scheme != "residual" else {}), "beta": beta,
        "l1_coef": r.l1_coef, "entropy_coef": r.entropy_coef,
        "learning_rate": r.learning_rate, "batch_size": r.batch_size, "grad_accum": r.grad_accum,
        "max_length": max_length, "seed": seed, **({} if defer else {"defer": False}),
        **({"augment": r.augment} if r.augment else {}),
    }
    with claim_output(output_dir, settings=settings, overwrite=overwrite, resume=resume, reads=reads) as claim:
        args.output_dir = str(claim.directory)  # beside output_dir for --overwrite, swapped in when saved
        set_seed(seed)
        if base_model is None:
            base_model, tokenizer = load_base(base, trust_remote_code=trust_remote_code, **placement)
        else:
            from transfertune.io.loading import load_tokenizer

            tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        value = ValueModel.create(
            init, zero_init_head=zero_init_head, lora=lora, lora_head=lora_head, trust_remote_code=trust_remote_code,
            beta=beta, scheme=scheme, l1_coef=r.l1_coef, entropy_coef=r.entropy_coef, training_base=portable_name(base),
        )
        value.config.extra["run_id"] = claim.run_id
        # chat data is rendered with the training base's template (data.render_chat): save it with the value
        # model, so generation and scoring render chats the way the value model was trained
        value.tokenizer.chat_template = getattr(tokenizer, "chat_template", None)
        value.config.chat_format = "template" if value.tokenizer.chat_template else "plain"
        value.check_compatible(tokenizer, base)
        max_length = fit_context(max_length, {f"base '{base}'": base_model, f"init '{init}'": value.model})
        dataset = SFTDataset(records, tokenizer, max_length, defer=defer)
        eval_dataset = SFTDataset(eval_records, tokenizer, max_length) if eval_records is not None else None
        trainer = ValueTrainer(
            value, base_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
            data_collator=RightPadCollator(pad_id_of(tokenizer)), callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=claim.resume_from)
        if eval_dataset is not None and trainer.state.global_step % args.eval_steps:
            trainer.evaluate()  # the held-out loss of the final weights, when the last step was not an eval step
        value.model.eval()
        if args.should_save:
            value.save(claim.directory)
            claim.finish(processes=args.world_size)
    return value


def check_distributed(args) -> None:
    """Refuse a launch of several processes that the Trainer does not train together: each would train
    alone and write the same --output. `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs
    need ACCELERATE_USE_CPU=true to train over gloo."""
    import os

    from transfertune.io.validate import InputError

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise InputError(f"launched as {launched} processes, but the Trainer found no way to train them together "
                         f"(world size {args.world_size}): on CPUs set ACCELERATE_USE_CPU=true (gloo backend); "
                         f"otherwise every process would write the same --output")


DEFAULT_MAX_LENGTH = 512


def fit_context(max_length: int | None, models: dict) -> int:
    """`max_length`, or by default the shortest context of `models` (at most DEFAULT_MAX_LENGTH); a value past
    a model's context is refused (positions past it are garbage, or an index error)."""
    from transfertune.io.loading import context_length
    from transfertune.io.validate import InputError

    limits = {name: context_length(m) for name, m in models.items() if context_length(m)}
    if max_length is None:
        return min([DEFAULT_MAX_LENGTH, *limits.values()])
    for name, limit in limits.items():
        if max_length > limit:
            raise InputError(f"max_length {max_length} is more than the context of {name} ({limit} tokens): "
                             f"use --max-length {limit} or less")
    return max_length


def records_digest(records: list[dict]) -> str:
    blob = json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def load_records(data) -> list[dict]:
    """A JSONL path, or a list of records in any of the accepted formats."""
    from transfertune.io.data import read_jsonl, to_prompt_response

    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return read_jsonl(data)
    return [to_prompt_response(r) for r in data]


def build_training_args(
    output_dir: str, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int, learning_rate: float,
    logging_steps: int, save_steps: int | None, seed: int, eval_steps: int | None = None, **training_args,
):
    """TrainingArguments with transfertune's defaults: cosine schedule, no reporting, CPU-friendly loading,
    non-padding input tokens counted (for tokens/s); `eval_steps` turns on evaluation every that many steps."""
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
        include_num_input_tokens_seen=training_args.pop("include_num_input_tokens_seen", "non_padding"),
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        per_device_eval_batch_size=training_args.pop("per_device_eval_batch_size", batch_size),
        **training_args,
    )
