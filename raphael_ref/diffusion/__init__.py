"""Diffusion equations of RAPHAEL Sec. 2: noise schedule, DDPM noising/loss/posterior step,
DDIM sampling and classifier-free guidance (one function per equation; see spec/equations.toml)."""

from raphael_ref.diffusion.ddim import DEFAULT_SPACING, SPACINGS, ddim_sigma, ddim_step, ddim_timesteps
from raphael_ref.diffusion.ddpm import (
    LOSS_REDUCTIONS,
    VARIANCE_KINDS,
    draw_noise,
    eps_from_v,
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
from raphael_ref.diffusion.guidance import cfg_combine
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
from raphael_ref.diffusion.timestep_shift import shift_time, shifted_timestep_probs, shifted_timesteps

__all__ = [
    "DEFAULT_KIND", "DEFAULT_SPACING", "KNOWN_KINDS", "LOSS_REDUCTIONS", "SPACINGS", "VARIANCE_KINDS",
    "NoiseSchedule", "alphas_cumprod", "cfg_combine", "check_timesteps", "ddim_sigma", "ddim_step",
    "ddim_timesteps", "draw_noise", "eps_from_v", "gather_float64", "lookup", "loss_eps", "make_betas",
    "p_mean_from_eps", "p_mean_from_eps_via_x0", "posterior_std", "posterior_step",
    "predict_x0_from_eps", "q_posterior_mean_variance", "q_sample", "rescale_zero_terminal_snr",
    "shift_time", "shifted_timestep_probs", "shifted_timesteps", "v_target",
]
