"""Golden cases for the evaluation metrics: FID, KID and the CLIP score (helper I)."""

from __future__ import annotations

import torch

from raphael_ref.evaluation.metrics import clip_score_from_embeddings, frechet_distance, kid_unbiased
from raphael_ref.testing.golden import GoldenCase, Tensors

# FID and KID are float64 by design (torch-fidelity computes their statistics in float64; ours cast
# every input to float64 first). Only the rounding of the inputs depends on the compute dtype, so
# they are checked in float64 and float32:
#   float64 (1e-10, 1e-10): eigendecompositions of 5 x 5 matrices with condition number < 100 agree
#       to ~1e-14 across BLAS builds; 1e-10 leaves room for LAPACK's eigh variants.
#   float32 (1e-5, 1e-5): inputs rounded to float32 (u = 6e-8) perturb the trace terms by ~kappa u
#       ~ 1e-6 relative; the result is O(1).
_STAT_TOL = {"float64": (1e-10, 1e-10), "float32": (1e-5, 1e-5)}


def _spd(gen: torch.Generator, d: int) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)  # well conditioned


def _fid_inputs(gen: torch.Generator) -> Tensors:
    d = 5
    return {"mu1": torch.randn(d, generator=gen, dtype=torch.float64), "sigma1": _spd(gen, d),
            "mu2": 0.5 * torch.randn(d, generator=gen, dtype=torch.float64), "sigma2": _spd(gen, d)}


def _fid_compute(x: Tensors) -> Tensors:
    return {"fid": frechet_distance(x["mu1"], x["sigma1"], x["mu2"], x["sigma2"])}


def _kid_inputs(gen: torch.Generator) -> Tensors:
    return {"x": torch.randn(6, 4, generator=gen, dtype=torch.float64),
            "y": 0.3 + torch.randn(6, 4, generator=gen, dtype=torch.float64)}


def _kid_compute(x: Tensors) -> Tensors:
    return {"kid": kid_unbiased(x["x"], x["y"])}


def _clip_inputs(gen: torch.Generator) -> Tensors:
    img = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    txt = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    txt[:3] += 1.5 * img[:3]  # half the pairs aligned (large positive cosine), half random (some clipped)
    return {"image_emb": img, "text_emb": txt}


def _clip_compute(x: Tensors) -> Tensors:
    return {"clip_score": clip_score_from_embeddings(x["image_emb"], x["text_emb"])}


CASES = [
    GoldenCase("eval.fid", _fid_inputs, _fid_compute, _STAT_TOL),
    GoldenCase("eval.kid", _kid_inputs, _kid_compute, _STAT_TOL),
    # CLIP score = 100 max(cos, 0), the cosine in float32 at least. Rounding the embeddings to the
    # compute dtype moves cos by <= ~2u (u: 6e-8 fp32, 4.9e-4 fp16, 3.9e-3 bf16), so the score by
    # <= 200u: float32 atol 3e-5; float16 atol 0.2; bfloat16 atol 1.0 (all ~2x that bound).
    GoldenCase("eval.clip_score", _clip_inputs, _clip_compute,
               {"float32": (1e-6, 3e-5), "float16": (0.0, 0.2), "bfloat16": (0.0, 1.0)}),
]
