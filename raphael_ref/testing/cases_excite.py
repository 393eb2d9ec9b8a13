"""Golden case: Attend-and-Excite's loss on the cross-attention maps (sampling-time option, E84)."""

from __future__ import annotations

import torch

from raphael_ref.excite import excite_loss, excite_loss_literal, word_tokens
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

_SUBJECTS = [[1, 3], [2], [], [4, 1, 2]]


def _excite_inputs(gen: torch.Generator) -> Tensors:
    """Maps of 4 prompts x 7 tokens on a 5 x 4 grid (softmax over the tokens, with attention on SOT, EOT and padding
    too), valid tokens 0..5 (EOT at 5) for three prompts and 0..6 for the last."""
    M = torch.softmax(2 * torch.randn(4, 20, 7, generator=gen, dtype=torch.float64), dim=-1)  # (4, 20, 7)
    valid = torch.zeros(4, 7, dtype=torch.bool)
    valid[:3, :6] = True
    valid[3] = True
    return {"M": M, "valid": valid, "pooled": torch.tensor([5, 5, 5, 6])}


def _excite(x: Tensors) -> Tensors:
    words = word_tokens(x["valid"], x["pooled"])
    return {
        "loss": excite_loss(x["M"], (5, 4), _SUBJECTS, words),
        "per_sample": torch.stack([excite_loss(x["M"][b:b + 1], (5, 4), _SUBJECTS[b:b + 1], words[b:b + 1])
                                   for b in range(4)]),
        "literal": excite_loss_literal(x["M"], (5, 4), _SUBJECTS, words),
    }


# L = sum_b max_s (1 - max_u (G * Abar)(u)), Abar = M_s / sum_words M: rounding the maps (u/2 relative each) moves
# Abar by ~u relative and the 9-term convex smoothing and the peak by as much; peaks <= 1 and 3 samples count, so
# |Delta L| <~ 3 u. The sums run in float32 for every dtype, so DEFAULT_TOL (3e-2 bf16 ~ 8u, 5e-3 fp16 ~ 10u) holds.
CASES = [
    GoldenCase("excite.loss", _excite_inputs, _excite,
               {k: DEFAULT_TOL[k] for k in ("float32", "bfloat16", "float16")}, seed=84),
]
