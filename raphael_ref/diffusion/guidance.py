"""Classifier-free guidance (Ho & Salimans 2022), used by RAPHAEL Sec. 4.2 ("guidance weights"
1.5, 3.0, 4.5, 6.0, 7.5, 9.0).

Convention (spec/errata.md): the scale s multiplies the difference
eps_cond - eps_uncond, so s = 0 is unconditional and s = 1 plain conditional sampling; Ho &
Salimans' weight w is s - 1. The paper's weights are read as s (7.5 is Stable Diffusion's default).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["cfg_combine"]


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, scale: float | Tensor) -> Tensor:
    """RAPHAEL Sec. 4.2, classifier-free guidance: eps = eps_uncond + s (eps_cond - eps_uncond).

    ``scale``: a float, a 0-d tensor, or a per-sample (B,) tensor (cast to the dtype of eps).
    """
    for name, x in (("eps_uncond", eps_uncond), ("eps_cond", eps_cond)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor, got {got}")
    if eps_uncond.shape != eps_cond.shape or eps_uncond.dtype != eps_cond.dtype or eps_uncond.device != eps_cond.device:
        raise ValueError(
            f"eps_uncond and eps_cond must share shape, dtype and device, got {tuple(eps_uncond.shape)} {eps_uncond.dtype} "
            f"{eps_uncond.device} and {tuple(eps_cond.shape)} {eps_cond.dtype} {eps_cond.device}"
        )
    if isinstance(scale, Tensor):
        if scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(f"scale must be real-valued, got dtype {scale.dtype}")
        if scale.dim() == 1:
            if eps_cond.dim() < 1 or scale.shape[0] != eps_cond.shape[0]:
                raise ValueError(
                    f"a per-sample scale must have shape (B,) = ({eps_cond.shape[0] if eps_cond.dim() else '?'},), "
                    f"got {tuple(scale.shape)}"
                )
            s = scale.reshape(-1, *([1] * (eps_cond.dim() - 1)))  # (B, 1, ...)
        elif scale.dim() == 0:
            s = scale
        else:
            raise ValueError(f"scale must be a float, a 0-d tensor or a (B,) tensor, got shape {tuple(scale.shape)}")
        if not bool(scale.isfinite().all()):
            raise ValueError("scale must be finite")
        s = s.to(device=eps_cond.device, dtype=eps_cond.dtype)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
        s = float(scale)
    else:
        raise ValueError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    return eps_uncond + s * (eps_cond - eps_uncond)  # (B, ...)
