"""Golden of the SR stage's noise-conditioning augmentation (spec id ``sr.noise_augmentation``; seed 004, Imagen).

Low-res x_lr (3, 3, 4, 4) in [-1, 1] upsampled to 8 x 8, augmentation noise eps (3, 3, 8, 8) ~ N(0, 1), levels
s = (0, 137, 1000) (clean, mid, the last level = the diffusion's t = 999), the scaled_linear table (T = 1000, kept
float64 as the spec keeps schedule tables). Outputs:

    z_bilinear  lowres_condition(x_lr, 8, s, eps, abar, "bilinear")    sqrt(abar_s) Up(x_lr) + sqrt(1 - abar_s) eps
    z_nearest   the same with nearest upsampling
    z_literal   noise_augment_literal(Up_bilinear(x_lr), s, eps, abar)  (per-sample Python float64 coefficients)
    up          upsample_lowres(x_lr, 8, "bilinear")                     (what s = 0 returns exactly)

Tolerances: the project defaults (``DEFAULT_TOL``: float32 (1e-5, 1e-6), float16 (5e-3, 5e-3), bfloat16 (3e-2,
3e-2)). Each output is a bilinear blend of 4 inputs (weights 1/16..9/16, exact in binary) computed in float32 at
least and cast back (one rounding), then a * x + b * eps with a, b cast once from float64: ~4 roundings on O(1)
values. Measured over seeds 0-4: max |err| / (|ref| + 1) <= 1.4 u (float32), 1.5 u (float16), 1.8 u (bfloat16)
of the unit roundoff u (6.0e-8, 4.9e-4, 3.9e-3), against the defaults' ~166 u, ~10 u, ~7.7 u: a margin >= 4x. In
float64 the fast and literal forms agree to the last bit or so (the vectorised kernel may fuse a * x + b * eps into
one FMA; 0.0 on these inputs) and s = 0 returns ``up`` bit for bit.
"""

from __future__ import annotations

import torch

from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

F64 = torch.float64
LEVELS = (0, 137, 1000)


def _inputs(gen: torch.Generator) -> Tensors:
    from raphael_ref.diffusion.schedule import alphas_cumprod, make_betas

    B = len(LEVELS)
    return {
        "x_lr": torch.rand(B, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1,  # (B, 3, h, w) in [-1, 1]
        "eps": torch.randn(B, 3, 8, 8, generator=gen, dtype=F64),  # (B, 3, H, W)
        "s": torch.tensor(LEVELS, dtype=torch.long),  # (B,)
        "alphas_cumprod": alphas_cumprod(make_betas("scaled_linear", 1000)),  # (T,) float64
    }


def _compute(x: Tensors) -> Tensors:
    from raphael_ref.sr import lowres_condition, noise_augment_literal, upsample_lowres

    abar = x["alphas_cumprod"]
    up = upsample_lowres(x["x_lr"], 8, "bilinear")  # (B, 3, 8, 8)
    return {
        "z_bilinear": lowres_condition(x["x_lr"], 8, x["s"], x["eps"], abar, "bilinear"),
        "z_nearest": lowres_condition(x["x_lr"], 8, x["s"], x["eps"], abar, "nearest"),
        "z_literal": noise_augment_literal(up, x["s"], x["eps"], abar).to(up.device),
        "up": up,
    }


CASES = [
    GoldenCase(id="sr.noise_augmentation", make_inputs=_inputs, compute=_compute, tol=dict(DEFAULT_TOL),
               keep_float64=("alphas_cumprod",)),
]
