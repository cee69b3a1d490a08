"""Speculative composed decoding: lossless for greedy, exact accept/reject rule for sampling."""
import pytest
import torch

from transfertune.composed import ComposedModel
from transfertune.data import encode_prompt
from transfertune.loading import load_causal_lm
from transfertune.sampling import SamplingParams
from transfertune.speculative import SpeculativeComposedGenerator, verify_draft

PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]


def target_and_draft(model_dir, tokenizer, arch="llama"):
    target = ComposedModel(load_causal_lm(model_dir(arch, hidden=48, seed=1)), tokenizer,
                           [load_causal_lm(model_dir(arch, hidden=32, seed=10))], beta=0.8)
    draft = load_causal_lm(model_dir(arch, hidden=32, seed=2))
    return target, draft


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_speculation_equals_plain_composed_decoding(model_dir, tokenizer, arch):
    target, draft = target_and_draft(model_dir, tokenizer, arch)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3)
    plain = target.generator()
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        expected = [int(t[0]) for t, _ in plain.decode_steps([ids], 24, SamplingParams())]
        assert spec.generate_ids(ids, 24) == expected[:24]
    assert spec.stats.drafted > 0 and spec.stats.accepted < spec.stats.drafted  # a weak draft gets rejected


def test_draft_equal_to_target_accepts_everything_when_sampling(model_dir, tokenizer):
    target, _ = target_and_draft(model_dir, tokenizer)
    spec = SpeculativeComposedGenerator(target, target.base, draft_len=4)
    spec.generate_ids(encode_prompt(tokenizer, "The"), 30, SamplingParams(temperature=1.0, seed=3))
    assert spec.stats.acceptance_rate == 1.0
    assert max(spec.stats.draft_lengths) > 4  # adaptive: grows while everything is accepted


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_greedy_speculation_equals_plain_decoding_of_each_row(model_dir, tokenizer, arch):
    """Rows of different lengths (left padding) that accept different numbers of drafted tokens."""
    target, draft = target_and_draft(model_dir, tokenizer, arch)
    spec = SpeculativeComposedGenerator(target, draft, draft_len=3)
    spec.eos_ids = set()
    plain = target.generator()
    plain.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1
    batched = spec.generate_batch(ids, 20)
    for row, prompt in zip(batched, ids):
        expected = [int(t[0]) for t, _ in plain.decode_steps([prompt], 20, SamplingParams())]
        assert row == expected
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
        plain = SpeculativeComposedGenerator(target, draft, draft_len=3).generate_batch(ids, 16)
        assert SpeculativeComposedGenerator(overlapped, draft, draft_len=3).generate_batch(ids, 16) == plain
    finally:
        torch.set_num_threads(threads)
