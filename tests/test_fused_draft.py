"""The fused draft computes what each model's own transformers forward pass computes."""
import torch

from transfertune.core.value_model import LoraSettings, ValueModel
from transfertune.inference.fused_draft import FusedDraft, can_fuse
from transfertune.inference.generator import left_pad
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm


def reference_logits(models, ids, mask):
    """Each model's last-position logits, recomputed over the whole (left-padded) sequence."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return [m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float() for m in models]


def assert_close(got, expected):
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert (g - e).abs().max() < 1e-4 * max(1.0, float(e.abs().max()))


def test_stacks_match_each_models_forward_pass_with_padding_and_rollback(model_dir, tokenizer):
    same_shape = [load_causal_lm(model_dir("llama", hidden=32, seed=s)) for s in (2, 10)]
    other_shape = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    value = ValueModel.create(model_dir("llama", hidden=32, seed=4), tokenizer=tokenizer, zero_init_head=False)
    models = [same_shape[0], other_shape, same_shape[1], value]
    prompts = [encode_prompt(tokenizer, p) for p in ("It was the best of times, it was", "Answer:")]
    ids, mask = left_pad(prompts, 1)
    fused = FusedDraft(models)
    assert len(fused.stacks) == 2  # the 32-wide models (a value model among them) share one
    draft = fused.start(2, capacity=ids.shape[1] + 2)  # too small: the cache grows as tokens are fed

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert_close(last(draft.run(ids, mask, positions)), reference_logits(models, ids, mask))
    for step in range(3):
        nxt = torch.tensor([[5 + step], [7 + step]])
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        got = draft.run(nxt, mask, positions[:, -1:] + step + 1)
        assert_close(last(got), reference_logits(models, ids, mask))
    draft.crop(draft.width - 2)  # roll back two tokens and take another path
    ids, mask = ids[:, :-2], mask[:, :-2]
    nxt = torch.tensor([[40, 41], [42, 43]])
    ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    got = draft.run(nxt, mask, (mask.cumsum(-1) - 1)[:, -2:])
    assert_close(last(got), reference_logits(models, ids, mask))


def last(logits):
    return [g[:, -1] for g in logits]


def test_only_plain_llama_models_fuse(model_dir, tokenizer):
    llama = model_dir("llama", hidden=32, seed=2)
    assert can_fuse([load_causal_lm(llama), ValueModel.create(llama, tokenizer=tokenizer)])
    assert not can_fuse([load_causal_lm(model_dir("qwen2", hidden=32, seed=2))])  # biased q/k/v projections
    lora = ValueModel.create(llama, tokenizer=tokenizer, lora=LoraSettings(r=2))
    assert not can_fuse([lora])


def test_half_precision_models_run_in_their_own_dtype(model_dir, tokenizer):
    model = load_causal_lm(model_dir("llama", hidden=32, seed=2)).to(torch.bfloat16)
    ids = torch.tensor([encode_prompt(tokenizer, "It was the best of times")])
    draft = FusedDraft([model]).start(1, ids.shape[1])
    got = draft.run(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0][:, -1]
    assert draft.caches[0].keys[0].dtype == torch.bfloat16 and got.dtype == torch.float32
    expected = reference_logits([model], ids, torch.ones_like(ids))[0]
    assert (got - expected).abs().max() < 0.05 * max(1.0, float(expected.abs().max()))  # bf16 rounding
