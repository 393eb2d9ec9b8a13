"""Golden of the ControlNet join (spec id ``controlnet.zero_join``; Zhang et al. 2023, as RAPHAEL Fig. 21 uses it).

Three U-Net skips h_i (2, 4, 6, 6), (2, 8, 3, 3), (2, 8, 3, 3) and a middle output (2, 8, 3, 3), the ControlNet
copy's features c_i of the same shapes, and *trained* 1x1 join convolutions W_i ~ N(0, 1/C), b_i ~ N(0, 1/4)
(zero at init would make the join vanish), strength s = 0.7. Outputs, all h_i + s (W_i c_i + b_i):

    skip_0..2, mid            controlnet.zero_conv_join_literal (one output channel at a time)
    fast_skip_0..2, fast_mid  the U-Net's join: nn.Conv2d 1x1 (the ControlNet's zero_convs) times s, then
                              controlnet.add_control (what RaphaelUNet.forward runs)

Tolerances: the project defaults (``DEFAULT_TOL``: float32 (1e-5, 1e-6), float16 (5e-3, 5e-3), bfloat16
(3e-2, 3e-2)). Each output is one add of an O(1) skip and an 8-term dot product (plus a bias) on O(1)
values: rounding the inputs costs ~u, the dot product a few u more (8 terms), so a few u of the unit roundoff
(6.0e-8, 4.9e-4, 3.9e-3) relative to |ref| + 1; the defaults are >= 3x that (float32: ~15x).
"""

from __future__ import annotations

import torch

from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

F64 = torch.float64
SHAPES = ((2, 4, 6, 6), (2, 8, 3, 3), (2, 8, 3, 3))
MID = (2, 8, 3, 3)
SCALE = 0.7


def _inputs(gen: torch.Generator) -> Tensors:
    x: Tensors = {}
    for i, shape in enumerate((*SHAPES, MID)):
        name = f"skip_{i}" if i < len(SHAPES) else "mid"
        C = shape[1]
        x[f"h_{name}"] = torch.randn(shape, generator=gen, dtype=F64)  # (B, C, H, W) U-Net activation
        x[f"c_{name}"] = torch.randn(shape, generator=gen, dtype=F64)  # (B, C, H, W) ControlNet feature
        x[f"w_{name}"] = torch.randn(C, C, generator=gen, dtype=F64) / C ** 0.5  # (C, C) 1x1 conv weight
        x[f"b_{name}"] = 0.5 * torch.randn(C, generator=gen, dtype=F64)  # (C,)
    return x


def _compute(x: Tensors) -> Tensors:
    from raphael_ref.controlnet import ControlResiduals, add_control, zero_conv_join_literal

    names = [f"skip_{i}" for i in range(len(SHAPES))]
    skips, mid = zero_conv_join_literal([x[f"h_{n}"] for n in names], x["h_mid"], [x[f"c_{n}"] for n in names],
                                        x["c_mid"], [x[f"w_{n}"] for n in names], [x[f"b_{n}"] for n in names],
                                        x["w_mid"], x["b_mid"], scale=SCALE)

    def conv(n):  # the ControlNet's nn.Conv2d 1x1 holding W, b
        W = x[f"w_{n}"]
        layer = torch.nn.Conv2d(W.shape[0], W.shape[0], 1, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            layer.weight.copy_(W[:, :, None, None])
            layer.bias.copy_(x[f"b_{n}"])
            return layer(x[f"c_{n}"]) * SCALE

    res = ControlResiduals(tuple(conv(n) for n in names), conv("mid"))
    fast, fast_mid = add_control([x[f"h_{n}"] for n in names], x["h_mid"], res)
    out = {n: s for n, s in zip(names, skips)}
    out.update({f"fast_{n}": s for n, s in zip(names, fast)})
    out["mid"], out["fast_mid"] = mid, fast_mid
    return out


TOL = {name: DEFAULT_TOL[name] for name in ("float32", "float16", "bfloat16")}  # see the module docstring

CASES = [GoldenCase("controlnet.zero_join", _inputs, _compute, TOL, seed=0)]
