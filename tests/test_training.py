import json

import pytest
import torch
import torch.nn.functional as F

from transfertune.compose import VocabularyMismatchError
from transfertune.composed import ComposedModel
from transfertune.data import RightPadCollator, SFTDataset, pad_id_of
from transfertune.loading import load_base, load_causal_lm
from transfertune.trainer import ValueTrainer, train_value_model
from transfertune.value_model import LoraSettings, ValueConfig, ValueModel

TRAIN = dict(epochs=30, learning_rate=1e-2, batch_size=8, logging_steps=1000, disable_tqdm=True)


def mean_nll(cm, records):
    lps = cm.score([r["prompt"] for r in records], [r["response"] for r in records], add_eos=True)
    return -torch.cat(lps).mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, yes_no_records):
    out = tmp_path_factory.mktemp("value") / "full"
    base = model_dir("llama", seed=3)
    train_value_model(base, yes_no_records, str(out), **TRAIN)
    return base, str(out)


def test_zero_init_head_starts_at_the_base(model_dir, tokenizer, yes_no_records):
    base = model_dir("llama", seed=3)
    value = ValueModel.create(base)
    assert not value.model.get_output_embeddings().weight.any()
    assert value.model.get_input_embeddings().weight.abs().sum() > 0, "zeroing the head must not zero tied embeddings"
    base_model, tok = load_base(base)
    records = yes_no_records[:4]
    alone = ComposedModel(base_model, tok).score([r["prompt"] for r in records], [r["response"] for r in records])
    composed = ComposedModel(base_model, tok, [value]).score([r["prompt"] for r in records], [r["response"] for r in records])
    for a, c in zip(alone, composed):
        torch.testing.assert_close(a, c)


def test_training_lowers_composed_nll_far_below_the_base(trained, yes_no_records):
    base, vdir = trained
    nll_base = mean_nll(ComposedModel.from_pretrained(base), yes_no_records)
    nll_composed = mean_nll(ComposedModel.from_pretrained(base, [vdir]), yes_no_records)
    assert nll_composed < 0.25 * nll_base, (nll_base, nll_composed)


def test_composed_model_reproduces_the_training_distribution(trained, yes_no_records, tokenizer):
    """The logits the trainer optimised are the ones scoring sees after save + load."""
    base, vdir = trained
    value = ValueModel.load(vdir)
    base_model = load_causal_lm(base)
    batch = RightPadCollator(pad_id_of(tokenizer))(list(SFTDataset(yes_no_records[:6], tokenizer)))
    trainer = ValueTrainer.__new__(ValueTrainer)  # only compute_loss is used: no Trainer set-up needed
    trainer.value_model, trainer.base_model = value, base_model
    with torch.no_grad():
        loss, out = trainer.compute_loss(value.model, batch, return_outputs=True)
    train_logp = F.log_softmax(out["composed_logits"], -1)
    labels = batch["labels"][:, 1:]
    train_tok = train_logp.gather(-1, labels[labels != -100][:, None]).squeeze(-1)
    cm = ComposedModel(base_model, tokenizer, [value])
    scored = torch.cat(cm.score([r["prompt"] for r in yes_no_records[:6]], [r["response"] for r in yes_no_records[:6]],
                                add_eos=True))
    torch.testing.assert_close(scored, train_tok, atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(-scored.mean().item(), rel=1e-5)


def test_save_load_round_trip_is_identical(trained, tmp_path, tokenizer):
    base, vdir = trained
    cfg = json.loads(open(f"{vdir}/transfertune.json").read())
    assert cfg["training_base"] == base and cfg["vocab_size"] == len(tokenizer) and cfg["vocab_fingerprint"]
    v1 = ValueModel.load(vdir)
    v1.save(tmp_path / "copy")
    v2 = ValueModel.load(tmp_path / "copy")
    ids = torch.tensor([tokenizer("The cat sat on")["input_ids"]])
    for name, weight in v1.model.state_dict().items():  # safetensors round-trips bytes: exact by construction
        assert torch.equal(weight, v2.model.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(v1(ids).logits, v2(ids).logits)
    assert not list(tmp_path.glob("copy/*.bin")) and list(tmp_path.glob("copy/*.safetensors"))


def test_composing_with_another_vocabulary_is_refused(trained, model_dir, other_tokenizer):
    _, vdir = trained
    other = model_dir("llama", name="other-vocab", tok=other_tokenizer)
    with pytest.raises(VocabularyMismatchError) as err:
        ComposedModel.from_pretrained(other, [vdir])
    msg = str(err.value)
    assert "320 tokens" in msg and "300 tokens" in msg and "other-vocab" in msg


def test_value_transfers_to_a_bigger_base_of_the_same_vocab(trained, model_dir, yes_no_records):
    _, vdir = trained
    big = model_dir("llama", hidden=64, seed=9)
    alone = mean_nll(ComposedModel.from_pretrained(big), yes_no_records)
    composed = mean_nll(ComposedModel.from_pretrained(big, [vdir]), yes_no_records)
    assert composed < 0.5 * alone


def test_padded_output_layer_composes(trained, model_dir, yes_no_records):
    _, vdir = trained
    padded = model_dir("llama", seed=3, vocab_pad=8)
    cm = ComposedModel.from_pretrained(padded, [vdir])
    assert mean_nll(cm, yes_no_records) < 1.0
    assert cm.generator().generate(["Review 1: the movie was great. Positive?"], max_new_tokens=3).text


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_value_model_trains_and_reloads(tmp_path, model_dir, yes_no_records, arch, tokenizer):
    base = model_dir(arch, seed=4)
    out = tmp_path / "lora"
    value = train_value_model(base, yes_no_records, str(out), lora=LoraSettings(r=4, alpha=8), **TRAIN)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert ValueConfig.load(out).lora.r == 4
    before = mean_nll(ComposedModel.from_pretrained(base), yes_no_records)
    after = mean_nll(ComposedModel.from_pretrained(base, [str(out)]), yes_no_records)
    assert after < 0.5 * before
    reloaded = ValueModel.load(out)
    ids = torch.tensor([tokenizer("The dog ran")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(value.model(ids).logits, reloaded.model(ids).logits)


def test_random_init_and_regularisers_are_recorded(tmp_path, model_dir, yes_no_records):
    base = model_dir("llama", seed=3)
    out = tmp_path / "rand"
    train_value_model(base, yes_no_records, str(out), init=f"random:{base}", l1_coef=0.5, entropy_coef=0.01,
                      beta=2.0, **{**TRAIN, "epochs": 2})
    cfg = ValueConfig.load(out)
    assert (cfg.l1_coef, cfg.entropy_coef, cfg.beta, cfg.init) == (0.5, 0.01, 2.0, f"random:{base}")
    assert ComposedModel.from_pretrained(base, [str(out)]).beta == 2.0


def test_l1_regulariser_shrinks_values(tmp_path, model_dir, yes_no_records, tokenizer):
    base = model_dir("llama", seed=3)
    sizes = {}
    for coef in (0.0, 5.0):
        v = train_value_model(base, yes_no_records, str(tmp_path / f"l1-{coef}"), l1_coef=coef, **TRAIN)
        ids = torch.tensor([tokenizer(yes_no_records[0]["prompt"])["input_ids"]])
        with torch.no_grad():
            sizes[coef] = v.model(ids).logits.abs().mean().item()
    assert sizes[5.0] < 0.5 * sizes[0.0]


def test_lora_needs_pretrained_weights(model_dir):
    with pytest.raises(ValueError, match="LoRA"):
        ValueModel.create(f"random:{model_dir('llama')}", lora=LoraSettings())


def test_missing_value_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="transfertune.json"):
        ValueModel.load(tmp_path)
