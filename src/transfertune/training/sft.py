"""Plain supervised fine-tuning of a base model (full or LoRA): the baselines transfer is compared with.

Used for the source model fine-tuned (proxy-tuning's tuned model, weight-diff transfer) and for the target
fine-tuned (the oracle). The loss is the model's own next-token CE on response tokens; a stock
`transformers.Trainer` does the rest. LoRA adapters are merged before saving, so the result is a plain model.
"""
from __future__ import annotations

from transfertune.core.value_model import LoraSettings
from transfertune.io.data import RightPadCollator, SFTDataset, pad_id_of
from transfertune.io.loading import load_base
from transfertune.training.value_trainer import build_training_args, load_records


def finetune_base(
    base: str,
    data,
    output_dir: str,
    *,
    lora: LoraSettings | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    seed: int = 0,
    logging_steps: int = 10,
    save_steps: int | None = None,
    trust_remote_code: bool = False,
    **training_args,
):
    """Fine-tune `base` on `data` and save a safetensors model directory (+ tokenizer) to `output_dir`."""
    from transformers import Trainer, set_seed

    set_seed(seed)
    model, tokenizer = load_base(base, frozen=False, trust_remote_code=trust_remote_code)
    model.train()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    args = build_training_args(
        output_dir, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
        learning_rate=learning_rate, logging_steps=logging_steps, save_steps=save_steps, seed=seed, **training_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=SFTDataset(load_records(data), tokenizer, max_length),
                      data_collator=RightPadCollator(pad_id_of(tokenizer)))
    trainer.train()
    if lora is not None:
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return model
