"""Noise schedules and their float64 tables (RAPHAEL Sec. 2; raphael_ref.diffusion.schedule)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.diffusion.schedule import (
    DEFAULT_KIND,
    KNOWN_KINDS,
    NoiseSchedule,
    alphas_cumprod,
    check_timesteps,
    gather_float64,
    lookup,
    make_betas,
    rescale_zero_terminal_snr,
)

kinds = st.sampled_from(KNOWN_KINDS)
Ts = st.integers(min_value=1, max_value=2000)


@pytest.mark.spec_id("schedule.betas")
@pytest.mark.spec_id("schedule.alphas_cumprod")
@settings(max_examples=30)
@given(kind=kinds, T=Ts)
def test_abar_strictly_decreasing_in_open_unit_interval(kind, T):
    betas = make_betas(kind, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool(((betas > 0) & (betas < 1)).all())
    abar = alphas_cumprod(betas)
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert bool(((abar > 0) & (abar < 1)).all())
    assert bool((abar[1:] < abar[:-1]).all())


@pytest.mark.spec_id("schedule.betas")
@settings(max_examples=20)
@given(T=st.integers(min_value=2, max_value=2000), b0=st.floats(1e-5, 1e-2), span=st.floats(0.0, 0.05))
def test_linear_and_scaled_linear_definitions(T, b0, span):
    b1 = b0 + span
    lin = make_betas("linear", T, beta_start=b0, beta_end=b1)
    assert lin[0].item() == pytest.approx(b0, rel=1e-14) and lin[-1].item() == pytest.approx(b1, rel=1e-14)
    # equal increments: beta_t = b0 + t (b1 - b0) / (T - 1)
    expected = torch.tensor([b0 + i * (b1 - b0) / (T - 1) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(lin, expected, rtol=1e-13, atol=1e-16)
    sl = make_betas("scaled_linear", T, beta_start=b0, beta_end=b1)
    root = torch.tensor([math.sqrt(b0) + i * (math.sqrt(b1) - math.sqrt(b0)) / (T - 1) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(sl, root**2, rtol=1e-13, atol=1e-16)


@pytest.mark.spec_id("schedule.betas")
def test_default_endpoints():
    torch.testing.assert_close(make_betas("linear")[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(make_betas("scaled_linear")[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64),
                               rtol=1e-14, atol=0)
    assert DEFAULT_KIND == "scaled_linear"
    torch.testing.assert_close(make_betas(), make_betas("scaled_linear", 1000), rtol=0, atol=0)


@pytest.mark.spec_id("schedule.betas")
@settings(max_examples=20)
@given(T=Ts)
def test_cosine_abar_is_the_squared_cosine(T):
    """Telescoping: where no beta is clipped, abar_t = f(t+1) / f(0), f(u) = cos^2(pi/2 (u/T + s)/(1 + s))."""
    f = [math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2 for u in range(T + 1)]
    betas = make_betas("cosine", T)
    abar = alphas_cumprod(betas)
    raw = torch.tensor([1 - f[i + 1] / f[i] for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(betas, raw.clamp(max=0.999), rtol=1e-12, atol=1e-15)
    unclipped = int((raw <= 0.999).long().cumprod(0).sum())  # leading run of unclipped betas
    expected = torch.tensor([f[i + 1] / f[0] for i in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(abar[:unclipped], expected, rtol=1e-11, atol=1e-300)
    assert betas.max().item() <= 0.999


@pytest.mark.spec_id("schedule.alphas_cumprod")
@settings(max_examples=20)
@given(kind=kinds, T=st.integers(min_value=1, max_value=300))
def test_alphas_cumprod_is_the_running_product(kind, T):
    betas = make_betas(kind, T)
    running, expected = 1.0, []
    for b in betas.tolist():
        running *= 1.0 - b
        expected.append(running)
    torch.testing.assert_close(alphas_cumprod(betas), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.spec_id("schedule.zero_terminal_snr")
@settings(max_examples=25)
@given(kind=kinds, T=st.integers(min_value=2, max_value=2000))
def test_zero_terminal_snr(kind, T):
    betas = make_betas(kind, T)
    new = rescale_zero_terminal_snr(betas)
    abar_old, abar_new = alphas_cumprod(betas), alphas_cumprod(new)
    assert abar_new[-1].item() == 0.0 and new[-1].item() == 1.0
    assert abar_new[0].item() == pytest.approx(abar_old[0].item(), rel=1e-12)
    assert bool((abar_new[1:] < abar_new[:-1]).all()) and bool((abar_new[:-1] > 0).all())
    # Algorithm 1 is an affine map of sqrt(abar): sqrt(abar') = a sqrt(abar) + b with sqrt(abar'_(T-1)) = 0.
    r_old, r_new = abar_old.sqrt(), abar_new.sqrt()
    a = (r_new[0] - r_new[-1]) / (r_old[0] - r_old[-1])
    torch.testing.assert_close(r_new, a * (r_old - r_old[-1]), rtol=1e-10, atol=1e-13)
    sched = NoiseSchedule.make(kind, T, zero_terminal_snr=True)
    torch.testing.assert_close(sched.alphas_cumprod, abar_new, rtol=0, atol=0)


@pytest.mark.spec_id("schedule.alphas_cumprod")
@pytest.mark.spec_id("ddpm.q_posterior")
@settings(max_examples=15)
@given(kind=kinds, T=st.integers(min_value=2, max_value=1500), zsnr=st.booleans())
def test_schedule_tables_follow_their_formulas(kind, T, zsnr):
    s = NoiseSchedule.make(kind, T, zsnr)
    assert s.T == T and all(getattr(s, f).dtype == torch.float64 for f in ("betas", "posterior_variance", "posterior_mean_coef1"))
    torch.testing.assert_close(s.alphas, 1 - s.betas, rtol=0, atol=0)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=0, atol=0)
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(T, dtype=torch.float64),
                               rtol=1e-14, atol=1e-14)
    # posterior variance as the inverse of the summed precisions (DDPM Eq. 7 derived from Bayes):
    # 1/beta~_t = alpha_t / beta_t + 1 / (1 - abar_{t-1}), t >= 1
    prec = s.alphas[1:] / s.betas[1:] + 1 / (1 - s.alphas_cumprod_prev[1:])
    torch.testing.assert_close(s.posterior_variance[1:], 1 / prec, rtol=1e-10, atol=1e-300)
    assert s.posterior_variance[0].item() == 0.0
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log(), rtol=1e-12, atol=1e-12)
    assert s.posterior_log_variance_clipped[0].item() == s.posterior_log_variance_clipped[1].item()
    # noiseless consistency: E[x_{t-1} | x_0] = sqrt(abar_{t-1}) x_0 = coef1 x_0 + coef2 sqrt(abar_t) x_0
    torch.testing.assert_close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod,
                               s.alphas_cumprod_prev.sqrt(), rtol=1e-11, atol=1e-14)


@pytest.mark.spec_id("schedule.alphas_cumprod")
@settings(max_examples=20)
@given(B=st.integers(1, 4), extra=st.integers(0, 3),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]), data=st.data())
def test_lookup_casts_and_broadcasts(B, extra, dtype, data):
    s = NoiseSchedule.make("linear", 50)
    x = torch.zeros((B,) + (2,) * extra, dtype=dtype)
    t = torch.tensor(data.draw(st.lists(st.integers(0, 49), min_size=B, max_size=B)))
    got = lookup(s.alphas_cumprod, t, x)
    assert got.dtype == dtype and got.shape == (B,) + (1,) * extra
    assert torch.equal(got.reshape(-1), s.alphas_cumprod[t].to(dtype))
    assert (got + x).shape == x.shape
    one = lookup(s.betas, int(t[0]), x)
    assert one.shape == (1,) + (1,) * extra and one.item() == s.betas[int(t[0])].to(dtype).item()
    g = gather_float64(s.betas, t, x)
    assert g.dtype == torch.float64
    assert s.betas.dtype == torch.float64  # the table itself is never cast


@pytest.mark.spec_id("schedule.betas")
def test_validation_errors():
    with pytest.raises(ValueError, match="T"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="T"):
        make_betas("linear", 10.0)
    with pytest.raises(ValueError, match="scaled_linear"):  # the message lists the known kinds
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="cosine"):
        make_betas("cosine", 10, beta_start=1e-4)
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", 10, beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match="beta_start"):
        make_betas("linear", 10, beta_start=0.1, beta_end=1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        NoiseSchedule.make("linear", 1, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="betas"):
        alphas_cumprod(torch.tensor([0.5, 1.5], dtype=torch.float64))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        check_timesteps(10, 10, x)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        check_timesteps(torch.tensor([0, -1]), 10, x)
    with pytest.raises(ValueError, match="integer"):
        check_timesteps(torch.tensor([0.0, 1.0]), 10, x)
    with pytest.raises(ValueError, match="batch size"):
        check_timesteps(torch.tensor([0, 1, 2]), 10, x)
    with pytest.raises(ValueError, match="int"):
        check_timesteps(True, 10, x)
    assert check_timesteps(torch.tensor([-3, 9]), 10, x, allow_negative=True).tolist() == [-3, 9]
