"""The cascade connection: the value model's input adds softmax(base logits) @ E; every path agrees."""
import json

import pytest
import torch
import torch.nn.functional as F

from transfertune.core.cascade import CascadeValue, cascade_embeddings
from transfertune.core.compose import VocabularyMismatchError, compose_logits
from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_base, load_causal_lm
from transfertune.io.validate import InputError
from transfertune.training.value_trainer import train_value_model

TRAIN = dict(epochs=20, learning_rate=1e-2, batch_size=8, logging_steps=1000, disable_tqdm=True)
PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory, model_dir, yes_no_records):
    out = tmp_path_factory.mktemp("cascade") / "value"
    train_value_model(model_dir("llama", seed=3), yes_no_records, str(out), scheme="cascade", **TRAIN)
    return str(out)


def test_cascade_embeddings_are_token_plus_expected_next_token_embedding(model_dir, tokenizer):
    value = load_causal_lm(model_dir("llama", seed=4))
    ids = torch.tensor([encode_prompt(tokenizer, "The dog ran to")])
    base_logits = torch.randn(1, ids.shape[1], len(tokenizer))
    E = value.get_input_embeddings().weight
    by_hand = E[ids[0]] + torch.softmax(base_logits[0], -1) @ E
    torch.testing.assert_close(cascade_embeddings(value, ids, base_logits)[0], by_hand, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not cover"):
        cascade_embeddings(value, ids, base_logits[:, :-1])


def test_cascade_training_is_recorded_and_lowers_the_nll(cascade_dir, model_dir, yes_no_records):
    config = json.loads(open(f"{cascade_dir}/transfertune.json").read())
    assert config["scheme"] == "cascade"
    base = model_dir("llama", seed=3)
    prompts, responses = [r["prompt"] for r in yes_no_records], [r["response"] for r in yes_no_records]
    alone = ComposedModel.from_pretrained(base).score(prompts, responses, add_eos=True)
    composed = ComposedModel.from_pretrained(base, [cascade_dir])
    assert isinstance(composed.values[0], CascadeValue)
    tuned = composed.score(prompts, responses, add_eos=True)
    assert -torch.cat(tuned).mean() < 0.5 * -torch.cat(alone).mean()


def test_cascade_values_depend_on_the_base(cascade_dir, model_dir, tokenizer):
    value = ValueModel.load(cascade_dir)
    ids = torch.tensor([encode_prompt(tokenizer, "Review 3: the movie was great. Positive?")])
    outs = []
    for seed in (3, 5):
        base, _ = load_base(model_dir("llama", seed=seed))
        with torch.no_grad():
            outs.append(CascadeValue(value.model)(input_ids=ids, base_logits=base(input_ids=ids).logits).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_cached_batched_decoding_matches_full_recomputation(cascade_dir, model_dir, tokenizer):
    """The decode loop feeds the value model the base's logits of the same step (all prompt positions at
    prefill, left padding included); a full recomputation over the sequence must give the same logits."""
    cm = ComposedModel.from_pretrained(model_dir("llama", seed=3), [cascade_dir], beta=0.8)
    gen = cm.generator()
    gen.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    steps = [(t, lg) for t, lg in gen.decode_steps(ids, 8, SamplingParams())]
    tokens = torch.stack([t for t, _ in steps], 1)
    logits = torch.stack([lg for _, lg in steps], 1)
    value = cm.values[0]
    with torch.no_grad():
        for row, prompt in enumerate(ids):
            seq = torch.tensor([prompt + tokens[row].tolist()])
            base_logits = cm.base(input_ids=seq).logits
            v = value(input_ids=seq, base_logits=base_logits).logits
            ref = compose_logits(base_logits[0], [v[0]], beta=0.8)[len(prompt) - 1 : -1]
            assert ref.argmax(-1).tolist() == tokens[row].tolist()
            torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
            scored = cm.score_ids(prompt, tokens[row].tolist())
            expected = F.log_softmax(ref, -1).gather(-1, tokens[row][:, None]).squeeze(-1)
            torch.testing.assert_close(scored, expected, atol=1e-4, rtol=1e-4)


def test_cascade_is_refused_where_it_cannot_work(cascade_dir, model_dir, other_tokenizer, tmp_path):
    from transfertune.inference.speculative import SpeculativeComposedGenerator
    from transfertune.serving.vllm.export import export_vllm

    base, tok = load_base(model_dir("llama", seed=3))
    cm = ComposedModel(base, tok, [ValueModel.load(cascade_dir)])
    with pytest.raises(ValueError, match="cascade"):
        SpeculativeComposedGenerator(cm, load_causal_lm(model_dir("llama", seed=5)))
    other = load_causal_lm(model_dir("llama", seed=3, tok=other_tokenizer))
    with pytest.raises(VocabularyMismatchError, match="cascade"):
        ComposedModel(other, other_tokenizer, [ValueModel.load(cascade_dir)], vocab_map="exact")
    with pytest.raises(InputError, match="cascade"):
        export_vllm(model_dir("llama", seed=3), [cascade_dir], tmp_path / "export")


def test_unknown_scheme_is_refused(cascade_dir, tmp_path, model_dir, yes_no_records):
    with pytest.raises(InputError, match="scheme"):
        train_value_model(model_dir("llama", seed=3), yes_no_records, str(tmp_path / "v"), scheme="serial", **TRAIN)
    config = json.loads(open(f"{cascade_dir}/transfertune.json").read())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("transfertune.json",):
        (bad / f).write_text(json.dumps({**config, "scheme": "serial"}))
    from transfertune.core.value_model import ValueConfig

    with pytest.raises(InputError, match="scheme"):
        ValueConfig.load(bad)
