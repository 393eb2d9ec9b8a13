"""Golden cases: cross-attention map and output, threshold mask, text and time gates.

Half-precision notes. The mask and the routes are discrete: a golden compares them exactly, so
the inputs are drawn with a margin that no bf16/fp16 rounding can cross (documented per case):
map entries stay >= 2% of the column max away from every threshold, gate inputs keep a top-2
logit gap far above the half-precision logit error.
"""

from __future__ import annotations

import torch

from raphael_ref.attention import cross_attention, cross_attention_literal, cross_attention_map
from raphael_ref.gates import GateFFN, gate_softmax, text_route, time_route
from raphael_ref.masks import threshold_mask
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

HEADS = 4
MASK_ALPHAS = (0.2, 0.5)  # Table 2's alpha, and a second value to cover the threshold's scaling
MASK_MARGIN = 0.02  # |M[j, i] / max_j M[:, i] - alpha| >= this for every entry
GATE_MARGIN = 0.25  # top-2 logit gap (float64) of every gate input kept in the golden


# --- attn.cross_map / attn.cross_output ---------------------------------------------------------

def _attn_inputs(gen: torch.Generator) -> Tensors:
    B, n_x, n_y, d = 2, 16, 8, 32  # 4 heads of width 8
    q = torch.randn(B, n_x, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, n_y, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, n_y, d, generator=gen, dtype=torch.float64)
    key_valid = torch.ones(B, n_y, dtype=torch.bool)
    key_valid[1, 5:] = False  # the second prompt has 5 real tokens and 3 padding slots
    return {"q": q, "k": k, "v": v, "key_valid": key_valid}


def _attn_map(x: Tensors) -> Tensors:
    return {
        "M": cross_attention_map(x["q"], x["k"], HEADS, key_valid=x["key_valid"]),
        "M_all_keys": cross_attention_map(x["q"], x["k"], HEADS),
    }


def _attn_output(x: Tensors) -> Tensors:
    out, _ = cross_attention(x["q"], x["k"], x["v"], HEADS, key_valid=x["key_valid"])
    out_map, _ = cross_attention(x["q"], x["k"], x["v"], HEADS, key_valid=x["key_valid"], need_map=True)  # maps x V
    out_lit, _ = cross_attention_literal(x["q"], x["k"], x["v"], HEADS, key_valid=x["key_valid"])
    return {"out": out, "out_with_map": out_map, "out_literal": out_lit}


# M in [0, 1]. Half inputs: rounding q and k (u relative each) moves the logits by ~u |logit|, and
# the result is rounded once more (u); observed max abs error 1.1e-3 = 0.27 u (bf16, u = 3.9e-3)
# and 2.6e-4 = 0.5 u (fp16, u = 4.9e-4). float32: DEFAULT_TOL (observed 4.6e-8).
ATTN_MAP_TOL = {
    "float32": DEFAULT_TOL["float32"],
    "bfloat16": (4e-3, 4e-3),  # u absolute and relative on values <= 1
    "float16": (1e-3, 1e-3),  # 2 u
}
# out is a convex combination of v (|v|max = 2.8 here): error ~ (logit error + final rounding)
# * |v|max ~ 2 u |v|max; observed max abs error 6.8e-3 = 0.6 u |v|max (bf16) and 7.2e-4 = 0.5 u
# |v|max (fp16). float32: DEFAULT_TOL (observed 2.8e-7).
ATTN_OUT_TOL = {
    "float32": DEFAULT_TOL["float32"],
    "bfloat16": (2e-2, 2e-2),  # ~2 u |v|max
    "float16": (2.5e-3, 2.5e-3),  # ~2 u |v|max
}


# --- smoe.threshold_mask --------------------------------------------------------------------------

def _mask_inputs(gen: torch.Generator) -> Tensors:
    """A softmax map whose entries all sit >= MASK_MARGIN (relative to their column max) from every
    threshold alpha in MASK_ALPHAS: entries inside a band are moved to its nearer edge. The map
    then no longer sums to 1 per row exactly; the mask only reads columns, so that is immaterial.
    """
    B, n_x, n_y = 2, 16, 8
    M = torch.softmax(1.5 * torch.randn(B, n_x, n_y, generator=gen, dtype=torch.float64), dim=-1)
    col_max = M.amax(dim=1, keepdim=True)  # (B, 1, n_y)
    ratio = M / col_max
    for a in MASK_ALPHAS:
        inside = (ratio - a).abs() < MASK_MARGIN
        ratio = torch.where(inside, torch.where(ratio >= a, a + MASK_MARGIN, a - MASK_MARGIN), ratio)
    return {"M": ratio * col_max}


def _mask(x: Tensors) -> Tensors:
    return {f"mask_alpha_{a:.1f}".replace(".", "p"): threshold_mask(x["M"], a) for a in MASK_ALPHAS}


# Boolean outputs are compared exactly (the harness ignores tolerances for them). Exactness in
# bf16/fp16 holds because entries sit >= 2% of the column max from eta_i, while rounding M and eta
# moves them by < 3 u <= 1.2% of the column max (bf16; fp16 3 u = 0.15%).
MASK_TOL = {"float32": (0.0, 0.0), "bfloat16": (0.0, 0.0), "float16": (0.0, 0.0)}


# --- gate.text_route / gate.time_route ------------------------------------------------------------

def _gate_weights(gen: torch.Generator, d_in: int, k: int) -> Tensors:
    """GateFFN(d_in, k) weights scaled so the logits spread over a few units (clear routes)."""
    hidden = d_in
    return {
        "fc1_weight": torch.randn(hidden, d_in, generator=gen, dtype=torch.float64) / d_in**0.5,
        "fc1_bias": 0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64),
        "fc2_weight": 2.0 * torch.randn(k, hidden, generator=gen, dtype=torch.float64) / hidden**0.5,
        "fc2_bias": 0.1 * torch.randn(k, generator=gen, dtype=torch.float64),
    }


def _build_gate(x: Tensors) -> GateFFN:
    k, d_in = x["fc2_weight"].shape[0], x["fc1_weight"].shape[1]
    gate = GateFFN(d_in, k).to(device=x["fc1_weight"].device, dtype=x["fc1_weight"].dtype)
    names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    gate.load_state_dict({name.replace("_", ".", 1): x[name] for name in names})  # fc1_weight -> fc1.weight
    return gate.eval()


def _clear_rows(gate_x: Tensors, cand: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The first n_keep candidate inputs (rows of cand) whose float64 top-2 logit gap >= GATE_MARGIN."""
    logits = _build_gate(gate_x)(cand)  # (N, k)
    top2 = logits.topk(2, dim=-1).values
    keep = (top2[:, 0] - top2[:, 1]) >= GATE_MARGIN
    if int(keep.sum()) < n_keep:
        raise RuntimeError("too few gate inputs with a clear top-2 margin; draw more candidates")
    return cand[keep][:n_keep]


def _text_gate_inputs(gen: torch.Generator) -> Tensors:
    B, n_y, d_y, k = 2, 6, 16, 6  # k = 6 space experts (Table 2)
    x = _gate_weights(gen, d_y, k)
    cand = torch.randn(8 * B * n_y, d_y, generator=gen, dtype=torch.float64)
    x["y"] = _clear_rows(x, cand, B * n_y).reshape(B, n_y, d_y)
    return x


def _text_gate(x: Tensors) -> Tensors:
    gate = _build_gate(x)
    routes, p_route = text_route(gate, x["y"], training=False, grad_mode="switch")
    _, st_weight = text_route(gate, x["y"], training=False, grad_mode="straight_through")
    probs = gate_softmax(gate(x["y"]))
    return {"routes": routes, "p_route": p_route, "probs": probs, "weight_straight_through": st_weight}


def _time_gate_inputs(gen: torch.Generator) -> Tensors:
    B, d_t, n_t = 8, 32, 4  # n_t = 4 time experts (Table 2)
    x = _gate_weights(gen, d_t, n_t)
    cand = torch.randn(8 * B, d_t, generator=gen, dtype=torch.float64)
    x["t_emb"] = _clear_rows(x, cand, B)
    return x


def _time_gate(x: Tensors) -> Tensors:
    gate = _build_gate(x)
    routes, p_route = time_route(gate, x["t_emb"], training=False, grad_mode="switch")
    _, st_weight = time_route(gate, x["t_emb"], training=False, grad_mode="straight_through")
    probs = gate_softmax(gate(x["t_emb"]))
    return {"routes": routes, "p_route": p_route, "probs": probs, "weight_straight_through": st_weight}


# Gate probabilities in [0, 1]. The half-precision FFN (two matmuls and a GELU, each rounded to
# the dtype) leaves a logit error of a few u |logit|max (|logit|max ~ 3.3 here; observed 2.5e-2
# bf16, 2.3e-3 fp16), and |dp_i| = |p_i (dl_i - sum_j p_j dl_j)| <= max|dl| / 2: bound ~1.5 u
# |logit|max, i.e. 1.9e-2 (bf16), 2.4e-3 (fp16); observed 3.6e-3 and 5.1e-4. Routes (long) are
# compared exactly: every golden input keeps a float64 top-2 logit gap >= GATE_MARGIN = 0.25,
# 10 x the worst bf16 logit error. float32: DEFAULT_TOL (observed 1.8e-7).
GATE_TOL = {
    "float32": DEFAULT_TOL["float32"],
    "bfloat16": (1e-2, 1.5e-2),  # ~1.2 u |logit|max absolute
    "float16": (2e-3, 2e-3),  # ~1.2 u |logit|max absolute
}


# The gates' softmax runs in float32 whatever the logits' dtype (raphael_ref.gates), so the float64
# reference of probs / p_route / weight_straight_through carries float32 rounding, which differs
# across CPUs (vectorised vs scalar float32 exp: measured 1 ulp32, 7.5e-9 on probs of ~0.06).
GATE_FLOAT32_REFERENCE = "the gate softmax runs in float32 by design (raphael_ref.gates.gate_softmax)"

CASES = [
    GoldenCase(id="attn.cross_map", make_inputs=_attn_inputs, compute=_attn_map, tol=ATTN_MAP_TOL, seed=0),
    GoldenCase(id="attn.cross_output", make_inputs=_attn_inputs, compute=_attn_output, tol=ATTN_OUT_TOL, seed=1),
    GoldenCase(id="smoe.threshold_mask", make_inputs=_mask_inputs, compute=_mask, tol=MASK_TOL, seed=0),
    GoldenCase(id="gate.text_route", make_inputs=_text_gate_inputs, compute=_text_gate, tol=GATE_TOL, seed=0,
               float32_reference=GATE_FLOAT32_REFERENCE),
    GoldenCase(id="gate.time_route", make_inputs=_time_gate_inputs, compute=_time_gate, tol=GATE_TOL, seed=0,
               float32_reference=GATE_FLOAT32_REFERENCE),
]
