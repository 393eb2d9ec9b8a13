"""Golden cases of the diffusion equations (raphael_ref.diffusion; RAPHAEL Sec. 2, 4.2).

Unit roundoff u: float32 6.0e-8, float16 4.9e-4, bfloat16 3.9e-3 (DEFAULT_TOL's convention: the
spacing of numbers near 1, i.e. twice the rounding error bound). Schedule coefficients are taken
from the float64 tables and cast once, so each output below is a short chain: rounding of the
inputs, of one or two coefficients, of a product-sum. Where a coefficient > 1 amplifies the
rounding of the inputs (1/sqrt(abar_t) up to 14.6 for scaled_linear at t = 999; the guidance
scale s up to 9) the tolerance says so.
"""

from __future__ import annotations

import torch

from raphael_ref.diffusion.ddim import ddim_step, ddim_timesteps
from raphael_ref.diffusion.ddpm import (
    eps_from_v,
    loss_eps,
    posterior_step,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    v_target,
)
from raphael_ref.diffusion.guidance import cfg_combine
from raphael_ref.diffusion.schedule import KNOWN_KINDS, NoiseSchedule, alphas_cumprod, make_betas
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase

SCHED = NoiseSchedule.make("scaled_linear", 1000)  # the project default schedule

# Schedule tables are float64 by design: "float64" checks the table itself (1e-12: libm cos/sqrt
# may differ in the last bits across platforms), "float32" its one rounding to float32 at lookup
# (|x32 - x| <= 2^-24 |x|; 2u = 1.2e-7 leaves margin for the float64 part).
TABLE_TOL = {"float64": (1e-12, 1e-15), "float32": (1.2e-7, 0.0)}


def _like(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"like": torch.zeros(1, dtype=torch.float64)}  # carries the compute dtype only


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# --- schedule.betas ------------------------------------------------------------------------------
def _betas(inp):
    return {kind: make_betas(kind, 1000).to(inp["like"].dtype) for kind in KNOWN_KINDS}


# --- schedule.alphas_cumprod ---------------------------------------------------------------------
def _abar_inputs(gen):
    return {"like": torch.zeros(1, dtype=torch.float64),
            "betas": 1e-4 + 0.05 * torch.rand(64, generator=gen, dtype=torch.float64)}  # (64,) a custom schedule


def _abar(inp):
    out = {kind: alphas_cumprod(make_betas(kind, 1000)).to(inp["like"].dtype) for kind in KNOWN_KINDS}
    out["custom"] = alphas_cumprod(inp["betas"]).to(inp["like"].dtype)
    return out


# --- schedule.zero_terminal_snr ------------------------------------------------------------------
def _zsnr(inp):
    out = {}
    for kind in KNOWN_KINDS:
        s = NoiseSchedule.make(kind, 1000, zero_terminal_snr=True)
        out[f"betas_{kind}"] = s.betas.to(inp["like"].dtype)
        out[f"abar_{kind}"] = s.alphas_cumprod.to(inp["like"].dtype)
    return out


# --- ddpm.q_sample / ddpm.predict_x0 -------------------------------------------------------------
T_SAMPLE = torch.tensor([0, 1, 500, 999])  # (4,) both ends of the schedule and the middle


def _noising_inputs(gen):
    x0, eps = _randn(gen, 4, 4, 8, 8), _randn(gen, 4, 4, 8, 8)
    return {"x0": x0, "eps": eps, "t": T_SAMPLE.clone(), "x_t": q_sample(x0, T_SAMPLE, eps, SCHED)}


def _q_sample(inp):
    return {"x_t": q_sample(inp["x0"], inp["t"], inp["eps"], SCHED)}


def _predict_x0(inp):
    return {"x0_hat": predict_x0_from_eps(inp["x_t"], inp["t"], inp["eps"], SCHED)}


def _v_target(inp):
    return {"v": v_target(inp["x0"], inp["t"], inp["eps"], SCHED)}


def _eps_from_v(inp):  # x_t and v of the same draw: the output is the draw's eps (E88)
    return {"eps": eps_from_v(inp["x_t"], inp["t"], v_target(inp["x0"], inp["t"], inp["eps"], SCHED), SCHED)}


# x0_hat = (x_t - sqrt(1-abar) eps) / sqrt(abar): four roundings of size <= u/2 relative (x_t,
# eps, the two coefficients) on values <= 4.5, multiplied by 1/sqrt(abar_999) = 14.6:
# 4 * 14.6 * 4.5 * u/2 ~ 131 u absolute: float32 8e-6, float16 6.4e-2, bfloat16 5.1e-1.
PREDICT_X0_TOL = {"float32": (1e-5, 1e-5), "float16": (5e-3, 6.5e-2), "bfloat16": (3e-2, 5e-1)}


# --- ddpm.q_posterior ----------------------------------------------------------------------------
def _posterior_inputs(gen):
    return {"x0": _randn(gen, 4, 4, 8, 8), "x_t": _randn(gen, 4, 4, 8, 8), "t": torch.tensor([1, 10, 500, 999])}


def _q_posterior(inp):
    mean, var, log_var = q_posterior_mean_variance(inp["x0"], inp["x_t"], inp["t"], SCHED)
    return {"mean": mean, "variance": var, "log_variance_clipped": log_var}


# --- ddpm.loss_eps -------------------------------------------------------------------------------
def _loss_inputs(gen):
    return {"eps_pred": _randn(gen, 8, 4, 8, 8), "eps": _randn(gen, 8, 4, 8, 8)}


def _loss(inp):
    return {r: loss_eps(inp["eps_pred"], inp["eps"], r) for r in ("mean", "none", "sum")}


# --- ddpm.posterior_step -------------------------------------------------------------------------
def _step_inputs(gen):
    return {"x_t": _randn(gen, 4, 4, 8, 8), "eps_pred": _randn(gen, 4, 4, 8, 8), "noise": _randn(gen, 4, 4, 8, 8),
            "t": torch.tensor([0, 1, 500, 999])}


def _posterior_step(inp):
    return {v: posterior_step(inp["x_t"], inp["t"], inp["eps_pred"], SCHED, variance=v, noise=inp["noise"])
            for v in ("fixed_small", "fixed_large")}


# --- ddim.timesteps ------------------------------------------------------------------------------
def _no_inputs(gen):
    return {}


def _timesteps(inp):
    return {
        "leading_50": ddim_timesteps(50, 1000, "leading", 1),  # the project default (Stable Diffusion)
        "leading_10_offset0": ddim_timesteps(10, 1000, "leading", 0),
        "trailing_50": ddim_timesteps(50, 1000, "trailing"),
        "linspace_50": ddim_timesteps(50, 1000, "linspace"),
        "trailing_16": ddim_timesteps(16, 1000, "trailing"),  # exact .5 ties
        "linspace_27": ddim_timesteps(27, 1000, "linspace"),  # a tie diffusers rounds the other way
        "trailing_61": ddim_timesteps(61, 1000, "trailing"),  # diffusers returns 62 steps here
    }


# --- ddim.step -----------------------------------------------------------------------------------
def _ddim_inputs(gen):
    return {"x_t": _randn(gen, 3, 4, 8, 8), "eps_pred": _randn(gen, 3, 4, 8, 8), "noise": _randn(gen, 3, 4, 8, 8),
            "t": torch.tensor([981, 501, 1]), "t_prev": torch.tensor([961, 481, -1])}


def _ddim(inp):
    return {f"eta_{e}".replace(".", "_"): ddim_step(inp["x_t"], inp["t"], inp["t_prev"], inp["eps_pred"], SCHED,
                                                    eta=e, noise=inp["noise"])
            for e in (0.0, 0.5, 1.0)}



# --- cfg.combine ---------------------------------------------------------------------------------
def _cfg_inputs(gen):
    return {"eps_uncond": _randn(gen, 4, 4, 8, 8), "eps_cond": _randn(gen, 4, 4, 8, 8),
            "scale": torch.tensor([1.5, 4.5, 7.5, 9.0], dtype=torch.float64)}  # Sec. 4.2's weights


def _cfg(inp):
    u, c = inp["eps_uncond"], inp["eps_cond"]
    return {"per_sample": cfg_combine(u, c, inp["scale"]), "s7_5": cfg_combine(u, c, 7.5),
            "s0": cfg_combine(u, c, 0.0), "s1": cfg_combine(u, c, 1.0)}


# u + s (c - u): the rounding of the inputs (<= u/2 relative, |eps| <= 4.5) is multiplied by s <= 9:
# s (|c| + |u|) u/2 <= 9 * 9 * u/2 ~ 40 u absolute (the output's own rounding is in rtol):
# float32 2.4e-6, float16 2e-2, bfloat16 1.6e-1.
CFG_TOL = {"float32": (1e-5, 5e-6), "float16": (5e-3, 2e-2), "bfloat16": (3e-2, 1.6e-1)}

_DEFAULT3 = {k: DEFAULT_TOL[k] for k in ("float32", "bfloat16", "float16")}


# --- loss.denoise_weight (option "v", erratum E70) -------------------------------------------------
def _denoise_weight(inp):
    from raphael_ref.objective import denoise_weights

    t = torch.arange(1000)
    out = {kind: denoise_weights(NoiseSchedule.make(kind, 1000), t, "v").to(inp["like"].dtype)
           for kind in ("scaled_linear", "linear")}  # (1000,) each; cosine's abar_T ~ 0 makes w(T) ~ 1e9
    out["scaled_linear_max5"] = denoise_weights(NoiseSchedule.make("scaled_linear", 1000), t, "v", 5.0).to(
        inp["like"].dtype)  # (1000,) the capped form (train.loss_weight_max, E71)
    out["zero_snr_max5"] = denoise_weights(NoiseSchedule.make("scaled_linear", 1000, zero_terminal_snr=True), t, "v",
                                           5.0).to(inp["like"].dtype)  # (1000,) finite at abar_(T-1) = 0
    return out

CASES = [
    GoldenCase("schedule.betas", _like, _betas, TABLE_TOL),
    GoldenCase("schedule.alphas_cumprod", _abar_inputs, _abar, TABLE_TOL, seed=1, keep_float64=("betas",)),
    GoldenCase("schedule.zero_terminal_snr", _like, _zsnr, TABLE_TOL),
    # two rounded coefficients and a product-sum on O(1) inputs: DEFAULT_TOL
    GoldenCase("ddpm.q_sample", _noising_inputs, _q_sample, _DEFAULT3, seed=2),
    GoldenCase("ddpm.predict_x0", _noising_inputs, _predict_x0, PREDICT_X0_TOL, seed=2),
    # v (E88): two coefficients <= 1 and a product-sum on O(1) inputs, as q_sample: DEFAULT_TOL; eps_from_v of the
    # rounded v_target: two such chains
    GoldenCase("ddpm.v_target", _noising_inputs, _v_target, _DEFAULT3, seed=2),
    GoldenCase("ddpm.eps_from_v", _noising_inputs, _eps_from_v, _DEFAULT3, seed=2),
    # coefficients <= 1, one product-sum; variance/log-variance: one rounding of a table entry
    GoldenCase("ddpm.q_posterior", _posterior_inputs, _q_posterior, _DEFAULT3, seed=3),
    # float32 accumulation for every dtype (loss_eps upcasts): only the inputs' rounding matters
    GoldenCase("ddpm.loss_eps", _loss_inputs, _loss, _DEFAULT3, seed=4),
    # c_out = 1/sqrt(alpha_t) <= 1.006, c_eps <= 0.11, sigma <= 0.11: DEFAULT_TOL
    GoldenCase("ddpm.posterior_step", _step_inputs, _posterior_step, _DEFAULT3, seed=5),
    # integer outputs, compared exactly; the single dtype key only selects one run
    GoldenCase("ddim.timesteps", _no_inputs, _timesteps, {"float64": (0.0, 0.0)}),
    # x0_hat's 1/sqrt(abar_981) = 13.2 is undone by sqrt(abar_961) = 0.085 (coefficient product ~1),
    # the other coefficients are <= 1: DEFAULT_TOL
    GoldenCase("ddim.step", _ddim_inputs, _ddim, _DEFAULT3, seed=6),
    GoldenCase("cfg.combine", _cfg_inputs, _cfg, CFG_TOL, seed=7),
    # a float64 table (1/abar and its mean), cast once: TABLE_TOL
    GoldenCase("loss.denoise_weight", _like, _denoise_weight, TABLE_TOL),
]
