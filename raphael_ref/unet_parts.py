"""U-Net building blocks that are not specific to RAPHAEL (App. 7.3, Fig. 8a).

Timestep embedding, ResBlocks with timestep conditioning, down/up sampling: the latent-diffusion
U-Net (Rombach et al., 2022) that RAPHAEL builds on. Norms run in float32 under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM App. B). (B,) -> (B, dim), float32."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_position_embedding(h: int, w: int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine embedding of the (h, w) image-token grid, (h * w, dim) float32, row-major tokens.

    Not in the paper (an option, erratum E72): ``model.pos_embed = "sincos"`` adds it to the image tokens
    after each transformer's ``proj_in``, so that a query knows where it is without relying on the
    zero padding of the convolutions. As in MAE / DiT: the first dim / 2 channels embed the row, the
    rest the column, each as :func:`timestep_embedding` of the integer coordinate (cos half, sin half).
    dim must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_embedding: dim must be a multiple of 4, got {dim}")
    if h < 1 or w < 1:
        raise ValueError(f"sincos_position_embedding: grid must be at least 1 x 1, got {h} x {w}")
    rows = torch.arange(h).repeat_interleave(w)  # (h*w,) row of each token
    cols = torch.arange(w).repeat(h)  # (h*w,) column of each token
    return torch.cat([timestep_embedding(rows, dim // 2, max_period),
                      timestep_embedding(cols, dim // 2, max_period)], dim=1)  # (h*w, dim)


def sincos_position_embedding_literal(h: int, w: int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Literal form of :func:`sincos_position_embedding`: one token and one frequency at a time, float64."""
    half, quarter = dim // 2, dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for k in range(quarter):
                f = math.exp(-math.log(max_period) * k / quarter)
                out[r * w + c, k] = math.cos(r * f)
                out[r * w + c, quarter + k] = math.sin(r * f)
                out[r * w + c, half + k] = math.cos(c * f)
                out[r * w + c, half + quarter + k] = math.sin(c * f)
    return out


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast/compute dtype, cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the autocast/compute dtype, cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TimestepMLP(nn.Module):
    """E'_theta(t): sinusoidal features -> Linear -> SiLU -> Linear (the U-Net's time embedding, d_t wide)."""

    def __init__(self, model_channels: int, d_t: int):
        super().__init__()
        self.model_channels = model_channels
        self.net = nn.Sequential(nn.Linear(model_channels, d_t), nn.SiLU(), nn.Linear(d_t, d_t))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.model_channels)  # (B, C) float32
        return self.net(emb.to(self.net[0].weight.dtype))  # (B, d_t)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + timestep projection, GN-SiLU-dropout-conv, with a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, d_t: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm32(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(d_t, c_out)
        self.norm2 = GroupNorm32(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each residual branch starts as identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.emb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
