"""Caches whose rows drop slots of their own compute what each row's kept tokens give alone."""
import pytest
import torch

from transfertune.inference.fused_draft import FusedDraft
from transfertune.inference.generator import left_pad
from transfertune.inference.ragged_cache import RaggedCaches, TransformersKV, takes_holes
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm


def alone(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


@pytest.mark.parametrize("store", ["transformers", "fused"])
def test_dropped_slots_compaction_and_row_changes(model_dir, tokenizer, store):
    model = load_causal_lm(model_dir("llama", hidden=32, seed=2))
    kv = TransformersKV([model]) if store == "transformers" else FusedDraft([model]).start(2, 4)
    caches = RaggedCaches(kv)
    rows = [encode_prompt(tokenizer, p) for p in ("It was the best of times, it was", "Answer:")]
    caches.forward(*left_pad(rows, 1))
    for step in range(6):  # each round feeds 3 tokens; row 0 keeps 1 of them, row 1 keeps step % 4
        fed = torch.tensor([[10 + step, 11, 12], [20 + step, 21, 22]])
        caches.forward(fed)
        kept = torch.tensor([1, step % 4])
        caches.commit(3, kept)
        rows = [r + fed[i, : int(kept[i])].tolist() for i, r in enumerate(rows)]
    assert caches.waste > 0
    nxt = torch.tensor([[7], [8]])
    before = caches.mask.shape[1]
    caches.compact()
    assert caches.mask.shape[1] < before and caches.waste == 0
    got = caches.forward(nxt)[0][:, -1]
    for i in range(2):
        rows[i].append(int(nxt[i]))
        assert torch.allclose(got[i], alone(model, rows[i]), atol=1e-4)
    caches.keep_rows([1])  # row 0 leaves; a new row joins through its own caches, merged after
    joining = RaggedCaches(kv.empty(1, 4))
    new_row = encode_prompt(tokenizer, "The dog ran to the park and back again. The cat")
    joining.forward(torch.tensor([new_row]))
    caches.merge(joining)
    got = caches.forward(torch.tensor([[9], [9]]))[0][:, -1]
    for i, tokens in enumerate((rows[1] + [9], new_row + [9])):
        assert torch.allclose(got[i], alone(model, tokens), atol=1e-4)


def test_which_architectures_take_holes(model_dir):
    assert takes_holes(load_causal_lm(model_dir("llama", hidden=32, seed=2)))
    assert takes_holes(load_causal_lm(model_dir("qwen2", hidden=32, seed=2)))
    assert not takes_holes(load_causal_lm(model_dir("gpt2", hidden=32, seed=2)))
