"""Binary region masks Mhat_i = [M[:, i] >= alpha max M[:, i]] (RAPHAEL Sec. 3.1, From Text to Image Region)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.masks import threshold_mask, threshold_mask_literal

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@st.composite
def maps(draw, max_b=3, max_nx=12, max_ny=9):
    """A cross-attention-like map (B, n_x, n_y) in float64: a row softmax, or a coarse grid with many ties."""
    B, n_x, n_y = draw(st.integers(1, max_b)), draw(st.integers(1, max_nx)), draw(st.integers(1, max_ny))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        scale = draw(st.sampled_from([0.5, 2.0, 5.0]))
        return torch.softmax(scale * torch.randn(B, n_x, n_y, generator=g, dtype=torch.float64), dim=-1)
    # values in {0, 1/8, ..., 1}: exact in every dtype, many ties with the threshold and the max
    return torch.randint(0, 9, (B, n_x, n_y), generator=g).double() / 8


alphas = st.sampled_from([0.0, 0.125, 0.2, 0.25, 0.5, 0.8, 1.0]) | st.floats(0.0, 1.0)


@pytest.mark.spec_id("smoe.threshold_mask")
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@settings(max_examples=20)
@given(M=maps(), alpha=alphas)
def test_fast_equals_literal_exactly(M, alpha, dtype_name):
    M = M.to(DTYPES[dtype_name])
    fast, lit = threshold_mask(M, alpha), threshold_mask_literal(M, alpha)
    assert fast.dtype == lit.dtype == torch.bool and fast.shape == M.shape
    assert torch.equal(fast, lit)


@pytest.mark.spec_id("smoe.threshold_mask")
@settings(max_examples=25)
@given(M=maps(), alpha=alphas)
def test_every_column_keeps_its_argmax(M, alpha):
    Mhat = threshold_mask(M, alpha)
    j_star = M.argmax(dim=1, keepdim=True)  # (B, 1, n_y)
    assert Mhat.gather(1, j_star).all()
    assert Mhat.any(dim=1).all()  # no text token is left without an image region


@pytest.mark.spec_id("smoe.threshold_mask")
@settings(max_examples=25)
@given(M=maps(), a=alphas, b=alphas)
def test_larger_alpha_gives_a_subset(M, a, b):
    lo, hi = min(a, b), max(a, b)
    assert not (threshold_mask(M, hi) & ~threshold_mask(M, lo)).any()


@pytest.mark.spec_id("smoe.threshold_mask")
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@settings(max_examples=15)
@given(M=maps())
def test_alpha_one_keeps_the_maxima_and_alpha_zero_keeps_all(M, dtype_name):
    M = M.to(DTYPES[dtype_name])
    assert torch.equal(threshold_mask(M, 1.0), M == M.amax(dim=1, keepdim=True))
    assert threshold_mask(M, 0.0).all()  # eta = 0 and a softmax map is >= 0


@pytest.mark.spec_id("smoe.threshold_mask")
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@settings(max_examples=15)
@given(M=maps(), alpha=alphas, seed=st.integers(0, 2**31 - 1))
def test_each_column_invariant_to_its_own_positive_scale(M, alpha, seed, dtype_name):
    """Scaling column i by c_i > 0 scales eta_i by c_i. Powers of two keep the check exact in every dtype."""
    M = M.to(DTYPES[dtype_name])
    exps = torch.randint(0, 5, (M.shape[0], 1, M.shape[2]), generator=torch.Generator().manual_seed(seed))
    c = (2.0**exps).to(M.dtype)  # (B, 1, n_y), exact powers of two
    assert torch.equal(threshold_mask(M * c, alpha), threshold_mask(M, alpha))


@pytest.mark.spec_id("smoe.threshold_mask")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@settings(max_examples=20)
@given(M=maps(), alpha=alphas)
def test_lower_precision_differs_only_near_the_threshold(M, alpha, dtype_name):
    """Rounding M and eta to the dtype can flip only entries within ~2 u max of eta (float64 reference)."""
    dtype = DTYPES[dtype_name]
    ref = threshold_mask(M, alpha)
    got = threshold_mask(M.to(dtype), alpha)
    eta = alpha * M.amax(dim=1, keepdim=True)
    u = UNIT_ROUNDOFF[dtype]
    # M rounds by <= u M, eta by <= u eta + u alpha max (max rounded then product rounded);
    # fp16 subnormals add <= 3e-8 absolute.
    band = (M - eta).abs() <= 3 * u * M.amax(dim=1, keepdim=True) + 1e-7
    assert not ((got != ref) & ~band).any()


@pytest.mark.spec_id("smoe.threshold_mask")
def test_ties_with_the_threshold_keep_the_entry():
    """'1 if M[j, i] >= eta_i': an entry equal to eta_i is kept."""
    M = torch.tensor([[[0.2, 0.5], [1.0, 0.1], [0.1999, 0.5]]], dtype=torch.float64)  # column max 1.0 and 0.5
    Mhat = threshold_mask(M, 0.2)  # eta = (0.2, 0.1)
    assert Mhat[0, :, 0].tolist() == [True, True, False]
    assert Mhat[0, :, 1].tolist() == [True, True, True]


@pytest.mark.spec_id("smoe.threshold_mask")
def test_mask_carries_no_gradient():
    M = torch.softmax(torch.randn(2, 6, 4, dtype=torch.float64), -1).requires_grad_(True)
    for f in (threshold_mask, threshold_mask_literal):
        Mhat = f(M, 0.2)
        assert Mhat.dtype == torch.bool and not Mhat.requires_grad and Mhat.grad_fn is None


def test_invalid_inputs_raise():
    M = torch.softmax(torch.randn(1, 4, 3), -1)
    for alpha in (-0.1, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match="alpha"):
            threshold_mask(M, alpha)
    with pytest.raises(ValueError, match=r"\(B, n_x, n_y\)"):
        threshold_mask(M[0], 0.2)
    with pytest.raises(ValueError, match=">= 0"):
        threshold_mask_literal(-M, 0.2)
    with pytest.raises(ValueError, match="floating"):
        threshold_mask(torch.ones(1, 2, 2, dtype=torch.long), 0.2)


@pytest.mark.spec_id("smoe.threshold_mask")
def test_check_values_false_skips_only_the_value_check():
    M = torch.softmax(torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(threshold_mask(M, 0.2, check_values=False), threshold_mask(M, 0.2))
    bad = M.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(bad, 0.2)
    threshold_mask(bad, 0.2, check_values=False)  # the caller vouched: no host sync, no error
    with pytest.raises(ValueError, match="alpha"):
        threshold_mask(M, 1.5, check_values=False)  # argument checks stay
