import json

import pytest
import torch
import torch.nn.functional as F

from transfertune.core.compose import VocabularyMismatchError
from transfertune.core.value_model import LoraSettings, ValueConfig, ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import RightPadCollator, SFTDataset, pad_id_of
from transfertune.io.loading import load_base, load_causal_lm
from transfertune.training.value_trainer import ValueTrainer, train_value_model

# augment=0: these tests check the training mechanics on the rows as given (the default adds reworded copies)
TRAIN = dict(epochs=30, learning_rate=1e-2, batch_size=8, logging_steps=1000, disable_tqdm=True, augment=0)


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
    composed = ComposedModel(base_model, tok, [value]).score([r["prompt"] for r in records],
                                                             [r["response"] for r in records])
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


def _tensor_shapes(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_lora_head_dir_holds_only_adapters_and_reloads(tmp_path, model_dir, yes_no_records, tokenizer):
    """--lora-head lora (the default): no vocabulary x hidden tensor is saved, the dir is far smaller than the
    full-head one, the reloaded model gives the trained logits, and the (tied) input embeddings are untouched."""
    base = model_dir("gpt2", seed=4)  # GPT-2 ties its output layer to the input embeddings
    kw = dict(lora=LoraSettings(r=4, alpha=8), **{**TRAIN, "epochs": 4})
    small = train_value_model(base, yes_no_records, str(tmp_path / "lora"), **kw)
    full = train_value_model(base, yes_no_records, str(tmp_path / "full"), lora_head="full", **kw)
    vocab, hidden = len(tokenizer), 32
    head_bytes = vocab * hidden * 4
    lora_file = tmp_path / "lora" / "adapter_model.safetensors"
    full_file = tmp_path / "full" / "adapter_model.safetensors"
    assert all(vocab * hidden > 4 * torch.Size(s).numel() for s in _tensor_shapes(lora_file).values())
    assert any(torch.Size(s).numel() == vocab * hidden for s in _tensor_shapes(full_file).values())
    assert lora_file.stat().st_size < full_file.stat().st_size - 0.75 * head_bytes  # the head adapter is r x (V + H)
    assert (ValueConfig.load(tmp_path / "lora").lora_head,
            ValueConfig.load(tmp_path / "full").lora_head) == ("lora", "full")
    ids = torch.tensor([tokenizer(yes_no_records[1]["prompt"])["input_ids"]])
    embeddings = load_causal_lm(base).get_input_embeddings().weight
    for trained, name in ((small, "lora"), (full, "full")):
        reloaded = ValueModel.load(tmp_path / name)
        with torch.no_grad():
            before, after = trained.model(ids).logits, reloaded.model(ids).logits
        assert before.abs().max() > 0.1, "the trained head must produce values"
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded.model.get_input_embeddings().weight, embeddings)
    nll_base = mean_nll(ComposedModel.from_pretrained(base), yes_no_records)
    assert mean_nll(ComposedModel.from_pretrained(base, [str(tmp_path / "lora")]), yes_no_records) < 0.8 * nll_base


def test_lora_dirs_written_before_the_head_choice_load_as_full_head(tmp_path, model_dir, tokenizer):
    base = model_dir("llama", seed=3)
    value = ValueModel.create(base, lora=LoraSettings(r=2, alpha=4), lora_head="full")
    torch.manual_seed(0)
    with torch.no_grad():
        value.model.get_output_embeddings().weight.normal_(0, 0.5)  # the saved full head (modules_to_save)
    value.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "transfertune.json").read_text())
    del config["lora_head"]
    (tmp_path / "old" / "transfertune.json").write_text(json.dumps(config))
    reloaded = ValueModel.load(tmp_path / "old")
    assert reloaded.config.lora_head == "full"
    ids = torch.tensor([tokenizer("The cat sat")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, value.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    config["lora_head"] = "half"
    (tmp_path / "old" / "transfertune.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lora_head"):
        ValueModel.load(tmp_path / "old")


def test_training_logs_held_out_loss_and_tokens_per_second(tmp_path, model_dir, yes_no_records):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    base = model_dir("llama", seed=3)
    rec = Record()
    train_value_model(base, yes_no_records[:16], str(tmp_path / "v"), eval_data=yes_no_records[16:], max_steps=6,
                      logging_steps=2, eval_steps=3, learning_rate=1e-2, batch_size=4, disable_tqdm=True,
                      callbacks=[rec])
    train_lines = [log for log in rec.logs if "loss" in log]
    evals = [log for log in rec.logs if "eval_loss" in log]
    assert len(train_lines) == 3 and all(log["tokens_per_second"] > 0 for log in train_lines)
    assert len(evals) == 2 and all(log["eval_tokens_per_second"] > 0 for log in evals)
    # eval_loss is the composed NLL of the held-out responses, as scoring computes it
    nll = mean_nll(ComposedModel.from_pretrained(base, [str(tmp_path / "v")]), yes_no_records[16:])
    assert evals[-1]["eval_loss"] == pytest.approx(nll, rel=0.05)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] * 1.5


def test_cli_train_prints_eval_loss_and_tokens_per_second(tmp_path, model_dir, yes_no_records, capsys):
    from transfertune.cli.main import main

    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records[:16]))
    held.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records[16:]))
    assert main(["train", "--base", model_dir("llama", seed=3), "--data", str(data), "--eval-data", str(held),
                 "--output", str(tmp_path / "v"), "--max-steps", "4", "--batch-size", "4", "--logging-steps", "2",
                 "--lora", "--lora-r", "2"]) == 0
    out = capsys.readouterr().out
    assert "'eval_loss'" in out and "'tokens_per_second'" in out
    assert ValueConfig.load(tmp_path / "v").lora_head == "lora"


def test_fused_composed_cross_entropy_matches_compose_then_cross_entropy():
    from transfertune.core.compose import compose_logits, composed_cross_entropy

    torch.manual_seed(0)
    for value_size, beta, weights in ((50, 1.0, None), (56, 0.5, None), (48, 2.0, None), (50, 1.0, [0.5, 2.0])):
        base = torch.randn(7, 50) * 3
        values = [torch.randn(7, value_size, requires_grad=True) for _ in (weights or [1])]
        targets = torch.randint(0, 48, (7,))
        kw = dict(beta=beta, weights=weights, real_vocab_size=48)
        ref = F.cross_entropy(compose_logits(base, values, **kw), targets, reduction="sum")
        got = composed_cross_entropy(base, values, targets, **kw)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(torch.autograd.grad(ref, values), torch.autograd.grad(got, values)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,lora", [("llama", None), ("gpt2", LoraSettings(r=2, alpha=4))])
def test_output_layer_runs_only_at_response_positions(model_dir, tokenizer, yes_no_records, arch, lora):
    """The trainer's logits at response positions equal the full forward's, gathered, with gradients."""
    from transfertune.core.response_logits import logits_at_positions, response_positions

    value = ValueModel.create(model_dir(arch, seed=5), zero_init_head=False, lora=lora)
    value.model.eval()  # no dropout: the two forward passes must agree
    head = value.model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape)))
    batch = RightPadCollator(pad_id_of(tokenizer))(list(SFTDataset(yes_no_records[:5], tokenizer)))
    rows, cols, _ = response_positions(batch["labels"])
    picked = logits_at_positions(value.model, batch["input_ids"], batch["attention_mask"], rows, cols)
    assert seen[-1] == (len(rows), head.weight.shape[0])  # the layer never saw the other positions
    full = value.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(picked, full[:, :-1][rows, cols], atol=1e-5, rtol=1e-5)
    picked.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in value.model.parameters() if p.requires_grad)


def test_train_step_benchmark_writes_table_json_plot_and_docs_section(model_dir, tmp_path, yes_no_records):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in yes_no_records))
    docs = tmp_path / "docs" / "performance.md"
    docs.parent.mkdir()
    docs.write_text("# Performance\n\nthe decoding section stays\n")
    bench.ROOT = tmp_path
    out = tmp_path / "res" / "train_step.json"
    value, base = model_dir("llama", seed=3), model_dir("llama", hidden=48, seed=1)
    bench.main(["--pairs", f"{value}:{base}", "--data", str(data), "--batch-size", "4", "--steps", "2",
                "--warmup", "1", "--repeats", "1", "--methods", "sft", "sft+base", "value", "--out", str(out),
                "--docs"])
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert set(row["tokens_per_second"]) == {"sft", "sft+base", "value"}
    assert all(v > 0 for v in row["tokens_per_second"].values()) and row["ratios"]["value/sft"] > 0
    assert row["peak_memory_mb"]["value"] > 0 and row["ratios"]["memory value/sft"] > 0
    assert out.with_suffix(".png").is_file()
    text = docs.read_text()
    assert ("the decoding section stays" in text and "<!-- section: train-step -->" in text
            and "| value over base" in text)


def test_random_init_from_an_fp16_checkpoint_trains_in_float32(tmp_path, model_dir, tokenizer, yes_no_records):
    """The built-in family stores fp16 weights: a random value model made from that config must still be fp32
    (fp16 training on CPU turned every weight into NaN)."""
    half = tmp_path / "half"
    load_causal_lm(model_dir("llama", seed=3)).to(torch.float16).save_pretrained(half)
    tokenizer.save_pretrained(half)
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"
    value = ValueModel.create(f"random:{half}")
    assert {p.dtype for p in value.model.parameters()} == {torch.float32}
    out = tmp_path / "value"
    train_value_model(str(half), yes_no_records, str(out), init=f"random:{half}", **{**TRAIN, "epochs": 3})
    trained = ValueModel.load(out)
    assert all(torch.isfinite(p).all() for p in trained.model.parameters())
