"""Which noise levels a training step draws: uniform t (the paper) or a shifted density (an option, erratum E90).

RAPHAEL Sec. 2 trains with the DDPM loss E_{t, eps} ||eps - D_theta(x_t, t, E(y))||^2 and does not print how t is
drawn; the project draws it uniformly over the T indices, as DDPM (Ho et al. 2020, Algorithm 1) and latent
diffusion do. The option ``train.t_shift = s`` draws u ~ U[0, 1) and maps it through the time shift of Stable
Diffusion 3 (Esser et al. 2024, Sec. 5.3.2, their Eq. 23 for a resolution ratio alpha):

    tau(u) = s u / (1 + (s - 1) u),        t = floor(T tau(u))   (0-based index, so t in 0 .. T - 1)

s = 1 is uniform; s > 1 moves draws towards high noise (large t), s < 1 towards low noise. tau is increasing, maps
[0, 1] onto [0, 1], and tau_{1/s}(u) = 1 - tau_s(1 - u) (a shift and its inverse are mirror images). Its inverse
is u(tau) = tau / (s - (s - 1) tau), so index i is drawn with probability

    p_s(i) = u((i + 1) / T) - u(i / T).

A shifted draw is a loss weighting in expectation: E_{t ~ p_s}[L_t] = (1/T) sum_i (T p_s(i)) L_i, uniform t with
weight T p_s(t) on top of whatever ``train.loss_weight`` applies. SD3 applies the shift to flow-matching time;
here it acts on t / T of the DDPM index, which is our decision (E90), not a formula of either paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_shift", "shift_time", "shifted_timesteps", "shifted_timestep_probs"]


def check_shift(shift) -> float:
    """The shift s as a float; a clear error unless it is a finite number > 0."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"timestep shift must be a finite number > 0 (1 = uniform t, the paper's), got {shift!r}")
    return float(shift)


def _check_steps(T) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")


def shift_time(u: Tensor, shift: float) -> Tensor:
    """tau(u) = s u / (1 + (s - 1) u): u in [0, 1] -> [0, 1], increasing; s = 1 is the identity."""
    s = check_shift(shift)
    return s * u / (1 + (s - 1) * u)


def shifted_timesteps(u: Tensor, T: int, shift: float) -> Tensor:
    """t = floor(T tau(u)) per draw, int64 in 0 .. T - 1; ``u`` is float64 in [0, 1) (e.g. ``torch.rand``).

    The clamp only catches tau(u) = 1, which float64 rounding can reach for u within an ulp of 1.
    """
    _check_steps(T)
    if not isinstance(u, Tensor) or u.dtype != torch.float64:
        raise ValueError(f"u must be a float64 tensor of uniform draws in [0, 1), got "
                         f"{u.dtype if isinstance(u, Tensor) else type(u).__name__}")
    if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
        raise ValueError(f"u must lie in [0, 1) (draws of torch.rand); got values in [{float(u.min())}, {float(u.max())}]")
    return torch.floor(T * shift_time(u, shift)).long().clamp_(0, T - 1)


def shifted_timestep_probs(T: int, shift: float) -> Tensor:
    """p_s(i) = u((i + 1) / T) - u(i / T) with u(tau) = tau / (s - (s - 1) tau): (T,) float64, sums to 1."""
    _check_steps(T)
    s = check_shift(shift)
    edges = torch.arange(T + 1, dtype=torch.float64) / T  # tau at the index boundaries 0, 1/T, .., 1
    u = edges / (s - (s - 1) * edges)
    return u[1:] - u[:-1]
