"""Token-level supervision of the cross-attention maps: not in RAPHAEL, an option (erratum E82).

RAPHAEL's premise (Sec. 3.1, Fig. 2) is that the cross-attention map M of a text token marks the image
region of the concept it names, so that the space-MoE routes that region to the token's expert. The
paper gets that localisation from scale alone. At toy scale it does not appear: each shape word's map
covers both objects of a two-object prompt, and the two objects are bound to their words at chance
(docs/results/toy_binding.md). The synthetic data know each object's pixels, so the maps can be taught
directly, as TokenCompose (Wang et al., CVPR 2024, Eq. 2, "token loss") does with segmentation masks::

    L_tok = 1/N sum_{(b, j)} (1 - sum_u m_{b,j}(u) A_{b,j}(u) / sum_u A_{b,j}(u))^2

over the N supervised (sample, token) pairs, where A_{b,j}(u) = M[b, u, j] is the head-averaged
cross-attention map of token j at image position u (attention.cross_attention_map, E8) and m_{b,j}(u)
in [0, 1] the fraction of the block's cell u covered by the object that token j names (the pixel mask
averaged over each cell: area pooling to the block's grid). L_tok is the squared share of the token's
attention mass that falls outside its object: 0 when all of it lies inside, 1 when none does. The
model's term is the mean of L_tok over the transformer blocks.

Two forms, equal on every input (tests/test_token_attention.py): :func:`token_attention_loss_literal`
(plain loops over pairs and positions) and :func:`token_attention_loss` (one gather per block).
:func:`token_targets` finds, in each caption of the synthetic set, the tokens of each object's colour,
shape and position words and pairs them with that object's pixel mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TOKEN_WORDS", "TokenTargets", "token_targets", "grid_masks", "token_attention_loss_literal",
           "token_attention_loss", "model_token_attention_loss"]

# which words of an object's phrase "a red circle on the left" are supervised with the object's mask
TOKEN_WORDS: tuple[str, ...] = ("color", "shape", "position")


@dataclass(frozen=True)
class TokenTargets:
    """N supervised (sample, token) pairs: sample (N,) long, token (N,) long, mask (N, H, W) float32 in [0, 1]."""

    sample: torch.Tensor
    token: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        s, j, m = self.sample, self.token, self.mask
        if not all(isinstance(x, torch.Tensor) for x in (s, j, m)):
            raise ValueError("TokenTargets: sample, token and mask must be tensors")
        if s.dtype != torch.long or j.dtype != torch.long or s.dim() != 1 or s.shape != j.shape:
            raise ValueError(f"TokenTargets: sample and token must be long tensors of one shape (N,), got "
                             f"{tuple(s.shape)} {s.dtype} and {tuple(j.shape)} {j.dtype}")
        if not m.is_floating_point() or m.dim() != 3 or m.shape[0] != s.shape[0]:
            raise ValueError(f"TokenTargets: mask must be a float tensor (N={s.shape[0]}, H, W), got "
                             f"{tuple(m.shape)} {m.dtype}")

    def to(self, device) -> "TokenTargets":
        return TokenTargets(self.sample.to(device), self.token.to(device), self.mask.to(device))

    def select(self, samples: slice) -> "TokenTargets":
        """The pairs of the samples ``start <= b < stop`` of ``samples`` (a micro-batch), renumbered from 0."""
        if not isinstance(samples, slice) or samples.step not in (None, 1) or not isinstance(samples.start, int) \
                or not isinstance(samples.stop, int) or not 0 <= samples.start <= samples.stop:
            raise ValueError(f"select takes a slice(start, stop) with 0 <= start <= stop, got {samples!r}")
        keep = (self.sample >= samples.start) & (self.sample < samples.stop)
        return TokenTargets(self.sample[keep] - samples.start, self.token[keep], self.mask[keep])


def _word_pieces(caption: str) -> list[str]:
    """The caption's words and commas in order, as the CLIP tokenizer's pre-split sees them (template captions)."""
    return re.findall(r"[a-z]+|,", caption)


def token_targets(scenes: Sequence, captions: Sequence[str], n_y: int,
                  words: Sequence[str] = TOKEN_WORDS) -> TokenTargets:
    """The supervised (sample, token, mask) of a batch of synthetic scenes (``data.synthetic.Scene``).

    ``captions[b]`` is the caption the model was given for ``scenes[b]``: an empty caption (dropped for
    classifier-free guidance) gives no pair. For each object of "a red circle on the left" the tokens of the
    words in ``words`` (``"color"`` "red", ``"shape"`` "circle", ``"position"`` "left"; multi-token words
    such as "triangles" give every token) are paired with the object's pixel mask. A count scene ("two
    green triangles on the left and in the center") pairs its colour and shape words with the union of its
    objects and each position word with its own object. Tokens are numbered as ``TextEncoder.tokenize``
    does (SOT at 0); tokens beyond the context (``n_y`` - 1: EOT's slot) are left out.
    """
    from raphael_ref.data.synthetic import POSITION_PHRASES, Scene, is_count_scene, object_mask
    from raphael_ref.text_encoder import clip_tokenizer

    words = tuple(words)
    if not words or any(w not in TOKEN_WORDS for w in words) or len(set(words)) != len(words):
        raise ValueError(f"words must be distinct names from {TOKEN_WORDS}, got {words!r}")
    if len(scenes) != len(captions):
        raise ValueError(f"token_targets: {len(scenes)} scenes but {len(captions)} captions")
    tok = clip_tokenizer()
    pos_word = {p: phrase.split()[-1] for p, phrase in POSITION_PHRASES.items()}  # "on the left" -> "left"
    sample, token, masks = [], [], []
    for b, (scene, caption) in enumerate(zip(scenes, captions)):
        if not isinstance(scene, Scene):
            raise ValueError(f"token_targets: scenes[{b}] is a {type(scene).__name__}, not a data.synthetic.Scene "
                             f"(the token-attention loss needs the synthetic set's object masks)")
        if caption == "":
            continue
        if caption != scene.caption:
            raise ValueError(f"token_targets: caption {b} {caption!r} is not its scene's caption {scene.caption!r}")
        objs = scene.objects
        pixel = [object_mask(o, scene.image_size) for o in objs]  # each object's pixel mask, (S, S)
        expected: list[tuple[str, np.ndarray]] = []  # the supervised words in caption order, with their masks
        if is_count_scene(objs):  # "two green triangles on the left and in the center" (caption_for)
            union = np.maximum.reduce(pixel)
            expected += [(objs[0].color, union)] if "color" in words else []
            expected += [(objs[0].shape + "s", union)] if "shape" in words else []
            expected += [(pos_word[o.position], m) for o, m in zip(objs, pixel)] if "position" in words else []
        else:
            for o, m in zip(objs, pixel):
                expected += [(o.color, m)] if "color" in words else []
                expected += [(o.shape, m)] if "shape" in words else []
                expected += [(pos_word[o.position], m)] if "position" in words else []
        k, first = 0, 1  # next expected word; token index of the current piece (SOT at 0)
        for piece in _word_pieces(caption):
            n = len(tok.encode(piece))
            if k < len(expected) and piece == expected[k][0]:
                for j in range(first, min(first + n, n_y - 1)):
                    sample.append(b)
                    token.append(j)
                    masks.append(expected[k][1])
                k += 1
            first += n
        if k != len(expected):  # the caption template changed under this function
            raise ValueError(f"token_targets: found {k} of the {len(expected)} supervised words in {caption!r}")
    if not sample:
        return TokenTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, 1, 1))
    return TokenTargets(torch.tensor(sample, dtype=torch.long), torch.tensor(token, dtype=torch.long),
                        torch.from_numpy(np.stack(masks)))


def _check(M: torch.Tensor, targets: TokenTargets) -> None:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point() or M.dim() != 3:
        got = f"{tuple(M.shape)} {M.dtype}" if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"a cross-attention map must be a float tensor (B, n_x, n_y), got {got}")
    if not isinstance(targets, TokenTargets):
        raise ValueError(f"targets must be a TokenTargets (token_targets), got {type(targets).__name__}")
    if targets.sample.numel() and (int(targets.sample.max()) >= M.shape[0] or int(targets.token.max()) >= M.shape[2]
                                   or int(targets.sample.min()) < 0 or int(targets.token.min()) < 0):
        raise ValueError(f"targets index samples / tokens outside the map's (B={M.shape[0]}, n_y={M.shape[2]})")


def grid_masks(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """m_{b,j}(u): the pixel masks (N, H, W) averaged over the cells of a (h, w) grid, (N, h * w), row-major
    as the blocks flatten their tokens. H and W must be multiples of h and w (the U-Net's grids are)."""
    N, H, W = mask.shape
    h, w = grid
    if H % h or W % w:
        raise ValueError(f"the mask side ({H}, {W}) must be a multiple of the block's grid {grid}")
    return F.avg_pool2d(mask[:, None], (H // h, W // w)).reshape(N, h * w)


def token_attention_loss_literal(M: torch.Tensor, grid: tuple[int, int], targets: TokenTargets) -> torch.Tensor:
    """TokenCompose's token loss on one block's map M (B, n_x, n_y), as plain loops (erratum E82).

    1/N sum over the pairs (b, j) of (1 - sum_u m(u) M[b, u, j] / sum_u M[b, u, j])^2, m the pair's pixel mask
    averaged over the cells of ``grid`` (n_x = h w). 0-d tensor in float32 or wider; 0 with no pair.
    """
    _check(M, targets)
    acc = torch.promote_types(M.dtype, torch.float32)
    h, w = grid
    H, W = targets.mask.shape[1:]
    fh, fw = H // h, W // w
    total = torch.zeros((), dtype=acc, device=M.device)
    N = targets.sample.numel()
    for n in range(N):
        b, j = int(targets.sample[n]), int(targets.token[n])
        inside, mass = torch.zeros((), dtype=acc), torch.zeros((), dtype=acc)
        for r in range(h):
            for c in range(w):
                cell = targets.mask[n, r * fh:(r + 1) * fh, c * fw:(c + 1) * fw].to(acc).mean()  # m(u)
                a = M[b, r * w + c, j].to(acc)  # A(u)
                inside = inside + cell * a
                mass = mass + a
        total = total + (1 - inside / mass) ** 2
    return total / N if N else total


def token_attention_loss(M: torch.Tensor, grid: tuple[int, int], targets: TokenTargets,
                         eps: float = 1e-12) -> torch.Tensor:
    """:func:`token_attention_loss_literal` with one gather and one pooling (no Python loop, no host sync).

    ``eps`` guards the division for a column with no attention mass at all (only a fully masked key has that;
    a softmax column of a valid key is positive everywhere)."""
    if M.dim() != 3 or M.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"the map M must be (B, n_x = {grid[0]} x {grid[1]}, n_y), got {tuple(M.shape)}")
    acc = torch.promote_types(M.dtype, torch.float32)
    if targets.sample.numel() == 0:
        return M.sum().to(acc) * 0  # keeps the graph (every rank / micro-step runs the same backward)
    m = grid_masks(targets.mask.to(M.device, acc), grid)  # (N, n_x)
    A = M[targets.sample, :, targets.token].to(acc)  # (N, n_x): the pairs' attention columns
    share = (A * m).sum(1) / A.sum(1).clamp_min(eps)  # (N,)
    return ((1 - share) ** 2).mean()


def model_token_attention_loss(maps: Sequence[tuple[torch.Tensor, tuple[int, int]]],
                               targets: TokenTargets) -> torch.Tensor:
    """The mean of :func:`token_attention_loss` over the blocks' ``(M, grid)`` (``BlockAux.attn_map``, ``.grid``)."""
    if not maps:
        raise ValueError("no block returned its cross-attention map: call the model with return_maps=True")
    return torch.stack([token_attention_loss(M, grid, targets) for M, grid in maps]).mean()
