"""Sampling with classifier-free guidance, and collection of diffusion paths (Sec. 3.1, Fig. 4/9).

``sample(...)`` runs DDIM (``ddim.ddim_step``) or ancestral DDPM (``ddpm.posterior_step``) from
pure noise, combining conditional and unconditional predictions with ``guidance.cfg_combine``.
With ``collect_paths=True`` it also returns, per step and per transformer block, the space
expert chosen for every text token and the time expert chosen for every sample (of the
conditional branch): the diffusion paths the paper analyses. ``collect_masks`` adds the space-MoE
masks of every block, at every step (``True``) or at chosen step indices only: masks are
(B, n_x, n_y) per block and step, which for a big model at 50 steps is gigabytes, so keep few.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from raphael_ref.diffusion import NoiseSchedule, cfg_combine, ddim_step, ddim_timesteps, posterior_step
from raphael_ref.diffusion.ddim import ddim_prev_timesteps
from raphael_ref.models import RaphaelUNet, check_model_schedule


@dataclasses.dataclass
class DiffusionPaths:
    """Routes taken while sampling. Shapes: S steps, K blocks, B samples, n_y text tokens.

    timesteps:    (S,) long, the model timestep of each step (descending).
    space_routes: (S, K, B, n_y) long, -1 where the block has no space-MoE.
    time_routes:  (S, K, B) long, -1 where the block has no time-MoE.
    valid:        (B, n_y) bool, which text tokens are real (not padding).
    masks:        optional list over the kept steps of lists over blocks of (B, n_x, n_y) bool masks.
    mask_steps:   the sampler step indices of ``masks`` (ascending; all steps with ``collect_masks=True``).
    """

    timesteps: torch.Tensor
    space_routes: torch.Tensor
    time_routes: torch.Tensor
    valid: torch.Tensor
    masks: list | None = None
    mask_steps: list[int] | None = None

    def path_of_token(self, step: int, sample: int, token: int) -> list[int]:
        """The space experts token ``token`` of sample ``sample`` went through at ``step``, block by block."""
        return self.space_routes[step, :, sample, token].tolist()


def prepare_paint(paint, schedule: NoiseSchedule, B: int, use_cfg: bool) -> dict:
    """The model keyword for a paint spec: ``{}`` (None) or ``{"paint": spec}`` with the schedule's abar and,
    under CFG, nothing painted for the unconditional rows B..2B-1 (the batch is [cond, uncond])."""
    if paint is None:
        return {}
    from raphael_ref.paint import PaintWithWords

    if not isinstance(paint, PaintWithWords):
        raise ValueError(f"paint must be a raphael_ref.paint.PaintWithWords or None, got {type(paint).__name__}")
    if paint.batch_size != B:
        raise ValueError(f"paint has regions for {paint.batch_size} prompts, sampling draws {B}")
    paint = paint.with_schedule(schedule.alphas_cumprod)
    return {"paint": paint.padded(2 * B) if use_cfg else paint}


def _routes(aux, B, n_y):
    # the -1 fillers of blocks without a MoE are made on the device of the other blocks' routes (the model's):
    # torch.stack refuses to mix CPU and CUDA tensors; one copy to the CPU per stack
    def stacked(routes, shape):
        dev = next((r.device for r in routes if r is not None), torch.device("cpu"))
        return torch.stack([r if r is not None else torch.full(shape, -1, dtype=torch.long, device=dev)
                            for r in routes]).cpu()

    return stacked([a.space_routes for a in aux], (B, n_y)), stacked([a.time_routes for a in aux], (B,))


@torch.no_grad()
def sample(model: RaphaelUNet, schedule: NoiseSchedule, cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, *, shape: tuple[int, ...],
           steps: int | None = 50, guidance: float = 4.5, sampler: str = "ddim", eta: float = 0.0,
           spacing: str = "leading", generator: torch.Generator | None = None, collect_paths: bool = False,
           collect_masks: bool | Sequence[int] = False, progress: Callable | None = None, clip_x0: float | None = None,
           prev_timestep: str = "next", set_alpha_to_one: bool = True,
           paint=None, start_from: torch.Tensor | None = None, excite=None) -> tuple[torch.Tensor, DiffusionPaths | None]:
    """Draw ``shape = (B, C, H, W)`` samples. ``cond``/``uncond`` are ``(hidden, valid, pooled_index)``
    of the prompts and of the empty prompt (``uncond=None`` or ``guidance == 1``: no guidance).

    ``steps``: DDIM steps; DDPM always runs all T steps (``steps`` None or T). ``clip_x0``
    (DDIM only; e.g. 1.0 for pixel-space models with data in [-1, 1]) clamps the predicted x_0. Noise is drawn on
    the CPU from ``generator`` (so a seed gives the same samples on any device) and moved to the
    model's device. The model is run in eval mode (deterministic routes) and its previous mode is
    restored afterwards. ``collect_masks`` (with ``collect_paths``): ``True`` keeps the masks of every
    step, a sequence of sampler step indices (0 = the first, noisiest step) keeps only those.
    DDIM settings (ignored by DDPM): ``spacing`` (``ddim_timesteps``), ``prev_timestep`` ("next": DDIM's
    next timestep of the list, default; "stride": diffusers' t - T // n; ``ddim_prev_timesteps``, E62) and
    ``set_alpha_to_one`` (abar after the last step: 1, default, or abar_0 as Stable Diffusion; E65).
    ``paint`` (a ``raphael_ref.paint.PaintWithWords`` for the B prompts, E77) goes to the conditional branch
    only, with this schedule's abar for its sigma_t; the unconditional half of a CFG batch gets nothing painted.
    ``start_from`` (B, C, H, W) or None: the chain starts at q_sample(start_from, t_0) = sqrt(abar_{t_0})
    start_from + sqrt(1 - abar_{t_0}) noise (t_0 the first timestep, the same noise draw) instead of at pure noise;
    for a model trained with non-zero terminal SNR whose x_T still carries an estimate of the image (the SR stage's
    upsampled low-res image, raphael_ref/sr.py, E80). None: pure noise, as the paper samples.
    ``excite`` (a ``raphael_ref.excite.Excite`` for the B prompts, E84; not with ``paint``): Attend-and-Excite's
    latent update before each of the first ``excite.steps`` sampler steps, from the conditional branch's maps.
    Returns ``(x_0, paths or None)``.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if clip_x0 is not None and sampler != "ddim":
        raise ValueError("clip_x0 is supported with sampler='ddim' only")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {shape}")
    check_model_schedule(model, schedule, "sample")  # a "v" U-Net turns v into eps with this schedule (E88)
    B = shape[0]
    device = next(model.parameters()).device
    hidden, valid, pooled = (c.to(device) for c in cond)
    if hidden.shape[0] != B:
        raise ValueError(f"cond has batch {hidden.shape[0]} but shape asks for {B} samples")
    use_cfg = uncond is not None and guidance != 1.0
    if use_cfg:
        u_hidden, u_valid, u_pooled = (c.to(device) for c in uncond)
        if u_hidden.shape[0] == 1:
            u_hidden, u_valid, u_pooled = u_hidden.expand(B, -1, -1), u_valid.expand(B, -1), u_pooled.expand(B)
        hidden2, valid2, pooled2 = (torch.cat(p) for p in ((hidden, u_hidden), (valid, u_valid), (pooled, u_pooled)))
    T = schedule.T
    if sampler == "ddim":
        ts = ddim_timesteps(50 if steps is None else steps, T, spacing)
        t_prevs = ddim_prev_timesteps(ts, T, prev_timestep)  # (n,) validates the rule
        if not isinstance(set_alpha_to_one, bool):
            raise ValueError(f"set_alpha_to_one must be a bool (True: abar = 1 after the last DDIM step), got {set_alpha_to_one!r}")
    else:
        if steps not in (None, T):
            raise ValueError(f"DDPM sampling runs all T = {T} steps; got steps={steps}. Use sampler='ddim' for fewer.")
        ts = torch.arange(T - 1, -1, -1)
        t_prevs = ts - 1  # unused by DDPM
    if isinstance(collect_masks, bool):
        mask_steps = list(range(len(ts))) if collect_masks else []
    else:
        mask_steps = sorted({int(i) for i in collect_masks})
        if any(not 0 <= i < len(ts) for i in mask_steps):
            raise ValueError(f"collect_masks: step indices must lie in [0, {len(ts)}) for {len(ts)} sampler steps; "
                             f"got {list(collect_masks)}")
    if excite is not None:
        from raphael_ref.excite import Excite

        if not isinstance(excite, Excite):
            raise ValueError(f"excite must be a raphael_ref.excite.Excite or None, got {type(excite).__name__}")
        if paint is not None:
            raise ValueError("excite and paint cannot be combined (each steers the cross-attention; use one)")
        if len(excite.subjects) != B:
            raise ValueError(f"excite has subject lists for {len(excite.subjects)} samples, the batch has {B}")
    paint = prepare_paint(paint, schedule, B, use_cfg)
    was_training = model.training
    model.eval()
    try:
        return _sample_loop(model, schedule, ts, t_prevs, shape, set_alpha_to_one=set_alpha_to_one, cond=(hidden, valid, pooled),
                            cond2=(hidden2, valid2, pooled2) if use_cfg else None, guidance=guidance,
                            sampler=sampler, eta=eta, generator=generator, collect_paths=collect_paths,
                            mask_steps=mask_steps, progress=progress, clip_x0=clip_x0, paint=paint,
                            start_from=start_from, excite=excite)
    finally:
        model.train(was_training)


def _sample_loop(model, schedule, ts, t_prevs, shape, *, set_alpha_to_one, cond, cond2, guidance, sampler, eta, generator, collect_paths,
                 mask_steps, progress, clip_x0, paint=None, start_from=None, excite=None):
    B = shape[0]
    device = next(model.parameters()).device
    hidden, valid, pooled = cond
    use_cfg = cond2 is not None
    if use_cfg:
        hidden2, valid2, pooled2 = cond2
    x = torch.randn(shape, generator=generator).to(device)
    if start_from is not None:  # q_sample(start_from, t_0) with this noise (E80)
        if tuple(start_from.shape) != tuple(shape) or not bool(torch.isfinite(start_from).all()):
            raise ValueError(f"start_from must be a finite tensor of the sample shape {tuple(shape)}, got "
                             f"{tuple(start_from.shape)}")
        a0 = float(schedule.alphas_cumprod[int(ts[0])])
        x = math.sqrt(a0) * start_from.to(device=device, dtype=x.dtype) + math.sqrt(1.0 - a0) * x
    n_y = hidden.shape[1]
    s_all, t_all, m_all = [], [], []
    keep_masks = set(mask_steps)
    iterator = range(len(ts))
    if progress is not None:
        iterator = progress(iterator)
    for i in iterator:
        t = int(ts[i])
        tb = torch.full((B,), t, dtype=torch.long, device=device)
        collect_masks = i in keep_masks
        if excite is not None and excite.alpha(i, len(ts)) > 0:  # Attend-and-Excite (E84): z_t <- z_t - alpha grad L
            x, _ = excite.update(model, x, tb, (hidden, valid, pooled), excite.alpha(i, len(ts)))
        if use_cfg:
            eps2, aux = model(torch.cat([x, x]), torch.cat([tb, tb]), hidden2, valid2, pooled2, return_masks=collect_masks,
                              **paint)
            eps_c, eps_u = eps2.chunk(2)
            eps = cfg_combine(eps_u, eps_c, guidance)
        else:
            eps, aux = model(x, tb, hidden, valid, pooled, return_masks=collect_masks, **paint)
        if collect_paths:
            s, tt = _routes(aux, 2 * B if use_cfg else B, n_y)
            s_all.append(s[:, :B])
            t_all.append(tt[:, :B])
            if collect_masks:
                m_all.append([a.masks[:B].cpu() for a in aux])
        eps = eps.to(x.dtype)
        if sampler == "ddim":
            noise = torch.randn(shape, generator=generator).to(device) if eta > 0 else None
            x = ddim_step(x, t, int(t_prevs[i]), eps, schedule, eta=eta, noise=noise, clip_x0=clip_x0,
                          set_alpha_to_one=set_alpha_to_one)
        else:
            noise = torch.randn(shape, generator=generator).to(device)
            x = posterior_step(x, tb, eps, schedule, noise=noise)
    paths = None
    if collect_paths:
        paths = DiffusionPaths(ts.clone(), torch.stack(s_all), torch.stack(t_all), valid.cpu(),
                               m_all if mask_steps else None, mask_steps if mask_steps else None)
    return x, paths
