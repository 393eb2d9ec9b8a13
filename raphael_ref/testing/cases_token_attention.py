"""Golden case: the optional token-attention loss on the cross-attention maps (TokenCompose's token loss, E82)."""

from __future__ import annotations

import torch

from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors
from raphael_ref.token_attention import TokenTargets, token_attention_loss, token_attention_loss_literal


def _token_inputs(gen: torch.Generator) -> Tensors:
    """Two blocks' maps of 2 prompts x 5 tokens: a 4 x 4 grid and a 2 x 2 grid (softmax over the tokens), and
    5 supervised pairs with soft 8 x 8 pixel masks (a 0/1 square, a disk-like blob, an empty corner)."""
    M4 = torch.softmax(2 * torch.randn(2, 16, 5, generator=gen, dtype=torch.float64), dim=-1)  # (2, 16, 5)
    M2 = torch.softmax(2 * torch.randn(2, 4, 5, generator=gen, dtype=torch.float64), dim=-1)  # (2, 4, 5)
    mask = torch.zeros(5, 8, 8, dtype=torch.float64)
    mask[0, 1:4, 1:4] = 1
    mask[1, 4:8, 2:7] = 1
    mask[2] = (torch.rand(8, 8, generator=gen, dtype=torch.float64) > 0.6).double()
    mask[3, 0:2, 6:8] = 1
    mask[4, 3:6, 3:6] = 1
    return {"M4": M4, "M2": M2, "mask": mask, "sample": torch.tensor([0, 0, 1, 1, 1]),
            "token": torch.tensor([1, 2, 1, 3, 4])}


def _token(x: Tensors) -> Tensors:
    t = TokenTargets(x["sample"], x["token"], x["mask"])
    return {
        "grid4": token_attention_loss(x["M4"], (4, 4), t),
        "grid2": token_attention_loss(x["M2"], (2, 2), t),
        "grid4_literal": token_attention_loss_literal(x["M4"], (4, 4), t),
    }


# L_tok = mean of (1 - s)^2, s = sum m A / sum A in [0, 1]: rounding the maps (u/2 relative each, m exact in every
# dtype as the masks' cell means of 0/1 pixels over 2 x 2 or 4 x 4 cells are dyadic) moves s by at most u and
# (1 - s)^2 by 2u; the sums run in float32 for every dtype, so DEFAULT_TOL (3e-2 bf16, 5e-3 fp16) holds.
CASES = [
    GoldenCase("token.attention_loss", _token_inputs, _token,
               {k: DEFAULT_TOL[k] for k in ("float32", "bfloat16", "float16")}, seed=82),
]
