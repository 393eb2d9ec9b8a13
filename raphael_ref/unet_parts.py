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
