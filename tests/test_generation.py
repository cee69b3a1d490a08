import pytest
import torch
import torch.nn.functional as F

from transfertune.inference.composed_model import ComposedModel
from transfertune.inference.sampling import SamplingParams, filter_logits
from transfertune.io.data import encode_prompt
from transfertune.io.loading import load_causal_lm

ARCHS = ["llama", "gpt2", "qwen2"]
PROMPTS = ["The cat sat", "It was the best of times, it was", "Answer:"]


def composed_for(model_dir, tokenizer, arch, n_values=1, proxy=False):
    base = load_causal_lm(model_dir(arch, hidden=48, seed=1))
    values = [load_causal_lm(model_dir(arch, hidden=32, seed=10 + i)) for i in range(n_values)]
    proxy_models = None
    if proxy:
        proxy_models = (load_causal_lm(model_dir(arch, seed=20)), load_causal_lm(model_dir(arch, seed=21)))
    return ComposedModel(base, tokenizer, values, weights=[0.5 + i for i in range(n_values)], beta=0.8,
                         proxy=proxy_models, alpha=0.6)


def uncached_greedy(cm, prompt_ids, steps):
    """Reference: every step recomputes every model over the whole sequence (what the research code does)."""
    ids = torch.tensor([prompt_ids])
    tokens, logits_seq = [], []
    for _ in range(steps):
        step = [m(input_ids=ids, use_cache=False).logits[:, -1] for m in cm.models]
        logits = cm.compose(step)
        nxt = logits.argmax(-1)
        tokens.append(int(nxt))
        logits_seq.append(logits[0])
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return tokens, torch.stack(logits_seq)


def cached_run(gen, prompt_ids_list, steps):
    toks, logits = [], []
    for nxt, lg in gen.decode_steps(prompt_ids_list, steps, SamplingParams()):
        toks.append(nxt)
        logits.append(lg)
    return torch.stack(toks, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("proxy", [False, True])
def test_cached_lockstep_matches_uncached_recomputation(model_dir, tokenizer, arch, proxy):
    cm = composed_for(model_dir, tokenizer, arch, n_values=2, proxy=proxy)
    gen = cm.generator()
    gen.eos_ids = set()  # run the full length so every step is compared
    with torch.no_grad():
        for p in PROMPTS:
            ids = encode_prompt(tokenizer, p)
            ref_tokens, ref_logits = uncached_greedy(cm, ids, 12)
            toks, logits = cached_run(gen, [ids], 12)
            assert toks[0].tolist() == ref_tokens
            torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_equals_one_by_one(model_dir, tokenizer, arch):
    cm = composed_for(model_dir, tokenizer, arch)
    gen = cm.generator()
    gen.eos_ids = set()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 1, "prompts must differ in length to exercise padding"
    batch_toks, batch_logits = cached_run(gen, ids, 10)
    for row, single in enumerate(ids):
        toks, logits = cached_run(gen, [single], 10)
        assert batch_toks[row].tolist() == toks[0].tolist()
        torch.testing.assert_close(batch_logits[row], logits[0], atol=1e-4, rtol=1e-4)


def test_proxy_mode_equals_its_formula_by_hand(model_dir, tokenizer):
    big = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    tuned, untuned = load_causal_lm(model_dir("llama", seed=20)), load_causal_lm(model_dir("llama", seed=21))
    cm = ComposedModel(big, tokenizer, proxy=(tuned, untuned), alpha=0.6)
    ids = torch.tensor([encode_prompt(tokenizer, "The dog ran")])
    with torch.no_grad():
        s_big, s_t, s_u = (m(input_ids=ids).logits[0, -1] for m in (big, tuned, untuned))
        by_hand = F.log_softmax(s_big + 0.6 * (s_t - s_u), -1)
        toks, logits = cached_run(cm.generator(), [ids[0].tolist()], 1)
    torch.testing.assert_close(F.log_softmax(logits[0, 0], -1), by_hand, atol=1e-5, rtol=1e-5)


def test_score_matches_decoding_logits(model_dir, tokenizer):
    cm = composed_for(model_dir, tokenizer, "llama")
    out = cm.generator().generate(["The cat sat"], max_new_tokens=8)
    gen = cm.generator()
    gen.eos_ids = set()
    _, logits = cached_run(gen, [encode_prompt(tokenizer, "The cat sat")], len(out.token_ids[0]))
    expected = F.log_softmax(logits[0], -1).gather(-1, torch.tensor(out.token_ids[0])[:, None]).squeeze(-1)
    scored = cm.score_ids(encode_prompt(tokenizer, "The cat sat"), out.token_ids[0])
    torch.testing.assert_close(scored, expected, atol=1e-4, rtol=1e-4)


def test_eos_stops_each_row_and_stop_strings_cut(model_dir, tokenizer):
    cm = composed_for(model_dir, tokenizer, "llama")
    gen = cm.generator()
    free = gen.generate(PROMPTS, max_new_tokens=12)
    assert free.finish_reason == ["length"] * 3 or "eos" in free.finish_reason
    # force EOS: the token each row emits at step 3 becomes an end-of-sequence token for that row's run
    for row, prompt in enumerate(PROMPTS):
        third = free.token_ids[row][2]
        gen.eos_ids = {third}
        out = gen.generate([prompt], max_new_tokens=12)
        assert (out.finish_reason == ["eos"]
                and out.token_ids[0] == free.token_ids[row][: free.token_ids[row].index(third)])
    gen.eos_ids = set()
    text = free.text[0]
    stop = text[3:6]
    cut = gen.generate([PROMPTS[0]], max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == ["stop"] and cut.text[0] == text[: text.find(stop)]


def test_stream_yields_the_generated_text(model_dir, tokenizer):
    cm = composed_for(model_dir, tokenizer, "gpt2")
    gen = cm.generator()
    whole = gen.generate(["The dog"], max_new_tokens=15).text[0]
    pieces = list(gen.stream("The dog", max_new_tokens=15))
    assert "".join(pieces) == whole and len(pieces) > 1
    stop = whole[4:7]
    assert "".join(gen.stream("The dog", max_new_tokens=15, stop=[stop])) == whole[: whole.find(stop)]


def test_sampling_is_seeded_and_filters_behave(model_dir, tokenizer):
    cm = composed_for(model_dir, tokenizer, "llama")
    gen = cm.generator()
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=123)
    a = gen.generate(PROMPTS, max_new_tokens=10, sampling=params).token_ids
    b = gen.generate(PROMPTS, max_new_tokens=10, sampling=params).token_ids
    assert a == b
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).sum().item()
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == 2
    probs = logits.softmax(-1)[0]
    assert kept(SamplingParams(temperature=1.0, top_p=float(probs[0]) - 1e-3)) == 1
    assert kept(SamplingParams(temperature=1.0, top_p=float(probs[0] + probs[1]) + 1e-3)) == 3
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_sampling_matches_the_composed_distribution(model_dir, tokenizer):
    """Empirical next-token frequencies follow softmax(composed logits)."""
    cm = composed_for(model_dir, tokenizer, "llama")
    cm.base.lm_head.weight.data *= 0.02  # flatten the base so many tokens have visible mass
    ids = encode_prompt(tokenizer, "The")
    gen = cm.generator()
    _, logits = cached_run(gen, [ids], 1)
    probs = logits[0, 0].softmax(-1)
    n = 4000
    draws = [nxt for nxt, _ in gen.decode_steps([ids] * n, 1, SamplingParams(temperature=1.0, seed=0))][0]
    freq = torch.bincount(draws, minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 0.03


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    """Found by the server's schema fuzz: top_p=1e-171 must not leave an empty (NaN) distribution."""
    from transfertune.inference.sampling import SamplingParams, sample_next

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for top_p in (1e-171, 1e-30, 1e-3):
        assert torch.equal(sample_next(logits, SamplingParams(temperature=1.0, top_p=top_p)), logits.argmax(-1))


def test_overlapped_models_decode_the_same_as_one_after_another(model_dir, tokenizer):
    base = load_causal_lm(model_dir("llama", hidden=48, seed=1))
    values = [load_causal_lm(model_dir("llama", hidden=32, seed=10 + i)) for i in range(2)]
    plain = ComposedModel(base, tokenizer, values, weights=[0.5, 1.5], beta=0.8)
    overlapped = ComposedModel(base, tokenizer, values, weights=[0.5, 1.5], beta=0.8, overlap=True)
    threads = torch.get_num_threads()
    try:
        assert overlapped.overlap_pool() is not None and plain.overlap_pool() is None
        assert torch.get_num_threads() == max(1, threads // 3)  # the cores are shared by the three models
        ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
        runs = []
        for cm in (plain, overlapped):
            gen = cm.generator()
            gen.eos_ids = set()
            runs.append(cached_run(gen, ids, 10))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0].tolist() == runs[1][0].tolist()
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-5)
