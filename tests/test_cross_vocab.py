"""Cross-vocabulary composition: the exact and aligned token maps, and composing through them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from transfertune.cli.main import main
from transfertune.core.compose import VocabularyMismatchError
from transfertune.core.value_model import ValueModel
from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import RightPadCollator
from transfertune.io.loading import load_base
from transfertune.vocab.token_map import CrossVocabValue, VocabMap, align_counts, dtw_path, token_bytes

PROMPTS = ["Review 3: the movie was great. Positive?", "The cat sat on the mat. The dog"]
RESPONSES = [" yes", " ran to the park and back again."]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, "▁the": 2, "▁cat": 3, "<0x0A>": 4, "▁": 5, "t": 6, "at": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_exact_map_round_trips_shared_tokens(tokenizer, other_tokenizer):
    vmap = VocabMap.exact(tokenizer, other_tokenizer)
    shared = 0
    for b, v in enumerate(vmap.index.tolist()):
        if b in tokenizer.all_special_ids or v < 0:
            continue
        assert tokenizer.decode([b]) == other_tokenizer.decode([v])
        shared += 1
    assert shared > 250  # the two tokenizers learnt on the same text share most merges
    assert vmap.index[tokenizer.eos_token_id] == other_tokenizer.eos_token_id
    by_text = {other_tokenizer.decode([i]): i for i in range(len(other_tokenizer))}
    missing = [b for b in range(len(tokenizer)) if vmap.index[b] < 0 and b not in tokenizer.all_special_ids]
    assert missing and all(tokenizer.decode([b]) not in by_text for b in missing)
    identity = VocabMap.exact(tokenizer, tokenizer)
    assert identity.unmapped == 0 and torch.equal(identity.index, torch.arange(len(tokenizer)))


def test_leading_space_markers_are_normalised(tokenizer):
    sp = sentencepiece_tokenizer()
    assert token_bytes(sp)[2] == b" the" and token_bytes(sp)[4] == b"\n"
    assert token_bytes(tokenizer)[tokenizer.convert_tokens_to_ids("Ġthe")] == b" the"
    vmap = VocabMap.exact(tokenizer, sp)
    assert vmap.index[tokenizer.convert_tokens_to_ids("Ġthe")] == 2
    assert vmap.index[tokenizer.convert_tokens_to_ids("Ċ")] == 4
    assert vmap.index[tokenizer.eos_token_id] == 1
    logits = torch.arange(8.0)[None]
    mapped = vmap(logits)
    assert mapped.shape == (1, len(tokenizer))
    assert mapped[0, tokenizer.convert_tokens_to_ids("Ġthe")] == 2.0
    neutral = mapped[0, vmap.index.ge(0)].mean()  # unmapped base tokens take the mean mapped value
    torch.testing.assert_close(mapped[0, vmap.index.lt(0)], neutral.expand(vmap.unmapped))


def test_dtw_on_a_hand_checked_example():
    # base "hel|lo| wor|ld" vs value "h|ello| world". Normalised edit distances: hel~h 2/3, hel~ello 3/4,
    # lo~ello 2/4, " wor"~" world" 2/6, ld~" world" 4/6: the cheapest monotone path pairs hel-h, lo-ello and
    # both " wor" and "ld" with " world" (1.83 in all; passing through hel~ello would add 3/4).
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    a, b = ["hel", "lo", " wor", "ld"], ["h", "ello", " world"]
    cost = np.asarray(cdist(a, b, scorer=Levenshtein.normalized_distance), dtype=np.float64)
    assert dtw_path(cost) == [(0, 0), (1, 1), (2, 2), (3, 2)]
    assert dtw_path(np.array([[0.0, 1, 1], [1, 0.5, 0]])) == [(0, 0), (1, 1), (1, 2)]
    assert dtw_path(np.array([[0.0, 0.2, 1], [1, 1, 0]])) == [(0, 0), (0, 1), (1, 2)]


def test_aligned_map_pairs_overlapping_tokens(tokenizer, other_tokenizer):
    from conftest import TEXT

    texts = [s + "." for s in TEXT.split(".")[:12] if s.strip()]
    counts = align_counts(tokenizer, other_tokenizer, texts)
    assert counts
    vmap = VocabMap.align(tokenizer, other_tokenizer, texts)
    exact = VocabMap.exact(tokenizer, other_tokenizer)
    assert vmap.stats["aligned"] > 0 and vmap.unmapped <= exact.unmapped
    seen_only = [b for b in range(len(tokenizer)) if exact.index[b] < 0 <= vmap.index[b]]
    assert seen_only, "alignment should map base tokens the value vocabulary has no exact match for"
    for b in seen_only:  # a merged base token takes a piece of itself
        piece = other_tokenizer.decode([int(vmap.index[b])])
        assert piece and piece in tokenizer.decode([b])


@pytest.fixture()
def shifted_value(tmp_path, model_dir, tokenizer):
    """A random value model whose tokenizer has one extra special token: another fingerprint, same tokens."""
    tok2 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    tok2.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    value = ValueModel.create("random:" + model_dir("llama", name="xv-value", seed=5), tokenizer=tok2,
                              zero_init_head=False)
    torch.manual_seed(0)
    with torch.no_grad():
        value.model.get_output_embeddings().weight.normal_(0, 2.0)
    value.model.eval()
    value.save(tmp_path / "value")
    return str(tmp_path / "value"), value


def test_composing_through_the_map_matches_direct_composition(shifted_value, model_dir):
    directory, value = shifted_value
    base = model_dir("llama", name="xv-base", seed=1)
    with pytest.raises(VocabularyMismatchError, match="vocab_map"):
        ComposedModel.from_pretrained(base, [directory])
    mapped = ComposedModel.from_pretrained(base, [directory], vocab_map="auto")
    assert isinstance(mapped.values[0], CrossVocabValue)
    assert VocabMap.saved(directory)[0].unmapped == 0
    direct = ComposedModel(*load_base(base), [value.model])
    for got, want in zip(mapped.score(PROMPTS, RESPONSES, add_eos=True),
                         direct.score(PROMPTS, RESPONSES, add_eos=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # scoring splits the mapped value model into a body and an output layer (then the map), chunk by chunk, so it
    # never holds [batch, length, base vocabulary] values; it gives what the whole model does
    from transfertune.core.response_logits import _checked_head

    feats, _ = mapped.encode(PROMPTS, RESPONSES)
    batch = RightPadCollator(0)(feats)
    assert _checked_head(mapped.values[0], batch["input_ids"], batch["attention_mask"]) is not None
    for got, want in zip(mapped.score(PROMPTS, RESPONSES, chunk_size=3), direct.score(PROMPTS, RESPONSES)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # decoding: the first step (after the prompts, batched with left padding) matches, and rows are independent
    ids = [mapped.generator()._encode(PROMPTS)]
    (_, l_mapped), (_, l_direct) = (next(cm.generator().decode_steps(ids[0], 1, __import__(
        "transfertune.inference.sampling", fromlist=["SamplingParams"]).SamplingParams())) for cm in (mapped, direct))
    torch.testing.assert_close(l_mapped, l_direct, atol=1e-4, rtol=1e-4)
    batched = mapped.generator().generate(PROMPTS, max_new_tokens=6)
    single = [mapped.generator().generate(p, max_new_tokens=6).token_ids[0] for p in PROMPTS]
    assert batched.token_ids == single
    assert all(len(t) == 6 or r == "eos" for t, r in zip(batched.token_ids, batched.finish_reason))


def test_zero_value_through_a_map_is_the_base(tmp_path, model_dir, tokenizer, other_tokenizer):
    value = ValueModel.create("random:" + model_dir("llama", name="xv-zero", tok=other_tokenizer),
                              tokenizer=other_tokenizer, training_base="other")
    value.save(tmp_path / "v")
    base = model_dir("llama", name="xv-base", seed=1)
    composed = ComposedModel.from_pretrained(base, [str(tmp_path / "v")], vocab_map="exact")
    alone = ComposedModel.from_pretrained(base)
    for got, want in zip(composed.score(PROMPTS, RESPONSES), alone.score(PROMPTS, RESPONSES)):
        torch.testing.assert_close(got, want)


def test_cli_builds_saves_and_uses_an_aligned_map(tmp_path, model_dir, tokenizer, other_tokenizer, capsys):
    from conftest import TEXT

    value = ValueModel.create("random:" + model_dir("llama", name="xv-cli", tok=other_tokenizer),
                              tokenizer=other_tokenizer, training_base="other")
    value.save(tmp_path / "v")
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT.replace(". ", ".\n\n"))
    base = model_dir("llama", name="xv-base", seed=1)
    assert main(["generate", "--base", base, "--value", str(tmp_path / "v"), "--vocab-map", "align", "hi"]) == 2
    assert "transfertune vocab-map" in capsys.readouterr().err
    assert main(["vocab-map", "--value", str(tmp_path / "v"), "--base", base, "--kind", "align",
                 "--texts", str(texts)]) == 0
    assert "align map" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "v")]) == 0
    info = capsys.readouterr().out
    assert "vocabulary map    align map" in info and "take the mean mapped value" in info
    assert main(["generate", "--base", base, "--value", str(tmp_path / "v"), "--vocab-map", "align",
                 "--max-new-tokens", "3", "The cat"]) == 0


# -- special tokens, neutral values, cache cropping ----------------------------------------------------
def _copy(tok, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), **special)


@pytest.fixture()
def chatml(other_tokenizer):
    """SmolLM2-Instruct's special tokens: bos <|im_start|>, eos and pad <|im_end|>, unk <|endoftext|>."""
    return _copy(other_tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                 unk_token="<|endoftext|>")


@pytest.fixture()
def gemma_like(tokenizer):
    """Gemma-3's: <bos>, <eos>, <pad>, and <start_of_turn> / <end_of_turn> as special tokens."""
    return _copy(tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                 additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


def test_chat_markers_map_to_their_counterparts_and_bos_pad_never_to_markers(chatml, gemma_like):
    g, c = gemma_like.convert_tokens_to_ids, chatml.convert_tokens_to_ids
    vmap = VocabMap.exact(gemma_like, chatml)  # base Gemma-like, value ChatML
    assert vmap.index[g("<start_of_turn>")] == c("<|im_start|>")
    assert vmap.index[g("<end_of_turn>")] == c("<|im_end|>")
    assert vmap.index[g("<eos>")] == c("<|im_end|>")  # the value model's "stop" is its end of turn
    # by role alone <bos> would take <|im_start|> and <pad> <|im_end|>: they stay unmapped (neutral) instead
    assert vmap.index[g("<bos>")] < 0 and vmap.index[g("<pad>")] < 0
    assert vmap.index[gemma_like.convert_tokens_to_ids("Ġthe")] == chatml.convert_tokens_to_ids("Ġthe")
    rev = VocabMap.exact(chatml, gemma_like)  # the other way round
    assert rev.index[c("<|im_start|>")] == g("<start_of_turn>") and rev.index[c("<|im_end|>")] == g("<end_of_turn>")
    assert rev.index[c("<|endoftext|>")] == g("<eos>")  # end of text to end of text, not unk to unk
    same = VocabMap.exact(chatml, chatml)
    assert same.unmapped == 0 and torch.equal(same.index, torch.arange(len(chatml)))


def test_base_chat_markers_reach_the_value_model_as_its_own(chatml, gemma_like):
    from conftest import make_model

    value = CrossVocabValue(make_model("llama", len(chatml)), chatml, gemma_like, VocabMap.exact(gemma_like, chatml))
    ids = gemma_like("<bos><start_of_turn>user\nThe cat<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert value._text(ids) == "<|im_start|>user\nThe cat<|im_end|>\n"
    assert value._value_ids(value._text(ids))[0] == chatml.convert_tokens_to_ids("<|im_start|>")
    assert value._text(ids[2:]) == "user\nThe cat<|im_end|>\n"


class _Shifted(torch.nn.Module):
    """A model whose logits are another's plus a constant."""

    def __init__(self, model, shift: float):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits + self.shift
        return out


def test_unmapped_tokens_take_a_neutral_value(model_dir, tokenizer, other_tokenizer):
    """Value logits mean something only relative to each other; an unmapped base token takes the mean of the
    mapped values at its position. With 0 instead, a value model whose mapped values average -0.43 moved
    probability to unmapped tokens (the symptom this guards against)."""
    from torch.nn.functional import log_softmax, softmax

    base = load_base(model_dir("llama", name="xv-base", seed=1))[0]
    vmap = VocabMap.exact(tokenizer, other_tokenizer)
    unmapped = vmap.index < 0
    assert 10 < vmap.unmapped < len(tokenizer) // 2
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logp = log_softmax(base(input_ids=ids).logits[0], -1)  # [T, V_base]
    base_mass = softmax(base_logp, -1)[:, unmapped].sum(-1)
    assert (base_mass > 0.05).all()

    def unmapped_mass(v_base):
        return softmax(base_logp + v_base, -1)[:, unmapped].sum(-1)

    torch.manual_seed(0)
    value = torch.randn(ids.shape[1], len(other_tokenizer)) - 0.43
    neutral = vmap(value)
    means = neutral[:, ~unmapped].mean(-1, keepdim=True)
    torch.testing.assert_close(neutral[:, unmapped], means.expand(-1, vmap.unmapped))
    torch.testing.assert_close(neutral[:, ~unmapped], value[:, vmap.index[~unmapped]])
    # a constant added to every value logit changes nothing (it did with 0 for unmapped tokens)
    torch.testing.assert_close(softmax(base_logp + vmap(value + 3.0), -1), softmax(base_logp + neutral, -1))
    zero_fill = torch.where(unmapped, torch.zeros(()), neutral)
    zero_shifted = torch.where(unmapped, torch.zeros(()), vmap(value + 3.0))
    assert (unmapped_mass(zero_fill) - unmapped_mass(zero_shifted)).abs().min() > 0.01
    # a value model that prefers no token leaves the unmapped tokens exactly the base's mass; 0 gave them more
    flat = torch.full_like(value, -0.43)
    torch.testing.assert_close(unmapped_mass(vmap(flat)), base_mass, atol=1e-6, rtol=1e-5)
    zero_mass = unmapped_mass(torch.where(unmapped, torch.zeros(()), vmap(flat)))
    assert (zero_mass > base_mass * 1.2).all()


def test_neutral_value_end_to_end_scores_and_decoding(model_dir, tokenizer, other_tokenizer):
    """Through CrossVocabValue (teacher-forced scoring and cached decoding): shifting the value model's logits by a
    constant leaves the composed model unchanged."""
    from conftest import make_model

    base, base_tok = load_base(model_dir("llama", name="xv-base", seed=1))
    value = make_model("llama", len(other_tokenizer), seed=3).eval()
    with torch.no_grad():
        value.get_output_embeddings().weight.normal_(0, 2.0)
    vmap = VocabMap.exact(tokenizer, other_tokenizer)
    models = [ComposedModel(base, base_tok, [CrossVocabValue(_Shifted(value, s), other_tokenizer, tokenizer, vmap)])
              for s in (0.0, -2.0)]
    for a, b in zip(*(m.score(PROMPTS, RESPONSES) for m in models)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    outs = [m.generator().generate(PROMPTS, max_new_tokens=5) for m in models]
    assert outs[0].token_ids == outs[1].token_ids


def test_decoding_crops_the_value_cache_when_its_tokenisation_changes(tokenizer, other_tokenizer):
    """A marker the base spells in pieces becomes one value token once complete, so the value model's earlier
    tokens change and its KV cache is cut back (transformers 5 `crop` takes the number of tokens to drop, as a
    negative int). Every step's value must equal the value model run afresh on the text so far."""
    from conftest import make_model

    value_tok = _copy(other_tokenizer, eos_token=other_tokenizer.eos_token,
                      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    model = make_model("llama", len(value_tok), seed=4).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 2.0)
    cv = CrossVocabValue(model, value_tok, tokenizer, VocabMap.exact(tokenizer, value_tok))
    ids = tokenizer("The cat<|im_start|>user\nThe dog ran<|im_end|>\n", add_special_tokens=False)["input_ids"]
    state, shrank = None, 0
    previous: list[int] = []
    for t in range(len(ids)):
        out = cv(torch.tensor([[ids[t]]]), attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                 past_key_values=state, use_cache=True)
        state = out.past_key_values
        v_ids = cv._value_ids(cv._text(ids[: t + 1]))
        shrank += v_ids[: len(previous)] != previous
        previous = v_ids
        with torch.no_grad():
            fresh = model(input_ids=torch.tensor([v_ids])).logits[0, -1]
        torch.testing.assert_close(out.logits[0, -1], cv.vocab_map(fresh), atol=1e-4, rtol=1e-4)
    assert shrank >= 2  # both markers were re-tokenised once complete
