"""RAPHAEL Sec. 3.2 and App. 7.2: the edge predictor P_theta(M) of edge-supervised learning.

P_theta maps the cross-attention map of one transformer block to edge logits on the block's
spatial grid. Which map feeds it: the column of ``M`` (B, n_x, n_y) that belongs to the pooled
(EOT) token of the CLIP text encoder (Fig. 7a: "attention map corresponding to the pooled token
in CLIP"), reshaped row-major to the block's grid (h, w) with n_x = h * w. The ground-truth edge
map I_edge (HED, Fig. 7b) is resized to the same grid with :func:`edge_target_to_grid`.

Decisions (spec/errata.md):
- N = 5 conv layers (Sec. 3.2, "e.g., N = 5"), 3x3 kernels, padding 1, ``width`` channels,
  GELU between layers (the activation Table 2 names for experts and gates), none after the last
  layer: the output is logits for the sigmoid focal loss.
- Input normalisation: each map is divided by its own maximum over the n_x image tokens,
  M_{*,i} / max_j M_{j,i}, so the input lies in (0, 1] whatever n_y, the temperature of the
  softmax or the resolution of the block. It is the same normaliser as the space-MoE threshold
  eta_i = alpha max(M_{*,i}) (Sec. 3.1). Rows of M sum to 1 over the n_y text tokens, so the raw
  column values are not ~1/n_x and have no fixed scale; scaling by n_x would not normalise them.
- Output bias init: b = -log((1 - pi) / pi) with prior pi = 0.1 and last-layer weights ~
  N(0, 0.01^2), as RetinaNet initialises its focal-loss head (Lin et al. 2017, Sec. 4.1), so the
  initial prediction is ~pi everywhere and the many easy background pixels do not dominate the
  first steps. pi = 0.1 is the order of the edge-pixel fraction of HED maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EdgePredictor",
    "attention_to_grid",
    "pooled_attention_map",
    "normalize_attention_map",
    "edge_predictor_functional",
    "edge_target_to_grid",
]


def attention_to_grid(m_col: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RAPHAEL Sec. 3.2: one column M_{*,i} (B, n_x) as an image (B, 1, h, w), row-major tokens.

    Token j sits at row j // width, column j % width: the order of ``x.flatten(2)`` for a feature
    map x (B, C, h, w), which is how the U-Net flattens h(x_t) into image tokens.
    """
    if m_col.dim() != 2:
        raise ValueError(
            f"attention_to_grid expects one attention column per sample, shape (B, n_x); got shape "
            f"{tuple(m_col.shape)}. Select the column first, e.g. M[:, :, i] or pooled_attention_map(...)."
        )
    if height < 1 or width < 1:
        raise ValueError(f"attention_to_grid: height and width must be >= 1, got {height} x {width}.")
    n_x = m_col.shape[1]
    if n_x != height * width:
        raise ValueError(
            f"attention_to_grid: n_x = {n_x} image tokens cannot be laid out on a {height} x {width} grid "
            f"({height * width} cells). Pass the (height, width) of the block whose attention map this is."
        )
    return m_col.reshape(m_col.shape[0], 1, height, width)  # (B, 1, h, w)


def pooled_attention_map(m: torch.Tensor, pooled_index: torch.Tensor, height: int, width: int, *,
                         check_values: bool = True) -> torch.Tensor:
    """RAPHAEL App. 7.2, Fig. 7a: the attention map of the pooled (EOT) text token, (B, 1, h, w).

    m:            cross-attention map M (B, n_x, n_y), heads already averaged.
    pooled_index: (B,) long, the position of the pooled token in each prompt (OpenCLIP pools at
                  the EOT token, i.e. the argmax of the token ids, so it varies per prompt).
    """
    if m.dim() != 3:
        raise ValueError(f"pooled_attention_map expects M of shape (B, n_x, n_y); got {tuple(m.shape)}.")
    B, n_x, n_y = m.shape
    if pooled_index.shape != (B,) or pooled_index.dtype != torch.long:
        raise ValueError(
            f"pooled_attention_map expects pooled_index of shape ({B},) and dtype torch.long; got "
            f"{tuple(pooled_index.shape)} {pooled_index.dtype}. Pass the EOT position of each prompt."
        )
    if check_values and pooled_index.numel() and (pooled_index.min() < 0 or pooled_index.max() >= n_y):
        raise ValueError(f"pooled_attention_map: pooled_index must lie in [0, {n_y - 1}], got {pooled_index.tolist()}.")
    idx = pooled_index.to(m.device).view(B, 1, 1).expand(B, n_x, 1)  # (B, n_x, 1)
    col = m.gather(2, idx).squeeze(2)  # (B, n_x)
    return attention_to_grid(col, height, width)  # (B, 1, h, w)


def normalize_attention_map(attn_map: torch.Tensor) -> torch.Tensor:
    """RAPHAEL Sec. 3.2 (our decision, see module docstring): attn_map / max over the map, in float32.

    attn_map: (B, C, h, w) non-negative attention values. Each (b, c) map is divided by its own
    maximum (clamped away from 0, so an all-zero map stays 0). Runs in float32 under bf16/fp16 like
    every norm of the project and returns the input dtype.
    """
    if attn_map.dim() != 4:
        raise ValueError(f"normalize_attention_map expects (B, C, h, w); got shape {tuple(attn_map.shape)}.")
    x = attn_map.float() if attn_map.dtype in (torch.float16, torch.bfloat16) else attn_map
    peak = x.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (B, C, 1, 1)
    return (x / peak).to(attn_map.dtype)  # (B, C, h, w)


def edge_predictor_functional(
    attn_map: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    normalize: bool = True,
) -> torch.Tensor:
    """RAPHAEL Sec. 3.2, P_theta(M): the literal chain conv -> GELU -> ... -> conv with given weights.

    attn_map: (B, 1, h, w); weights[k]: (c_out, c_in, 3, 3); biases[k]: (c_out,). Returns edge
    logits (B, 1, h, w). :class:`EdgePredictor` must equal this chain with its own weights.
    """
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"edge_predictor_functional: need as many biases as weights (>= 1); got {len(weights)} and {len(biases)}.")
    x = normalize_attention_map(attn_map) if normalize else attn_map  # (B, 1, h, w)
    for k, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w, b, padding=w.shape[-1] // 2)  # (B, c_k, h, w)
        if k < len(weights) - 1:
            x = F.gelu(x)
    return x  # (B, 1, h, w)


class EdgePredictor(nn.Module):
    """RAPHAEL Sec. 3.2, P_theta: N conv layers mapping an attention map to edge logits.

    (B, in_channels, h, w) -> (B, 1, h, w), same resolution. Layers: in -> width -> ... -> width
    -> 1 (``n_layers`` convs, ``kernel_size`` x ``kernel_size``, same padding), GELU between.
    Fully convolutional, so one module can serve every block of the U-Net whatever its grid.
    """

    def __init__(
        self,
        n_layers: int = 5,  # Sec. 3.2: "N convolutional layers (e.g., N = 5)"
        width: int = 32,  # not given by the paper; a small head (the map is one channel)
        in_channels: int = 1,
        kernel_size: int = 3,
        normalize: bool = True,  # divide each map by its max (module docstring)
        prior_prob: float = 0.1,  # RetinaNet-style bias init: sigmoid(b) = prior_prob
    ) -> None:
        super().__init__()
        if n_layers < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"EdgePredictor needs n_layers >= 1, width >= 1, in_channels >= 1; got "
                f"n_layers={n_layers}, width={width}, in_channels={in_channels}."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"EdgePredictor: kernel_size must be odd (same padding keeps h, w); got {kernel_size}.")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"EdgePredictor: prior_prob must lie in (0, 1); got {prior_prob}.")
        self.normalize = normalize
        self.prior_prob = prior_prob
        chans = [in_channels] + [width] * (n_layers - 1) + [1]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2) for c_in, c_out in zip(chans[:-1], chans[1:])
        )
        self.reset_last_layer()

    def reset_last_layer(self) -> None:
        """Last conv: weights ~ N(0, 0.01^2), bias = -log((1 - pi) / pi) (RetinaNet, Lin et al. 2017)."""
        last = self.convs[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.constant_(last.bias, -math.log((1.0 - self.prior_prob) / self.prior_prob))

    def forward(self, attn_map: torch.Tensor) -> torch.Tensor:
        if attn_map.dim() != 4 or attn_map.shape[1] != self.convs[0].in_channels:
            raise ValueError(
                f"EdgePredictor expects an attention map (B, {self.convs[0].in_channels}, h, w); got shape "
                f"{tuple(attn_map.shape)}. Reshape a column M[:, :, i] with attention_to_grid(col, h, w)."
            )
        x = normalize_attention_map(attn_map) if self.normalize else attn_map  # (B, 1, h, w)
        for k, conv in enumerate(self.convs):
            x = conv(x)  # (B, c_k, h, w)
            if k < len(self.convs) - 1:
                x = F.gelu(x)
        return x  # (B, 1, h, w) edge logits


def edge_target_to_grid(edge_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RAPHAEL Sec. 3.2 (our decision): I_edge resized to a block's grid, kept soft in [0, 1].

    edge_map: (B, 1, H, W) soft HED edge probability of the training image. Bilinear resize with
    antialiasing (a triangle low-pass filter when downsampling, so thin edges are averaged rather
    than skipped); its weights are non-negative and sum to 1, so the result stays in [0, 1].
    Computed in float32 under bf16/fp16; returns the input dtype.
    """
    if edge_map.dim() != 4 or edge_map.shape[1] != 1:
        raise ValueError(f"edge_target_to_grid expects an edge map (B, 1, H, W); got shape {tuple(edge_map.shape)}.")
    if height < 1 or width < 1:
        raise ValueError(f"edge_target_to_grid: height and width must be >= 1, got {height} x {width}.")
    x = edge_map.float() if edge_map.dtype in (torch.float16, torch.bfloat16) else edge_map
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).to(edge_map.dtype)  # (B, 1, h, w)
