"""diffusers as an independent numerical oracle for the schedules and samplers.

diffusers builds its tables in float32. Where we compare *formulas* (add_noise, step), we hand
its schedulers our float64 ``alphas_cumprod`` so both sides run in float64 and agree to ~1e-12;
where we compare the *schedules* themselves, the bound is diffusers' float32 arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as hf_rescale  # noqa: E402

from raphael_ref.diffusion.ddim import SPACINGS, ddim_prev_timesteps, ddim_step, ddim_timesteps  # noqa: E402
from raphael_ref.diffusion.ddpm import posterior_step, q_sample  # noqa: E402
from raphael_ref.diffusion.schedule import NoiseSchedule, make_betas  # noqa: E402

T = 1000
U32 = 2.0**-24  # float32 unit roundoff
# ours -> (diffusers beta_schedule, beta_start, beta_end)
KINDS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
         "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}


def _hf(cls, kind, **kw):
    name, b0, b1 = KINDS[kind]
    return cls(num_train_timesteps=T, beta_schedule=name, beta_start=b0, beta_end=b1, **kw)


def _float64_tables(sched, ours: NoiseSchedule):
    """Run diffusers' formulas on our float64 table (they only read alphas_cumprod in step/add_noise)."""
    sched.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM: abar after the last step, as diffusers builds it
        one = sched.config.get("set_alpha_to_one", True)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if one else ours.alphas_cumprod[0].clone()
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.spec_id("schedule.betas")
@pytest.mark.spec_id("schedule.alphas_cumprod")
@pytest.mark.spec_id("schedule.zero_terminal_snr")
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_schedules_match_ddpm_scheduler(kind, zero_snr):
    hf = _hf(DDPMScheduler, kind, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule.make(kind, T, zero_terminal_snr=zero_snr)
    if not zero_snr:
        # diffusers' betas are float32: linspace in float32 (a few ulp), then squared for scaled_linear
        torch.testing.assert_close(hf.betas.double(), ours.betas, rtol=8 * U32, atol=0)
    # a float32 cumprod of T factors: first-order relative error bound 2 T u (inputs and products)
    torch.testing.assert_close(hf.alphas_cumprod.double(), ours.alphas_cumprod, rtol=2 * T * U32, atol=1e-7)
    if zero_snr:
        assert ours.alphas_cumprod[-1].item() == 0.0 == hf.alphas_cumprod[-1].item()


@pytest.mark.spec_id("schedule.zero_terminal_snr")
@pytest.mark.parametrize("kind", list(KINDS))
def test_rescale_zero_terminal_snr_float64(kind):
    """diffusers' Algorithm 1 is a pure torch function: run it on our float64 betas."""
    betas = make_betas(kind, T)
    ours = NoiseSchedule.make(kind, T, zero_terminal_snr=True).betas
    torch.testing.assert_close(hf_rescale(betas.clone()), ours, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("ddpm.q_sample")
@pytest.mark.parametrize("kind", list(KINDS))
def test_q_sample_matches_add_noise(kind):
    ours = NoiseSchedule.make(kind, T)
    hf = _float64_tables(_hf(DDPMScheduler, kind), ours)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(q_sample(x0, t, eps, ours), hf.add_noise(x0, eps, t), rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("ddpm.posterior_step")
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_posterior_step_matches_ddpm_scheduler(kind, variance):
    ours = NoiseSchedule.make(kind, T)
    hf = _float64_tables(_hf(DDPMScheduler, kind, clip_sample=False, variance_type=variance, prediction_type="epsilon"), ours)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for t in (999, 500, 37, 1, 0):
        ref = hf.step(eps, t, x, generator=torch.Generator().manual_seed(100 + t)).prev_sample
        # diffusers draws z with torch.randn(shape, generator, dtype) on the CPU, only for t > 0
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + t), dtype=torch.float64)
        # diffusers takes beta_t = 1 - abar_t / abar_{t-1} (we read the betas table): the
        # difference 1 - ratio loses ~1e-16 / beta_t relative, hence 1e-10 rather than 1e-12
        torch.testing.assert_close(posterior_step(x, t, eps, ours, variance=variance, noise=z), ref, rtol=1e-10, atol=1e-10)


def _hf_spacing_values(n: int, spacing: str) -> np.ndarray:
    hf = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    hf.set_timesteps(n)
    return hf.timesteps.numpy()


@pytest.mark.spec_id("ddim.timesteps")
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 16, 20, 25, 50, 100, 250, 500, 999])
def test_timesteps_match_ddim_scheduler_common_counts(spacing, n):
    offset = 1 if spacing == "leading" else 0
    if spacing == "leading" and (n - 1) * (T // n) + offset > T - 1:
        pytest.skip("diffusers would index past T-1 here; we raise (tested in test_ddim.py)")
    assert ddim_timesteps(n, T, spacing, offset).tolist() == _hf_spacing_values(n, spacing).tolist()


@pytest.mark.spec_id("ddim.timesteps")
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_every_count_agrees_except_documented_cases(spacing):
    """All n in 1..T: equal to diffusers, except (errata, DDIM spacing) where diffusers' float64
    rounding resolves an exact .5 tie the other way (one position, off by one) or its float
    'trailing' arange yields n+1 steps (the extra one is t = -1)."""
    ties = extra = 0
    for n in range(1, T + 1):
        offset = 1 if spacing == "leading" else 0
        if spacing == "leading" and (n - 1) * (T // n) + offset > T - 1:
            continue
        ours = ddim_timesteps(n, T, spacing, offset).numpy()
        ref = _hf_spacing_values(n, spacing)
        if len(ref) == n + 1 and spacing == "trailing":
            assert ref[-1] == -1, (n, ref[-3:])
            ref = ref[:-1]
            extra += 1
        assert len(ref) == n
        diff = np.nonzero(ours != ref)[0]
        for i in diff:
            k = n - 1 - i
            exact = Fraction(T * (k + 1), n) if spacing == "trailing" else Fraction(k * (T - 1), n - 1)
            assert exact.denominator == 2 and abs(int(ours[i]) - int(ref[i])) == 1, (spacing, n, i, ours[i], ref[i])
        ties += bool(len(diff))
    assert spacing != "leading" or ties == extra == 0


@pytest.mark.spec_id("ddim.step")
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_ddim_step_matches_ddim_scheduler(kind, spacing, eta, set_alpha_to_one):
    ours = NoiseSchedule.make(kind, T)
    n = 50
    hf = _hf(DDIMScheduler, kind, clip_sample=False, set_alpha_to_one=set_alpha_to_one, prediction_type="epsilon",
             timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    hf.set_timesteps(n)
    hf = _float64_tables(hf, ours)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for t in hf.timesteps[[0, 1, 25, n - 1]].tolist():
        ref = hf.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        t_prev = t - T // n  # diffusers' previous timestep (negative after the last step: final_alpha_cumprod)
        got = ddim_step(x, t, t_prev, eps, ours, eta=eta, noise=z, set_alpha_to_one=set_alpha_to_one)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


    # the setting matters on the last step only, and there by sqrt(1 - abar_0) eps (pins both branches)
    t_last = int(hf.timesteps[-1])
    last = {one: ddim_step(x, t_last, t_last - T // n, eps, ours, set_alpha_to_one=one) for one in (True, False)}
    assert (last[True] - last[False]).abs().max().item() > 1e-3


# --- whole DDIM trajectories: every spacing at the step counts people use (E62, E65) ---------------

STEP_COUNTS = [10, 20, 25, 30, 50, 100]
# Where DDIM's "next timestep of the list" and diffusers' "t - T // n" are the same step by design:
# "leading" whenever T // n > steps_offset (all counts here), "trailing" when n divides T = 1000.
AGREE_BY_DESIGN = {"leading": set(STEP_COUNTS), "trailing": {10, 20, 25, 50, 100}, "linspace": set()}
# Tolerance of a whole trajectory, float64 on both sides: one step agrees to 1e-12 (test above);
# the n <= 100 step errors add up (this eps stand-in has |d eps / dx| <= 1.5, each step's map is
# O(1)-Lipschitz in x), so n * 1e-12 <= 1e-10.
LOOP_TOL = 1e-10


def _eps_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for eps_theta(x_t, t), nonlinear in x and dependent on t."""
    return torch.tanh(x) * (0.5 + t / T) + 0.1 * math.cos(t / 37)


def _x_T_and_noises(n: int):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    return x, [torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def _hf_trajectory(kind, spacing, n, set_alpha_to_one, eta=0.0):
    ours = NoiseSchedule.make(kind, T)
    hf = _hf(DDIMScheduler, kind, clip_sample=False, set_alpha_to_one=set_alpha_to_one, prediction_type="epsilon",
             timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    hf.set_timesteps(n)
    hf = _float64_tables(hf, ours)
    x, noises = _x_T_and_noises(n)
    for i, t in enumerate(hf.timesteps.tolist()):
        x = hf.step(_eps_model(x, t), t, x, eta=eta, variance_noise=noises[i] if eta > 0 else None).prev_sample
    return hf.timesteps, x


def _our_trajectory(kind, spacing, n, rule, set_alpha_to_one, eta=0.0):
    ours = NoiseSchedule.make(kind, T)
    ts = ddim_timesteps(n, T, spacing)
    x, noises = _x_T_and_noises(n)
    for i, (t, tp) in enumerate(zip(ts.tolist(), ddim_prev_timesteps(ts, T, rule).tolist())):
        x = ddim_step(x, t, tp, _eps_model(x, t), ours, eta=eta, noise=noises[i] if eta > 0 else None,
                      set_alpha_to_one=set_alpha_to_one)
    return ts, x


def _literal_ddim_trajectory(kind, spacing, n, set_alpha_to_one):
    """DDIM (Song et al. 2021) Eq. 12 with eta = 0 along the sub-sequence tau: each step goes to the
    next timestep of tau; after the last one abar = 1 (alpha_0 = 1) or abar_0. Python floats per step."""
    abar = NoiseSchedule.make(kind, T).alphas_cumprod.tolist()
    tau = ddim_timesteps(n, T, spacing).tolist()
    x, _ = _x_T_and_noises(n)
    for i, t in enumerate(tau):
        a_t = abar[t]
        a_prev = abar[tau[i + 1]] if i + 1 < len(tau) else (1.0 if set_alpha_to_one else abar[0])
        e = _eps_model(x, t)
        x0_hat = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * e
    return x


@pytest.mark.spec_id("ddim.step")
@pytest.mark.spec_id("ddim.timesteps")
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_trajectory_stride_rule_is_diffusers(spacing, n, set_alpha_to_one):
    """prev_timestep="stride" reproduces diffusers' DDIMScheduler loop for every spacing and count,
    with either set_alpha_to_one (eta = 0, and eta = 0.5 with the same injected noise)."""
    for eta in (0.0, 0.5):
        hf_ts, hf_x = _hf_trajectory("scaled_linear", spacing, n, set_alpha_to_one, eta)
        ts, x = _our_trajectory("scaled_linear", spacing, n, "stride", set_alpha_to_one, eta)
        assert ts.tolist() == hf_ts.tolist()
        torch.testing.assert_close(x, hf_x, rtol=LOOP_TOL, atol=LOOP_TOL)


@pytest.mark.spec_id("ddim.step")
@pytest.mark.spec_id("ddim.timesteps")
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_trajectory_default_rule(spacing, n, set_alpha_to_one):
    """The default prev_timestep="next" is DDIM's definition for every spacing and count. Where that is
    diffusers' step by design (AGREE_BY_DESIGN) it equals diffusers' loop; elsewhere ("linspace", and
    "trailing" with n not dividing T) diffusers differs by design, and this test pins that it does."""
    ts, x = _our_trajectory("scaled_linear", spacing, n, "next", set_alpha_to_one)
    torch.testing.assert_close(x, _literal_ddim_trajectory("scaled_linear", spacing, n, set_alpha_to_one),
                               rtol=LOOP_TOL, atol=LOOP_TOL)
    same_rule = torch.equal(ddim_prev_timesteps(ts, T, "next"), ddim_prev_timesteps(ts, T, "stride"))
    assert same_rule == (n in AGREE_BY_DESIGN[spacing])
    _, hf_x = _hf_trajectory("scaled_linear", spacing, n, set_alpha_to_one)
    if same_rule:
        torch.testing.assert_close(x, hf_x, rtol=LOOP_TOL, atol=LOOP_TOL)
    else:
        # different steps, not rounding: measured 0.4 (linspace, 100) to 3.1 (linspace, 10), 0.49 at 30 trailing
        # steps; agreeing trajectories differ by <= 1.1e-13
        assert (x - hf_x).abs().max().item() > 1e-3
