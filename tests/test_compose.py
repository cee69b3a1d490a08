import pytest
import torch
import torch.nn.functional as F

from transfertune.core.compose import (
    VocabularyMismatchError,
    compose_logits,
    composed_log_probs,
    l1_penalty,
    match_vocab_size,
    value_entropy,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)


def test_zero_values_give_the_base_distribution(logits):
    """log_softmax applied twice is not bit-identical to once on every CPU: compare within float32 rounding."""
    base, _ = logits
    out = composed_log_probs(base, [torch.zeros_like(base)])
    torch.testing.assert_close(out, F.log_softmax(base, -1), rtol=1e-6, atol=1e-6)


def test_beta_divides_the_values(logits):
    base, v = logits
    for beta in (0.5, 1.0, 4.0):
        expected = F.log_softmax(base, -1) + v / beta
        torch.testing.assert_close(compose_logits(base, [v], beta=beta), expected)
    # larger beta moves the composed distribution toward the base
    kl = lambda beta: F.kl_div(F.log_softmax(base, -1), composed_log_probs(base, [v], beta=beta), log_target=True,
                               reduction="batchmean")
    assert kl(8.0) < kl(2.0) < kl(0.5)


def test_several_weighted_value_models(logits):
    base, v = logits
    w = torch.randn_like(v)
    torch.testing.assert_close(
        compose_logits(base, [v, w], weights=[0.3, 2.0], beta=2.0), F.log_softmax(base, -1) + (0.3 * v + 2.0 * w) / 2.0
    )


def test_proxy_tuning_formula(logits):
    base, tuned = logits
    untuned = torch.randn_like(base)
    out = compose_logits(base, proxy=(tuned, untuned), alpha=0.7)
    lsm = lambda x: F.log_softmax(x, -1)
    torch.testing.assert_close(out, lsm(base) + 0.7 * (lsm(tuned) - lsm(untuned)))
    # the distribution equals the raw-logit form s_big + alpha (s_tuned - s_untuned) used by proxy-tuning
    torch.testing.assert_close(F.log_softmax(out, -1), lsm(base + 0.7 * (tuned - untuned)))


def test_vocab_map_hook_is_applied(logits):
    base, v = logits
    perm = torch.randperm(11)
    out = compose_logits(base, [v], vocab_maps=[lambda x: x[..., perm]])
    torch.testing.assert_close(out, F.log_softmax(base, -1) + v[..., perm])


def test_padded_tails_are_matched_and_real_mismatches_refused():
    v = torch.arange(12.0)
    assert match_vocab_size(v, 10, real_vocab_size=10).tolist() == list(range(10))
    padded = match_vocab_size(v[:10], 12, real_vocab_size=10)
    assert padded.tolist() == list(range(10)) + [0.0, 0.0]
    with pytest.raises(VocabularyMismatchError, match="real vocabulary"):
        match_vocab_size(v, 10, real_vocab_size=11)
    base = torch.randn(2, 12)
    out = compose_logits(base, [torch.ones(2, 10)], real_vocab_size=10)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[:, 10:], F.log_softmax(base, -1)[:, 10:])


def test_bad_arguments():
    base = torch.randn(2, 4)
    with pytest.raises(ValueError, match="beta"):
        compose_logits(base, [base], beta=0)
    with pytest.raises(ValueError, match="weights"):
        compose_logits(base, [base], weights=[1.0, 2.0])


def test_regularisers():
    v = torch.tensor([[1.0, -3.0, 0.0, 2.0]])
    assert l1_penalty(v).item() == pytest.approx(1.5)
    assert value_entropy(torch.zeros(2, 8)).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert value_entropy(torch.tensor([[50.0, 0, 0, 0]])).item() < 1e-6


def test_composition_leaves_its_inputs_alone_and_keeps_the_base_graph():
    """Values are added in place into the base's log-softmax buffer: the inputs must not change, and a base that
    carries a graph (differentiated through) must still backpropagate."""
    torch.manual_seed(0)
    base, v = torch.randn(3, 11), torch.randn(3, 11, requires_grad=True)
    base_copy, v_copy = base.clone(), v.detach().clone()
    out = compose_logits(base, [v], beta=0.5)
    assert torch.equal(base, base_copy) and torch.equal(v.detach(), v_copy)
    torch.testing.assert_close(out, torch.log_softmax(base, -1) + v_copy / 0.5)
    out.sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v, 2.0))
    graph_base = torch.randn(3, 11, requires_grad=True)
    (compose_logits(graph_base, [v.detach()]) ** 2).sum().backward()  # log_softmax's saved output untouched
    assert graph_base.grad is not None and torch.isfinite(graph_base.grad).all()
