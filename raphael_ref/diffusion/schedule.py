"""The T-step noise schedule {alpha_t} of RAPHAEL Sec. 2 and every table derived from it.

The paper states T = 1000 (Table 2) but no beta schedule. We default to ``"scaled_linear"``, the
latent-diffusion / Stable Diffusion schedule RAPHAEL builds on (Sec. 4 "Implementations";
spec/errata.md). Index convention: timesteps are 0-based, ``t in [0, T-1]``;
the paper's t = 1..T is our t + 1, so ``alphas_cumprod[0]`` is the paper's abar_1.

Every table is computed once, in float64, outside autocast, and named after its formula
(improved-diffusion style). :func:`lookup` picks ``table[t]`` per sample and casts it to the
compute dtype and device at use; the equations in ``ddpm.py``/``ddim.py`` do their coefficient
algebra on the float64 values first and cast once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "KNOWN_KINDS",
    "DEFAULT_KIND",
    "make_betas",
    "rescale_zero_terminal_snr",
    "alphas_cumprod",
    "NoiseSchedule",
    "check_timesteps",
    "gather_float64",
    "lookup",
]

KNOWN_KINDS = ("linear", "scaled_linear", "cosine")
DEFAULT_KIND = "scaled_linear"  # not stated in the paper: the latent-diffusion default (errata)

# (beta_start, beta_end) per kind: DDPM (Ho et al. 2020, Sec. 4) and latent diffusion / SD.
_DEFAULT_ENDPOINTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
COSINE_S = 0.008  # Nichol & Dhariwal 2021, Eq. 17 offset s
COSINE_MAX_BETA = 0.999  # Nichol & Dhariwal 2021: betas clipped "to be no larger than 0.999"


def _check_T(T) -> None:
    if not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (number of diffusion steps) must be an int >= 1, got {T!r}; RAPHAEL uses T = 1000")


def make_betas(kind: str = DEFAULT_KIND, T: int = 1000, *, beta_start: float | None = None,
               beta_end: float | None = None) -> Tensor:
    """RAPHAEL Sec. 2, the T-step noise schedule: beta_t = 1 - alpha_t, float64 of shape (T,).

    kinds:
      ``"linear"``        beta_t linear from beta_start = 1e-4 to beta_end = 0.02 (DDPM, Ho et al. 2020).
                          Not rescaled for T != 1000 (diffusers' convention, not improved-diffusion's).
      ``"scaled_linear"`` sqrt(beta_t) linear from sqrt(0.00085) to sqrt(0.012) (latent diffusion,
                          Stable Diffusion); the project default.
      ``"cosine"``        abar(u) = cos^2(pi/2 (u + s)/(1 + s)), s = 0.008, u = t/T and
                          beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999) (Nichol & Dhariwal 2021).
    """
    _check_T(T)
    if kind not in KNOWN_KINDS:
        raise ValueError(f"unknown beta schedule kind {kind!r}; known kinds: {list(KNOWN_KINDS)}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError(
                "the cosine schedule has no beta_start/beta_end (it is defined by abar(u)); "
                f"got beta_start={beta_start!r}, beta_end={beta_end!r}: leave them None"
            )
        u = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) u = t/T
        abar = torch.cos((u + COSINE_S) / (1 + COSINE_S) * (math.pi / 2)) ** 2  # (T+1,)
        return (1 - abar[1:] / abar[:-1]).clamp(max=COSINE_MAX_BETA)  # (T,)

    b0, b1 = _DEFAULT_ENDPOINTS[kind]
    b0 = b0 if beta_start is None else float(beta_start)
    b1 = b1 if beta_end is None else float(beta_end)
    if not (0.0 < b0 <= b1 < 1.0):
        raise ValueError(
            f"{kind} schedule needs 0 < beta_start <= beta_end < 1, got beta_start={b0}, beta_end={b1}"
        )
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float64)  # (T,)
    return torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=torch.float64) ** 2  # (T,)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """RAPHAEL Sec. 2: abar_t = prod_{i <= t} alpha_i with alpha_i = 1 - beta_i (float64, (T,))."""
    if not isinstance(betas, Tensor) or betas.dim() != 1 or betas.numel() < 1 or not betas.is_floating_point():
        raise ValueError(f"betas must be a non-empty 1-D floating tensor (T,), got {_describe(betas)}")
    betas = betas.to(torch.float64)
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must lie in (0, 1]; check the schedule (beta = 1 only at a zero-SNR last step)")
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """RAPHAEL Sec. 2 noise schedule, optional zero terminal SNR (Lin et al. 2024, Algorithm 1; not in
    the paper): shift and scale sqrt(abar) so that
    sqrt(abar_{T-1}) = 0 while sqrt(abar_0) is kept; returns the new betas (float64, (T,)).

    sqrt(abar)' = (sqrt(abar) - sqrt(abar_{T-1})) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1})).
    The last beta becomes 1: x_{T-1} is pure noise, and the eps-parameterised x0 estimate at
    t = T-1 divides by sqrt(abar_{T-1}) = 0 (Lin et al. pair this with v-prediction).
    """
    if isinstance(betas, Tensor) and betas.dim() == 1 and betas.numel() < 2:
        raise ValueError(f"zero terminal SNR needs T >= 2 steps (it pins abar_0 and abar_(T-1)), got T = {betas.numel()}")
    sqrt_abar = alphas_cumprod(betas).sqrt()  # (T,)
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))  # (T,) shift to 0, scale back to sqrt(abar_0)
    abar = sqrt_abar**2  # (T,)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # (T,) undo the cumulative product
    return 1.0 - alphas  # (T,)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Float64 tables of one noise schedule, each of shape (T,), indexed by 0-based t.

    Build with :meth:`make`. ``abar_{-1} = 1`` (no noise before the first step) defines
    ``alphas_cumprod_prev[0]``. Tables are on the CPU; :func:`lookup` casts entries at use.
    """

    kind: str
    T: int
    zero_terminal_snr: bool
    betas: Tensor  # beta_t
    alphas: Tensor  # alpha_t = 1 - beta_t
    alphas_cumprod: Tensor  # abar_t = prod_{i<=t} alpha_i
    alphas_cumprod_prev: Tensor  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas: Tensor  # sqrt(alpha_t)
    sqrt_alphas_cumprod: Tensor  # sqrt(abar_t): signal scale of x_t
    sqrt_one_minus_alphas_cumprod: Tensor  # sqrt(1 - abar_t): noise scale of x_t
    sqrt_recip_alphas_cumprod: Tensor  # 1 / sqrt(abar_t) (inf at a zero-SNR last step)
    sqrt_recipm1_alphas_cumprod: Tensor  # sqrt(1 / abar_t - 1) (inf at a zero-SNR last step)
    posterior_variance: Tensor  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (DDPM Eq. 7); 0 at t = 0
    posterior_log_variance_clipped: Tensor  # log beta~_t with beta~_0 replaced by beta~_1 (log 0 avoided)
    posterior_mean_coef1: Tensor  # beta_t sqrt(abar_{t-1}) / (1 - abar_t): weight of x_0 in mu~_t
    posterior_mean_coef2: Tensor  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t): weight of x_t in mu~_t

    @classmethod
    def from_betas(cls, betas: Tensor, *, kind: str = "custom", zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """All tables from a beta sequence (converted to float64)."""
        abar = alphas_cumprod(betas)  # validates; (T,) float64
        betas = betas.detach().to(device="cpu", dtype=torch.float64).clone()
        T = betas.numel()
        alphas = 1.0 - betas
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta~_0 = 0; its log is replaced by log beta~_1 (improved-diffusion), or log beta_0 if T = 1.
        first = post_var[1:2] if T > 1 else betas[:1]
        return cls(
            kind=kind,
            T=T,
            zero_terminal_snr=zero_terminal_snr,
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas=alphas.sqrt(),
            sqrt_alphas_cumprod=abar.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - abar).sqrt(),
            sqrt_recip_alphas_cumprod=abar.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / abar - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(torch.cat([first, post_var[1:]])),
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1.0 - abar),
            posterior_mean_coef2=alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar),
        )

    @classmethod
    def make(cls, kind: str = DEFAULT_KIND, T: int = 1000, zero_terminal_snr: bool = False, *,
             beta_start: float | None = None, beta_end: float | None = None) -> "NoiseSchedule":
        """RAPHAEL Sec. 2, the T-step schedule: :func:`make_betas`, optionally zero terminal SNR."""
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be a bool, got {zero_terminal_snr!r}")
        betas = make_betas(kind, T, beta_start=beta_start, beta_end=beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, kind=kind, zero_terminal_snr=zero_terminal_snr)

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, T={self.T}, zero_terminal_snr={self.zero_terminal_snr})"


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def check_timesteps(t, T: int, like: Tensor | None = None, *, name: str = "t", allow_negative: bool = False) -> Tensor:
    """Validate timesteps and return them as a CPU long tensor of shape () or (B,).

    ``t``: a Python int or an integer tensor of shape () or (B,), with B = like.shape[0].
    Values must lie in [0, T-1] (0-based; the paper's t = 1..T is our t + 1). With
    ``allow_negative`` any negative value is accepted too (DDIM's "before the first step").
    """
    if isinstance(t, bool) or not isinstance(t, (numbers.Integral, Tensor)):
        raise ValueError(f"{name} must be an int or an integer tensor of shape () or (B,), got {_describe(t)}")
    tt = torch.as_tensor(t)
    if tt.is_floating_point() or tt.is_complex() or tt.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer timesteps (e.g. torch.long), got dtype {tt.dtype}; cast with .long()")
    if tt.dim() > 1:
        raise ValueError(f"{name} must have shape () or (B,), got {tuple(tt.shape)}")
    if tt.dim() == 1 and like is not None:
        if like.dim() < 1 or tt.shape[0] != like.shape[0]:
            raise ValueError(
                f"per-sample {name} of shape {tuple(tt.shape)} must match the batch size of the tensor "
                f"of shape {tuple(like.shape)} (dim 0)"
            )
    tt = tt.detach().to("cpu", torch.long)
    if tt.numel():
        lo, hi = int(tt.min()), int(tt.max())
        if hi > T - 1 or (lo < 0 and not allow_negative):
            allowed = f"<= {T - 1}" if allow_negative else f"in [0, {T - 1}]"
            raise ValueError(
                f"{name} must be {allowed} for a T = {T} schedule (0-based timesteps; the paper's t = 1..T "
                f"is our t + 1), got values in [{lo}, {hi}]"
            )
    return tt


def gather_float64(table: Tensor, t, like: Tensor) -> Tensor:
    """``table[t]`` in float64 on the table's device, shaped (B or 1, 1, ..., 1) to broadcast against ``like``.

    For coefficient algebra in float64 before the one cast to the compute dtype.
    """
    if not isinstance(table, Tensor) or table.dim() != 1:
        raise ValueError(f"table must be a 1-D schedule table (T,), got {_describe(table)}")
    if not isinstance(like, Tensor):
        raise ValueError(f"like must be a tensor (the array the entry broadcasts against), got {_describe(like)}")
    tt = check_timesteps(t, table.numel(), like).to(table.device)
    vals = table.to(torch.float64)[tt.reshape(-1)]  # (B,) or (1,)
    return vals.reshape(-1, *([1] * max(like.dim() - 1, 0))) if like.dim() >= 1 else vals.reshape(())


def lookup(table: Tensor, t, like: Tensor) -> Tensor:
    """``table[t]`` cast to ``like``'s dtype and device, shaped (B or 1, 1, ..., 1) to broadcast against it."""
    return gather_float64(table, t, like).to(device=like.device, dtype=like.dtype)
