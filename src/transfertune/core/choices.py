"""The value model's named options, importable without torch (the CLI builds its flags from them)."""

SCHEMES = ("residual", "cascade")
"""How a value model connects to the base: "residual" reads only the tokens and runs beside the base; "cascade"
also reads the base's next-token distribution (Inverse Value Learning; cascade.py)."""

LORA_HEADS = ("lora", "full")
"""How a LoRA value model trains its output layer: "lora" puts a rank-r adapter on the (frozen, zeroed) layer,
so the directory holds only adapters; "full" trains and saves the whole layer (vocabulary x hidden)."""

VALUE_HEADS = ("zero", "copy")
"""What the value model's output layer starts as: "zero" (training starts at the base distribution) or "copy"
(the init LM's own layer is kept: the sum starts at twice the base logits, as in IVL's release)."""

POOLS = ("mean", "last")
"""How a label reward reads a prompt's hidden states: averaged over its tokens, or at its last token."""
