"""Attend-and-Excite at sampling time: not in RAPHAEL, an option (erratum E84).

The toy's two-object failures are "catastrophic neglect": one named shape is not drawn, nearly always the
second one (docs/results/toy_scene_mix.md). Chefer et al. (Attend-and-Excite, SIGGRAPH 2023, Sec. 3) meet the
same failure in Stable Diffusion at inference time, without training: during the first denoising steps they move
the latent z_t along the gradient of a loss that asks every subject token to hold a strong peak somewhere in its
cross-attention map::

    A_t        = the cross-attention maps at one resolution, averaged over heads and layers, (h, w, n_y)
    Abar_t     = A_t over the caption's word tokens only (<sot> and the end token left out), renormalised per cell
    L_s        = 1 - max_u (G * Abar_t^s)(u)         for each subject token s (G: a 3 x 3 Gaussian, sigma 0.5)
    L          = max_s L_s                            (the most neglected subject)
    z_t'       = z_t - alpha_t grad_{z_t} L

Our decisions (spec/equations.toml "excite.loss"):

- Abar renormalises by the sum over the word tokens, Abar(u, s) = M(u, s) / sum_{j word} M(u, j), so each cell's
  word-token attention is a share in [0, 1]; M is the model's head-averaged map (E8).
- The map is the mean of M over the blocks at one grid (default: the second-finest grid of the U-Net, 12 x 12
  for the 24 px toy, as A&E's 16 x 16 is the second-finest of Stable Diffusion's 64 x 64 latent).
- G is the normalised 3 x 3 Gaussian of sigma 0.5, applied with reflected borders.
- Over a batch the loss is the sum of each sample's L (so each sample's latent moves by its own gradient, whatever
  the batch size); a sample with no subject token contributes nothing and keeps its latent.
- alpha_i = scale (1 - i / (2 N)) at sampler step i of N, on the first ``steps`` steps only: a step size that falls
  linearly to half over the trajectory (our choice; A&E also shrink it over the steps). One update per step (A&E's
  iterative refinement to a threshold at a few chosen steps is left out).
- A cell where the word tokens hold no attention at all has Abar = 0 there (0 / 0 := 0).

Two forms, equal on every input (tests/test_excite.py): :func:`excite_loss_literal` (plain loops over samples,
subjects and cells, the convolution written out) and :func:`excite_loss` (one gather and one conv2d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["GAUSS_SIGMA", "gaussian_kernel", "word_tokens", "excite_loss_literal", "excite_loss", "Excite"]

GAUSS_SIGMA = 0.5  # A&E's smoothing of the maps: a 3 x 3 Gaussian of sigma 0.5 cells


def gaussian_kernel(sigma: float = GAUSS_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """The normalised 3 x 3 Gaussian g(a, b) = exp(-(a^2 + b^2) / (2 sigma^2)) / Z, a, b in {-1, 0, 1}."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def word_tokens(valid: torch.Tensor, pooled_index: torch.Tensor) -> torch.Tensor:
    """(B, n_y) bool: the caption's word tokens, i.e. the valid tokens other than <sot> (0) and the end token
    (``pooled_index``, CLIP's EOT)."""
    if valid.dim() != 2 or pooled_index.shape != valid.shape[:1]:
        raise ValueError(f"valid must be (B, n_y) and pooled_index (B,), got {tuple(valid.shape)} and "
                         f"{tuple(pooled_index.shape)}")
    words = valid.bool().clone()
    words[:, 0] = False
    words[torch.arange(valid.shape[0], device=valid.device), pooled_index.long()] = False
    return words


def _check(M: torch.Tensor, grid: tuple[int, int], subjects: Sequence[Sequence[int]], words: torch.Tensor) -> None:
    if M.dim() != 3 or M.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"the map M must be (B, n_x = {grid[0]} x {grid[1]}, n_y), got {tuple(M.shape)}")
    if grid[0] < 2 or grid[1] < 2:
        raise ValueError(f"the grid must be at least 2 x 2 (reflected borders), got {grid}")
    if tuple(words.shape) != (M.shape[0], M.shape[2]) or words.dtype != torch.bool:
        raise ValueError(f"words must be a bool (B, n_y) = {(M.shape[0], M.shape[2])} tensor, got "
                         f"{tuple(words.shape)} {words.dtype}")
    if len(subjects) != M.shape[0]:
        raise ValueError(f"subjects: one list of token indices per sample ({M.shape[0]}), got {len(subjects)}")
    for b, toks in enumerate(subjects):
        for s in toks:
            if not 0 <= int(s) < M.shape[2] or not bool(words[b, int(s)]):
                raise ValueError(f"subject token {s} of sample {b} is not one of its caption's word tokens "
                                 f"{torch.nonzero(words[b]).flatten().tolist()}")


def excite_loss_literal(M: torch.Tensor, grid: tuple[int, int], subjects: Sequence[Sequence[int]],
                        words: torch.Tensor, sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    """sum_b max_{s in subjects[b]} (1 - max_u (G * Abar_b^s)(u)), written out cell by cell (the reference form).

    M (B, n_x = h w, n_y) the cross-attention map; subjects[b] the subject token indices of sample b (may be empty);
    words (B, n_y) bool the tokens Abar is renormalised over (:func:`word_tokens`)."""
    _check(M, grid, subjects, words)
    h, w = grid
    acc = torch.promote_types(M.dtype, torch.float32)
    g = gaussian_kernel(sigma, acc).to(M.device)

    def reflect(i: int, n: int) -> int:  # index -1 -> 1, n -> n - 2 (reflection without repeating the edge)
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    total = M.new_zeros((), dtype=acc)
    for b in range(M.shape[0]):
        if len(subjects[b]) == 0:
            continue
        word_ids = [j for j in range(M.shape[2]) if bool(words[b, j])]
        losses = []
        for s in subjects[b]:
            Abar = []
            for u in range(h * w):
                denom = sum(M[b, u, j].to(acc) for j in word_ids)
                Abar.append(M[b, u, int(s)].to(acc) / denom if bool(denom > 0) else denom * 0)  # 0 / 0 := 0
            smoothed = [sum(g[a + 1, e + 1] * Abar[reflect(r + a, h) * w + reflect(c + e, w)]
                            for a in (-1, 0, 1) for e in (-1, 0, 1))
                        for r in range(h) for c in range(w)]
            losses.append(1 - torch.stack(smoothed).amax())  # amax: tied peaks share the gradient evenly
        total = total + torch.stack(losses).amax()
    return total


def excite_loss(M: torch.Tensor, grid: tuple[int, int], subjects: Sequence[Sequence[int]], words: torch.Tensor,
                sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    """The fast form of :func:`excite_loss_literal` (one gather, one conv2d); equal to it on every input, gradients
    included (a cell whose word tokens hold no attention has Abar = 0 in both)."""
    _check(M, grid, subjects, words)
    h, w = grid
    acc = torch.promote_types(M.dtype, torch.float32)
    pairs = [(b, int(s)) for b, toks in enumerate(subjects) for s in toks]
    if not pairs:
        return M.sum().to(acc) * 0  # keeps the graph
    b_idx = torch.tensor([p[0] for p in pairs], device=M.device)
    s_idx = torch.tensor([p[1] for p in pairs], device=M.device)
    Mw = M.to(acc) * words[:, None, :].to(acc)  # (B, n_x, n_y): non-word tokens out
    denom = Mw.sum(-1)[b_idx]  # (P, n_x)
    pos = denom > 0
    Abar = torch.where(pos, M[b_idx, :, s_idx].to(acc) / torch.where(pos, denom, torch.ones_like(denom)),
                       torch.zeros_like(denom))  # (P, n_x), 0 / 0 := 0 (no NaN in the gradient either)
    img = F.pad(Abar.reshape(-1, 1, h, w), (1, 1, 1, 1), mode="reflect")
    smooth = F.conv2d(img, gaussian_kernel(sigma, acc).to(M.device)[None, None])  # (P, 1, h, w)
    loss_p = 1 - smooth.flatten(1).amax(1)  # (P,)
    per_sample = torch.full((M.shape[0],), -math.inf, dtype=acc, device=M.device).scatter_reduce(
        0, b_idx, loss_p, reduce="amax")
    return per_sample[torch.isfinite(per_sample)].sum()


@dataclass(frozen=True)
class Excite:
    """The sampling-time update (``sampling.sample(..., excite=Excite(...))``).

    subjects: per sample (B lists), the token indices whose maps are excited (e.g. each object's shape word);
    scale: alpha at the first step (alpha_i = scale (1 - i / (2 N)));
    steps: the number of first sampler steps that are updated (A&E: the first half);
    grid: the block grid whose maps are averaged, None: the second-finest grid of the U-Net;
    sigma: the Gaussian's sigma in cells.
    """

    subjects: tuple[tuple[int, ...], ...]
    scale: float = 20.0
    steps: int = 10
    grid: tuple[int, int] | None = None
    sigma: float = GAUSS_SIGMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "subjects", tuple(tuple(int(s) for s in toks) for toks in self.subjects))
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"excite scale must be a finite number >= 0, got {self.scale}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"excite steps must be an int >= 0 (the first sampler steps updated), got {self.steps!r}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 2):
            raise ValueError(f"excite grid must be None or (h, w) with h, w >= 2, got {self.grid}")
        if not self.sigma > 0:
            raise ValueError(f"excite sigma must be > 0, got {self.sigma}")

    def alpha(self, i: int, n_steps: int) -> float:
        """The step size at sampler step i of n_steps: scale (1 - i / (2 n_steps)) while i < steps, else 0."""
        return self.scale * (1 - i / (2 * n_steps)) if i < self.steps else 0.0

    def pick_grid(self, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The grid whose blocks' maps are averaged: ``grid`` if set (it must be one of the blocks'), else the
        second-finest grid among ``grids`` (the finest when there is only one)."""
        sizes = sorted({tuple(g) for g in grids}, key=lambda g: g[0] * g[1], reverse=True)
        if self.grid is not None:
            if tuple(self.grid) not in sizes:
                raise ValueError(f"excite grid {tuple(self.grid)} is not a transformer block's grid; the U-Net's are "
                                 f"{sizes}")
            return tuple(self.grid)
        return sizes[1] if len(sizes) > 1 else sizes[0]

    def update(self, model, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step z <- z - alpha grad_z L on the conditional branch. Returns ``(z', L)`` (L detached)."""
        hidden, valid, pooled = cond
        if len(self.subjects) != x.shape[0]:
            raise ValueError(f"excite: {len(self.subjects)} subject lists for a batch of {x.shape[0]} samples")
        if not any(self.subjects):  # nothing to excite: no model call, the latents as they are
            return x, x.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            _, aux = model(xg, t, hidden, valid, pooled, return_maps=True)
            grid = self.pick_grid([a.grid for a in aux])
            maps = [a.attn_map for a in aux if tuple(a.grid) == grid]
            L = excite_loss(torch.stack(maps).mean(0), grid, self.subjects, word_tokens(valid, pooled), self.sigma)
            (g,) = torch.autograd.grad(L, xg)
        return (x - alpha * g.to(x.dtype)).detach(), L.detach()
