"""Binary image-region masks from the cross-attention map (RAPHAEL Sec. 3.1, From Text to Image Region).

For text token ``i`` the threshold is ``eta_i = alpha * max_j M[j, i]`` and the mask is
``Mhat_i[j] = 1`` if ``M[j, i] >= eta_i`` else ``0`` (``>=`` as printed: ties keep the entry).
``alpha = 0.2`` (Table 2). The mask is binary (torch.bool): no gradient flows through it; the
space-MoE output is differentiable only through the features it masks and the experts.

The comparison runs in the dtype of ``M``: ``eta_i`` is ``alpha * max`` rounded to that dtype, so
under bf16/fp16 entries within about one rounding unit of ``eta_i`` may fall either side compared
with a float32 map (see spec/errata.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["threshold_mask_literal", "threshold_mask"]


def _check(M: Tensor, alpha: float, check_values: bool = True) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(
            f"alpha must be a number in [0, 1] (Table 2 uses 0.2), got {alpha!r}; "
            "alpha = 0 keeps every image token, alpha = 1 only the argmax tokens"
        )
    if not isinstance(M, Tensor) or M.dim() != 3 or not M.is_floating_point():
        got = f"{tuple(M.shape)} {M.dtype}" if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"M must be a floating cross-attention map of shape (B, n_x, n_y), got {got}")
    if M.shape[1] < 1:
        raise ValueError(f"M needs at least one image token (n_x >= 1), got shape {tuple(M.shape)}")
    if not check_values:
        return  # the caller vouches for the values (e.g. the model: M comes from a softmax)
    with torch.no_grad():
        if bool(torch.isnan(M).any()) or bool((M < 0).any()):
            raise ValueError(
                "M must be a cross-attention map (softmax output): entries >= 0 and not NaN; "
                "pass the map from raphael_ref.attention.cross_attention_map"
            )


def threshold_mask_literal(M: Tensor, alpha: float = 0.2) -> Tensor:
    """RAPHAEL Sec. 3.1, From Text to Image Region: Mhat_i[j] = [M[j, i] >= eta_i], eta_i = alpha max(M[*, i]).

    Literal form: plain loops over the batch and the text tokens ``i``. ``M`` (B, n_x, n_y) with
    rows image tokens ``j``; returns a torch.bool mask of the same shape, with no gradient.
    """
    _check(M, alpha)
    B, n_x, n_y = M.shape
    Mhat = torch.zeros(B, n_x, n_y, dtype=torch.bool, device=M.device)  # (B, n_x, n_y)
    with torch.no_grad():
        for b in range(B):
            for i in range(n_y):
                column = M[b, :, i]  # (n_x,) correspondence of text token i with every image token
                eta_i = alpha * column.max()  # threshold, in M's dtype
                Mhat[b, :, i] = column >= eta_i  # (n_x,)
    return Mhat


def threshold_mask(M: Tensor, alpha: float = 0.2, *, check_values: bool = True) -> Tensor:
    """RAPHAEL Sec. 3.1, From Text to Image Region: vectorised ``threshold_mask_literal`` (equal, bit for bit).

    ``M`` (B, n_x, n_y) -> torch.bool (B, n_x, n_y); no gradient. ``check_values=False`` skips the
    NaN / negative-entry check (a host sync) for callers whose M is a softmax output.
    """
    _check(M, alpha, check_values)
    with torch.no_grad():
        eta = alpha * M.amax(dim=1, keepdim=True)  # (B, 1, n_y)
        return M >= eta  # (B, n_x, n_y)

