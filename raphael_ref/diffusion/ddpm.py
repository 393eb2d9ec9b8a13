"""DDPM forward noising, denoising loss and ancestral posterior step (RAPHAEL Sec. 2).

RAPHAEL Sec. 2 prints two of these equations with errors (spec/errata.md):
the forward sample with the square roots swapped, and the posterior step with sqrt(1 - alpha_t)
where DDPM (Ho et al. 2020, Eq. 11 / Algorithm 2) has sqrt(1 - abar_t). We implement DDPM.

Timesteps are 0-based (paper t = our t + 1) and may be one int or a per-sample (B,) long tensor.
Coefficients are gathered from the float64 tables, combined in float64 and cast once to the
dtype of the data (see :mod:`raphael_ref.diffusion.schedule`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raphael_ref.diffusion.schedule import NoiseSchedule, gather_float64

__all__ = [
    "q_sample",
    "predict_x0_from_eps",
    "v_target",
    "eps_from_v",
    "loss_eps",
    "q_posterior_mean_variance",
    "p_mean_from_eps",
    "p_mean_from_eps_via_x0",
    "posterior_std",
    "posterior_step",
    "draw_noise",
    "VARIANCE_KINDS",
    "LOSS_REDUCTIONS",
]

VARIANCE_KINDS = ("fixed_small", "fixed_large")
LOSS_REDUCTIONS = ("mean", "none", "sum")


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(
            f"schedule must be a NoiseSchedule (build one with NoiseSchedule.make(...)), got {type(schedule).__name__}"
        )


def _check_pair(names: tuple[str, str], a, b) -> None:
    for n, x in zip(names, (a, b)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{n} must be a floating tensor, got {got}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must share dtype and device, got {a.dtype} on {a.device} and "
            f"{b.dtype} on {b.device}; cast them to one compute dtype first"
        )


def _cast(c: Tensor, like: Tensor) -> Tensor:
    return c.to(device=like.device, dtype=like.dtype)


def draw_noise(like: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """z ~ N(0, I) shaped like ``like``: the given ``noise`` (checked), else drawn from ``generator``.

    Drawn on the generator's device (the CPU one by default) in float32 (float64 for float64 data),
    then cast and moved, so a seeded CPU generator gives the same z on every device and dtype.
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both (noise is used as given; generator draws it)")
    if noise is not None:
        _check_pair(("noise", "x"), noise, like)
        return noise
    device = generator.device if generator is not None else like.device
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    z = torch.randn(like.shape, generator=generator, device=device, dtype=dtype)
    return z.to(device=like.device, dtype=like.dtype)


def q_sample(x0: Tensor, t, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """RAPHAEL Sec. 2, forward noising (erratum: roots swapped in print; DDPM Eq. 4):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    _check_schedule(schedule)
    _check_pair(("x0", "noise"), x0, noise)
    signal = _cast(gather_float64(schedule.sqrt_alphas_cumprod, t, x0), x0)  # (B, 1, ...)
    sigma = _cast(gather_float64(schedule.sqrt_one_minus_alphas_cumprod, t, x0), x0)  # (B, 1, ...)
    return signal * x0 + sigma * noise  # (B, ...)


def _check_positive(coef: Tensor, name: str, what: str) -> None:
    """Zero-terminal-SNR schedules have abar_{T-1} = alpha_{T-1} = 0: eps prediction cannot invert there."""
    if bool((coef <= 0).any()):
        raise ValueError(
            f"{name} = 0 at a requested timestep (a zero-terminal-SNR schedule at t = T-1): cannot {what}, "
            f"the eps-parameterised step divides by sqrt({name}). Start sampling at t <= T-2 (e.g. DDIM "
            f"'leading' spacing) or use a schedule without zero_terminal_snr (spec/errata.md, E5)."
        )


def predict_x0_from_eps(x_t: Tensor, t, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """RAPHAEL Sec. 2, q_sample solved for x_0 (DDPM Eq. 15, DDIM Eq. 12 "predicted x_0"):
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    _check_schedule(schedule)
    _check_pair(("x_t", "eps"), x_t, eps)
    abar = gather_float64(schedule.alphas_cumprod, t, x_t)  # (B, 1, ...) float64
    _check_positive(abar, "abar_t", "predict x_0 from eps")
    c_x = _cast(abar.rsqrt(), x_t)  # 1 / sqrt(abar_t)
    c_eps = _cast(((1.0 - abar) / abar).sqrt(), x_t)  # sqrt(1 - abar_t) / sqrt(abar_t)
    return c_x * x_t - c_eps * eps  # (B, ...)


def v_target(x0: Tensor, t, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The velocity of Salimans & Ho (2022, Progressive Distillation, Sec. 4), not in RAPHAEL (erratum E88):
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, what a U-Net with ``model.prediction = "v"`` outputs."""
    _check_schedule(schedule)
    _check_pair(("x0", "eps"), x0, eps)
    c_eps = _cast(gather_float64(schedule.sqrt_alphas_cumprod, t, x0), x0)  # sqrt(abar_t)
    c_x0 = _cast(gather_float64(schedule.sqrt_one_minus_alphas_cumprod, t, x0), x0)  # sqrt(1 - abar_t)
    return c_eps * eps - c_x0 * x0  # (B, ...)


def eps_from_v(x_t: Tensor, t, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The noise a v prediction implies (erratum E88): eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.

    With x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (``q_sample``) and v = ``v_target(x_0, t, eps)`` it returns
    eps exactly (abar_t + (1 - abar_t) = 1). Unlike ``predict_x0_from_eps`` it divides by nothing, so it holds at
    abar_t = 0 (a zero-terminal-SNR schedule's last step: eps = x_t).
    """
    _check_schedule(schedule)
    _check_pair(("x_t", "v"), x_t, v)
    c_v = _cast(gather_float64(schedule.sqrt_alphas_cumprod, t, x_t), x_t)  # sqrt(abar_t)
    c_x = _cast(gather_float64(schedule.sqrt_one_minus_alphas_cumprod, t, x_t), x_t)  # sqrt(1 - abar_t)
    return c_v * v + c_x * x_t  # (B, ...)


def eps_from_v_literal(x_t: Tensor, t: int, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Reference form of :func:`eps_from_v` for one integer t, written as printed (float64 scalars from abar_t)."""
    abar = float(schedule.alphas_cumprod[t])
    return abar ** 0.5 * v + (1.0 - abar) ** 0.5 * x_t


def loss_eps(eps_pred: Tensor, eps: Tensor, reduction: str = "mean") -> Tensor:
    """RAPHAEL Sec. 2, L_denoise = E_{t, x0, eps} ||eps - D_theta(x_t, t)||_2^2.

    The expectation is estimated by the mean over the batch, and the squared norm is replaced by
    the mean over elements (a constant factor: the usual "simple" loss of DDPM/LDM).
    ``reduction``: ``"mean"`` (scalar; mean over all elements), ``"none"`` ((B,), mean over the
    non-batch dims of each sample), ``"sum"`` (scalar; the literal sum of squares over everything).
    Computed in float32 for bf16/fp16 inputs (returned in float32), else in the input dtype.
    """
    _check_pair(("eps_pred", "eps"), eps_pred, eps)
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(LOSS_REDUCTIONS)}, got {reduction!r}")
    if eps.dim() < 1:
        raise ValueError("eps must have a batch dimension (B, ...), got a 0-d tensor")
    acc = torch.promote_types(eps.dtype, torch.float32)
    sq = (eps.to(acc) - eps_pred.to(acc)) ** 2  # (B, ...)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq.reshape(sq.shape[0], -1).mean(dim=1)  # (B,)


def q_posterior_mean_variance(x0: Tensor, x_t: Tensor, t, schedule: NoiseSchedule) -> tuple[Tensor, Tensor, Tensor]:
    """RAPHAEL Sec. 2, the posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM Eqs. 6-7).

    mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    Returns ``(mean (B, ...), variance (B, 1, ...), log_variance_clipped (B, 1, ...))``.
    """
    _check_schedule(schedule)
    _check_pair(("x0", "x_t"), x0, x_t)
    c0 = _cast(gather_float64(schedule.posterior_mean_coef1, t, x_t), x_t)  # (B, 1, ...)
    ct = _cast(gather_float64(schedule.posterior_mean_coef2, t, x_t), x_t)  # (B, 1, ...)
    mean = c0 * x0 + ct * x_t  # (B, ...)
    var = _cast(gather_float64(schedule.posterior_variance, t, x_t), x_t)  # (B, 1, ...)
    log_var = _cast(gather_float64(schedule.posterior_log_variance_clipped, t, x_t), x_t)  # (B, 1, ...)
    return mean, var, log_var


def p_mean_from_eps(x_t: Tensor, t, eps_pred: Tensor, schedule: NoiseSchedule) -> Tensor:
    """RAPHAEL Sec. 2, posterior mean (erratum: sqrt(1 - abar_t), not sqrt(1 - alpha_t); DDPM Eq. 11):
    mu_theta = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) D_theta(x_t, t))."""
    _check_schedule(schedule)
    _check_pair(("x_t", "eps_pred"), x_t, eps_pred)
    alpha = gather_float64(schedule.alphas, t, x_t)  # (B, 1, ...) float64
    _check_positive(alpha, "alpha_t", "take the eps-form posterior step")
    sqrt_1m_abar = gather_float64(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)  # (B, 1, ...)
    c_out = _cast(1.0 / alpha.sqrt(), x_t)  # 1 / sqrt(alpha_t)
    c_eps = _cast((1.0 - alpha) / sqrt_1m_abar, x_t)  # (1 - alpha_t) / sqrt(1 - abar_t)
    return c_out * (x_t - c_eps * eps_pred)  # (B, ...)


def p_mean_from_eps_via_x0(x_t: Tensor, t, eps_pred: Tensor, schedule: NoiseSchedule) -> Tensor:
    """RAPHAEL Sec. 2, the same posterior mean computed as mu~_t(x0_hat(x_t, eps), x_t)
    (improved-diffusion form); equals :func:`p_mean_from_eps` (tested)."""
    x0_hat = predict_x0_from_eps(x_t, t, eps_pred, schedule)  # (B, ...)
    mean, _, _ = q_posterior_mean_variance(x0_hat, x_t, t, schedule)
    return mean


def posterior_std(t, schedule: NoiseSchedule, like: Tensor, variance: str = "fixed_small") -> Tensor:
    """RAPHAEL Sec. 2, sigma_t, "the standard deviation of the newly injected noise" (value not
    printed; decision in the errata): sigma_t^2 = beta~_t (``"fixed_small"``, the true posterior
    variance) or beta_t (``"fixed_large"``), both DDPM Sec. 3.2; sigma_t = 0 at t = 0 (the last
    step adds no noise). Float64, shaped (B or 1, 1, ...) against ``like``."""
    _check_schedule(schedule)
    if variance not in VARIANCE_KINDS:
        raise ValueError(f"variance must be one of {list(VARIANCE_KINDS)}, got {variance!r}")
    table = schedule.posterior_variance if variance == "fixed_small" else schedule.betas
    var = gather_float64(table, t, like)  # (B, 1, ...)
    not_last = gather_float64((torch.arange(schedule.T) > 0).to(torch.float64), t, like)  # (B, 1, ...)
    return var.sqrt() * not_last


def posterior_step(x_t: Tensor, t, eps_pred: Tensor, schedule: NoiseSchedule, *, variance: str = "fixed_small",
                   noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """RAPHAEL Sec. 2, one reverse step x_t -> x_{t-1} (erratum: DDPM Algorithm 2's denominator):
    x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) D_theta(x_t, t)) + sigma_t z.

    ``t`` is 0-based (one int or (B,)); at t = 0 no noise is added. ``z`` is ``noise`` if given,
    else drawn from ``generator`` (drawn only when some t > 0).
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both (noise is used as given; generator draws it)")
    mean = p_mean_from_eps(x_t, t, eps_pred, schedule)  # (B, ...)
    sigma = posterior_std(t, schedule, x_t, variance)  # (B, 1, ...) float64
    if noise is None and not bool((sigma > 0).any()):
        return mean  # every sample is at t = 0: nothing to inject, nothing drawn
    z = draw_noise(x_t, noise, generator)  # (B, ...)
    return mean + _cast(sigma, x_t) * z  # (B, ...)
