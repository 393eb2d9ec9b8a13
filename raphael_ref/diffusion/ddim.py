"""DDIM sampling (Song et al. 2021), the sampler RAPHAEL reports its step counts in (Sec. 4.2,
Fig. 6c; App. 7.3, Fig. 9).

Timesteps are 0-based, ``t in [0, T-1]``. A ``t_prev < 0`` stands for "before the first
step": abar_{t_prev} = 1 there by default (``set_alpha_to_one=True``, DDIM's alpha_0 = 1 and
diffusers' default), so the last DDIM step returns the predicted x_0 itself when eta = 0;
``set_alpha_to_one=False`` uses abar_0 instead, as Stable Diffusion's scheduler config
(spec/errata.md, E65). Each step goes to the next timestep of the sub-sequence (DDIM's
definition, ``prev_timestep="next"``); diffusers steps to ``t - T // n`` instead, which differs
for "linspace" and for "trailing" when n does not divide T (``prev_timestep="stride"``; E62).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from raphael_ref.diffusion.ddpm import _cast, _check_pair, _check_schedule, draw_noise, predict_x0_from_eps
from raphael_ref.diffusion.schedule import NoiseSchedule, check_timesteps

__all__ = ["SPACINGS", "DEFAULT_SPACING", "PREV_TIMESTEP_RULES", "ddim_timesteps", "ddim_prev_timesteps",
           "ddim_sigma", "ddim_step"]

SPACINGS = ("leading", "trailing", "linspace")
DEFAULT_SPACING = "leading"  # with steps_offset = 1, as Stable Diffusion's scheduler config (errata)
# "next": DDIM's definition (the next timestep of the sub-sequence); "stride": diffusers' t - T // n (E62)
PREV_TIMESTEP_RULES = ("next", "stride")


def _round_half_even_div(num: Tensor, den: int) -> Tensor:
    """round(num / den) with ties to even, exactly, on non-negative long tensors (numpy's rounding
    rule without its floating-point error)."""
    q, r = torch.div(num, den, rounding_mode="floor"), torch.remainder(num, den)  # num = q den + r
    up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    return q + up.long()


def ddim_timesteps(num_inference_steps: int, T: int = 1000, spacing: str = DEFAULT_SPACING,
                   steps_offset: int | None = None) -> Tensor:
    """RAPHAEL Sec. 4.2 ("DDIM [33] steps"), the DDIM timestep sub-sequence: n descending 0-based
    timesteps, a long tensor of shape (n,).

    With n = ``num_inference_steps`` and i = 0..n-1 (definitions of Lin et al. 2024, Table 2, and
    diffusers' ``DDIMScheduler.set_timesteps``):
      ``"leading"``  t_i = (n-1-i) * (T // n) + steps_offset        (ends at steps_offset)
      ``"trailing"`` t_i = round(T (n-i) / n) - 1                     (starts at T-1)
      ``"linspace"`` t_i = round((n-1-i) (T-1) / (n-1))              (0 and T-1 included; n = 1 gives [0])
    ``round`` is round-half-to-even in exact integer arithmetic: where the rational value is an
    exact .5 tie diffusers' float64 rounding can land on the other side, and for some n diffusers'
    ``"trailing"`` returns n+1 steps; we return n (errata: DDIM spacing).
    ``steps_offset`` (None: 1 for "leading" as Stable Diffusion, 0 otherwise) only applies to
    "leading"; diffusers ignores it for the other spacings, we reject a non-zero one.
    """
    for name, v, lo in (("num_inference_steps", num_inference_steps, 1), ("T", T, 1)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    n, T = int(num_inference_steps), int(T)
    if n > T:
        raise ValueError(f"num_inference_steps must be <= T = {T} (one model call per distinct timestep), got {n}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown DDIM timestep spacing {spacing!r}; known: {list(SPACINGS)}")
    if steps_offset is None:
        steps_offset = 1 if spacing == "leading" else 0
    if not isinstance(steps_offset, numbers.Integral) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
    if spacing != "leading" and steps_offset != 0:
        raise ValueError(
            f"steps_offset applies to the 'leading' spacing only (diffusers ignores it for {spacing!r}); "
            f"got steps_offset={steps_offset}: pass 0 or None"
        )
    k = torch.arange(n - 1, -1, -1, dtype=torch.long)  # (n,) k = n-1-i, descending
    if spacing == "leading":
        ts = k * (T // n) + steps_offset  # (n,)
        if int(ts[0]) > T - 1:
            raise ValueError(
                f"'leading' spacing with n={n}, steps_offset={steps_offset} reaches t={int(ts[0])} > T-1 = {T - 1}; "
                "lower steps_offset or num_inference_steps"
            )
    elif spacing == "trailing":
        ts = _round_half_even_div(T * (k + 1), n) - 1  # (n,) T (n-i)/n - 1
    else:
        ts = _round_half_even_div(k * (T - 1), n - 1) if n > 1 else torch.zeros(1, dtype=torch.long)  # (n,)
    return ts


def ddim_prev_timesteps(timesteps: Tensor, T: int, rule: str = "next") -> Tensor:
    """RAPHAEL Sec. 4.2 ("DDIM [33] steps"): the timestep each DDIM step goes to, (n,) long, for the
    descending sub-sequence ``timesteps`` of :func:`ddim_timesteps` (spec/errata.md, E62).

    ``"next"`` (default; DDIM, Song et al. 2021, Sec. 4.2: the sampler runs along the sub-sequence
    tau): t_prev_i = timesteps[i+1], and -1 ("before the first step") after the last one.
    ``"stride"`` (diffusers' ``DDIMScheduler.step``): t_prev_i = timesteps[i] - T // n, negative
    (i.e. "before the first step") where it falls below 0. The rules agree for "leading" when
    T // n > steps_offset and for "trailing" when n divides T; they differ for "linspace" and for
    "trailing" otherwise, where the two samplers end 0.4 to 3.1 apart (max abs, O(1) samples) on the
    trajectories of ``tests/test_diffusers_oracle.py`` (10..100 steps).
    """
    if not isinstance(timesteps, Tensor) or timesteps.dim() != 1 or timesteps.dtype != torch.long or len(timesteps) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D long tensor (ddim_timesteps' output), got {timesteps!r}")
    if rule not in PREV_TIMESTEP_RULES:
        raise ValueError(f"unknown DDIM prev_timestep rule {rule!r}; known: {list(PREV_TIMESTEP_RULES)} "
                         "('next': DDIM's definition, 'stride': diffusers' t - T // n)")
    if len(timesteps) > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {timesteps.tolist()}")
    if rule == "next":
        return torch.cat([timesteps[1:], torch.full((1,), -1, dtype=torch.long)])  # (n,)
    prev = timesteps - int(T) // len(timesteps)  # (n,)
    return prev.clamp(min=-1)  # any negative value means "before the first step"


def _check_set_alpha_to_one(set_alpha_to_one) -> None:
    if not isinstance(set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be True (abar = 1 before the first step, DDIM) or False "
                         f"(abar_0, Stable Diffusion's scheduler config), got {set_alpha_to_one!r}")


def _abar_prev(schedule: NoiseSchedule, t_prev, like: Tensor, set_alpha_to_one: bool = True) -> Tensor:
    """abar_{t_prev} in float64 shaped (B or 1, 1, ...); where t_prev < 0: 1 if ``set_alpha_to_one``, else abar_0."""
    _check_set_alpha_to_one(set_alpha_to_one)
    tp = check_timesteps(t_prev, schedule.T, like, name="t_prev", allow_negative=True)  # () or (B,)
    final = torch.ones((), dtype=torch.float64) if set_alpha_to_one else schedule.alphas_cumprod[0]
    abar = torch.where(tp >= 0, schedule.alphas_cumprod[tp.clamp(min=0)], final)
    return abar.reshape(-1, *([1] * max(like.dim() - 1, 0)))


def ddim_sigma(t, t_prev, schedule: NoiseSchedule, like: Tensor, eta: float = 0.0, *,
               set_alpha_to_one: bool = True) -> Tensor:
    """RAPHAEL Sec. 4.2 (DDIM [33] sampler), DDIM Eq. 16:
    sigma_t(eta) = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).

    eta = 1 with t_prev = t - 1 gives the DDPM posterior std sqrt(beta~_t). Float64 (B or 1, 1, ...).
    ``set_alpha_to_one``: abar_prev where t_prev < 0 (:func:`ddim_step`).
    """
    _check_schedule(schedule)
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not (0.0 <= float(eta) <= 1.0):
        raise ValueError(f"eta must be a float in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    tt = check_timesteps(t, schedule.T, like)
    tp = check_timesteps(t_prev, schedule.T, like, name="t_prev", allow_negative=True)
    if not bool((tp < tt).all()):
        raise ValueError(f"t_prev must be smaller than t (sampling goes from noise to data), got t={t!r}, t_prev={t_prev!r}")
    abar_t = schedule.alphas_cumprod[tt].reshape(-1, *([1] * max(like.dim() - 1, 0)))  # (B, 1, ...)
    abar_prev = _abar_prev(schedule, t_prev, like, set_alpha_to_one)  # (B, 1, ...)
    return float(eta) * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()


def ddim_step(x_t: Tensor, t, t_prev, eps_pred: Tensor, schedule: NoiseSchedule, *, eta: float = 0.0,
              noise: Tensor | None = None, generator: torch.Generator | None = None,
              clip_x0: float | None = None, set_alpha_to_one: bool = True) -> Tensor:
    """RAPHAEL Sec. 4.2 (DDIM [33] sampler), DDIM Eq. 12 (Song et al. 2021), one step t -> t_prev:
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_pred + sigma_t z,
    x0_hat = (x_t - sqrt(1 - abar_t) eps_pred) / sqrt(abar_t), sigma_t = :func:`ddim_sigma`.

    ``t_prev < 0`` means "before the first step": abar_prev = 1 with ``set_alpha_to_one=True``
    (default: DDIM's alpha_0 = 1, diffusers' default), abar_0 with ``False`` (Stable Diffusion's
    scheduler config; spec/errata.md, E65). ``clip_x0`` (default None: no clipping) clamps x0_hat to
    [-clip_x0, clip_x0]; eps_pred is used unchanged in the direction term. ``z`` is ``noise`` if
    given, else drawn from ``generator``; nothing is drawn where sigma_t = 0 everywhere (eta = 0).
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both (noise is used as given; generator draws it)")
    _check_pair(("x_t", "eps_pred"), x_t, eps_pred)
    if clip_x0 is not None and (not isinstance(clip_x0, numbers.Real) or isinstance(clip_x0, bool) or not clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive float (e.g. 1.0 for data in [-1, 1]), got {clip_x0!r}")
    sigma = ddim_sigma(t, t_prev, schedule, x_t, eta, set_alpha_to_one=set_alpha_to_one)  # (B, 1, ...) float64
    abar_prev = _abar_prev(schedule, t_prev, x_t, set_alpha_to_one)  # (B, 1, ...) float64
    x0_hat = predict_x0_from_eps(x_t, t, eps_pred, schedule)  # (B, ...)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-float(clip_x0), float(clip_x0))
    c_x0 = _cast(abar_prev.sqrt(), x_t)  # sqrt(abar_prev)
    c_dir = _cast((1 - abar_prev - sigma**2).clamp(min=0).sqrt(), x_t)  # "direction pointing to x_t"
    x_prev = c_x0 * x0_hat + c_dir * eps_pred  # (B, ...)
    if noise is None and not bool((sigma > 0).any()):
        return x_prev
    z = draw_noise(x_t, noise, generator)  # (B, ...)
    return x_prev + _cast(sigma, x_t) * z  # (B, ...)
