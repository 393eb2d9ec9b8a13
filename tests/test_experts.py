"""Expert FFNs (RAPHAEL App. 7.1 Table 2: experts are FFNs with GELU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.experts import ExpertBank, expert_ffn

F64 = torch.float64


def _params(d: int, hidden: int, gen: torch.Generator, dtype=F64):
    return (torch.randn(d, hidden, generator=gen, dtype=dtype), torch.randn(hidden, generator=gen, dtype=dtype),
            torch.randn(hidden, d, generator=gen, dtype=dtype), torch.randn(d, generator=gen, dtype=dtype))


@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=20)
@given(d=st.integers(1, 6), hidden=st.integers(1, 8), lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_expert_ffn_matches_linear_gelu_linear(d, hidden, lead, seed):
    """e(x) equals torch's Linear -> GELU(erf) -> Linear with the same parameters, for any leading shape."""
    gen = torch.Generator().manual_seed(seed)
    w1, b1, w2, b2 = _params(d, hidden, gen)
    x = torch.randn(*lead, d, generator=gen, dtype=F64)
    lin1, lin2 = torch.nn.Linear(d, hidden, dtype=F64), torch.nn.Linear(hidden, d, dtype=F64)
    with torch.no_grad():
        lin1.weight.copy_(w1.T), lin1.bias.copy_(b1), lin2.weight.copy_(w2.T), lin2.bias.copy_(b2)
    ref = lin2(torch.nn.GELU(approximate="none")(lin1(x)))
    torch.testing.assert_close(expert_ffn(x, w1, b1, w2, b2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("moe.expert_ffn")
def test_expert_ffn_gelu_is_exact_erf_not_tanh():
    """Scalar expert (d = h = 1, w = 1, b = 0) is GELU itself: x Phi(x) with the erf CDF, not the tanh approximation."""
    one, zero = torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64)
    xs = [-3.0, -1.0, -0.3, 0.0, 0.5, 1.7, 4.0]
    got = expert_ffn(torch.tensor(xs, dtype=F64)[:, None], one, zero, one, zero)[:, 0]
    exact = torch.tensor([x * 0.5 * (1 + math.erf(x / math.sqrt(2))) for x in xs], dtype=F64)
    tanh_approx = torch.tensor([0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))) for x in xs], dtype=F64)
    torch.testing.assert_close(got, exact, rtol=1e-14, atol=1e-14)
    assert (got - tanh_approx).abs().max() > 1e-5  # the two GELUs differ by ~1e-4 around |x| ~ 2-3


@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=15)
@given(n=st.integers(2, 6), d=st.integers(1, 5), hidden=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_expert_ffn_acts_per_position(n, d, hidden, seed):
    """Row j of e(X) depends on row j of X only: e applied to rows one by one gives the same result."""
    gen = torch.Generator().manual_seed(seed)
    p = _params(d, hidden, gen)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    rows = torch.stack([expert_ffn(x[j], *p) for j in range(n)])
    torch.testing.assert_close(expert_ffn(x, *p), rows, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=15)
@given(k=st.integers(1, 4), d=st.integers(1, 5), hidden=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_bank_expert_forward_and_zero(k, d, hidden, seed):
    """bank.expert(e, x) = expert_ffn with slice e; forward stacks all experts; expert_at_zero = e_k(0)."""
    gen = torch.Generator().manual_seed(seed)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64)
    x = torch.randn(3, 2, d, generator=gen, dtype=F64)
    for e in range(k):
        torch.testing.assert_close(bank.expert(e, x), expert_ffn(x, bank.w1[e], bank.b1[e], bank.w2[e], bank.b2[e]))
    torch.testing.assert_close(bank(x), torch.stack([bank.expert(e, x) for e in range(k)]))
    zero_out = torch.stack([bank.expert(e, torch.zeros(d, dtype=F64)) for e in range(k)])  # (k, d)
    torch.testing.assert_close(bank.expert_at_zero(), zero_out, rtol=1e-12, atol=1e-12)
    assert bank.expert_at_zero().abs().max() > 0  # nonzero biases: e(0) = GELU(b1) w2 + b2 != 0


@pytest.mark.spec_id("moe.expert_ffn")
def test_bank_expert_at_zero_vanishes_without_biases():
    """GELU(0) = 0, so e_k(0) is exactly zero when both biases are zero, and not otherwise."""
    bank = ExpertBank(3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert bank.expert_at_zero().abs().max() > 0
    with torch.no_grad():
        bank.b1.zero_(), bank.b2.zero_()
    assert torch.equal(bank.expert_at_zero(), torch.zeros(3, 4))


@pytest.mark.spec_id("moe.expert_ffn")
def test_bank_init_like_linear_and_seeded():
    """Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in nn.Linear; same generator seed -> same bank."""
    d, hidden = 64, 256
    a = ExpertBank(4, d, hidden, generator=torch.Generator().manual_seed(7))
    b = ExpertBank(4, d, hidden, generator=torch.Generator().manual_seed(7))
    for name, fan_in in (("w1", d), ("b1", d), ("w2", hidden), ("b2", hidden)):
        p, bound = getattr(a, name), 1 / math.sqrt(fan_in)
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.95 * bound  # spans the interval (thousands of draws)
        assert torch.equal(p, getattr(b, name))
    # uniform(-c, c) has std c / sqrt(3); w1 holds 65536 draws, so the sample std is within 1%
    assert abs(a.w1.std().item() * math.sqrt(3) * math.sqrt(d) - 1) < 0.02
    assert sum(p.numel() for p in a.parameters()) == 4 * (d * hidden + hidden + hidden * d + d)


def test_bank_from_params_copies():
    gen = torch.Generator().manual_seed(1)
    src = ExpertBank(2, 3, 4, generator=gen, dtype=F64)
    bank = ExpertBank.from_params(src.w1.detach(), src.b1.detach(), src.w2.detach(), src.b2.detach())
    x = torch.randn(5, 3, dtype=F64, generator=gen)
    torch.testing.assert_close(bank(x), src(x), rtol=0, atol=0)
    assert bank.w1.data_ptr() != src.w1.data_ptr()


@pytest.mark.parametrize("call, match", [
    (lambda p: expert_ffn(torch.randn(2, 5), *p), "x must be"),
    (lambda p: expert_ffn(torch.ones(2, 4, dtype=torch.long), *p), "x must be"),
    (lambda p: expert_ffn(torch.randn(2, 4), p[0], torch.zeros(3), p[2], p[3]), "b1"),
    (lambda p: expert_ffn(torch.randn(2, 4), p[0].int(), *p[1:]), "w1"),
    (lambda p: expert_ffn(torch.randn(2, 4), p[0], p[1], p[2][:, :3], p[3]), "w2"),
    (lambda p: ExpertBank(0, 4, 6), "n_experts"),
    (lambda p: ExpertBank(2, 4, 6).expert(2, torch.randn(4)), "k must be"),
    (lambda p: ExpertBank(2, 4, 6)(torch.randn(3, 5)), "x must be"),
    (lambda p: ExpertBank.from_params(torch.randn(2, 4, 6), torch.randn(2, 6), torch.randn(2, 6, 3), torch.randn(2, 4)), "w2"),
])
def test_validation_errors(call, match):
    p = (torch.randn(4, 6), torch.randn(6), torch.randn(6, 4), torch.randn(4))
    with pytest.raises(ValueError, match=match):
        call(p)


# ---------------------------------------------------------------- GEGLU experts (model.expert_act = "geglu", E76)

@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=15)
@given(d=st.integers(1, 6), hidden=st.integers(1, 8), lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_geglu_expert_is_stable_diffusions_feedforward(d, hidden, lead, seed):
    """act="geglu": e(x) = (a * GELU(g)) W2 + b2, [a, g] = x W1 + b1 (value first): diffusers' FeedForward(geglu)."""
    diffusers_attention = pytest.importorskip("diffusers.models.attention")
    gen = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(d, 2 * hidden, generator=gen, dtype=F64), torch.randn(2 * hidden, generator=gen, dtype=F64)
    w2, b2 = torch.randn(hidden, d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    x = torch.randn(*lead, d, generator=gen, dtype=F64)
    ff = diffusers_attention.FeedForward(d, activation_fn="geglu", inner_dim=hidden).to(F64)
    with torch.no_grad():
        ff.net[0].proj.weight.copy_(w1.T), ff.net[0].proj.bias.copy_(b1), ff.net[2].weight.copy_(w2.T), ff.net[2].bias.copy_(b2)
    torch.testing.assert_close(expert_ffn(x, w1, b1, w2, b2, act="geglu"), ff(x), rtol=1e-12, atol=1e-12)
    a, g = (x @ w1 + b1).chunk(2, dim=-1)
    ref = (a * torch.nn.functional.gelu(g)) @ w2 + b2
    torch.testing.assert_close(expert_ffn(x, w1, b1, w2, b2, act="geglu"), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=10)
@given(k=st.integers(1, 4), d=st.integers(1, 5), hidden=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_geglu_bank_shapes_forward_zero_and_copy(k, d, hidden, seed):
    """A GEGLU bank holds w1 (k, d, 2h), b1 (k, 2h); expert / forward / expert_at_zero / from_params agree."""
    gen = torch.Generator().manual_seed(seed)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64, act="geglu")
    assert bank.w1.shape == (k, d, 2 * hidden) and bank.b1.shape == (k, 2 * hidden) and bank.w2.shape == (k, hidden, d)
    x = torch.randn(3, 2, d, generator=gen, dtype=F64)
    for e in range(k):
        torch.testing.assert_close(bank.expert(e, x),
                                   expert_ffn(x, bank.w1[e], bank.b1[e], bank.w2[e], bank.b2[e], act="geglu"))
    torch.testing.assert_close(bank(x), torch.stack([bank.expert(e, x) for e in range(k)]))
    zero_out = torch.stack([bank.expert(e, torch.zeros(d, dtype=F64)) for e in range(k)])  # (k, d)
    torch.testing.assert_close(bank.expert_at_zero(), zero_out, rtol=1e-12, atol=1e-12)
    copy = ExpertBank.from_params(*(p.detach() for p in (bank.w1, bank.b1, bank.w2, bank.b2)), act="geglu")
    assert copy.act == "geglu" and "geglu" in repr(copy)
    torch.testing.assert_close(copy(x), bank(x), rtol=0, atol=0)


def test_geglu_zero_last_projection_outputs_zero():
    """w2 = 0 and b2 = 0 make every expert output exactly 0 (the converted space-MoE at step 0, E76)."""
    bank = ExpertBank(3, 4, 5, generator=torch.Generator().manual_seed(0), act="geglu")
    with torch.no_grad():
        bank.w2.zero_(), bank.b2.zero_()
    x = torch.randn(7, 4)
    assert torch.equal(bank(x), torch.zeros(3, 7, 4)) and torch.equal(bank.expert_at_zero(), torch.zeros(3, 4))


@pytest.mark.parametrize("call, match", [
    (lambda: ExpertBank(2, 4, 6, act="relu"), "act must be one of"),
    (lambda: expert_ffn(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), torch.randn(6, 4), torch.randn(4), act="swiglu"),
     "act must be one of"),
    (lambda: expert_ffn(torch.randn(2, 4), torch.randn(4, 5), torch.randn(5), torch.randn(2, 4), torch.randn(4), act="geglu"),
     "2 \\* hidden"),
    (lambda: expert_ffn(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), torch.randn(6, 4), torch.randn(4), act="geglu"),
     "w2"),
    (lambda: ExpertBank.from_params(torch.randn(2, 4, 5), torch.randn(2, 5), torch.randn(2, 2, 4), torch.randn(2, 4), act="geglu"),
     "2 \\* hidden"),
])
def test_geglu_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- the weighted sum of all experts (space-MoE dense)


@pytest.mark.spec_id("moe.expert_ffn")
@settings(max_examples=20)
@given(k=st.integers(1, 5), d=st.integers(1, 5), hidden=st.integers(1, 6), act=st.sampled_from(["gelu", "geglu"]),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_mixture_is_the_weighted_sum_of_the_stacked_experts(k, d, hidden, act, lead, seed):
    """bank.mixture(x, w) = sum_k w[..., k] e_k(x), values and gradients (float64: only the order of the sums
    differs, so 1e-12)."""
    gen = torch.Generator().manual_seed(seed)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64, act=act)
    x = torch.randn(*lead, d, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(*lead, k, generator=gen, dtype=F64, requires_grad=True)
    got = bank.mixture(x, w)
    ref = torch.einsum("...k,k...d->...d", w, torch.stack([bank.expert(e, x) for e in range(k)]))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(ref.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad((got * g).sum(), [x, w, *bank.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, w, *bank.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mixture_float32_at_toy_sizes():
    """float32 at the toy's widths (k = 6, d = 32, h = 64, 16 x 576 positions): within 1e-5 of the float64 sum. The
    sums run over d = 32 and k h = 384 terms of size ~1: a float32 rounding (6e-8) times ~sqrt(400) terms, with a margin."""
    gen = torch.Generator().manual_seed(0)
    bank = ExpertBank(6, 32, 64, generator=gen)
    x, w = torch.randn(16, 576, 32, generator=gen), torch.rand(16, 576, 6, generator=gen) * 3
    ref = ExpertBank.from_params(*(p.double() for p in (bank.w1, bank.b1, bank.w2, bank.b2))).mixture(x.double(), w.double())
    torch.testing.assert_close(bank.mixture(x, w).double(), ref, rtol=0, atol=1e-5)


def test_mixture_validation():
    bank = ExpertBank(3, 4, 5)
    with pytest.raises(ValueError, match=r"weights must be .* \(2, 7, 3\)"):
        bank.mixture(torch.randn(2, 7, 4), torch.randn(2, 7, 2))
    with pytest.raises(ValueError, match="x must be"):
        bank.mixture(torch.randn(2, 7, 5), torch.randn(2, 7, 3))
