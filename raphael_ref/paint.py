"""eDiff-I's paint-with-words (seed 003; Balaji et al. 2022), on RAPHAEL's cross-attention and space-MoE.

A user paints regions for words of the prompt. For each transformer block with a grid of n_x = h w image
tokens, the region of token i is resized to the grid (area average; :func:`resize_region`) and gives the
paint map ``P`` (B, n_x, n_y): ``P[b, j, i]`` in [0, 1] is how much of image token j lies in the region
painted for text token i (0 for tokens nobody painted). Two uses:

1. **cross-attention bias** (eDiff-I): ``softmax((Q K^T + w' P) / sqrt(d))`` with
   ``w' = w log(1 + sigma) max(Q K^T)``. We add the bias to the scaled logits, per head h:

       logits_h = Q_h K_h^T / sqrt(d_head) + w log(1 + sigma_t) max_{j,i}(Q_h K_h^T / sqrt(d_head)) P

   (the same as eDiff-I's form divided by sqrt(d)); the max is taken per sample and per head over the
   image tokens and the valid keys, so that samples of one batch (and the two halves of a CFG batch)
   do not change each other. ``sigma_t = sqrt((1 - abar_t) / abar_t)``, the EDM noise level of the
   timestep; without a schedule (``alphas_cumprod`` None) the factor ``log(1 + sigma)`` is taken as 1.
   The map M of the block (thresholded masks, edge head) is the softmax of the same biased logits.
2. **space-MoE masks**: the painted tokens' thresholded masks Mhat_i are replaced by the region
   (``mode="replace"``) or OR-ed with it (``mode="add"``); the region on the grid is ``P >= 0.5``.

``weight = 0`` turns painting off altogether (neither bias nor masks): the U-Net output is then bit for
bit the one without ``paint``. Errata: E77; spec entry ``paint.attention_bias``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PaintWithWords", "BlockPaint", "resize_region", "paint_map", "paint_logit_bias_literal",
           "paint_logit_bias", "paint_masks", "paint_sigma", "find_token_indices", "MODES"]

MODES = ("replace", "add")
REGION_THRESHOLD = 0.5  # a grid token belongs to the painted region when half of it is painted


@dataclasses.dataclass(frozen=True)
class PaintWithWords:
    """What to paint, per prompt of the batch.

    regions: one list per prompt (``len(regions) == B``); each item ``(token_indices, region)`` with
             ``token_indices`` a sequence of text-token positions (0 is SOT; see :func:`find_token_indices`)
             and ``region`` a (H, W) float tensor in [0, 1] at image resolution (any H, W of the image's
             aspect ratio). An empty list: nothing painted for that prompt.
    weight:  w >= 0 of the attention bias (eDiff-I's w); 0 turns painting off (bias and masks).
    mode:    "replace" (the painted tokens' space-MoE masks become the region) or "add" (mask OR region).
    alphas_cumprod: the noise schedule's abar table (T,), for sigma_t; set by the samplers
             (:meth:`with_schedule`); None: the factor log(1 + sigma) is 1.
    """

    regions: Sequence[Sequence[tuple[Sequence[int], Tensor]]]
    weight: float = 1.0
    mode: str = "replace"
    alphas_cumprod: Tensor | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be a finite number >= 0 (0: painting off), got {w!r}")
        if isinstance(self.regions, (str, bytes)) or not isinstance(self.regions, Sequence):
            raise ValueError("regions must be a list (one per prompt) of lists of (token_indices, region)")
        for b, items in enumerate(self.regions):
            if not isinstance(items, Sequence):
                raise ValueError(f"regions[{b}] must be a list of (token_indices, region) pairs")
            for n, item in enumerate(items):
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise ValueError(f"regions[{b}][{n}] must be a pair (token_indices, region)")
                idx, region = item
                if isinstance(idx, int) or not isinstance(idx, Sequence) or not idx or \
                        not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                    raise ValueError(f"regions[{b}][{n}]: token_indices must be a non-empty list of ints, got {idx!r}")
                if not isinstance(region, Tensor) or region.dim() != 2 or not region.is_floating_point() \
                        or min(region.shape) < 1:
                    got = f"{tuple(region.shape)} {region.dtype}" if isinstance(region, Tensor) else type(region).__name__
                    raise ValueError(f"regions[{b}][{n}]: region must be a float (H, W) tensor, got {got}")
                if bool(torch.isnan(region).any()) or bool((region < 0).any()) or bool((region > 1).any()):
                    raise ValueError(f"regions[{b}][{n}]: region values must lie in [0, 1]")

    @property
    def batch_size(self) -> int:
        return len(self.regions)

    @property
    def active(self) -> bool:
        """False for weight 0 or nothing painted: the model then runs as without paint."""
        return self.weight > 0 and any(len(items) for items in self.regions)

    def with_schedule(self, alphas_cumprod: Tensor) -> "PaintWithWords":
        return dataclasses.replace(self, alphas_cumprod=alphas_cumprod)

    def padded(self, n: int) -> "PaintWithWords":
        """The spec for a batch of n >= B whose rows B.. have nothing painted (the unconditional half of CFG)."""
        if n < self.batch_size:
            raise ValueError(f"cannot pad a paint spec of batch {self.batch_size} to {n}")
        return dataclasses.replace(self, regions=list(self.regions) + [[] for _ in range(n - self.batch_size)])

    def check(self, B: int, y_valid: Tensor) -> None:
        """Batch size and token indices against the text tokens: each index a valid (non-padding) position."""
        if self.batch_size != B:
            raise ValueError(f"paint has regions for {self.batch_size} prompts, the batch has {B}")
        n_y = y_valid.shape[1]
        for b, items in enumerate(self.regions):
            for n, (idx, _) in enumerate(items):
                bad = [i for i in idx if not 0 <= i < n_y]
                if bad:
                    raise ValueError(f"regions[{b}][{n}]: token indices {bad} out of range [0, {n_y})")
                if not torch.compiler.is_compiling():
                    pad = [i for i in idx if not bool(y_valid[b, i])]
                    if pad:
                        raise ValueError(f"regions[{b}][{n}]: token indices {pad} are padding of prompt {b}")


def resize_region(region: Tensor, grid: tuple[int, int]) -> Tensor:
    """A (H, W) region in [0, 1] at image resolution -> (h * w,) on a block's grid, row-major as the image tokens.

    Area average (``adaptive_avg_pool2d``): each grid token gets the painted fraction of the pixels it covers.
    The region must have the grid's aspect ratio (H w == W h).
    """
    h, w = grid
    H, W = region.shape
    if H * w != W * h:
        raise ValueError(f"region of shape {(H, W)} does not have the aspect ratio of the grid {(h, w)}")
    return F.adaptive_avg_pool2d(region[None, None].double(), (h, w)).reshape(h * w)  # (n_x,) float64


def paint_map(paint: PaintWithWords, grid: tuple[int, int], n_y: int, device=None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """P (B, n_x, n_y): the resized region of each painted token (the max where regions of a token overlap)."""
    h, w = grid
    P = torch.zeros(paint.batch_size, h * w, n_y, dtype=torch.float64)
    for b, items in enumerate(paint.regions):
        for idx, region in items:
            r = resize_region(region.detach().cpu(), grid)  # (n_x,)
            for i in idx:
                if not 0 <= i < n_y:
                    raise ValueError(f"token index {i} out of range [0, {n_y})")
                P[b, :, i] = torch.maximum(P[b, :, i], r)
    return P.to(device=device, dtype=dtype)


def paint_sigma(paint: PaintWithWords, t: Tensor) -> Tensor:
    """log(1 + sigma_t) per sample (B,), sigma_t = sqrt((1 - abar_t) / abar_t); ones without a schedule."""
    if paint.alphas_cumprod is None:
        return torch.ones(t.shape[0], dtype=torch.float64)
    abar = paint.alphas_cumprod.detach().cpu().double()[t.detach().cpu().long()]  # (B,)
    return torch.log1p(torch.sqrt((1 - abar) / abar))


def _logit_max(logits: Tensor, key_valid: Tensor | None) -> Tensor:
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return logits.amax(dim=(-2, -1), keepdim=True)  # (B, heads, 1, 1)


def paint_logit_bias_literal(q: Tensor, k: Tensor, heads: int, P: Tensor, scale: Tensor, *,
                             key_valid: Tensor | None = None) -> Tensor:
    """eDiff-I paint-with-words bias, literal: loops over samples and heads.

    bias[b, h] = scale[b] * max_{j, i valid}(Q_bh K_bh^T / sqrt(d_head)) * P[b]; ``scale = w log(1 + sigma_t)``
    (B,); ``P`` (B, n_x, n_y). Returns (B, heads, n_x, n_y) in the softmax dtype (float32 for half inputs).
    """
    from raphael_ref.attention import softmax_dtype

    work = softmax_dtype(q.dtype)
    B, n_x, d = q.shape
    d_head = d // heads
    out = torch.zeros(B, heads, n_x, k.shape[1], dtype=work, device=q.device)
    with torch.autocast(device_type=q.device.type, enabled=False):
        for b in range(B):
            for h in range(heads):
                cols = slice(h * d_head, (h + 1) * d_head)
                logits = q[b, :, cols].to(work) @ k[b, :, cols].to(work).T / math.sqrt(d_head)  # (n_x, n_y)
                if key_valid is not None:
                    logits = logits[:, key_valid[b]]
                out[b, h] = scale[b].to(work) * logits.max() * P[b].to(work)
    return out


def paint_logit_bias(q: Tensor, k: Tensor, heads: int, P: Tensor, scale: Tensor, *,
                     key_valid: Tensor | None = None) -> Tensor:
    """Vectorised :func:`paint_logit_bias_literal` (the form the model uses): (B, heads, n_x, n_y)."""
    from raphael_ref.attention import _split_heads, softmax_dtype

    work = softmax_dtype(q.dtype)
    d_head = q.shape[-1] // heads
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = _split_heads(q.to(work), heads) @ _split_heads(k.to(work), heads).transpose(-1, -2) / math.sqrt(d_head)
        mx = _logit_max(logits, key_valid)  # (B, heads, 1, 1)
        return scale.to(device=q.device, dtype=work)[:, None, None, None] * mx * P.to(work)[:, None]


def paint_masks(masks: Tensor, P: Tensor, mode: str) -> Tensor:
    """The space-MoE masks with the painted regions: masks (B, n_x, n_y) bool, P (B, n_x, n_y) paint map.

    A token i is painted in sample b when its column of P is not all zero; its region is ``P >= 0.5``.
    "replace": Mhat_i <- region; "add": Mhat_i <- Mhat_i OR region. Unpainted tokens keep their mask.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if masks.shape != P.shape or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool of the paint map's shape {tuple(P.shape)}, got {tuple(masks.shape)} "
                         f"{masks.dtype}")
    region = P >= REGION_THRESHOLD  # (B, n_x, n_y)
    if mode == "add":
        return masks | region
    painted = (P > 0).any(dim=1, keepdim=True)  # (B, 1, n_y)
    return torch.where(painted, region, masks)


@dataclasses.dataclass
class BlockPaint:
    """What a transformer block needs: the paint map of its grid, the bias scale and the mask mode."""

    P: Tensor  # (B, n_x, n_y) float32
    scale: Tensor  # (B,) w log(1 + sigma_t)
    mode: str


def block_paints(paint: PaintWithWords, t: Tensor, n_y: int, device) -> "callable":
    """A cached grid -> BlockPaint function for one forward."""
    scale = (paint.weight * paint_sigma(paint, t)).to(device=device, dtype=torch.float32)  # (B,)
    cache: dict = {}

    def get(grid: tuple[int, int]) -> BlockPaint:
        if grid not in cache:
            cache[grid] = BlockPaint(paint_map(paint, grid, n_y, device), scale, paint.mode)
        return cache[grid]

    return get


def find_token_indices(text_encoder, prompt: str, phrase: str) -> list[int]:
    """Positions of ``phrase``'s CLIP BPE tokens in ``prompt``'s tokens (position 0 is SOT), first occurrence.

    ``text_encoder`` is the model's (anything with ``tokenize``: :class:`raphael_ref.text_encoder.TextEncoder`).
    """
    from raphael_ref.text_encoder import clip_tokenizer

    if hasattr(text_encoder, "t5") and hasattr(text_encoder, "clip"):  # T5 + CLIP (E78): CLIP's tokens follow T5's
        return [text_encoder.t5.n_y + i for i in find_token_indices(text_encoder.clip, prompt, phrase)]
    if not hasattr(text_encoder, "tokenize") or type(text_encoder).__name__ == "T5TextEncoder":
        raise ValueError(f"find_token_indices reads CLIP BPE tokens; the text encoder {type(text_encoder).__name__} has "
                         f"other tokens: give the token positions of the phrase in PaintWithWords.regions directly")
    ids = text_encoder.tokenize([prompt])[0].tolist()  # [SOT, bpe..., EOT, 0...]
    sub = clip_tokenizer().encode(phrase)
    if not sub:
        raise ValueError(f"phrase {phrase!r} has no tokens")
    for s in range(1, len(ids) - len(sub) + 1):
        if ids[s:s + len(sub)] == sub:
            return list(range(s, s + len(sub)))
    raise ValueError(f"phrase {phrase!r} is not in the tokens of prompt {prompt!r}")
