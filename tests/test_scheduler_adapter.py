"""Spec ``sched.diffusers_adapter`` (raphael_ref/schedulers.py): the adapter's loop through diffusers' DDIM, Euler
and DPM-Solver++ (2M) equals the literal form ``adapter_step_literal`` step by step (timesteps, model input,
CFG, update, the last step's target abar), and the literal form reduces to known identities (Euler in sigma
space is DDIM; first-order DPM-Solver++ is DDIM)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from raphael_ref.diffusion import NoiseSchedule, cfg_combine  # noqa: E402
from raphael_ref.diffusion.ddim import ddim_timesteps  # noqa: E402
from raphael_ref.schedulers import (DEFAULT_SPACINGS, LITERAL_SAMPLERS, adapter_step_literal,  # noqa: E402
                                    make_scheduler, sample_with_scheduler)

SHAPE = (2, 3, 8, 8)


class SmoothModel(torch.nn.Module):
    """A float64 stand-in for the U-Net (its GroupNorm32 keeps float32 islands): eps = tanh(conv(x)) (1 + t / T)
    plus a shift read from the prompt's pooled token, so the CFG halves differ."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, t, y, y_valid, pooled_index, return_masks=False):
        shift = y[torch.arange(len(t)), pooled_index, :3].to(x.dtype)  # (B, 3)
        return torch.tanh(self.conv(x)) * (1 + t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + shift[..., None, None], []


def _conds(B: int = 2):
    g = torch.Generator().manual_seed(7)
    y = torch.randn(B + 1, 5, 4, generator=g, dtype=torch.float64)
    valid = torch.ones(B + 1, 5, dtype=torch.bool)
    pooled = torch.tensor([4, 2, 0][:B] + [1])
    return (y[:B], valid[:B], pooled[:B]), (y[B:], valid[B:], pooled[B:])


def _literal_loop(name, model, schedule, cond, uncond, steps, guidance, set_alpha_to_one, seed, first_order=False):
    """The adapter's sampling loop written with adapter_step_literal: diffusers' timesteps, its first state
    init_noise_sigma z, DDIM's stride rule t - T // n (E62), the multistep solver's first- and last-order choice."""
    sched = make_scheduler(name, schedule, set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(steps)
    ts = [int(round(float(t))) for t in sched.timesteps]
    T, abar = schedule.T, schedule.alphas_cumprod
    final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else abar[0]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * float(sched.init_noise_sigma)
    x0_prev = a_prev = None
    B = SHAPE[0]
    for i, t in enumerate(ts):
        tn = t - T // steps if name == "ddim" else (ts[i + 1] if i + 1 < len(ts) else -1)
        a_t, a_n = abar[t], (abar[tn] if tn >= 0 else final)
        x_model = x * a_t.sqrt().to(x.dtype) if name == "euler" else x
        tb = torch.full((B,), t, dtype=torch.long)
        eps_c, _ = model(x_model, tb, *cond)
        eps_u, _ = model(x_model, tb, *(c.expand(B, *c.shape[1:]) for c in uncond))
        second = name == "dpmpp_2m" and i > 0 and not (i == len(ts) - 1 and (set_alpha_to_one or len(ts) < 15)) \
            and not first_order
        out = adapter_step_literal(name, x, eps_c, eps_u, guidance, a_t, a_n,
                                   abar_prev=a_prev if second else None, x0_prev=x0_prev if second else None)
        assert torch.equal(out["x_model"], x_model)
        x0_prev, a_prev, x = out["x0"], a_t, out["x_next"]
    return x


@pytest.mark.spec_id("sched.diffusers_adapter")
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("name", LITERAL_SAMPLERS)
def test_adapter_loop_equals_the_literal_form(name, set_alpha_to_one):
    """float64 states and model. DDIM reads the installed float64 table: equal to 1e-10 of max|x|. diffusers'
    Euler and DPM-Solver++ store their sigmas in float32 and derive alpha, sigma, lambda from them in float32
    (Euler also runs step() on a float32 copy of the state), so they equal the float64 literal form to float32
    coefficients only, amplified along the trajectory by 1/alpha_t (up to 157 at t = 999): measured 3.8e-7
    (DPM-Solver++) and 7.1e-8 (Euler) of max|x|; asserted 1e-5 of max|x|. The control below shows the scale
    of a wrong choice: DPM-Solver++ with every step first order is off by 3e-2 of max|x| (asserted > 1e-2)."""
    schedule = NoiseSchedule.make(T=1000)
    model = SmoothModel()
    cond, uncond = _conds()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, _ = sample_with_scheduler(model, schedule, cond, uncond, shape=SHAPE, scheduler=name, steps=10,
                                        guidance=4.0, set_alpha_to_one=set_alpha_to_one,
                                        generator=torch.Generator().manual_seed(3))
        lit = _literal_loop(name, model, schedule, cond, uncond, 10, 4.0, set_alpha_to_one, 3)
    finally:
        torch.set_default_dtype(old)
    tol = 1e-10 if name == "ddim" else 1e-5
    torch.testing.assert_close(ours.double(), lit, rtol=0, atol=tol * lit.abs().max().item())
    if name == "dpmpp_2m":  # control: the multistep order matters far beyond the tolerance
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            first = _literal_loop(name, model, schedule, cond, uncond, 10, 4.0, set_alpha_to_one, 3, first_order=True)
        finally:
            torch.set_default_dtype(old)
        assert (first - lit).abs().max() > 1e-2 * lit.abs().max()


@pytest.mark.spec_id("sched.diffusers_adapter")
@pytest.mark.parametrize("steps", [5, 10, 20, 25, 50])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "unipc", "euler", "heun"])
def test_scheduler_timesteps_are_the_ddim_sub_sequence(name, steps):
    """Every sampler steps through ddim.timesteps of its spacing (leading with steps_offset 1 for DDIM / DDPM,
    trailing for the ODE solvers; Heun visits each inner timestep twice). Step counts without E7's float ties."""
    schedule = NoiseSchedule.make(T=1000)
    sched = make_scheduler(name, schedule)
    sched.set_timesteps(steps)
    spacing = DEFAULT_SPACINGS[name]
    expect = ddim_timesteps(steps, 1000, spacing, steps_offset=1 if spacing == "leading" and name != "ddpm" else 0)
    got = torch.tensor([int(round(float(t))) for t in sched.timesteps])
    if name == "heun":
        got = torch.unique_consecutive(got)
    assert torch.equal(got, expect)
    assert all(float(t) == round(float(t)) for t in sched.timesteps)  # integer t: the model sees them unrounded


def _draw(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.spec_id("sched.diffusers_adapter")
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), a_t=st.floats(0.01, 0.99), a_n=st.floats(0.01, 1.0),
       w=st.floats(0.0, 10.0))
def test_euler_in_sigma_space_and_first_order_dpmpp_are_ddim(seed, a_t, a_n, w):
    """Reductions: with x_sigma = x_t / sqrt(abar_t), Euler's step is DDIM's (x0 + sigma_next eps), and the
    first-order DPM-Solver++ step is DDIM's (Lu et al. 2022); every form sees the same model input x_t and
    returns the same x0 estimate; eps is the CFG combination."""
    x, ec, eu = _draw(seed)
    a_t, a_n = torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_n, dtype=torch.float64)
    ddim = adapter_step_literal("ddim", x, ec, eu, w, a_t, a_n)
    euler = adapter_step_literal("euler", x / a_t.sqrt(), ec, eu, w, a_t, a_n)
    dpm = adapter_step_literal("dpmpp_2m", x, ec, eu, w, a_t, a_n)
    torch.testing.assert_close(ddim["eps"], cfg_combine(eu, ec, w), rtol=0, atol=0)
    torch.testing.assert_close(euler["x_model"], x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(euler["x0"], ddim["x0"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(euler["x_next"] * a_n.sqrt(), ddim["x_next"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dpm["x_next"], ddim["x_next"], rtol=1e-10, atol=1e-10)
    if float(a_n) == 1.0:  # the last step to abar = 1 lands on the x0 estimate
        torch.testing.assert_close(ddim["x_next"], ddim["x0"], rtol=0, atol=1e-12)


@pytest.mark.spec_id("sched.diffusers_adapter")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), a_p=st.floats(0.01, 0.3), gap1=st.floats(0.05, 0.3),
       gap2=st.floats(0.05, 0.3))
def test_dpmpp_2m_error_on_x0_linear_in_lambda(seed, a_p, gap1, gap2):
    """DPM-Solver++ solves x_n / s_n = x_t / s_t + int_{lambda_t}^{lambda_n} e^l x0(l) dl. For x0 linear in lambda,
    x0(l) = c0 + c1 (l - lambda_t), the exact step is alpha_n [c0 (1 - e^-h) + c1 (h - 1 + e^-h)]-shifted; the
    first-order step misses c1 entirely (error alpha_n c1 (h - 1 + e^-h)), the 2M (midpoint) step takes c1 as
    alpha_n (1 - e^-h) h / 2 whatever the previous step length (r = h_prev / h cancels: D = c1 h): its error is
    alpha_n c1 ((h - 1 + e^-h) - (1 - e^-h) h / 2) = O(h^3). Steps of unequal length (gap1, gap2) check r."""
    a_t, a_n = min(a_p + gap1, 0.98), min(a_p + gap1 + gap2, 0.99)
    ab = [torch.tensor(v, dtype=torch.float64) for v in (a_p, a_t, a_n)]
    lam = [torch.log(a.sqrt() / (1 - a).sqrt()) for a in ab]
    g = torch.Generator().manual_seed(seed)
    c0, c1, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    x0_of = lambda l: c0 + c1 * (l - lam[1])  # noqa: E731
    x_t = ab[1].sqrt() * c0 + (1 - ab[1]).sqrt() * z
    eps = z  # its x0 estimate at t is c0 = x0(lambda_t)
    h = lam[2] - lam[1]
    e = torch.exp(-h)
    alpha_n, s_n, s_t = ab[2].sqrt(), (1 - ab[2]).sqrt(), (1 - ab[1]).sqrt()
    exact = (s_n / s_t) * x_t + alpha_n * (c0 * (1 - e) + c1 * (h - 1 + e))
    second = adapter_step_literal("dpmpp_2m", x_t, eps, eps, 1.0, ab[1], ab[2], abar_prev=ab[0], x0_prev=x0_of(lam[0]))
    first = adapter_step_literal("dpmpp_2m", x_t, eps, eps, 1.0, ab[1], ab[2])
    torch.testing.assert_close(second["x0"], c0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact - first["x_next"], alpha_n * c1 * (h - 1 + e), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(exact - second["x_next"], alpha_n * c1 * ((h - 1 + e) - (1 - e) * h / 2),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.spec_id("sched.diffusers_adapter")
def test_literal_form_clear_errors():
    x, ec, eu = _draw(0)
    with pytest.raises(ValueError, match="covers"):
        adapter_step_literal("heun", x, ec, eu, 1.0, 0.5, 0.6)
    with pytest.raises(ValueError, match="one shape"):
        adapter_step_literal("ddim", x, ec[:1], eu, 1.0, 0.5, 0.6)
    with pytest.raises(ValueError, match="abar_t must be"):
        adapter_step_literal("ddim", x, ec, eu, 1.0, 1.0, 0.6)
    with pytest.raises(ValueError, match="go together"):
        adapter_step_literal("dpmpp_2m", x, ec, eu, 1.0, 0.5, 0.6, abar_prev=0.4)
    with pytest.raises(ValueError, match="dpmpp_2m only"):
        adapter_step_literal("ddim", x, ec, eu, 1.0, 0.5, 0.6, abar_prev=0.4, x0_prev=x)
    with pytest.raises(ValueError, match="first order"):
        adapter_step_literal("dpmpp_2m", x, ec, eu, 1.0, 0.5, 1.0, abar_prev=0.4, x0_prev=x)
