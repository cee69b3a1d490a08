"""Cross-vocabulary composition: the exact and aligned token maps, and composing through them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from transfertune.cli import main
from transfertune.composed import ComposedModel
from transfertune.compose import VocabularyMismatchError
from transfertune.cross_vocab import CrossVocabValue, VocabMap, align_counts, dtw_path, token_bytes
from transfertune.loading import load_base
from transfertune.value_model import ValueModel

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
    assert mapped[0, vmap.index.lt(0)].abs().sum() == 0  # unmapped base tokens get a neutral value


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
    for got, want in zip(mapped.score(PROMPTS, RESPONSES, add_eos=True), direct.score(PROMPTS, RESPONSES, add_eos=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # decoding: the first step (after the prompts, batched with left padding) matches, and rows are independent
    ids = [mapped.generator()._encode(PROMPTS)]
    (_, l_mapped), (_, l_direct) = (next(cm.generator().decode_steps(ids[0], 1, __import__(
        "transfertune.sampling", fromlist=["SamplingParams"]).SamplingParams())) for cm in (mapped, direct))
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
    assert "vocabulary map    align map" in info and "get value 0" in info
    assert main(["generate", "--base", base, "--value", str(tmp_path / "v"), "--vocab-map", "align",
                 "--max-new-tokens", "3", "The cat"]) == 0
