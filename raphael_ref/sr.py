"""A text-conditioned super-resolution diffusion stage: the Imagen cascade (seed 004) on RAPHAEL's U-Net.

Not in RAPHAEL: the paper reaches high resolution with a tailor-made SR-GAN (Real-ESRGAN, Sec. 4.1 / App. 7.8;
``raphael_ref.upscale``). Seed 004 (Imagen, Saharia et al. 2022, Sec. 2.5 and App. B) instead cascades diffusion
models: a base model draws a small image, then text-conditioned super-resolution diffusion models draw larger
ones *conditioned on it*, with noise-conditioning augmentation of the low-res image (spec ``sr.noise_augmentation``,
erratum E80). Here the SR stage is the same :class:`~raphael_ref.models.RaphaelUNet` (every RAPHAEL component:
space-MoE, time-MoE, edge supervision, text cross-attention) with ``model.cond_channels = 3``:

    x_lr   (B, 3, h, w)   the low-res image in [-1, 1] (a base sample, or a downsampled ground truth)
    up     = Up(x_lr)     (B, 3, H, W): bilinear (align_corners=False) or nearest, ``sr.upsample``
    z      = sqrt(abar_s) up + sqrt(1 - abar_s) eps,  eps ~ N(0, I) on the (H, W) grid   (noise augmentation)
    eps_hat, aux = U-Net([x_t, z], t, E(y); s)      z concatenated to x_t on the channel axis; s embedded
                                                    (its own sinusoid + MLP) and added to the time embedding E'(t)

Levels s are integers in [0, T]: s = 0 is the clean image (abar = 1: ``z = up`` exactly), s >= 1 noises as the
diffusion's 0-based timestep s - 1 (``abar_s = prod_{i < s} (1 - beta_i)``, the schedule's ``alphas_cumprod_prev``).
Training draws s ~ U{0..sr.aug_max} per sample; sampling fixes s = sr.aug_sample (Imagen's choices). The
augmentation is applied on the high-res grid, after upsampling (i.i.d. noise per high-res pixel, the same kind
of noise x_t carries), so the conditioning channels are a diffusion-noised image of level s on x_t's grid.

Classifier-free guidance drops only the text: both branches see the same z (Imagen's SR models are
conditioned on the low-res image in both). The loss is the base model's (``objective.training_losses``:
L_denoise + L_edge, the run's loss weighting), evaluated through :class:`SRDenoiser`, which feeds z and s.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raphael_ref.diffusion import NoiseSchedule

__all__ = [
    "UPSAMPLE_MODES",
    "SRDenoiser",
    "SRStage",
    "aug_abar",
    "check_lowres",
    "lowres_condition",
    "noise_augment",
    "noise_augment_literal",
    "sample_aug_levels",
    "sr_pair",
    "sr_training_losses",
    "upsample_lowres",
]

UPSAMPLE_MODES = ("bilinear", "nearest")


# ---------------------------------------------------------------------------------------------- the equation


def aug_abar(alphas_cumprod: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """abar of augmentation levels ``s`` (B,) long in [0, T]: 1 at s = 0, ``alphas_cumprod[s - 1]`` else (float64)."""
    T = alphas_cumprod.shape[0]
    if s.ndim != 1 or s.is_floating_point():
        raise ValueError(f"augmentation levels s must be an integer tensor of shape (B,); got {tuple(s.shape)} {s.dtype}")
    if s.numel() and (int(s.min()) < 0 or int(s.max()) > T):
        raise ValueError(f"augmentation levels s must lie in [0, T={T}] (0: no augmentation); got {s.tolist()}")
    table = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.detach().to("cpu", torch.float64)])  # (T+1,)
    return table[s.cpu()]  # (B,) float64


def noise_augment_literal(x: torch.Tensor, s: torch.Tensor, eps: torch.Tensor,
                          alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Seed 004 (Imagen, Sec. 2.5 / App. B), noise-conditioning augmentation: z = sqrt(abar_s) x + sqrt(1 - abar_s) eps.

    Literal form: one sample at a time, the two coefficients formed in Python float64 from the float64 table;
    s = 0 is abar = 1 (z = x exactly), s >= 1 is abar_{s-1} of the 0-based diffusion schedule (erratum E80).
    x, eps (B, C, H, W); s (B,) long; returns z in float64 (B, C, H, W).
    """
    if x.shape != eps.shape or x.ndim != 4:
        raise ValueError(f"x and eps must be (B, C, H, W) of one shape; got {tuple(x.shape)}, {tuple(eps.shape)}")
    if s.shape != (x.shape[0],):
        raise ValueError(f"s must have shape ({x.shape[0]},); got {tuple(s.shape)}")
    abar = aug_abar(alphas_cumprod, s)  # (B,) float64
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        a = float(abar[b])
        out[b] = math.sqrt(a) * x[b].double().cpu() + math.sqrt(1.0 - a) * eps[b].double().cpu()  # (C, H, W)
    return out


def noise_augment(x: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fast form of :func:`noise_augment_literal`: one broadcast multiply-add in x's dtype and device, the two
    coefficients taken from the float64 table and cast once (as ``ddpm.q_sample``). (B, C, H, W) -> same."""
    if x.shape != eps.shape or x.ndim != 4:
        raise ValueError(f"x and eps must be (B, C, H, W) of one shape; got {tuple(x.shape)}, {tuple(eps.shape)}")
    if s.shape != (x.shape[0],):
        raise ValueError(f"s must have shape ({x.shape[0]},); got {tuple(s.shape)}")
    abar = aug_abar(alphas_cumprod, s)  # (B,) float64
    a = abar.sqrt().to(x.device, x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    b = (1.0 - abar).sqrt().to(x.device, x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a * x + b * eps.to(x.dtype)  # (B, C, H, W)


def check_lowres(x_lr: torch.Tensor, lowres_size: int | None = None, what: str = "the low-res image") -> None:
    """ValueError unless ``x_lr`` is a finite float (B, 3, h, w) tensor (h = w = ``lowres_size`` when given)."""
    if not isinstance(x_lr, torch.Tensor) or not x_lr.is_floating_point() or x_lr.ndim != 4 or x_lr.shape[1] != 3:
        raise ValueError(f"{what} must be a float RGB tensor (B, 3, h, w) in [-1, 1]; got "
                         f"{getattr(x_lr, 'dtype', type(x_lr).__name__)} {tuple(getattr(x_lr, 'shape', ()))}")
    if lowres_size is not None and tuple(x_lr.shape[-2:]) != (lowres_size, lowres_size):
        raise ValueError(f"{what} must be {lowres_size} x {lowres_size} pixels (the SR stage's sr.lowres_size); got "
                         f"{x_lr.shape[-2]} x {x_lr.shape[-1]}: resize it, or use the SR run trained for that size")
    if not bool(torch.isfinite(x_lr).all()):
        raise ValueError(f"{what} contains NaN or inf")


def upsample_lowres(x_lr: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Low-res (B, C, h, w) -> (B, C, size, size): ``F.interpolate`` bilinear (align_corners=False, no antialias;
    values stay in the range of the input) or nearest. Computed in float32 at least (bf16/fp16 inputs)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if x_lr.ndim != 4:
        raise ValueError(f"the low-res image must be (B, C, h, w); got {tuple(x_lr.shape)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < max(x_lr.shape[-2:]):
        raise ValueError(f"size must be an int >= the low-res side {max(x_lr.shape[-2:])}; got {size!r}")
    acc = torch.promote_types(x_lr.dtype, torch.float32)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x_lr.to(acc), size=(size, size), mode=mode, **kw).to(x_lr.dtype)  # (B, C, size, size)


def lowres_condition(x_lr: torch.Tensor, size: int, s: torch.Tensor, eps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """The SR stage's conditioning channels: z = noise_augment(Up(x_lr), s, eps), (B, 3, size, size).

    ``eps`` (B, 3, size, size) is the augmentation noise on the high-res grid; ``s`` (B,) levels in [0, T]."""
    check_lowres(x_lr)
    up = upsample_lowres(x_lr, size, mode)  # (B, 3, size, size)
    if eps.shape != up.shape:
        raise ValueError(f"eps must be on the high-res grid {tuple(up.shape)}; got {tuple(eps.shape)}")
    return noise_augment(up, s, eps, alphas_cumprod)  # (B, 3, size, size)


def sample_aug_levels(B: int, aug_max: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training levels s ~ U{0, ..., aug_max}, (B,) long, drawn on the CPU from ``generator``."""
    if aug_max < 0:
        raise ValueError(f"aug_max must be >= 0, got {aug_max}")
    return torch.randint(0, aug_max + 1, (B,), generator=generator)


# ---------------------------------------------------------------------------------------------- the model


class SRDenoiser(nn.Module):
    """An SR U-Net with its conditioning fixed: ``forward(x_t, t, y, y_valid, pooled_index, **kw)`` as the base U-Net.

    Lets the base model's samplers (``sampling.sample``, ``training.generate_images``) and loss
    (``objective.training_losses``) run the SR stage unchanged. ``z`` (B, 3, H, W) and ``s`` (B,) are repeated
    when the sampler doubles the batch for classifier-free guidance ([cond, uncond]: both get z, only the text
    differs). Holds no parameters of its own.
    """

    def __init__(self, unet: nn.Module, z: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.z, self.s = z, s
        self.train(unet.training)  # a new Module starts in train mode: samplers restore the mode they found

    @property
    def cfg(self):
        return self.unet.cfg

    def forward(self, x, t, y, y_valid, pooled_index, **kw):
        z, s = self.z, self.s
        if x.shape[0] != z.shape[0]:
            if x.shape[0] % z.shape[0]:
                raise ValueError(f"batch {x.shape[0]} is not a multiple of the conditioning batch {z.shape[0]}")
            k = x.shape[0] // z.shape[0]
            z, s = z.repeat(k, 1, 1, 1), s.repeat(k)
        return self.unet(x, t, y, y_valid, pooled_index, cond=z.to(x.device), aug_level=s.to(x.device), **kw)


def sr_training_losses(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, x_lr: torch.Tensor,
                       t: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, aug_noise: torch.Tensor,
                       y: torch.Tensor, y_valid: torch.Tensor, pooled_index: torch.Tensor,
                       edge_map: torch.Tensor | None = None, *, upsample: str = "bilinear", **loss_kw) -> dict:
    """``objective.training_losses`` of the SR stage: the same L = L_denoise + L_edge on the high-res x0 (B, 3, H, W),
    with the U-Net also fed z = lowres_condition(x_lr, H, s, aug_noise) and s."""
    from raphael_ref.objective import training_losses

    z = lowres_condition(x_lr, x0.shape[-1], s, aug_noise, schedule.alphas_cumprod, upsample)  # (B, 3, H, W)
    return training_losses(SRDenoiser(model, z, s.to(x0.device)), schedule, x0, t, noise, y, y_valid, pooled_index,
                           edge_map, **loss_kw)


# ---------------------------------------------------------------------------------------------- data


def _area_down(img: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(img, size=(size, size), mode="area")


def sr_pair(index: int, hr_size: int, lr_size: int, *, seed: int = 0, source: str = "render",
            max_objects: int = 3) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One training pair of the synthetic renderer: (high-res (3, H, H), low-res (3, h, h)) in [-1, 1] and the caption.

    The scene is ``sample_scene(default_rng([seed, index]))`` laid out at each size (the layout scales with the
    side). ``source``: "render" (the low-res image is the renderer's own at ``lr_size``: crisp, as the base model
    learnt to draw) or "downsample" (the high-res render area-averaged to ``lr_size``, Imagen's pairs).
    """
    import numpy as np

    from raphael_ref.data.synthetic import make_scene, render, sample_scene

    if source not in ("render", "downsample"):
        raise ValueError(f"source must be 'render' or 'downsample', got {source!r}")
    scene = sample_scene(np.random.default_rng([seed, index]), image_size=hr_size, max_objects=max_objects)
    objs = [(o.shape, o.color, o.position) for o in scene.objects]
    hr = render(scene).float()[None] / 127.5 - 1  # (1, 3, H, H)
    if source == "render":
        lr = render(make_scene(objs, lr_size)).float()[None] / 127.5 - 1  # (1, 3, h, h)
    else:
        lr = _area_down(hr, lr_size)  # (1, 3, h, h)
    return hr[0], lr[0], scene.caption


# ---------------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class SRStage:
    """A trained SR stage: the U-Net (EMA weights), its text encoder, schedule and config (``sr`` section).

    ``stage(images, prompts)`` -> high-res images (B, 3, H, W) in [-1, 1] on the CPU.
    """

    model: nn.Module
    text_encoder: object
    schedule: NoiseSchedule
    config: object

    @classmethod
    def from_run(cls, run: str | Path, *, weights: str = "ema", device: str | torch.device | None = None) -> "SRStage":
        """The SR stage of a tools/train_sr.py run folder (its latest checkpoint) or a checkpoint folder."""
        from raphael_ref import training
        from raphael_ref.checkpoint import load_model

        ckpt = training.resolve_checkpoint(run)
        name = {"ema": "ema.safetensors", "raw": "model.safetensors"}.get(weights)
        if name is None:
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        device = torch.device(device or "cpu")
        model, cfg = load_model(ckpt, weights_name=name, map_location=device)
        if cfg.model.cond_channels <= 0:
            raise ValueError(f"{ckpt} is not an SR stage (model.cond_channels = 0): pass a tools/train_sr.py run")
        encoder = training.build_text_encoder(cfg, device)
        d = cfg.diffusion
        return cls(model.to(device).eval(), encoder, NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr), cfg)

    @property
    def lowres_size(self) -> int:
        return self.config.sr.lowres_size

    @property
    def size(self) -> int:
        return self.config.model.sample_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, negative_prompts: Sequence[str] | None = None,
                 steps: int | None = None, guidance: float | None = None, aug_level: int | None = None,
                 sampler: str | None = None, generator: torch.Generator | None = None,
                 progress=None, start_from_lowres: bool = True) -> torch.Tensor:
        """Upscale ``images`` (B, 3, lowres, lowres) in [-1, 1] for ``prompts``; defaults from the run's config
        (``sample.steps``, ``sample.guidance``, ``sample.sampler``, ``sr.aug_sample``). The augmentation noise
        is drawn first from ``generator`` (CPU), then the sampler's noise. ``start_from_lowres`` (default): the
        chain starts at q_sample(Up(images), t_0) with that noise instead of at pure noise (E80)."""
        from raphael_ref.sampling import sample

        cfg = self.config
        check_lowres(images, self.lowres_size, "images given to the SR stage")
        prompts = list(prompts)
        B = images.shape[0]
        if len(prompts) != B:
            raise ValueError(f"one prompt per image: {B} images, {len(prompts)} prompts")
        s_val = cfg.sr.aug_sample if aug_level is None else aug_level
        if isinstance(s_val, bool) or not isinstance(s_val, int) or not 0 <= s_val <= self.schedule.T:
            raise ValueError(f"aug_level must be an int in [0, T={self.schedule.T}], got {s_val!r}")
        steps = cfg.sample.steps if steps is None else steps
        guidance = cfg.sample.guidance if guidance is None else guidance
        sampler = cfg.sample.sampler if sampler is None else sampler
        device = next(self.model.parameters()).device
        H = self.size
        eps = torch.randn((B, 3, H, H), generator=generator)  # augmentation noise, CPU
        s = torch.full((B,), s_val, dtype=torch.long)
        z = lowres_condition(images.float().cpu(), H, s, eps, self.schedule.alphas_cumprod, cfg.sr.upsample)
        c = self.text_encoder(prompts)
        u = None
        if guidance != 1.0:
            neg = [""] if negative_prompts is None else list(negative_prompts)
            u = self.text_encoder(neg)
        net = SRDenoiser(self.model, z.to(device), s.to(device))
        # start the chain at q_sample(Up(x_lr), t_0), not at pure noise: with the schedule's non-zero terminal SNR
        # the training x_T still carries the high-res image, which the stage learns to read (E80, docs/results/sr_toy.md)
        start = upsample_lowres(images.float().cpu(), H, cfg.sr.upsample) if start_from_lowres else None
        x, _ = sample(net, self.schedule, (c.hidden, c.valid, c.pooled_index),
                      None if u is None else (u.hidden, u.valid, u.pooled_index), shape=(B, 3, H, H),
                      steps=None if sampler == "ddpm" else steps, guidance=guidance, sampler=sampler,
                      generator=generator, set_alpha_to_one=cfg.sample.set_alpha_to_one, progress=progress,
                      start_from=start)
        return x.float().cpu()  # (B, 3, H, H), identity codec
