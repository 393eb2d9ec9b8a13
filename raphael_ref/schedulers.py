"""Samplers through diffusers' schedulers: DPM-Solver++ (2M), UniPC, Euler, Heun, DDIM and DDPM drive
:class:`~raphael_ref.models.RaphaelUNet` with the project's classifier-free guidance.

The project's own DDIM and DDPM (``sampling.sample``) stay the literal reference; this adapter adds the
solvers every peer offers without writing new ones. Each scheduler is built for the project's noise
schedule: :func:`install_schedule` hands it the float64 ``alphas_cumprod`` of :class:`NoiseSchedule`
(diffusers would otherwise rebuild the table in float32), so DDIM through the adapter is the project's
DDIM up to float rounding (tests/test_schedulers.py). One loop serves every scheduler (diffusers' own):

    x = init_noise_sigma * z,   z ~ N(0, I) drawn on the CPU from ``generator``
    for t in scheduler.timesteps:
        eps = cfg_combine(eps_u, eps_c, s)  of  model(scale_model_input(x, t), round(t), ...)
        x = scheduler.step(eps, t, x).prev_sample

``scale_model_input`` divides x by sqrt(sigma^2 + 1) for the sigma-space schedulers (Euler, Heun), which
turns their x = x_0 + sigma eps back into the model's x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps. The model
is trained on integer t: fractional scheduler timesteps (Karras sigmas, Euler with "linspace" spacing) are
rounded for the model call only. diffusers is an optional extra (``pip install "raphael_ref[samplers]"``),
imported on first use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from raphael_ref.diffusion import NoiseSchedule, cfg_combine
from raphael_ref.models import check_model_schedule
from raphael_ref.sampling import DiffusionPaths, _routes, prepare_paint

__all__ = ["SCHEDULERS", "DEFAULT_SPACINGS", "LITERAL_SAMPLERS", "require_diffusers", "make_scheduler",
           "install_schedule", "sample_with_scheduler", "adapter_step_literal"]

# sampler name -> (diffusers class, its settings for that sampler)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
# timestep spacing per sampler: DDIM/DDPM as the project's sampler ("leading", steps_offset 1, Stable
# Diffusion's config); the ODE solvers start at t = T - 1 on integer timesteps ("trailing", Lin et al. 2024)
DEFAULT_SPACINGS = {"ddim": "leading", "ddpm": "leading", "dpmpp_2m": "trailing", "unipc": "trailing",
                    "euler": "trailing", "heun": "trailing"}
EXTRA = "samplers"  # the pyproject extra that installs diffusers for this module


def require_diffusers():
    """The ``diffusers`` module; ImportError naming the extra to install when it is missing."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"the diffusers samplers ({', '.join(s for s in SCHEDULERS)} through diffusers' "
                          f"schedulers) need diffusers: pip install \"raphael_ref[{EXTRA}]\" (or use the "
                          f"project's own sampler='ddim' / 'ddpm')") from e
    return diffusers


def install_schedule(scheduler, schedule: NoiseSchedule, *, set_alpha_to_one: bool = True):
    """Give a diffusers ``scheduler`` the tables of ``schedule``: float64 betas, alphas, alphas_cumprod and
    the quantities diffusers derives from them at construction (alpha_t, sigma_t, lambda_t, sigmas,
    final_alpha_cumprod); ``set_timesteps`` derives the rest. Returns the scheduler.

    With a zero terminal SNR (abar_{T-1} = 0) the sigma-space schedulers get abar_{T-1} = 2**-24 instead,
    as diffusers' ``rescale_betas_zero_snr`` does (sigma_{T-1} would be infinite); DDIM and DDPM keep 0.
    """
    abar = schedule.alphas_cumprod.clone()  # (T,) float64
    if schedule.zero_terminal_snr and not hasattr(scheduler, "final_alpha_cumprod") and \
            type(scheduler).__name__ != "DDPMScheduler":
        abar[-1] = 2.0**-24
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = abar
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM: abar after the last step (E65)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else abar[0].clone()
    if hasattr(scheduler, "one"):
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "alpha_t"):  # DPM-Solver, UniPC
        scheduler.alpha_t, scheduler.sigma_t = abar.sqrt(), (1 - abar).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def make_scheduler(name: str, schedule: NoiseSchedule, *, spacing: str | None = None,
                   set_alpha_to_one: bool = True, **settings: Any):
    """The diffusers scheduler of sampler ``name`` (a key of :data:`SCHEDULERS`) for the project's
    ``schedule``: epsilon prediction, ``spacing`` (None: :data:`DEFAULT_SPACINGS`), steps_offset 1 for
    "leading" (0 otherwise, and for DDPM, whose T steps then run T - 1 .. 0 as the project's DDPM), no
    clipping of x0_hat, and the last step to abar = 1 (``set_alpha_to_one``; ``final_sigmas_type`` "zero"
    of the multistep solvers) or to abar_0 (False; "sigma_min"). ``settings`` override the
    scheduler's own (e.g. ``use_karras_sigmas=True``, ``solver_order=3``)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SCHEDULERS)}")
    if not isinstance(set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be a bool, got {set_alpha_to_one!r}")
    diffusers = require_diffusers()
    cls_name, own = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    spacing = DEFAULT_SPACINGS[name] if spacing is None else spacing
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: ['leading', 'trailing', 'linspace']")
    accepted = set(inspect.signature(cls.__init__).parameters)
    kw: dict[str, Any] = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(),
                              prediction_type="epsilon", timestep_spacing=spacing,
                              steps_offset=1 if spacing == "leading" and name != "ddpm" else 0, **own)
    if "set_alpha_to_one" in accepted:
        kw["set_alpha_to_one"] = set_alpha_to_one
    if "clip_sample" in accepted:  # DDIM/DDPM clip x0_hat to [-1, 1] by default; the project's samplers do not
        kw["clip_sample"] = False
    if "final_sigmas_type" in accepted:
        kw["final_sigmas_type"] = "zero" if set_alpha_to_one else "sigma_min"
    kw.update(settings)
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ValueError(f"{cls_name} takes no setting(s) {unknown}")
    return install_schedule(cls(**kw), schedule, set_alpha_to_one=set_alpha_to_one)


def _step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict[str, Any]:
    """Keyword arguments of ``scheduler.step`` for eta (DDIM only) and the noise generator (stochastic ones)."""
    accepted = inspect.signature(scheduler.step).parameters
    if eta and "eta" not in accepted:
        raise ValueError(f"eta applies to DDIM only; {type(scheduler).__name__} takes no eta (pass eta=0)")
    kw: dict[str, Any] = {"eta": float(eta)} if "eta" in accepted else {}
    if "generator" in accepted:
        kw["generator"] = generator
    return kw


@torch.no_grad()
def sample_with_scheduler(model, schedule: NoiseSchedule, cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                          uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, *,
                          shape: tuple[int, ...], scheduler: Any = "dpmpp_2m", steps: int | None = 20,
                          guidance: float = 4.5, eta: float = 0.0, spacing: str | None = None,
                          set_alpha_to_one: bool = True, generator: torch.Generator | None = None,
                          collect_paths: bool = False, collect_masks: bool | Sequence[int] = False,
                          progress: Callable | None = None, paint=None) -> tuple[torch.Tensor, DiffusionPaths | None]:
    """Draw ``shape = (B, C, H, W)`` samples with a diffusers scheduler: the arguments and the return
    value ``(x_0, paths or None)`` of :func:`raphael_ref.sampling.sample`.

    ``scheduler``: a sampler name (:func:`make_scheduler` builds it for ``schedule`` with ``spacing`` and
    ``set_alpha_to_one``) or a diffusers scheduler object, used as configured. ``steps``: inference steps
    (None: 50, or all T for "ddpm"); Heun calls the model twice per step but the last, so the paths then
    hold one entry per model call. ``eta``: DDIM's (other schedulers reject a non-zero one). Noise is drawn
    on the CPU from ``generator``; the model runs in eval mode and its mode is restored afterwards.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {shape}")
    check_model_schedule(model, schedule, "sample_with_scheduler")  # a "v" U-Net's v -> eps schedule (E88)
    if isinstance(scheduler, str):
        name = scheduler
        scheduler = make_scheduler(name, schedule, spacing=spacing, set_alpha_to_one=set_alpha_to_one)
        if steps is None:
            steps = schedule.T if name == "ddpm" else 50
    elif spacing is not None:
        raise ValueError("spacing applies when the scheduler is given by name; configure a scheduler object yourself")
    if steps is None:
        steps = 50
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an int in [1, T = {schedule.T}], got {steps!r}")
    if scheduler.config.num_train_timesteps != schedule.T:
        raise ValueError(f"the scheduler has num_train_timesteps={scheduler.config.num_train_timesteps}, "
                         f"the schedule T = {schedule.T}")
    B = shape[0]
    device = next(model.parameters()).device
    hidden, valid, pooled = (c.to(device) for c in cond)
    if hidden.shape[0] != B:
        raise ValueError(f"cond has batch {hidden.shape[0]} but shape asks for {B} samples")
    cond2 = None
    if uncond is not None and guidance != 1.0:
        u = tuple(c.to(device) for c in uncond)
        if u[0].shape[0] == 1:
            u = (u[0].expand(B, -1, -1), u[1].expand(B, -1), u[2].expand(B))
        cond2 = tuple(torch.cat(p) for p in zip((hidden, valid, pooled), u))
    scheduler.set_timesteps(steps, device=device)
    ts = scheduler.timesteps
    if float(ts.max()) > schedule.T - 1 or float(ts.min()) < 0:
        raise ValueError(f"{type(scheduler).__name__} with {steps} steps asks for timesteps in "
                         f"[{float(ts.min())}, {float(ts.max())}], outside [0, T - 1 = {schedule.T - 1}]: "
                         f"use fewer steps or another spacing")
    n_calls = len(ts)
    if isinstance(collect_masks, bool):
        mask_steps = list(range(n_calls)) if collect_masks else []
    else:
        mask_steps = sorted({int(i) for i in collect_masks})
        if any(not 0 <= i < n_calls for i in mask_steps):
            raise ValueError(f"collect_masks: step indices must lie in [0, {n_calls}) for {n_calls} model calls; "
                             f"got {list(collect_masks)}")
    step_kw = _step_kwargs(scheduler, eta, generator)
    was_training = model.training
    model.eval()
    try:
        return _loop(model, scheduler, shape, (hidden, valid, pooled), cond2, guidance, generator, step_kw,
                     collect_paths, mask_steps, progress, prepare_paint(paint, schedule, B, cond2 is not None))
    finally:
        model.train(was_training)


def _loop(model, scheduler, shape, cond, cond2, guidance, generator, step_kw, collect_paths, mask_steps, progress,
          paint=None):
    paint = {} if paint is None else paint
    B = shape[0]
    device = next(model.parameters()).device
    hidden, valid, pooled = cond
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma  # (B, C, H, W)
    keep = set(mask_steps)
    model_ts, s_all, t_all, m_all = [], [], [], []
    iterator = range(len(scheduler.timesteps))
    if progress is not None:
        iterator = progress(iterator)
    for i in iterator:
        t = scheduler.timesteps[i]
        t_model = int(torch.round(t.float()).item()) if t.is_floating_point() else int(t)
        tb = torch.full((B,), t_model, dtype=torch.long, device=device)
        x_in = scheduler.scale_model_input(x, t)  # Euler/Heun: x / sqrt(sigma^2 + 1); others: x
        with_masks = i in keep
        if cond2 is not None:
            eps2, aux = model(torch.cat([x_in, x_in]), torch.cat([tb, tb]), *cond2, return_masks=with_masks, **paint)
            eps_c, eps_u = eps2.chunk(2)
            eps = cfg_combine(eps_u, eps_c, guidance)
        else:
            eps, aux = model(x_in, tb, hidden, valid, pooled, return_masks=with_masks, **paint)
        if collect_paths:
            s, tt = _routes(aux, 2 * B if cond2 is not None else B, hidden.shape[1])
            s_all.append(s[:, :B])
            t_all.append(tt[:, :B])
            if with_masks:
                m_all.append([a.masks[:B].cpu() for a in aux])
        model_ts.append(t_model)
        x = scheduler.step(eps.to(x.dtype), t, x, **step_kw).prev_sample
    paths = None
    if collect_paths:
        paths = DiffusionPaths(torch.tensor(model_ts, dtype=torch.long), torch.stack(s_all), torch.stack(t_all),
                               valid.cpu(), m_all if mask_steps else None, mask_steps if mask_steps else None)
    return x, paths


# ---------------------------------------------------------------------------------------------
# literal form (spec sched.diffusers_adapter)

LITERAL_SAMPLERS = ("ddim", "euler", "dpmpp_2m")


def adapter_step_literal(name: str, x: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                         guidance: float | torch.Tensor, abar_t, abar_next, *, abar_prev=None,
                         x0_prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Not in RAPHAEL (its Sec. 4.2 samples with DDIM): one step of the diffusers-scheduler adapter, literal form
    (spec ``sched.diffusers_adapter``), for ``name`` in :data:`LITERAL_SAMPLERS` (DDIM with eta 0, Euler,
    DPM-Solver++ (2M)).

    x: the scheduler's state at timestep t, (B, C, H, W): x_t for "ddim" / "dpmpp_2m", x_t / sqrt(abar_t) for
    the sigma-space "euler". eps_cond / eps_uncond: the U-Net's epsilon on the two halves of the CFG batch, run
    on ``x_model`` at round(t). abar_t, abar_next: abar at t and at the timestep the step goes to (1 after the
    last step with ``set_alpha_to_one``; abar_0 without it). abar_prev, x0_prev: DPM-Solver++'s previous
    timestep and x0 estimate (None: the first-order step, which diffusers takes first and, to a final abar of
    1, last). With sigma(a) = sqrt((1 - a) / a), alpha = sqrt(a), s = sqrt(1 - a), lambda = log(alpha / s):

        x_model = sqrt(abar_t) x  (euler: x / sqrt(sigma_t^2 + 1))   else x
        eps     = eps_u + w (eps_c - eps_u)                             (cfg.combine)
        ddim:     x0 = (x - s_t eps) / alpha_t,   x_next = alpha_next x0 + s_next eps
        euler:    x0 = x - sigma_t eps,           x_next = x + (sigma_next - sigma_t) eps
        dpmpp_2m: x0 = (x - s_t eps) / alpha_t,   h = lambda_next - lambda_t,
                  x_next = (s_next / s_t) x - alpha_next (e^{-h} - 1) (x0 + D / 2),
                  D = 0 (first order) or (x0 - x0_prev) h / (lambda_t - lambda_prev)

    Coefficients in float64 from the abar values, cast to x's dtype at use. Returns
    ``{"x_model", "eps", "x0", "x_next"}``.
    """
    if name not in LITERAL_SAMPLERS:
        raise ValueError(f"adapter_step_literal covers {list(LITERAL_SAMPLERS)}; got {name!r}")
    if not (x.shape == eps_cond.shape == eps_uncond.shape):
        raise ValueError(f"x, eps_cond and eps_uncond must have one shape; got {tuple(x.shape)}, "
                         f"{tuple(eps_cond.shape)}, {tuple(eps_uncond.shape)}")
    f64 = dict(dtype=torch.float64)
    a_t, a_n = torch.as_tensor(abar_t, **f64).cpu(), torch.as_tensor(abar_next, **f64).cpu()
    if a_t.dim() or a_n.dim() or not (0 < float(a_t) < 1) or not (0 < float(a_n) <= 1):
        raise ValueError(f"abar_t must be a scalar in (0, 1) and abar_next one in (0, 1]; got {a_t}, {a_n}")
    if (abar_prev is None) != (x0_prev is None):
        raise ValueError("abar_prev and x0_prev go together (DPM-Solver++'s second-order step) or not at all")
    if x0_prev is not None and (name != "dpmpp_2m" or float(a_n) == 1.0):
        raise ValueError("a second-order step (x0_prev) exists for dpmpp_2m only, and not to abar_next = 1 "
                         "(the last step to the data is first order, as diffusers takes it)")

    def c(v: torch.Tensor) -> torch.Tensor:  # a float64 coefficient at use
        return v.to(dtype=x.dtype, device=x.device)

    eps = cfg_combine(eps_uncond, eps_cond, guidance)  # (B, C, H, W)
    alpha_t, s_t, alpha_n, s_n = a_t.sqrt(), (1 - a_t).sqrt(), a_n.sqrt(), (1 - a_n).sqrt()
    if name == "euler":
        sigma_t, sigma_n = s_t / alpha_t, s_n / alpha_n
        x_model = x * c(alpha_t)  # x / sqrt(sigma_t^2 + 1)
        x0 = x - c(sigma_t) * eps
        x_next = x + c(sigma_n - sigma_t) * eps
    else:
        x_model = x
        x0 = (x - c(s_t) * eps) / c(alpha_t)
        if name == "ddim":
            x_next = c(alpha_n) * x0 + c(s_n) * eps
        else:
            exp_mh = (s_n * alpha_t) / (alpha_n * s_t)  # e^{-h}, 0 when abar_next = 1
            first = c(s_n / s_t) * x - c(alpha_n * (exp_mh - 1)) * x0
            if x0_prev is None:
                x_next = first
            else:
                a_p = torch.as_tensor(abar_prev, **f64).cpu()
                lam = lambda a: torch.log(a.sqrt() / (1 - a).sqrt())  # noqa: E731
                r = (lam(a_t) - lam(a_p)) / (lam(a_n) - lam(a_t))  # h_prev / h
                x_next = first - c(0.5 * alpha_n * (exp_mh - 1) / r) * (x0 - x0_prev)
    return {"x_model": x_model, "eps": eps, "x0": x0, "x_next": x_next}
