"""The composition math and the models it composes: `compose` (log p_base + v / beta, the only place the math
lives), the value model, the cascade scheme, logits at response positions."""
