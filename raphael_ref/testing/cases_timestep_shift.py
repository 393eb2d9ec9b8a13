"""Golden of the shifted timestep draw (spec id ``train.t_shift``; raphael_ref/diffusion/timestep_shift.py, E90):
t = floor(T s u / (1 + (s - 1) u)) for 256 uniform draws u plus the ends u = 0 and the largest float64 below 1, at
s = 1 (uniform), 3 (the shift measured in E90) and 1/3, T = 1000; and the index probabilities p_s(i) for T = 1000 at
s = 3 and for T = 10 at s = 2. u stays float64 in every dtype run (the draw is float64 by definition), so the
outputs are exact in every dtype.
"""

from __future__ import annotations

import torch

from raphael_ref.diffusion.timestep_shift import shifted_timestep_probs, shifted_timesteps
from raphael_ref.testing.golden import GoldenCase, Tensors


def _inputs(gen: torch.Generator) -> Tensors:
    u = torch.rand(256, generator=gen, dtype=torch.float64)
    ends = torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64)
    return {"u": torch.cat([ends, u])}


def _compute(x: Tensors) -> Tensors:
    u = x["u"]
    return {
        "t_s1": shifted_timesteps(u, 1000, 1.0),
        "t_s3": shifted_timesteps(u, 1000, 3.0),
        "t_s1_3": shifted_timesteps(u, 1000, 1.0 / 3.0),
        "probs_T1000_s3": shifted_timestep_probs(1000, 3.0),
        "probs_T10_s2": shifted_timestep_probs(10, 2.0),
    }


EXACT = {"float32": (0.0, 0.0), "bfloat16": (0.0, 0.0), "float16": (0.0, 0.0)}  # u is kept float64: same values

CASES = [GoldenCase(id="train.t_shift", make_inputs=_inputs, compute=_compute, tol=EXACT, seed=0, keep_float64=("u",))]
