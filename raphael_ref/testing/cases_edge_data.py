"""Golden cases for the edge predictor, the focal loss, the total loss and the bucket rule (helper D)."""

from __future__ import annotations

import torch

from raphael_ref.data.buckets import BUCKETS, bucket_nearest, resize_crop_plan
from raphael_ref.edge import EdgePredictor
from raphael_ref.focal import sigmoid_focal_loss
from raphael_ref.losses import total_loss
from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.testing.golden import GoldenCase, Tensors

# --- edge.predictor -----------------------------------------------------------------------------
_EDGE_LAYERS, _EDGE_WIDTH, _EDGE_HW = 5, 8, (6, 8)


def _edge_inputs(gen: torch.Generator) -> Tensors:
    B, (h, w) = 2, _EDGE_HW
    n_y = 7
    # A realistic input: one column of a row-softmax attention map M (B, n_x, n_y), on the grid.
    logits = 2.0 * torch.randn(B, h * w, n_y, generator=gen, dtype=torch.float64)
    col = torch.softmax(logits, dim=-1)[:, :, 3]  # (B, n_x)
    out: Tensors = {"attn_map": col.reshape(B, 1, h, w)}
    chans = [1] + [_EDGE_WIDTH] * (_EDGE_LAYERS - 1) + [1]
    for k, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
        fan_in = c_in * 9
        # He-scaled weights keep activations O(1) through the chain (the default init would shrink them).
        out[f"w{k}"] = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64) * (2.0 / fan_in) ** 0.5
        out[f"b{k}"] = 0.1 * torch.randn(c_out, generator=gen, dtype=torch.float64)
    return out


def _edge_compute(x: Tensors) -> Tensors:
    attn = x["attn_map"]
    net = EdgePredictor(n_layers=_EDGE_LAYERS, width=_EDGE_WIDTH).to(device=attn.device, dtype=attn.dtype)
    state = {}
    for k in range(_EDGE_LAYERS):
        state[f"convs.{k}.weight"], state[f"convs.{k}.bias"] = x[f"w{k}"], x[f"b{k}"]
    net.load_state_dict(state)
    # cuDNN convolutions default to TF32 (u ~ 5e-4) on Ampere+; the golden checks float32 math.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            return {"logits": net(attn)}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


# Five 3x3 convs (reductions over <= 72 terms) with GELU between; He-scaled weights give each layer a
# gain ~1, so the output error is the sum of ~2 roundings (weights, output) per layer carried with
# gain ~1: ~sqrt(10) u ~ 3 u on O(1) logits (the max-normalised input adds one more u). float32:
# DEFAULT_TOL; float16 3e-3/3e-3 (~6 u); bfloat16 2.5e-2/2.5e-2 (~6 u).
EDGE_TOL = {"float32": DEFAULT_TOL["float32"], "float16": (3e-3, 3e-3), "bfloat16": (2.5e-2, 2.5e-2)}

# --- edge.focal_loss ----------------------------------------------------------------------------


def _focal_inputs(gen: torch.Generator) -> Tensors:
    shape = (2, 1, 6, 6)
    logits = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    soft = torch.rand(shape, generator=gen, dtype=torch.float64)
    hard = (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3).to(torch.float64)
    return {"logits": logits, "soft_targets": soft, "hard_targets": hard}


def _focal_compute(x: Tensors) -> Tensors:
    lg = x["logits"]
    return {
        "soft_none": sigmoid_focal_loss(lg, x["soft_targets"], alpha=0.5, gamma=2.0, reduction="none"),
        "soft_mean": sigmoid_focal_loss(lg, x["soft_targets"], alpha=0.5, gamma=2.0, reduction="mean"),
        "hard_none": sigmoid_focal_loss(lg, x["hard_targets"], alpha=0.5, gamma=2.0, reduction="none"),
        "hard_mean": sigmoid_focal_loss(lg, x["hard_targets"], alpha=0.5, gamma=2.0, reduction="mean"),
    }


# The loss runs in float32 whatever the input dtype, so the error is the rounding of the inputs:
# logits x ~ N(0, 9) (|x| <= ~9) move by |x| u and |dFL/dx| <= ~0.5, giving <= ~4.5 u; targets move
# by y u and |dFL/dy| <= ~|x|/2, another <= ~4.5 u. float32: DEFAULT_TOL; float16 5e-3/5e-3
# (~10 u); bfloat16 4e-2/4e-2 (~10 u). The means average these errors and sit well inside.
FOCAL_TOL = {"float32": DEFAULT_TOL["float32"], "float16": (5e-3, 5e-3), "bfloat16": (4e-2, 4e-2)}

# --- loss.total ---------------------------------------------------------------------------------


def _total_inputs(gen: torch.Generator) -> Tensors:
    B, K = 8, 3
    return {
        "denoise": torch.rand(B, generator=gen, dtype=torch.float64),
        "edge": torch.rand(K, B, generator=gen, dtype=torch.float64),
        "t": torch.randint(0, 1000, (B,), generator=gen),
    }


def _total_compute(x: Tensors) -> Tensors:
    return total_loss(x["denoise"], x["edge"], x["t"], T_c=500)


# Sums of <= 8 + 24 O(1) terms: DEFAULT_TOL (see raphael_ref/testing/__init__.py).
TOTAL_TOL = {k: DEFAULT_TOL[k] for k in ("float32", "float16", "bfloat16")}

# --- data.bucket_nearest ------------------------------------------------------------------------


def _bucket_inputs(gen: torch.Generator) -> Tensors:
    # Every bucket itself, its transposes and halves, plus random sizes from 64 to 4096 pixels.
    exact = torch.tensor([[h, w] for h, w in BUCKETS] + [[h // 2, w // 2] for h, w in BUCKETS], dtype=torch.long)
    rand = torch.randint(64, 4097, (40, 2), generator=gen)
    return {"sizes": torch.cat([exact, rand])}


def _bucket_compute(x: Tensors) -> Tensors:
    sizes = x["sizes"].cpu().tolist()
    index = [bucket_nearest(h, w) for h, w in sizes]
    plans = [resize_crop_plan(h, w, BUCKETS[i]) for (h, w), i in zip(sizes, index)]
    return {"index": torch.tensor(index, dtype=torch.long), "plan": torch.tensor(plans, dtype=torch.long)}


# Outputs are integers computed with exact rational arithmetic from integer inputs: compared
# exactly (torch.equal); the "float64" key only makes the harness run the case once.
BUCKET_TOL = {"float64": (0.0, 0.0)}

CASES = [
    GoldenCase(id="edge.predictor", make_inputs=_edge_inputs, compute=_edge_compute, tol=EDGE_TOL, seed=41),
    GoldenCase(id="edge.focal_loss", make_inputs=_focal_inputs, compute=_focal_compute, tol=FOCAL_TOL, seed=42),
    GoldenCase(id="loss.total", make_inputs=_total_inputs, compute=_total_compute, tol=TOTAL_TOL, seed=43),
    GoldenCase(id="data.bucket_nearest", make_inputs=_bucket_inputs, compute=_bucket_compute, tol=BUCKET_TOL, seed=44),
]
