"""Properties of eDiff-I's paint-with-words bias (spec ``paint.attention_bias``; raphael_ref/paint.py, E77) on
random shapes, heads, masks and paint maps: fast == literal; the bias is scale * (per-sample, per-head max of the
scaled logits over valid keys) * P, so it is 0 off the painted entries, linear in scale and in P, and a sample's
bias does not depend on the other samples of its batch (the CFG halves stay independent)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.attention import cross_attention, cross_attention_literal
from raphael_ref.paint import paint_logit_bias, paint_logit_bias_literal


@st.composite
def _case(draw):
    B, heads, d_head = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    n_x, n_y = draw(st.integers(1, 9)), draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, n_x, heads * d_head, generator=g, dtype=torch.float64)
    k = torch.randn(B, n_y, heads * d_head, generator=g, dtype=torch.float64)
    v = torch.randn(B, n_y, heads * d_head, generator=g, dtype=torch.float64)
    P = torch.rand(B, n_x, n_y, generator=g, dtype=torch.float64) * (torch.rand(B, n_x, n_y, generator=g) > 0.6)
    scale = torch.rand(B, generator=g, dtype=torch.float64) * 3
    kv = torch.rand(B, n_y, generator=g) > 0.3
    kv[:, 0] = True  # at least one valid key per sample
    masked = draw(st.booleans())
    return q, k, v, heads, P, scale, (kv if masked else None)


@pytest.mark.spec_id("paint.attention_bias")
@settings(max_examples=60, deadline=None)
@given(c=_case())
def test_bias_fast_equals_literal_and_its_closed_form(c):
    q, k, v, heads, P, scale, kv = c
    fast = paint_logit_bias(q, k, heads, P, scale, key_valid=kv)
    lit = paint_logit_bias_literal(q, k, heads, P, scale, key_valid=kv)
    torch.testing.assert_close(fast, lit, rtol=1e-12, atol=1e-12)
    B, n_x, d = q.shape
    dh = d // heads
    for b in range(B):
        for h in range(heads):
            logits = q[b, :, h * dh:(h + 1) * dh] @ k[b, :, h * dh:(h + 1) * dh].T / math.sqrt(dh)  # (n_x, n_y)
            m = logits[:, kv[b]].max() if kv is not None else logits.max()
            torch.testing.assert_close(fast[b, h], scale[b] * m * P[b], rtol=1e-12, atol=1e-12)
    assert bool((fast[(P == 0)[:, None].expand_as(fast)] == 0).all())  # nothing off the painted entries
    out, M = cross_attention(q, k, v, heads, key_valid=kv, need_map=True, logit_bias=fast)
    out_l, maps = cross_attention_literal(q, k, v, heads, key_valid=kv, logit_bias=lit)
    torch.testing.assert_close(out, out_l, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M, maps.mean(dim=1), rtol=1e-10, atol=1e-10)


@pytest.mark.spec_id("paint.attention_bias")
@settings(max_examples=40, deadline=None)
@given(c=_case(), a=st.floats(0.0, 4.0), t=st.floats(0.0, 4.0))
def test_bias_linear_in_scale_and_paint_and_per_sample(c, a, t):
    q, k, v, heads, P, scale, kv = c
    bias = paint_logit_bias(q, k, heads, P, scale, key_valid=kv)
    torch.testing.assert_close(paint_logit_bias(q, k, heads, P, a * scale, key_valid=kv), a * bias,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paint_logit_bias(q, k, heads, t * P, scale, key_valid=kv), t * bias,
                               rtol=1e-12, atol=1e-12)
    for b in range(q.shape[0]):  # a sample alone gets the bias it gets in the batch
        one = paint_logit_bias(q[b:b + 1], k[b:b + 1], heads, P[b:b + 1], scale[b:b + 1],
                               key_valid=None if kv is None else kv[b:b + 1])
        torch.testing.assert_close(one[0], bias[b], rtol=1e-12, atol=1e-12)
    zero = paint_logit_bias(q, k, heads, P, torch.zeros_like(scale), key_valid=kv)
    out0, M0 = cross_attention(q, k, v, heads, key_valid=kv, need_map=True, logit_bias=zero)
    out, M = cross_attention(q, k, v, heads, key_valid=kv, need_map=True)
    torch.testing.assert_close(out0, out, rtol=1e-12, atol=1e-12)  # scale 0: the attention unpainted
    torch.testing.assert_close(M0, M, rtol=1e-12, atol=1e-12)
