"""RAPHAEL Sec. 3.2: the training loss L = L_denoise + L_edge, edge term paused for large t.

Decision (spec/errata.md): with 0-based timesteps t in [0, T-1],

    L = (1/B) sum_b [ L_denoise,b + 1[t_b < T_c] * (1/K) sum_k L_edge,k,b ]

over a batch of B samples and K supervised blocks. Normalising the edge term by B (not by the
number of eligible samples) makes L an unbiased estimate of E_{x0,t}[L_denoise + 1[t < T_c] L_edge]
and keeps the edge term's weight from jumping with the number of samples that happen to draw
t < T_c. The alternative, dividing by max(1, #eligible), weighs each eligible sample by B/#eligible
(~2x for T_c = T/2) and estimates E[L_edge | t < T_c] instead.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["edge_loss_gate", "total_loss"]


def _check_t(t: torch.Tensor, fn: str) -> None:
    if t.dim() != 1 or t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"{fn}: t must be integer timesteps of shape (B,) (0-based); got {tuple(t.shape)} {t.dtype}.")
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{fn}: timesteps are 0-based, t >= 0; got min {t.min().item()}.")


def edge_loss_gate(t: torch.Tensor, T_c: int = 500) -> torch.Tensor:
    """RAPHAEL Sec. 3.2, Table 2 (T_c = 500): edge supervision is active where t < T_c (0-based), (B,) bool."""
    _check_t(t, "edge_loss_gate")
    if isinstance(T_c, bool) or not isinstance(T_c, numbers.Integral) or T_c < 0:
        raise ValueError(f"edge_loss_gate: T_c must be an int >= 0 (0 switches edge supervision off); got {T_c!r}.")
    return t < T_c  # (B,)


def total_loss(
    denoise_per_sample: torch.Tensor,
    edge_per_sample: torch.Tensor | None,
    t: torch.Tensor,
    T_c: int = 500,
) -> dict[str, torch.Tensor]:
    """RAPHAEL Sec. 3.2: L = L_denoise + L_edge, L_edge only for t < T_c; returns {total, denoise, edge}.

    denoise_per_sample: (B,) per-sample denoising loss (e.g. ddpm.loss_eps with reduction per sample).
    edge_per_sample:    (B,) or (K, B) per-sample focal edge loss of K blocks (averaged over
                        blocks), or None when edge supervision is off (edge term = 0).
    t:                  (B,) integer 0-based timesteps.
    All three outputs are scalars; ``edge`` is normalised by B (module docstring). Ineligible
    samples are dropped with ``torch.where``, so a NaN/inf edge loss of a sample with t >= T_c
    neither reaches the value nor the gradient; with no eligible sample the edge term is an exact
    0 that still belongs to the graph.
    """
    _check_t(t, "total_loss")
    B = t.shape[0]
    if denoise_per_sample.shape != (B,) or not denoise_per_sample.is_floating_point():
        raise ValueError(
            f"total_loss: denoise_per_sample must be a floating (B,) = ({B},) tensor, one loss per sample; got "
            f"{tuple(denoise_per_sample.shape)} {denoise_per_sample.dtype}. Reduce over pixels, not over the batch."
        )
    if B == 0:
        raise ValueError("total_loss: empty batch (B = 0); the mean over the batch is undefined.")
    denoise = denoise_per_sample.mean()
    if edge_per_sample is None:
        edge = torch.zeros((), dtype=denoise.dtype, device=denoise.device)
    else:
        if edge_per_sample.dim() == 1:
            edge_per_sample = edge_per_sample.unsqueeze(0)  # (1, B)
        if edge_per_sample.dim() != 2 or edge_per_sample.shape[1] != B or edge_per_sample.shape[0] < 1:
            raise ValueError(
                f"total_loss: edge_per_sample must be (B,) or (K, B) with B = {B} and K >= 1 blocks; got "
                f"{tuple(edge_per_sample.shape)}."
            )
        if not edge_per_sample.is_floating_point():
            raise ValueError(f"total_loss: edge_per_sample must be floating point; got {edge_per_sample.dtype}.")
        gate = edge_loss_gate(t, T_c).to(edge_per_sample.device)  # (B,)
        edge_b = edge_per_sample.mean(dim=0)  # (B,) averaged over blocks
        edge_b = torch.where(gate, edge_b, torch.zeros_like(edge_b))  # (B,) 1[t_b < T_c] L_edge,b
        edge = edge_b.sum() / B
    return {"total": denoise + edge, "denoise": denoise, "edge": edge}
