"""RAPHAEL Sec. 3.2: L_edge = Focal(P_theta(M), I_edge), the sigmoid focal loss of Lin et al. (2017).

    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t),
    p = sigmoid(x),  p_t = p y + (1 - p)(1 - y),  alpha_t = alpha y + (1 - alpha)(1 - y),

with Table 2's alpha = 0.5 and gamma = 2. Soft targets y in [0, 1] (the HED map is a soft edge
probability) use the same expression with -log(p_t) replaced by the binary cross-entropy
-[y log p + (1 - y) log(1 - p)], which equals -log(p_t) for y in {0, 1}; this is exactly what
``torchvision.ops.sigmoid_focal_loss`` computes. With alpha = 0.5, alpha_t = 0.5 for every y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_literal", "focal_loss_per_sample"]

_REDUCTIONS = ("none", "mean", "sum")


def _check(logits: torch.Tensor, targets: torch.Tensor, alpha: float | None, gamma: float, reduction: str, fn: str,
           check_values: bool = True) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"{fn}: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape; "
            f"resize the edge map to the prediction's grid (raphael_ref.edge.edge_target_to_grid)."
        )
    if not logits.is_floating_point():
        raise ValueError(f"{fn}: logits must be floating point, got {logits.dtype}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{fn}: alpha must lie in [0, 1] (or be None for no class weighting); got {alpha}.")
    if gamma < 0:
        raise ValueError(f"{fn}: gamma must be >= 0; got {gamma}.")
    if check_values and targets.numel():  # value checks sync with the device: callers may vouch instead
        y = targets.detach()
        if not bool(torch.isfinite(y).all()) or bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError(
                f"{fn}: targets must be edge probabilities in [0, 1]; got values in "
                f"[{y.min().item()}, {y.max().item()}]. Normalise the edge map to [0, 1] first."
            )


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (losses run in float32 under bf16/fp16), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sigmoid_focal_loss_literal(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.5, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """RAPHAEL Sec. 3.2 / Lin et al. 2017 Eq. 5, literal: -alpha_t (1 - p_t)^gamma log(p_t), hard targets.

    Reads like the paper; takes log of a probability, so it underflows for |logits| >~ 17 in
    float32. Use :func:`sigmoid_focal_loss` in training.
    """
    _check(logits, targets, alpha, gamma, reduction, "sigmoid_focal_loss_literal")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("sigmoid_focal_loss_literal: the literal form takes hard targets in {0, 1}; use sigmoid_focal_loss for soft ones.")
    x = logits.to(_compute_dtype(logits.dtype))
    y = targets.to(x.dtype)
    p = torch.sigmoid(x)
    p_t = torch.where(y == 1, p, 1 - p)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        alpha_t = torch.where(y == 1, torch.full_like(x, alpha), torch.full_like(x, 1 - alpha))
        loss = alpha_t * loss
    return _reduce(loss, reduction)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.5, gamma: float = 2.0, reduction: str = "mean",
    *, check_values: bool = True,
) -> torch.Tensor:
    """RAPHAEL Sec. 3.2, Table 2 (alpha 0.5, gamma 2): sigmoid focal loss, stable form, soft targets.

    logits, targets: same shape (e.g. (B, 1, h, w)); targets in [0, 1]. The cross-entropy is
    BCE-with-logits (no log of a rounded probability) and 1 - p_t is evaluated as
    y sigmoid(-x) + (1 - y) sigmoid(x), which equals 1 - p_t without cancellation when p_t -> 1.
    Computed and returned in float32 for bf16/fp16 inputs (float64 stays float64).
    reduction: "mean" over every element (pixels and batch), "sum", or "none".
    ``check_values=False`` skips the target range check (a host sync) for callers that checked once.
    """
    _check(logits, targets, alpha, gamma, reduction, "sigmoid_focal_loss", check_values)
    x = logits.to(_compute_dtype(logits.dtype))
    y = targets.to(x.dtype)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")  # -[y log p + (1-y) log(1-p)]
    one_minus_p_t = y * torch.sigmoid(-x) + (1 - y) * torch.sigmoid(x)  # 1 - p_t
    loss = ce * one_minus_p_t**gamma
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss  # alpha_t
    return _reduce(loss, reduction)


def focal_loss_per_sample(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.5, gamma: float = 2.0, *,
    check_values: bool = True,
) -> torch.Tensor:
    """RAPHAEL Sec. 3.2: L_edge of each sample, the focal loss averaged over its pixels, (B,).

    logits, targets: (B, ...) with at least one non-batch element. Feeds ``losses.total_loss``.
    """
    if logits.dim() < 2 or logits[0].numel() == 0:
        raise ValueError(f"focal_loss_per_sample expects (B, ...) with pixels per sample; got {tuple(logits.shape)}.")
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none",
                              check_values=check_values)  # (B, ...)
    return loss.flatten(1).mean(dim=1)  # (B,)
