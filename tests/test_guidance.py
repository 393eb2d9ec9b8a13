"""Classifier-free guidance (Ho & Salimans 2022; RAPHAEL Sec. 4.2; raphael_ref.diffusion.guidance)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.diffusion.guidance import cfg_combine

seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)
scales = st.floats(-2.0, 12.0, allow_nan=False)


def _pair(seed, B, dims, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *dims, generator=gen, dtype=dtype), torch.randn(B, *dims, generator=gen, dtype=dtype))


@pytest.mark.spec_id("cfg.combine")
@settings(max_examples=30)
@given(B=st.integers(1, 4), dims=shapes, seed=seeds, s1=scales, s2=scales, lam=st.floats(-2.0, 2.0))
def test_reductions_and_linearity_in_scale(B, dims, seed, s1, s2, lam):
    u, c = _pair(seed, B, dims)
    assert torch.equal(cfg_combine(u, c, 0.0), u)  # s = 0: unconditional
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c, rtol=0, atol=1e-15)  # s = 1: plain conditional
    # affine in s: f(lam s1 + (1 - lam) s2) = lam f(s1) + (1 - lam) f(s2)
    mix = cfg_combine(u, c, lam * s1 + (1 - lam) * s2)
    torch.testing.assert_close(mix, lam * cfg_combine(u, c, s1) + (1 - lam) * cfg_combine(u, c, s2), rtol=1e-12, atol=1e-12)
    # Ho & Salimans' weight w = s - 1: (1 + w) eps_c - w eps_u
    torch.testing.assert_close(cfg_combine(u, c, s1), s1 * c - (s1 - 1) * u, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("cfg.combine")
@settings(max_examples=20)
@given(B=st.integers(1, 5), dims=shapes, seed=seeds, data=st.data())
def test_per_sample_scale_equals_per_row_calls(B, dims, seed, data):
    u, c = _pair(seed, B, dims)
    s = torch.tensor(data.draw(st.lists(scales, min_size=B, max_size=B)), dtype=torch.float64)
    out = cfg_combine(u, c, s)
    for b in range(B):
        assert torch.equal(out[b], cfg_combine(u[b], c[b], float(s[b])))
    assert torch.equal(cfg_combine(u, c, torch.tensor(2.5)), cfg_combine(u, c, 2.5))


@pytest.mark.spec_id("cfg.combine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    u, c = _pair(0, 2, (4,), dtype)
    assert cfg_combine(u, c, 7.5).dtype == dtype
    assert cfg_combine(u, c, torch.tensor([1.5, 9.0], dtype=torch.float64)).dtype == dtype


@pytest.mark.spec_id("cfg.combine")
def test_validation():
    u = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        cfg_combine(u, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        cfg_combine(u, u.double(), 1.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        cfg_combine(u, u, torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        cfg_combine(u, u, torch.ones(2, 1))
    with pytest.raises(ValueError, match="finite"):
        cfg_combine(u, u, float("inf"))
    with pytest.raises(ValueError, match="scale"):
        cfg_combine(u, u, "7.5")
    with pytest.raises(ValueError, match="floating"):
        cfg_combine(u.long(), u.long(), 1.0)
