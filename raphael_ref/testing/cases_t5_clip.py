"""Golden of eDiff-I's T5 + CLIP token concatenation (spec id ``text.t5_clip_concat``; raphael_ref/t5_encoder.py,
errata E78).

A T5 encoding of 2 prompts, 5 positions of width 4 (valid through </s> at positions 2 and 0), and a CLIP
encoding of the same prompts, 6 positions of width 3 (EOT at positions 3 and 1). Outputs: the joint tokens
(2, 11, 7) with each encoder in its own block of channels and zeros elsewhere, valid (2, 11), pooled_index
(2,) = 5 + CLIP's EOT, pooled (2, 7), ids (2, 11).

Tolerances: every output is a copy of an input (or an exact zero), so the only error is the rounding of the
float64 input to the compute dtype: at most u relative (float32 2^-24, bfloat16 2^-8, float16 2^-11), plus
float16's subnormal spacing 2^-24 / 2 absolute for |x| < 2^-14. Integer and boolean outputs are exact.
"""

from __future__ import annotations

import torch

from raphael_ref.t5_encoder import concat_text_tokens
from raphael_ref.testing.golden import GoldenCase, Tensors
from raphael_ref.text_encoder import TextEncoding


def _inputs(gen: torch.Generator) -> Tensors:
    B, n_t, d_t, n_c, d_c = 2, 5, 4, 6, 3
    h_t = torch.randn(B, n_t, d_t, generator=gen, dtype=torch.float64)
    h_c = torch.randn(B, n_c, d_c, generator=gen, dtype=torch.float64)
    pool_t, pool_c = torch.tensor([2, 0]), torch.tensor([3, 1])
    return {"t5_hidden": h_t, "clip_hidden": h_c,
            "t5_valid": torch.arange(n_t)[None] <= pool_t[:, None], "t5_pooled_index": pool_t,
            "clip_valid": torch.arange(n_c)[None] <= pool_c[:, None], "clip_pooled_index": pool_c,
            "t5_ids": torch.randint(2, 30, (B, n_t), generator=gen),
            "clip_ids": torch.randint(1, 400, (B, n_c), generator=gen)}


def _encoding(x: Tensors, which: str) -> TextEncoding:
    h, p = x[f"{which}_hidden"], x[f"{which}_pooled_index"]
    return TextEncoding(hidden=h, pooled_index=p, valid=x[f"{which}_valid"], pooled=h[torch.arange(len(p)), p],
                        ids=x[f"{which}_ids"])


def _compute(x: Tensors) -> Tensors:
    y = concat_text_tokens(_encoding(x, "t5"), _encoding(x, "clip"))
    return {"hidden": y.hidden, "valid": y.valid, "pooled_index": y.pooled_index, "pooled": y.pooled, "ids": y.ids}


# COPY_TOL: one rounding of each input (u relative; float16 subnormals 2^-25 absolute), see the module docstring.
COPY_TOL = {
    "float32": (2.0**-24, 0.0),
    "bfloat16": (2.0**-8, 0.0),
    "float16": (2.0**-11, 2.0**-25),
}

CASES = [GoldenCase(id="text.t5_clip_concat", make_inputs=_inputs, compute=_compute, tol=COPY_TOL, seed=0)]
