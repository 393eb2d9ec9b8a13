"""DDPM forward noising, loss and posterior step (RAPHAEL Sec. 2; raphael_ref.diffusion.ddpm)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.diffusion.ddpm import (
    eps_from_v,
    eps_from_v_literal,
    loss_eps,
    p_mean_from_eps,
    p_mean_from_eps_via_x0,
    posterior_std,
    posterior_step,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    v_target,
)
from raphael_ref.diffusion.schedule import KNOWN_KINDS, NoiseSchedule

T = 1000
SCHEDULES = {k: NoiseSchedule.make(k, T) for k in KNOWN_KINDS}
kinds = st.sampled_from(KNOWN_KINDS)
seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)  # non-batch dims


def _draw(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _per_sample_t(gen, B, lo=0):
    return torch.randint(lo, T, (B,), generator=gen)


@pytest.mark.spec_id("ddpm.q_sample")
@settings(max_examples=8)
@given(kind=kinds, t=st.integers(0, T - 1), seed=seeds)
def test_q_sample_moments(kind, t, seed):
    """Over N draws of eps, x_t has mean sqrt(abar_t) x_0 and variance 1 - abar_t (5-sigma bounds)."""
    s, gen, N = SCHEDULES[kind], torch.Generator().manual_seed(seed), 20000
    x0 = _draw(gen, 1, 6).expand(N, 6)  # (N, 6): one x_0, many eps
    xt = q_sample(x0, t, _draw(gen, N, 6), s)  # (N, 6)
    abar = s.alphas_cumprod[t].item()
    mean_se = math.sqrt((1 - abar) / N)
    assert (xt.mean(0) - math.sqrt(abar) * x0[0]).abs().max().item() < 5 * mean_se
    var_se = (1 - abar) * math.sqrt(2 / (N - 1))
    assert (xt.var(0) - (1 - abar)).abs().max().item() < 5 * var_se


@pytest.mark.spec_id("ddpm.q_sample")
@pytest.mark.spec_id("ddpm.predict_x0")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 5), dims=shapes, seed=seeds)
def test_q_sample_formula_and_exact_inversion(kind, B, dims, seed):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, eps = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = _per_sample_t(gen, B)
    xt = q_sample(x0, t, eps, s)
    for b in range(B):  # per-sample, with Python floats
        abar = s.alphas_cumprod[int(t[b])].item()
        torch.testing.assert_close(xt[b], math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * eps[b], rtol=1e-13, atol=1e-13)
    # x_0 recovered from x_t and the true eps (1/sqrt(abar_t) <= 2e4 amplifies float64 rounding)
    torch.testing.assert_close(predict_x0_from_eps(xt, t, eps, s), x0, rtol=1e-10, atol=1e-10)


@pytest.mark.spec_id("ddpm.q_sample")
def test_q_sample_printed_form_is_not_variance_preserving():
    """Erratum (Sec. 2): the printed x_t = sqrt(1 - abar_t) x_0 + sqrt(abar_t) eps is almost pure
    noise at t = 0; ours keeps x_0 there and is noise at t = T-1."""
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(0)
    x0, eps = _draw(gen, 4, 64), _draw(gen, 4, 64)
    ours_0 = q_sample(x0, 0, eps, s)
    printed_0 = s.sqrt_one_minus_alphas_cumprod[0] * x0 + s.sqrt_alphas_cumprod[0] * eps
    assert F.cosine_similarity(ours_0.flatten(), x0.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(printed_0.flatten(), x0.flatten(), dim=0) < 0.2
    assert F.cosine_similarity(q_sample(x0, T - 1, eps, s).flatten(), eps.flatten(), dim=0) > 0.99


@pytest.mark.spec_id("ddpm.loss_eps")
@settings(max_examples=25)
@given(B=st.integers(1, 5), dims=shapes, seed=seeds)
def test_loss_eps_reductions(B, dims, seed):
    gen = torch.Generator().manual_seed(seed)
    eps, pred = _draw(gen, B, *dims), _draw(gen, B, *dims).requires_grad_(True)
    mean = loss_eps(pred, eps)
    torch.testing.assert_close(mean, F.mse_loss(pred, eps), rtol=1e-13, atol=0)
    torch.testing.assert_close(loss_eps(pred, eps, "sum"), ((eps - pred) ** 2).sum(), rtol=1e-13, atol=0)
    per = loss_eps(pred, eps, "none")
    assert per.shape == (B,)
    for b in range(B):
        torch.testing.assert_close(per[b], F.mse_loss(pred[b], eps[b]), rtol=1e-13, atol=0)
    torch.testing.assert_close(per.mean(), mean, rtol=1e-13, atol=0)  # equal-size samples
    (grad,) = torch.autograd.grad(mean, pred)
    torch.testing.assert_close(grad, 2 * (pred - eps).detach() / eps.numel(), rtol=1e-13, atol=1e-15)
    assert loss_eps(eps, eps).item() == 0.0


@pytest.mark.spec_id("ddpm.loss_eps")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_eps_low_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(1)
    eps, pred = _draw(gen, 3, 4, 8, 8).to(dtype), _draw(gen, 3, 4, 8, 8).to(dtype)
    out = loss_eps(pred, eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.mse_loss(pred.float(), eps.float()), rtol=1e-6, atol=0)


@pytest.mark.spec_id("ddpm.loss_eps")
def test_loss_eps_validation():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        loss_eps(a, a, "max")
    with pytest.raises(ValueError, match="same shape"):
        loss_eps(a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        loss_eps(a, a.double())
    with pytest.raises(ValueError, match="batch"):
        loss_eps(torch.zeros(()), torch.zeros(()))


@pytest.mark.spec_id("ddpm.q_posterior")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 4), dims=shapes, seed=seeds)
def test_q_posterior_is_the_bayes_product(kind, B, dims, seed):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1}):
    precisions add, and the mean is the precision-weighted combination."""
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, xt = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = _per_sample_t(gen, B, lo=1)
    mean, var, log_var = q_posterior_mean_variance(x0, xt, t, s)
    assert mean.shape == x0.shape and var.shape == (B,) + (1,) * len(dims)
    for b in range(B):
        tb = int(t[b])
        beta, alpha, abar_prev = s.betas[tb].item(), 1 - s.betas[tb].item(), s.alphas_cumprod[tb - 1].item()
        v = 1 / (alpha / beta + 1 / (1 - abar_prev))
        m = v * (math.sqrt(alpha) / beta * xt[b] + math.sqrt(abar_prev) / (1 - abar_prev) * x0[b])
        torch.testing.assert_close(mean[b], m, rtol=1e-9, atol=1e-11)
        assert var[b].item() == pytest.approx(v, rel=1e-9)
        assert log_var[b].item() == pytest.approx(math.log(v), rel=1e-9, abs=1e-9)


@pytest.mark.spec_id("ddpm.posterior_step")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 4), dims=shapes, seed=seeds, variance=st.sampled_from(["fixed_small", "fixed_large"]))
def test_posterior_step_with_true_noise_is_the_posterior_mean(kind, B, dims, seed, variance):
    """Given the true eps and z = 0, the step lands on mu~_t(x_0, x_t), the mean of q(x_{t-1}|x_t,x_0)."""
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, eps = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = _per_sample_t(gen, B)
    xt = q_sample(x0, t, eps, s)
    step = posterior_step(xt, t, eps, s, variance=variance, noise=torch.zeros_like(xt))
    mean, _, _ = q_posterior_mean_variance(x0, xt, t, s)
    # via x_0 = (x_t - sqrt(1-abar) eps)/sqrt(abar): rounding amplified by 1/sqrt(abar_t) <= 2e4
    torch.testing.assert_close(step, mean, rtol=1e-10, atol=1e-10)


@pytest.mark.spec_id("ddpm.posterior_step")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 4), dims=shapes, seed=seeds)
def test_literal_posterior_mean_equals_the_x0_form(kind, B, dims, seed):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    xt, eps = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = _per_sample_t(gen, B)
    torch.testing.assert_close(p_mean_from_eps(xt, t, eps, s), p_mean_from_eps_via_x0(xt, t, eps, s), rtol=1e-9, atol=1e-9)


@pytest.mark.spec_id("ddpm.posterior_step")
def test_literal_posterior_mean_equals_the_x0_form_float32():
    """float32: the x_0 form divides by sqrt(abar_t) >= 0.069 (scaled_linear) and multiplies back:
    ~15x amplification of u = 6e-8 on |x| <= 5, so 5e-5 absolute."""
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(3)
    xt, eps = _draw(gen, 64, 16, dtype=torch.float32), _draw(gen, 64, 16, dtype=torch.float32)
    t = torch.randint(0, T, (64,), generator=gen)
    torch.testing.assert_close(p_mean_from_eps(xt, t, eps, s), p_mean_from_eps_via_x0(xt, t, eps, s), rtol=0, atol=5e-5)


@pytest.mark.spec_id("ddpm.posterior_step")
@settings(max_examples=20)
@given(kind=kinds, B=st.integers(2, 5), seed=seeds, variance=st.sampled_from(["fixed_small", "fixed_large"]))
def test_posterior_step_injects_sigma_z_except_at_t0(kind, B, seed, variance):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    xt, eps, z = _draw(gen, B, 3, 2), _draw(gen, B, 3, 2), _draw(gen, B, 3, 2)
    t = _per_sample_t(gen, B)
    t[0] = 0  # always one sample at the last step
    with_z = posterior_step(xt, t, eps, s, variance=variance, noise=z)
    added = with_z - posterior_step(xt, t, eps, s, variance=variance, noise=torch.zeros_like(z))
    table = s.posterior_variance if variance == "fixed_small" else s.betas
    for b in range(B):
        sigma = 0.0 if int(t[b]) == 0 else math.sqrt(table[int(t[b])].item())
        torch.testing.assert_close(added[b], sigma * z[b], rtol=1e-9, atol=1e-12)
    assert torch.equal(added[0], torch.zeros_like(added[0]))
    torch.testing.assert_close(posterior_std(t, s, xt, variance).reshape(-1)[1:] ** 2, table[t[1:]], rtol=1e-12, atol=0)


@pytest.mark.spec_id("ddpm.posterior_step")
def test_posterior_step_printed_denominator_misses_the_posterior_mean():
    """Erratum (Sec. 2): with sqrt(1 - alpha_t) in the denominator, the true noise does not lead to mu~_t."""
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(0)
    x0, eps, t = _draw(gen, 2, 32), _draw(gen, 2, 32), 500
    xt = q_sample(x0, t, eps, s)
    alpha = s.alphas[t]
    printed = (xt - (1 - alpha) / (1 - alpha).sqrt() * eps) / alpha.sqrt()
    mean, _, _ = q_posterior_mean_variance(x0, xt, t, s)
    torch.testing.assert_close(posterior_step(xt, t, eps, s, noise=torch.zeros_like(xt)), mean, rtol=1e-10, atol=1e-10)
    assert (printed - mean).abs().max().item() > 0.1


@pytest.mark.spec_id("ddpm.posterior_step")
def test_posterior_step_per_sample_t_and_generator():
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(0)
    xt, eps = _draw(gen, 3, 4, 2, 2, dtype=torch.float32), _draw(gen, 3, 4, 2, 2, dtype=torch.float32)
    t = torch.tensor([999, 0, 371])
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7))
    out = posterior_step(xt, t, eps, s, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, posterior_step(xt, t, eps, s, noise=z), rtol=0, atol=0)
    for b in range(3):
        single = posterior_step(xt[b : b + 1], int(t[b]), eps[b : b + 1], s, noise=z[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], single, rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    posterior_step(xt, 0, eps, s, generator=g)  # t = 0 everywhere: nothing drawn
    assert torch.equal(g.get_state(), state)


@pytest.mark.spec_id("ddpm.posterior_step")
def test_ddpm_validation():
    s, x = SCHEDULES["linear"], torch.zeros(2, 3)
    with pytest.raises(ValueError, match="not both"):
        posterior_step(x, 5, x, s, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="variance"):
        posterior_step(x, 5, x, s, variance="learned")
    with pytest.raises(ValueError, match="NoiseSchedule"):
        q_sample(x, 5, x, "scaled_linear")
    with pytest.raises(ValueError, match="same shape"):
        q_sample(x, 5, torch.zeros(2, 4), s)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        q_sample(x, 1000, x, s)
    with pytest.raises(ValueError, match="batch size"):
        q_sample(x, torch.tensor([1, 2, 3]), x, s)
    with pytest.raises(ValueError, match="same shape"):
        posterior_step(x, 5, x, s, noise=torch.zeros(3))


@pytest.mark.spec_id("ddpm.posterior_step")
def test_zero_terminal_snr_last_step_is_a_clear_error():
    from raphael_ref.diffusion import NoiseSchedule, ddim_step, posterior_step

    sched = NoiseSchedule.make("scaled_linear", T=50, zero_terminal_snr=True)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        posterior_step(x, 49, torch.randn(2, 3), sched)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        ddim_step(x, 49, 30, torch.randn(2, 3), sched)
    assert torch.isfinite(ddim_step(x, 48, 30, torch.randn(2, 3), sched)).all()


# --- v parameterisation (not in RAPHAEL; erratum E88) ----------------------------------------------------------

@pytest.mark.spec_id("ddpm.v_target")
@pytest.mark.spec_id("ddpm.eps_from_v")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 5), dims=shapes, seed=seeds)
def test_v_target_and_eps_from_v_invert_each_other(kind, B, dims, seed):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 per sample with Python floats; eps_from_v(x_t, v) gives eps back and
    sqrt(abar) x_t - sqrt(1 - abar) v gives x_0 back (Salimans & Ho 2022, Sec. 4), at every t."""
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, eps = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = _per_sample_t(gen, B)
    xt, v = q_sample(x0, t, eps, s), v_target(x0, t, eps, s)
    for b in range(B):
        abar = s.alphas_cumprod[int(t[b])].item()
        torch.testing.assert_close(v[b], math.sqrt(abar) * eps[b] - math.sqrt(1 - abar) * x0[b], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(math.sqrt(abar) * xt[b] - math.sqrt(1 - abar) * v[b], x0[b], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_v(xt, t, v, s), eps, rtol=1e-12, atol=1e-12)
    # and through the eps route the samplers take: the x_0 that eps implies is the v route's x_0
    torch.testing.assert_close(predict_x0_from_eps(xt, t, eps_from_v(xt, t, v, s), s), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.spec_id("ddpm.eps_from_v")
@settings(max_examples=15)
@given(kind=kinds, t=st.integers(0, T - 1), dims=shapes, seed=seeds)
def test_eps_from_v_equals_its_literal_form(kind, t, dims, seed):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    xt, v = _draw(gen, 2, *dims), _draw(gen, 2, *dims)
    torch.testing.assert_close(eps_from_v(xt, t, v, s), eps_from_v_literal(xt, t, v, s), rtol=1e-14, atol=1e-14)
    x32, v32 = xt.float(), v.float()  # float32: coefficients rounded once, one product-sum of O(1) values
    torch.testing.assert_close(eps_from_v(x32, t, v32, s), eps_from_v_literal(xt, t, v, s).float(),
                               rtol=2e-6, atol=2e-6)


def test_eps_from_v_holds_at_zero_terminal_snr():
    """Where abar_(T-1) = 0 eps prediction cannot give x_0 (it divides by sqrt(abar)); v gives eps = x_t there, and
    v = -x_0 is the exact target: nothing is divided."""
    sched = NoiseSchedule.make("scaled_linear", T=50, zero_terminal_snr=True)
    gen = torch.Generator().manual_seed(3)
    x0, eps = _draw(gen, 2, 5), _draw(gen, 2, 5)
    xt = q_sample(x0, 49, eps, sched)
    torch.testing.assert_close(xt, eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(v_target(x0, 49, eps, sched), -x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(eps_from_v(xt, 49, -x0, sched), eps, rtol=0, atol=1e-15)


def test_v_parameterisation_validation():
    s, x = SCHEDULES["scaled_linear"], torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        eps_from_v(x, 0, torch.zeros(2, 4), s)
    with pytest.raises(ValueError, match="share dtype"):
        v_target(x, 0, x.double(), s)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        eps_from_v(x, 0, x, "scaled_linear")
    with pytest.raises(ValueError):
        eps_from_v(x, T, x, s)  # t out of range
