"""Golden of the LoRA update (spec id ``lora.update``; Hu et al. 2021, as RAPHAEL Sec. 4.1 / App. 7.8 use it).

One linear layer d_in 12 -> d_out 10 (bias), rank r = 3, alpha = 6, strength s = 0.7, on x (2, 5, 12).
W, b and A are drawn like nn.Linear's init (U(+-1/sqrt(d_in))), B ~ N(0, 1/4): a *trained* adapter (B = 0
at init would make the update vanish). Outputs, all the same y = x W^T + b + s (alpha / r) (x A^T) B^T:

    out         lora.lora_linear_literal (plain torch)
    out_peft    peft's lora.Linear wrapping an nn.Linear holding W, b, with lora_A = A, lora_B = B, scale s
    out_merged  the same peft layer after merge (one matmul with W + s (alpha / r) B A)
    delta_w     s (alpha / r) B A (lora.lora_delta_weight), (d_out, d_in)
    w_restored  the peft layer's base weight after merge then unmerge (= W up to two roundings)

Tolerances: the project defaults (``DEFAULT_TOL``: float32 (1e-5, 1e-6), float16 (5e-3, 5e-3), bfloat16
(3e-2, 3e-2)). Each output is a chain of three short matmuls (12, 3 and 3 terms) on O(1) values, or
(merged) one add of the O(1) update into W before a 12-term matmul; rounding the inputs costs ~u and the
chain a few u more. Measured over seeds 0-4: max |err| / (|ref| + 1) <= 4.0 u (float32), 2.2 u (float16),
2.3 u (bfloat16) of the unit roundoff u (6.0e-8, 4.9e-4, 3.9e-3), so the defaults leave a margin of >= 3x
(float32: ~40x). In float64 the three outputs agree to 4.4e-16 and w_restored equals W to 2.8e-17.
"""

from __future__ import annotations

import math

import torch

from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

F64 = torch.float64
D_IN, D_OUT, R, ALPHA, SCALE = 12, 10, 3, 6.0, 0.7


def _inputs(gen: torch.Generator) -> Tensors:
    def u(shape):
        return (2 * torch.rand(shape, generator=gen, dtype=F64) - 1) / math.sqrt(D_IN)
    return {
        "x": torch.randn(2, 5, D_IN, generator=gen, dtype=F64),  # (B, n, d_in)
        "weight": u((D_OUT, D_IN)),  # W (d_out, d_in)
        "bias": u((D_OUT,)),  # b (d_out,)
        "A": u((R, D_IN)),  # (r, d_in)
        "B": 0.5 * torch.randn(D_OUT, R, generator=gen, dtype=F64),  # (d_out, r)
    }


def peft_linear(weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, alpha: float,
                scale: float = 1.0) -> torch.nn.Module:
    """A peft ``lora.Linear`` around an ``nn.Linear`` holding (weight, bias), with lora_A = A, lora_B = B and
    strength ``scale``, in the weights' dtype and device (eval mode)."""
    from peft import LoraConfig, inject_adapter_in_model

    r = A.shape[0]
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                 dtype=weight.dtype, device=weight.device)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, init_lora_weights=False)
    inject_adapter_in_model(cfg, holder)
    layer = holder.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if bias is not None:
            layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.set_scale("default", scale)
    return layer.eval()


def _compute(x: Tensors) -> Tensors:
    from raphael_ref.lora import lora_delta_weight, lora_linear_literal

    args = (x["weight"], x["bias"], x["A"], x["B"], ALPHA, R)
    layer = peft_linear(x["weight"], x["bias"], x["A"], x["B"], ALPHA, SCALE)
    with torch.no_grad():
        out_peft = layer(x["x"])
        layer.merge()
        out_merged = layer(x["x"])
        layer.unmerge()
        w_restored = layer.base_layer.weight.detach().clone()
    return {
        "out": lora_linear_literal(x["x"], *args, scale=SCALE),
        "out_peft": out_peft,
        "out_merged": out_merged,
        "delta_w": lora_delta_weight(x["A"], x["B"], ALPHA, R, scale=SCALE),
        "w_restored": w_restored,
    }


TOL = {name: DEFAULT_TOL[name] for name in ("float32", "float16", "bfloat16")}  # see the module docstring

CASES = [GoldenCase("lora.update", _inputs, _compute, TOL, seed=0)]
