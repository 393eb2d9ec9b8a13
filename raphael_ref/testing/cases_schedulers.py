"""Golden of the diffusers-scheduler adapter's literal form (spec id ``sched.diffusers_adapter``;
raphael_ref/schedulers.py ``adapter_step_literal``).

One state x, the two CFG halves eps_c, eps_u (2, 3, 4, 4), guidance 4, abar_prev = 0.4 < abar_t = 0.6 <
abar_next = 0.8 (float64 tables, kept float64 as the spec keeps schedule tables). Outputs, per form: x_model,
eps, x0, x_next of DDIM ("ddim"), of DDIM's last step to abar = 1 ("ddim_final"), of Euler ("euler", the same
x read as the sigma-space state), of DPM-Solver++ first order ("dpm1") and second order with x0_prev
("dpm2").

Tolerances: eps = eps_u + 4 (eps_c - eps_u) rounds 3 times and scales the input rounding by up to 2 w + 1 = 9
(|eps| <= 17.6 here), and every other output inherits that absolute error (x0 divides by alpha_t = 0.77; x_next
adds O(1) multiples, DPM-Solver++ 2M a 1 / r = 4.3 on x0 - x0_prev), so the error is absolute, set by the
output scale, not relative to each entry. Observed max abs errors against the float64 golden over all outputs
(largest value 17.6): float32 1.2e-6, bfloat16 0.105 (1.5 u of 17.6), float16 1.5e-2 (1.7 u). Asserted:
float32 the project default; bfloat16 and float16 atol 3x the observed error (0.32, 0.045), rtol 3 u.
"""

from __future__ import annotations

import torch

from raphael_ref.schedulers import adapter_step_literal
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors


def _inputs(gen: torch.Generator) -> Tensors:
    shape = (2, 3, 4, 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps_c = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps_u = torch.randn(shape, generator=gen, dtype=torch.float64)
    x0_prev = torch.randn(shape, generator=gen, dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    return {"x": x, "eps_c": eps_c, "eps_u": eps_u, "x0_prev": x0_prev, "guidance": torch.tensor(4.0, **f64),
            "abar_prev": torch.tensor(0.4, **f64), "abar_t": torch.tensor(0.6, **f64),
            "abar_next": torch.tensor(0.8, **f64)}


def _compute(x: Tensors) -> Tensors:
    w = float(x["guidance"])
    args = (x["x"], x["eps_c"], x["eps_u"], w, x["abar_t"])
    forms = {
        "ddim": adapter_step_literal("ddim", *args, x["abar_next"]),
        "ddim_final": adapter_step_literal("ddim", *args, 1.0),
        "euler": adapter_step_literal("euler", *args, x["abar_next"]),
        "dpm1": adapter_step_literal("dpmpp_2m", *args, x["abar_next"]),
        "dpm2": adapter_step_literal("dpmpp_2m", *args, x["abar_next"], abar_prev=x["abar_prev"], x0_prev=x["x0_prev"]),
    }
    return {f"{form}.{k}": v.clone() for form, out in forms.items() for k, v in out.items()}  # x_model may be x itself


ADAPTER_TOL = {
    "float32": DEFAULT_TOL["float32"],
    "bfloat16": (1.2e-2, 0.32),
    "float16": (1.5e-3, 0.045),
}

CASES = [GoldenCase(id="sched.diffusers_adapter", make_inputs=_inputs, compute=_compute, tol=ADAPTER_TOL, seed=0,
                    keep_float64=("guidance", "abar_prev", "abar_t", "abar_next"))]
