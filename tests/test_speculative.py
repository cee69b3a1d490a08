"""Speculative composed decoding: lossless for greedy, exact accept/reject rule for sampling."""
import pytest
import torch

from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams
from transfertune.inference.speculative import SpeculativeComposedGenerator, SpeculativeStats, verify_draft
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm

PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]
# (draft_engine, exact): a transformers draft, and a fused one with exact values, equal plain decoding token for
# token; a fused draft reusing its own value logits equals it up to ties within the fused network's rounding
ENGINES = [("transformers", False), ("fused", True), ("fused", False)]


def plain_greedy(target, prompt_ids, n):
    """Tokens and composed logits of plain composed decoding."""
    plain = target.generator()
    plain.eos_ids = set()
    steps = list(plain.decode_steps([prompt_ids], n, SamplingParams()))
    return [int(t[0]) for t, _ in steps], [logits[0] for _, logits in steps]


def assert_same_greedy(tokens, expected, logits, exact):
    """tokens == expected; without `exact`, they may part where plain decoding's two best tokens tie within 1e-4."""
    if exact or tokens == expected:
        assert tokens == expected
        return
    i = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
    top2 = logits[i].topk(2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"greedy output departs from plain decoding at token {i}"


def target_and_draft(model_dir, tokenizer, arch="llama"):
    target = ComposedModel(load_causal_lm(model_dir(arch, hidden=48, seed=1)), tokenizer,
                           [load_causal_lm(model_dir(arch, hidden=32, seed=10))], beta=0.8)
    draft = load_causal_lm(model_dir(arch, hidden=32, seed=2))
    return target, draft


@pytest.mark.parametrize("arch, engine, exact", [("llama", *e) for e in ENGINES] + [("qwen2", "auto", False)])
def test_greedy_speculation_equals_plain_composed_decoding(model_dir, tokenizer, arch, engine, exact):
    target, draft = target_and_draft(model_dir, tokenizer, arch)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3, draft_engine=engine, exact=exact)
    spec.eos_ids = set()
    assert spec.fused == (engine == "fused")  # auto: a Qwen2 draft runs through transformers
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        expected, logits = plain_greedy(target, ids, 24)
        assert_same_greedy(spec.generate_ids(ids, 24), expected, logits, exact or engine != "fused")
    assert spec.stats.drafted > 0 and spec.stats.accepted < spec.stats.drafted  # a weak draft gets rejected


def test_draft_equal_to_target_accepts_everything_when_sampling(model_dir, tokenizer):
    target, _ = target_and_draft(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, target.base, draft_len=4, draft_engine="transformers")
    spec.generate_ids(encode_prompt(tokenizer, "The"), 30, SamplingParams(temperature=1.0, seed=3))
    assert spec.stats.acceptance_rate == 1.0
    assert spec.stats.draft_lengths[:-1] == [4] * (len(spec.stats.draft_lengths) - 1)  # seeded: no adapting


def test_best_draft_len_follows_acceptance_and_costs():
    def stats(accepted, rejected, step, verify_one, verify_per_token, rows=1):
        s = SpeculativeStats(accepted=accepted, rejected=rejected)
        for tokens in (2, 5, 2, 5):
            s.draft_step.add(rows, step)
            s.verify.add(rows * tokens, verify_one + verify_per_token * (rows * tokens - 1))
            s.bookkeeping.add(rows, 0.0)
        return s

    assert stats(10, 90, 0.1, 1.0, 0.0).best_draft_len(12) == 1  # a draft the verifier rarely agrees with
    assert stats(990, 10, 0.01, 1.0, 0.0).best_draft_len(12) == 12  # cheap and nearly always right
    good = stats(80, 20, 0.1, 1.0, 0.0)
    assert 1 < good.best_draft_len(12) < 12
    # a batch committing what all its rows accepted drafts shorter; rows committing their own do not
    assert good.best_draft_len(12, rows=8, per_row=False) < good.best_draft_len(12, rows=8) == good.best_draft_len(12)
    costly = stats(80, 20, 0.1, 1.0, 0.5)
    assert costly.best_draft_len(12) < good.best_draft_len(12)  # verifying costs per token
    assert costly.verify(7) == pytest.approx(4.0) and good.verify(7) == pytest.approx(1.0)


def test_adaptive_drafting_times_two_lengths_first(model_dir, tokenizer):
    """The first rounds alternate draft_len and twice it, so the cost model sees verification at two sizes."""
    target, _ = target_and_draft(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, target.base, draft_len=2, max_draft_len=12,
                                        draft_engine="transformers")
    spec.eos_ids = set()
    spec.generate_ids(encode_prompt(tokenizer, "The"), 60)
    assert spec.stats.draft_lengths[:4] == [2, 4, 2, 4]  # two lengths first: verification timed at two sizes
    assert spec.stats.acceptance_rate == 1.0 and spec.stats.rejected == 0


def test_verify_rule_reproduces_the_target_distribution():
    """First emitted token of draft-then-verify is distributed as the target's first row, whatever q is."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 5) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 5) * 1.5, -1)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        drafted = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(2)])
        accepted, nxt = verify_draft(p, q, drafted, gen)
        counts[int(drafted[0]) if accepted >= 1 else nxt] += 1
    assert (counts / n - p[0]).abs().max() < 0.015


def test_speculative_sampling_is_seeded(model_dir, tokenizer):
    target, draft = target_and_draft(model_dir, tokenizer)
    ids = encode_prompt(tokenizer, "The")
    runs = [SpeculativeComposedGenerator(target, draft).generate_ids(ids, 16, SamplingParams(temperature=1.0, seed=7))
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_proxy_mode_is_refused(model_dir, tokenizer):
    base = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    small = load_causal_lm(model_dir("llama", seed=3))
    with pytest.raises(ValueError, match="proxy"):
        SpeculativeComposedGenerator(ComposedModel(base, tokenizer, [], proxy=(small, small)), small)


@pytest.mark.parametrize("arch, engine, exact", [("llama", *e) for e in ENGINES] + [("qwen2", "auto", False)])
def test_batched_greedy_speculation_equals_plain_decoding_of_each_row(model_dir, tokenizer, arch, engine, exact):
    """Rows of different lengths (left padding) that accept different numbers of drafted tokens."""
    target, draft = target_and_draft(model_dir, tokenizer, arch)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3, draft_engine=engine, exact=exact)
    spec.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1
    batched = spec.generate_batch(ids, 20)
    for row, prompt in zip(batched, ids):
        assert_same_greedy(row, *plain_greedy(target, prompt, 20), exact or engine != "fused")
    assert spec.stats.drafted > spec.stats.accepted > 0


def test_batched_speculation_stops_rows_at_eos(model_dir, tokenizer):
    target, draft = target_and_draft(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3)
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    free = SpeculativeComposedGenerator(target, draft, draft_len=3)
    free.eos_ids = set()
    unstopped = free.generate_batch(ids, 16)
    stop_token = unstopped[0][5]  # row 0 "ends" at its sixth token
    spec.eos_ids = {stop_token}
    rows = spec.generate_batch(ids, 16)
    assert rows[0] == unstopped[0][: unstopped[0].index(stop_token) + 1]
    for row, full in zip(rows[1:], unstopped[1:]):
        cut = next((i for i, t in enumerate(full) if t == stop_token), None)
        assert row == (full if cut is None else full[: cut + 1])


def test_overlapped_drafting_gives_the_same_tokens(model_dir, tokenizer):
    target, draft = target_and_draft(model_dir, tokenizer)
    overlapped = ComposedModel(target.base, tokenizer, target.values, beta=0.8, overlap=True)
    threads = torch.get_num_threads()
    try:
        ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
        plain = SpeculativeComposedGenerator(target, draft, draft_len=3, draft_engine="transformers")
        spec = SpeculativeComposedGenerator(overlapped, draft, draft_len=3, draft_engine="transformers")
        assert spec.generate_batch(ids, 16) == plain.generate_batch(ids, 16)
    finally:
        torch.set_num_threads(threads)


def test_fused_draft_needs_plain_llama_models(model_dir, tokenizer):
    target, draft = target_and_draft(model_dir, tokenizer, "qwen2")
    with pytest.raises(ValueError, match="plain Llama"):
        SpeculativeComposedGenerator(target, draft, draft_engine="fused")
    with pytest.raises(ValueError, match="draft_engine"):
        SpeculativeComposedGenerator(target, draft, draft_engine="vllm")
