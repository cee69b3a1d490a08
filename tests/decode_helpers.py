"""What the batch-decoding tests share: a batch that rows join and leave while it decodes."""
from __future__ import annotations

import torch


def join_and_leave(cm, gen, ids: list[list[int]], steps: int) -> dict[int, list[torch.Tensor]]:
    """Greedy lock-step decoding where rows 0 and 1 start at step 0, row 2 joins at step 3 and row 0 leaves after
    step 4: each row's composed logits per step it was in the batch (5, `steps`, `steps` - 3 of them)."""
    batch = gen.new_batch()
    batch.join([ids[0], ids[1]])
    seen, rows = {0: [], 1: [], 2: []}, [0, 1]
    for step in range(steps):
        if step == 3:
            batch.join([ids[2]])
            rows.append(2)
        logits = cm.compose(batch.step())
        for r, lg in zip(rows, logits):
            seen[r].append(lg)
        if step == 4:
            keep = [i for i, r in enumerate(rows) if r != 0]
            rows = [rows[i] for i in keep]
            batch.keep(keep)
            logits = logits[keep]
        batch.feed(logits.argmax(-1))
    return seen
