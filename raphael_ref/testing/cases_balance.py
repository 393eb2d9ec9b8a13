"""Golden case: the optional load-balancing loss of the gates (Switch Transformer, erratum E73)."""

from __future__ import annotations

import torch

from raphael_ref.balance import balance_loss, balance_loss_literal
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors


def _balance_inputs(gen: torch.Generator) -> Tensors:
    """A space-MoE layer (2 prompts x 7 tokens, 6 experts, the second prompt with 3 padding slots) and a
    time-MoE layer (5 samples, 4 experts). Routes are the argmax of the probabilities (as the gates route,
    without noise); they are integer inputs, so half-precision rounding of the probabilities cannot move them."""
    p_space = torch.softmax(2 * torch.randn(2, 7, 6, generator=gen, dtype=torch.float64), dim=-1)  # (2, 7, 6)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    p_time = torch.softmax(2 * torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=-1)  # (5, 4)
    return {"p_space": p_space, "routes_space": p_space.argmax(-1), "valid": valid,
            "p_time": p_time, "routes_time": p_time.argmax(-1)}


def _balance(x: Tensors) -> Tensors:
    return {
        "space": balance_loss(x["p_space"], x["routes_space"], x["valid"]),
        "space_all_slots": balance_loss(x["p_space"], x["routes_space"]),
        "space_literal": balance_loss_literal(x["p_space"], x["routes_space"], x["valid"]),
        "time": balance_loss(x["p_time"], x["routes_time"]),
    }


# L = n sum_i f_i P_i with sum_i f_i = 1: rounding the probabilities (u/2 relative each, P_i <= 1) moves L by
# at most n u/2 (6 u/2 = 3 u); the sums run in float32 for every dtype. 3 u is 1.2e-2 (bf16) and 1.5e-3 (fp16),
# inside DEFAULT_TOL's 3e-2 / 5e-3 on values ~1; float32: DEFAULT_TOL (O(10)-term sums).
CASES = [
    GoldenCase("moe.balance_loss", _balance_inputs, _balance,
               {k: DEFAULT_TOL[k] for k in ("float32", "bfloat16", "float16")}, seed=73),
]
