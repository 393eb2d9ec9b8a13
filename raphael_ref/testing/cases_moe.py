"""Golden cases of the expert FFN, the space-MoE and the time-MoE (RAPHAEL Sec. 3.1, App. 7.1, 7.3).

Expert parameters are inputs of each golden (drawn like nn.Linear's init, with biases of size
O(1) so that e_k(0) is far from zero). Outputs are O(1). Tolerances: the project defaults
(``DEFAULT_TOL``: float32 (1e-5, 1e-6), float16 (5e-3, 5e-3), bfloat16 (3e-2, 3e-2), i.e. ~150 u,
~10 u, ~8 u). Each case is a short chain (two matmuls of 4-12 terms around an erf GELU, then a
mean over n_y = 5 terms or one product w_b e): rounding the float64 inputs and parameters costs
~u each and the chain a few u more. Measured over seeds 0-4, the smallest c with rtol = atol = c
that passes is <= 1.6 u (float32), 1.0 u (float16), 1.2 u (bfloat16) of the unit roundoff u
(6.0e-8, 4.9e-4, 3.9e-3), so the defaults leave a margin of >= 6x.
"""

from __future__ import annotations

import math

import torch

from raphael_ref.experts import ExpertBank, expert_ffn
from raphael_ref.space_moe import space_moe, space_moe_literal
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors
from raphael_ref.time_moe import time_moe, time_moe_literal

F64 = torch.float64


def _expert_params(gen: torch.Generator, k: int, d: int, hidden: int) -> Tensors:
    """Stacked expert parameters: weights ~ U(+-1/sqrt(fan_in)) as nn.Linear, biases ~ N(0, 1/4)."""
    def u(shape, fan_in):
        return (2 * torch.rand(shape, generator=gen, dtype=F64) - 1) / math.sqrt(fan_in)
    return {"w1": u((k, d, hidden), d), "b1": 0.5 * torch.randn(k, hidden, generator=gen, dtype=F64),
            "w2": u((k, hidden, d), hidden), "b2": 0.5 * torch.randn(k, d, generator=gen, dtype=F64)}


def _bank(x: Tensors) -> ExpertBank:
    return ExpertBank.from_params(x["w1"], x["b1"], x["w2"], x["b2"])


# --- moe.expert_ffn: one expert, x (7, 6), hidden 12 ---------------------------------------------

def _expert_inputs(gen: torch.Generator) -> Tensors:
    p = _expert_params(gen, 1, 6, 12)
    x = torch.randn(7, 6, generator=gen, dtype=F64)  # (n, d)
    return {"x": x, "w1": p["w1"][0], "b1": p["b1"][0], "w2": p["w2"][0], "b2": p["b2"][0]}


def _expert_compute(x: Tensors) -> Tensors:
    return {"out": expert_ffn(x["x"], x["w1"], x["b1"], x["w2"], x["b2"])}


# --- smoe.output: B 2, n_x 6, n_y 5, d 4, hidden 8, k 3 ------------------------------------------

def _smoe_inputs(gen: torch.Generator) -> Tensors:
    B, n_x, n_y, d, hidden, k = 2, 6, 5, 4, 8, 3
    M = (2 * torch.randn(B, n_x, n_y, generator=gen, dtype=F64)).softmax(-1)  # (B, n_x, n_y)
    masks = M >= 0.2 * M.amax(dim=1, keepdim=True)  # (B, n_x, n_y)  alpha = 0.2 (Table 2)
    return {
        "h": torch.randn(B, n_x, d, generator=gen, dtype=F64),  # (B, n_x, d)
        "masks": masks,
        "routes": torch.arange(B * n_y).reshape(B, n_y) % k,  # (B, n_y)  every expert gets tokens
        "weights": 1 - torch.rand(B, n_y, generator=gen, dtype=F64),  # (B, n_y)  gate-like, in (0, 1]
        "valid": torch.tensor([[True, True, True, False, False], [True, True, True, True, False]]),  # (B, n_y)
        **_expert_params(gen, k, d, hidden),
    }


def _smoe_compute(x: Tensors) -> Tensors:
    bank = _bank(x)
    args = (x["h"], x["masks"], x["routes"], x["weights"], bank)
    return {
        "out": space_moe_literal(*args, valid=x["valid"]),
        "out_valid_only": space_moe_literal(*args, valid=x["valid"], count_padding=False),
        "out_dense": space_moe(*args, valid=x["valid"], impl="dense"),
        "out_gather": space_moe(*args, valid=x["valid"], impl="gather"),
    }


# --- tmoe.output: B 4, n_x 3, d 4, hidden 8, k 2 ----------------------------------------------------

def _tmoe_inputs(gen: torch.Generator) -> Tensors:
    return {
        "h": torch.randn(4, 3, 4, generator=gen, dtype=F64),  # (B, n_x, d)
        "routes": torch.tensor([1, 0, 1, 1]),  # (B,)  both experts used, out of batch order
        "weights": 1 - torch.rand(4, generator=gen, dtype=F64),  # (B,)
        **_expert_params(gen, 2, 4, 8),
    }


def _tmoe_compute(x: Tensors) -> Tensors:
    bank = _bank(x)
    return {"out": time_moe_literal(x["h"], x["routes"], x["weights"], bank),
            "out_fast": time_moe(x["h"], x["routes"], x["weights"], bank)}


TOL = {name: DEFAULT_TOL[name] for name in ("float32", "float16", "bfloat16")}  # see the module docstring

CASES = [
    GoldenCase("moe.expert_ffn", _expert_inputs, _expert_compute, TOL, seed=0),
    GoldenCase("smoe.output", _smoe_inputs, _smoe_compute, TOL, seed=0),
    GoldenCase("tmoe.output", _tmoe_inputs, _tmoe_compute, TOL, seed=0),
]
