"""DDIM timesteps and update (Song et al. 2021; raphael_ref.diffusion.ddim)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.diffusion.ddim import (DEFAULT_SPACING, SPACINGS, ddim_prev_timesteps, ddim_sigma, ddim_step,
                                        ddim_timesteps)
from raphael_ref.diffusion.ddpm import posterior_step, predict_x0_from_eps, q_sample
from raphael_ref.diffusion.schedule import KNOWN_KINDS, NoiseSchedule

T = 1000
SCHEDULES = {k: NoiseSchedule.make(k, T) for k in KNOWN_KINDS}
kinds = st.sampled_from(KNOWN_KINDS)
seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)


def _draw(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _round_half_even(q: Fraction) -> int:
    return round(q)  # Python rounds a Fraction half to even, exactly


def _reference_timesteps(n: int, T: int, spacing: str, offset: int) -> list[int]:
    """The definitions, with exact rationals (ddim_timesteps' docstring)."""
    if spacing == "leading":
        return [(n - 1 - i) * (T // n) + offset for i in range(n)]
    if spacing == "trailing":
        return [_round_half_even(Fraction(T * (n - i), n)) - 1 for i in range(n)]
    if n == 1:
        return [0]
    return [_round_half_even(Fraction((n - 1 - i) * (T - 1), n - 1)) for i in range(n)]


@pytest.mark.spec_id("ddim.timesteps")
def test_timesteps_pinned_10_steps():
    # hand-computed from the definitions for T = 1000, n = 10
    assert ddim_timesteps(10, 1000, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ddim_timesteps(10, 1000, "leading", 0).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ddim_timesteps(10, 1000, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ddim_timesteps(10, 1000, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # the project default: "leading" with steps_offset = 1 (Stable Diffusion)
    assert DEFAULT_SPACING == "leading"
    assert ddim_timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ddim_timesteps(50).tolist()[:3] == [981, 961, 941] and ddim_timesteps(50).tolist()[-1] == 1


@pytest.mark.spec_id("ddim.timesteps")
def test_timesteps_pinned_ties_round_half_even():
    # linspace n = 3: 999/2 = 499.5 -> 500; trailing n = 16: 62.5 (16 - i) - 1 with x.5 -> even
    assert ddim_timesteps(3, 1000, "linspace").tolist() == [999, 500, 0]
    assert ddim_timesteps(16, 1000, "trailing").tolist() == [
        999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61]
    assert ddim_timesteps(1, 1000, "linspace").tolist() == [0]
    assert ddim_timesteps(1, 1000, "trailing").tolist() == [999]
    assert ddim_timesteps(1000, 1000, "leading", 0).tolist() == list(range(999, -1, -1))


@pytest.mark.spec_id("ddim.timesteps")
@settings(max_examples=60)
@given(T=st.integers(1, 3000), data=st.data(), spacing=st.sampled_from(SPACINGS))
def test_timesteps_match_the_exact_definition(T, data, spacing):
    n = data.draw(st.integers(1, T))
    offset = 0
    if spacing == "leading":
        offset = data.draw(st.integers(0, T - 1 - (n - 1) * (T // n)))
    ts = ddim_timesteps(n, T, spacing, offset)
    assert ts.dtype == torch.long and ts.shape == (n,)
    assert ts.tolist() == _reference_timesteps(n, T, spacing, offset)
    assert bool((ts[1:] < ts[:-1]).all()) and 0 <= int(ts.min()) and int(ts.max()) <= T - 1
    if spacing == "trailing":
        assert int(ts[0]) == T - 1
    if spacing == "linspace" and n > 1:
        assert int(ts[0]) == T - 1 and int(ts[-1]) == 0
    if spacing == "leading":
        assert int(ts[-1]) == offset


@pytest.mark.spec_id("ddim.timesteps")
def test_timesteps_validation():
    with pytest.raises(ValueError, match="<= T"):
        ddim_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, 1000, "uniform")
    with pytest.raises(ValueError, match="leading"):
        ddim_timesteps(10, 1000, "trailing", steps_offset=1)
    with pytest.raises(ValueError, match="T-1"):
        ddim_timesteps(1000, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_timesteps(0, 1000)


@pytest.mark.spec_id("ddim.step")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 4), dims=shapes, seed=seeds)
def test_eta0_with_true_noise_recovers_x0_and_stays_on_the_forward_marginal(kind, B, dims, seed):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, eps = _draw(gen, B, *dims), _draw(gen, B, *dims)
    t = torch.randint(1, T, (B,), generator=gen)
    t_prev = (torch.rand(B, generator=gen, dtype=torch.float64) * t).long()  # in [0, t)
    xt = q_sample(x0, t, eps, s)
    # rounding amplified by 1/sqrt(abar_t) <= 2e4 (cosine, t = 999)
    torch.testing.assert_close(ddim_step(xt, t, -1, eps, s), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ddim_step(xt, t, t_prev, eps, s), q_sample(x0, t_prev, eps, s), rtol=1e-10, atol=1e-10)


@pytest.mark.spec_id("ddim.step")
def test_eta0_is_deterministic():
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(0)
    xt, eps = _draw(gen, 2, 4, 3, 3, dtype=torch.float32), _draw(gen, 2, 4, 3, 3, dtype=torch.float32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = g1.get_state()
    a = ddim_step(xt, 981, 961, eps, s, generator=g1)
    b = ddim_step(xt, 981, 961, eps, s, generator=g2)
    assert torch.equal(a, b) and torch.equal(a, ddim_step(xt, 981, 961, eps, s))
    assert torch.equal(g1.get_state(), state)  # nothing drawn when sigma = 0


@pytest.mark.spec_id("ddim.step")
@settings(max_examples=25)
@given(kind=kinds, B=st.integers(1, 4), seed=seeds)
def test_eta1_single_steps_are_ddpm(kind, B, seed):
    """eta = 1 and t_prev = t - 1: sigma_t^2 = beta~_t and the whole step equals DDPM's (fixed_small)."""
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    xt, eps, z = _draw(gen, B, 3, 2), _draw(gen, B, 3, 2), _draw(gen, B, 3, 2)
    t = torch.randint(0, T, (B,), generator=gen)
    sigma = ddim_sigma(t, t - 1, s, xt, eta=1.0).reshape(-1)
    torch.testing.assert_close(sigma**2, s.posterior_variance[t], rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(ddim_step(xt, t, t - 1, eps, s, eta=1.0, noise=z),
                               posterior_step(xt, t, eps, s, variance="fixed_small", noise=z), rtol=1e-9, atol=1e-9)


@pytest.mark.spec_id("ddim.step")
@settings(max_examples=20)
@given(kind=kinds, eta=st.floats(0.0, 1.0), seed=seeds, data=st.data())
def test_sigma_and_injected_noise(kind, eta, seed, data):
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    t = data.draw(st.integers(1, T - 1))
    t_prev = data.draw(st.integers(-1, t - 1))
    xt, eps, z = _draw(gen, 2, 5), _draw(gen, 2, 5), _draw(gen, 2, 5)
    a = s.alphas_cumprod[t].item()
    ap = 1.0 if t_prev < 0 else s.alphas_cumprod[t_prev].item()
    expected = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    assert ddim_sigma(t, t_prev, s, xt, eta).item() == pytest.approx(expected, rel=1e-10, abs=1e-15)
    with_z = ddim_step(xt, t, t_prev, eps, s, eta=eta, noise=z)
    added = with_z - ddim_step(xt, t, t_prev, eps, s, eta=eta, noise=torch.zeros_like(z))
    torch.testing.assert_close(added, expected * z, rtol=1e-9, atol=1e-12)
    # Eq. 12 with Python floats
    x0_hat = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
    lit = math.sqrt(ap) * x0_hat + math.sqrt(max(1 - ap - expected**2, 0.0)) * eps + expected * z
    torch.testing.assert_close(ddim_step(xt, t, t_prev, eps, s, eta=eta, noise=z), lit, rtol=1e-9, atol=1e-9)


@pytest.mark.spec_id("ddim.step")
@settings(max_examples=6)
@given(kind=kinds, eta=st.sampled_from([0.3, 1.0]), seed=seeds, data=st.data())
def test_any_eta_keeps_the_forward_marginal(kind, eta, seed, data):
    """With the true eps and fresh z, x_prev ~ N(sqrt(abar_prev) x_0, 1 - abar_prev) (DDIM Lemma 1); 5-sigma bounds."""
    s, gen, N = SCHEDULES[kind], torch.Generator().manual_seed(seed), 20000
    t = data.draw(st.integers(1, T - 1))
    t_prev = data.draw(st.integers(0, t - 1))
    x0 = _draw(gen, 1, 4).expand(N, 4)
    xt = q_sample(x0, t, _draw(gen, N, 4), s)
    eps = (xt - s.sqrt_alphas_cumprod[t] * x0) / s.sqrt_one_minus_alphas_cumprod[t]
    out = ddim_step(xt, t, t_prev, eps, s, eta=eta, generator=gen)
    ap = s.alphas_cumprod[t_prev].item()
    assert (out.mean(0) - math.sqrt(ap) * x0[0]).abs().max().item() < 5 * math.sqrt((1 - ap) / N)
    assert (out.var(0) - (1 - ap)).abs().max().item() < 5 * (1 - ap) * math.sqrt(2 / (N - 1))


@pytest.mark.spec_id("ddim.step")
def test_clip_x0():
    s, gen = SCHEDULES["scaled_linear"], torch.Generator().manual_seed(0)
    xt, eps = 3 * _draw(gen, 2, 16), _draw(gen, 2, 16)
    x0_hat = predict_x0_from_eps(xt, 500, eps, s)
    assert x0_hat.abs().max().item() > 1
    torch.testing.assert_close(ddim_step(xt, 500, -1, eps, s, clip_x0=1.0), x0_hat.clamp(-1, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ddim_step(xt, 500, -1, eps, s), x0_hat, rtol=0, atol=1e-12)  # no clipping by default


@pytest.mark.spec_id("ddim.step")
def test_ddim_validation():
    s, x = SCHEDULES["linear"], torch.zeros(2, 3)
    with pytest.raises(ValueError, match="smaller than t"):
        ddim_step(x, 10, 10, x, s)
    with pytest.raises(ValueError, match="smaller than t"):
        ddim_step(x, torch.tensor([10, 5]), torch.tensor([3, 7]), x, s)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x, 10, 5, x, s, eta=1.5)
    with pytest.raises(ValueError, match="not both"):
        ddim_step(x, 10, 5, x, s, eta=1.0, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="clip_x0"):
        ddim_step(x, 10, 5, x, s, clip_x0=-1.0)
    with pytest.raises(ValueError, match=r"<= 999"):
        ddim_step(x, 10, 1000, x, s)


@pytest.mark.spec_id("ddim.timesteps")
def test_prev_timesteps_pinned():
    # DDIM's rule: the next timestep of the list, -1 after the last
    ts = ddim_timesteps(10, 1000, "linspace")
    assert ddim_prev_timesteps(ts, 1000).tolist() == [888, 777, 666, 555, 444, 333, 222, 111, 0, -1]
    # diffusers' rule t - T // n: 100 below each step (the last one lands below 0: "before the first step")
    assert ddim_prev_timesteps(ts, 1000, "stride").tolist() == [899, 788, 677, 566, 455, 344, 233, 122, 11, -1]
    # trailing 30 steps (T % n != 0): the list steps by 33 or 34, diffusers always by 33
    tr = ddim_timesteps(30, 1000, "trailing")
    assert tr.tolist()[:4] == [999, 966, 932, 899]
    assert ddim_prev_timesteps(tr, 1000).tolist()[:3] == [966, 932, 899]
    assert ddim_prev_timesteps(tr, 1000, "stride").tolist()[:3] == [966, 933, 899]
    # leading with T // n > steps_offset, and trailing with n | T: the two rules are the same steps
    for spacing, n in (("leading", 50), ("trailing", 50), ("leading", 3)):
        ts = ddim_timesteps(n, 1000, spacing)
        assert torch.equal(ddim_prev_timesteps(ts, 1000), ddim_prev_timesteps(ts, 1000, "stride"))
    # leading with T // n == steps_offset (n = 600): diffusers' last step goes to t = 0, DDIM's past it
    ts = ddim_timesteps(600, 1000, "leading")
    assert ddim_prev_timesteps(ts, 1000).tolist()[-1] == -1 and ddim_prev_timesteps(ts, 1000, "stride").tolist()[-1] == 0


@pytest.mark.spec_id("ddim.timesteps")
def test_prev_timesteps_validation():
    ts = ddim_timesteps(10, 1000)
    with pytest.raises(ValueError, match="prev_timestep rule"):
        ddim_prev_timesteps(ts, 1000, "previous")
    with pytest.raises(ValueError, match="1-D long"):
        ddim_prev_timesteps(ts.float(), 1000)
    with pytest.raises(ValueError, match="descending"):
        ddim_prev_timesteps(ts.flip(0), 1000)


@pytest.mark.spec_id("ddim.step")
@settings(max_examples=15)
@given(kind=kinds, B=st.integers(1, 3), seed=seeds)
def test_set_alpha_to_one_false_ends_on_abar_0(kind, B, seed):
    """set_alpha_to_one=False (Stable Diffusion's config): after the last step abar = abar_0, so with the
    true eps an eta = 0 step lands on the forward marginal at t = 0 instead of on x_0; the default lands on x_0."""
    s, gen = SCHEDULES[kind], torch.Generator().manual_seed(seed)
    x0, eps = _draw(gen, B, 3, 2), _draw(gen, B, 3, 2)
    t = torch.randint(1, T, (B,), generator=gen)
    xt = q_sample(x0, t, eps, s)
    # rounding amplified by 1/sqrt(abar_t) <= 2e4 (cosine, t = 999), as above
    torch.testing.assert_close(ddim_step(xt, t, -1, eps, s, set_alpha_to_one=False), q_sample(x0, 0, eps, s),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ddim_step(xt, t, -1, eps, s, set_alpha_to_one=True), x0, rtol=1e-10, atol=1e-10)
    # only t_prev < 0 is affected; sigma uses the same abar_prev
    torch.testing.assert_close(ddim_step(xt, t, 0, eps, s, set_alpha_to_one=True),
                               ddim_step(xt, t, -1, eps, s, set_alpha_to_one=False), rtol=0, atol=0)
    torch.testing.assert_close(ddim_sigma(t, -1, s, xt, 1.0, set_alpha_to_one=False), ddim_sigma(t, 0, s, xt, 1.0),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step(xt, t, -1, eps, s, set_alpha_to_one=0)


def test_sample_plumbs_the_ddim_settings(monkeypatch):
    """sampling.sample hands prev_timestep and set_alpha_to_one to every DDIM step."""
    import raphael_ref.sampling as S

    calls = []

    def spy(x, t, t_prev, eps, schedule, **kw):
        calls.append((t, t_prev, kw["set_alpha_to_one"]))
        return ddim_step(x, t, t_prev, eps, schedule, **kw)

    class Zero(torch.nn.Module):  # eps = 0 model: the plumbing, not the network, is under test
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, hidden, valid, pooled, return_masks=False):
            return x * self.w, []

    monkeypatch.setattr(S, "ddim_step", spy)
    cond = (torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    s = SCHEDULES["scaled_linear"]
    for rule, one in (("next", True), ("stride", False)):
        calls.clear()
        S.sample(Zero(), s, cond, None, shape=(1, 1, 2, 2), steps=10, spacing="linspace", prev_timestep=rule,
                 set_alpha_to_one=one, generator=torch.Generator().manual_seed(0))
        ts = ddim_timesteps(10, T, "linspace")
        assert calls == [(int(t), int(tp), one) for t, tp in zip(ts, ddim_prev_timesteps(ts, T, rule))]
    with pytest.raises(ValueError, match="prev_timestep rule"):
        S.sample(Zero(), s, cond, None, shape=(1, 1, 2, 2), steps=10, prev_timestep="diffusers")
