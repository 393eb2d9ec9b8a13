"""Golden of eDiff-I-style time-interval routing (spec id ``gate.interval_route``; raphael_ref/gates.py
``interval_route``, errata E69): route(t) = floor(t n / T) for every 0-based t of T = 1000 with n = 4 (Table 2's
time experts) and n = 3 (intervals of unequal integer length: 334, 333, 333), and of T = 7 with n = 4 (interval
lengths 2, 2, 2, 1). Integer routes and weights of exactly 1: exact in every dtype (no floating input).
"""

from __future__ import annotations

import torch

from raphael_ref.gates import interval_route
from raphael_ref.testing.golden import GoldenCase, Tensors


def _inputs(gen: torch.Generator) -> Tensors:
    return {"t1000": torch.arange(1000), "t7": torch.arange(7)}


def _compute(x: Tensors) -> Tensors:
    r4, w4 = interval_route(x["t1000"], 4, 1000)
    r3, _ = interval_route(x["t1000"], 3, 1000)
    r7, _ = interval_route(x["t7"], 4, 7)
    return {"routes_n4_T1000": r4, "weights_n4_T1000": w4, "routes_n3_T1000": r3, "routes_n4_T7": r7}


EXACT = {"float32": (0.0, 0.0), "bfloat16": (0.0, 0.0), "float16": (0.0, 0.0)}  # integers and exact ones

CASES = [GoldenCase(id="gate.interval_route", make_inputs=_inputs, compute=_compute, tol=EXACT, seed=0)]
