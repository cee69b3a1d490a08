"""Per-row speculative decoding: each row commits its own accepted tokens, rows join and leave between rounds,
and the output is plain composed decoding's (greedy) or follows the composed distribution (sampling)."""
import pytest
import torch
from scipy.stats import chisquare

from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams, filter_logits
from transfertune.inference.speculative import SpeculativeComposedGenerator
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm

PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:", "The dog ran to the park and"]


def models(model_dir, tokenizer, arch="llama"):
    target = ComposedModel(load_causal_lm(model_dir(arch, hidden=48, seed=1)), tokenizer,
                           [load_causal_lm(model_dir(arch, hidden=32, seed=10))], beta=0.8)
    return target, load_causal_lm(model_dir(arch, hidden=32, seed=2))


def plain_tokens(target, prompt_ids, n):
    plain = target.generator()
    plain.eos_ids = set()
    return [int(t[0]) for t, _ in plain.decode_steps([prompt_ids], n, SamplingParams())]


@pytest.mark.parametrize("arch, engine, exact", [("llama", "transformers", False), ("llama", "fused", True),
                                                 ("qwen2", "transformers", False)])
def test_rows_commit_their_own_tokens_and_equal_plain_decoding(model_dir, tokenizer, arch, engine, exact):
    """Per-row commits take fewer rounds than commits of what every row accepted, with the same tokens (the
    random Qwen2 draft is nearly always rejected: there both take about one round per token)."""
    target, draft = models(model_dir, tokenizer, arch)
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    outputs, rounds = {}, {}
    for per_row in (True, False):
        spec = SpeculativeComposedGenerator(target, draft, draft_len=3, adaptive=False, draft_engine=engine,
                                            exact=exact, per_row=per_row)
        spec.eos_ids = set()
        outputs[per_row], rounds[per_row] = spec.generate_batch(ids, 24), spec.stats.rounds
    assert outputs[True] == outputs[False] == [plain_tokens(target, p, 24) for p in ids]
    assert rounds[True] < rounds[False] if arch == "llama" else rounds[True] <= rounds[False]


def test_architectures_without_cache_holes_commit_what_every_row_accepted(model_dir, tokenizer):
    target, draft = models(model_dir, tokenizer, "gpt2")  # learned absolute positions: no per-row holes
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3)
    spec.eos_ids = set()
    assert not spec.per_row
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert spec.generate_batch(ids, 16) == [plain_tokens(target, p, 16) for p in ids]
    with pytest.raises(ValueError, match="per_row=False"):
        SpeculativeComposedGenerator(target, draft, per_row=True)


@pytest.mark.parametrize("engine", ["transformers", "fused"])
def test_stop_strings_and_finish_reasons_match_plain_generation(model_dir, tokenizer, engine):
    target, draft = models(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3, draft_engine=engine, exact=True)
    plain = target.generator()
    free = plain.generate(PROMPTS, max_new_tokens=20)
    stop = [free.text[0][3:6]]  # a string row 0 writes; other rows may write it too, or end otherwise
    expected = plain.generate(PROMPTS, max_new_tokens=20, stop=stop)
    got = spec.generate(PROMPTS, max_new_tokens=20, stop=stop)
    assert expected.finish_reason[0] == "stop" and "length" in expected.finish_reason  # rows end at other times
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids,
                                                            expected.finish_reason)


def test_rows_join_and_leave_between_rounds(model_dir, tokenizer):
    """The step-level API a server drives: rows joining a running batch and leaving it early decode as alone."""
    target, draft = models(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=2, adaptive=False, draft_engine="fused", exact=True)
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    batch = spec.new_batch()
    out = {0: [], 1: []}
    for row, first in zip((0, 1), batch.join(ids[:2])):
        out[row].append(first)
    order = [0, 1]
    for step in range(8):
        if step == 2:  # a row joins a running batch (a longer prompt than the running rows' widths)
            out[3] = batch.join([ids[3]])
            order.append(3)
        if step == 4:  # row 0 leaves (cancelled), the others go on
            batch.keep([1, 2])
            order = [1, 3]
        for row, tokens in zip(order, batch.round(2)):
            out[row] += tokens
    for row, tokens in out.items():
        assert tokens == plain_tokens(target, ids[row], len(tokens)), f"row {row}"
    assert len(out[1]) > len(out[0]) and len(out[3]) > 3


@pytest.mark.parametrize("per_row", [True, False])
def test_sampled_tokens_follow_the_composed_distribution(model_dir, tokenizer, per_row):
    """Chi-square test of the first three sampled tokens (top-k 3: 27 sequences) against the composed model's
    own probabilities; the draft disagrees with the target, so tokens get rejected and redrawn."""
    target, draft = models(model_dir, tokenizer)
    prompt = encode_prompt(tokenizer, "The cat")
    params = SamplingParams(temperature=1.0, top_k=3)

    def probs(prefix):
        ids = torch.tensor([prompt + prefix])
        with torch.no_grad():
            logits = [m(input_ids=ids).logits[0, -1].float() for m in (target.base, *target.values)]
        return filter_logits(target.compose([x[None] for x in logits])[0], params).softmax(-1)

    expected = {}
    p1 = probs([])
    for a in p1.nonzero()[:, 0].tolist():
        p2 = probs([a])
        for b in p2.nonzero()[:, 0].tolist():
            p3 = probs([a, b])
            for c in p3.nonzero()[:, 0].tolist():
                expected[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    torch.manual_seed(0)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=2, adaptive=False, per_row=per_row)
    spec.eos_ids = set()
    counts = dict.fromkeys(expected, 0)
    for _ in range(6):
        for row in spec.generate_batch([prompt] * 400, 3, params):
            assert tuple(row) in counts, f"{row} is outside the top-3 support"
            counts[tuple(row)] += 1
    n = sum(counts.values())
    assert n == 2400 and 0.05 < spec.stats.acceptance_rate < 0.95
    keys = sorted(expected)
    f_exp = torch.tensor([expected[k] for k in keys], dtype=torch.float64)
    _, p_value = chisquare([counts[k] for k in keys], (f_exp / f_exp.sum() * n).tolist())
    assert p_value > 1e-3
