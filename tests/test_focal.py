"""Sigmoid focal loss (RAPHAEL Sec. 3.2, Table 2; Lin et al. 2017): literal == stable, oracle, limits."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.focal import focal_loss_per_sample, sigmoid_focal_loss, sigmoid_focal_loss_literal

pytestmark = pytest.mark.spec_id("edge.focal_loss")

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
alphas = st.one_of(st.none(), st.floats(0.0, 1.0))
gammas = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])


def _draw(shape, seed, scale=3.0, soft=True):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    return x, (y if soft else (y < 0.3).double())


@given(shape=shapes, seed=st.integers(0, 2**16), alpha=alphas, gamma=gammas)
def test_stable_form_equals_literal_form_on_hard_targets(shape, seed, alpha, gamma):
    x, y = _draw(shape, seed, scale=4.0, soft=False)
    # The literal form takes log(p_t) of a rounded p_t: relative error ~ u / (1 - p_t) in 1 - p_t,
    # so "moderate" logits are |x| <= 8 in float64 (<= 4e-13) and |x| <= 4 in float32 (<= 4e-6).
    for dtype, bound, tol in ((torch.float64, 8.0, 1e-11), (torch.float32, 4.0, 1e-5)):
        xd = x.clamp(-bound, bound).to(dtype)
        lit = sigmoid_focal_loss_literal(xd, y.to(dtype), alpha=alpha, gamma=gamma, reduction="none")
        fast = sigmoid_focal_loss(xd, y.to(dtype), alpha=alpha, gamma=gamma, reduction="none")
        torch.testing.assert_close(fast, lit, rtol=tol, atol=tol)


@given(shape=shapes, seed=st.integers(0, 2**16), soft=st.booleans(), alpha=alphas, gamma=gammas,
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_matches_torchvision_sigmoid_focal_loss(shape, seed, soft, alpha, gamma, reduction):
    """Independent oracle, hard and soft targets (torchvision disables alpha with alpha < 0)."""
    x, y = _draw(shape, seed, soft=soft)
    ours = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = torchvision.ops.sigmoid_focal_loss(x, y, alpha=-1.0 if alpha is None else alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)  # float64: different but exact algebra


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_gamma_zero_alpha_half_is_half_bce(shape, seed):
    """Reduction to a known case: gamma = 0, alpha = 0.5 gives 0.5 * binary cross-entropy."""
    x, y = _draw(shape, seed, scale=2.0)
    p = 1 / (1 + torch.exp(-x))
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    torch.testing.assert_close(sigmoid_focal_loss(x, y, alpha=0.5, gamma=0.0, reduction="none"), 0.5 * bce, rtol=1e-10, atol=1e-12)


@given(shape=shapes, seed=st.integers(0, 2**16), alpha=alphas, gamma=gammas)
def test_nonnegative_and_below_weighted_bce(shape, seed, alpha, gamma):
    """0 <= FL <= alpha_t * BCE, since the modulating factor (1 - p_t)^gamma lies in [0, 1]."""
    x, y = _draw(shape, seed)
    fl = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none")
    weighted = sigmoid_focal_loss(x, y, alpha=alpha, gamma=0.0, reduction="none")
    assert torch.all(fl >= 0)
    assert torch.all(fl <= weighted + 1e-15)


@given(seed=st.integers(0, 2**16), alpha=alphas)
def test_hard_positive_loss_decreases_with_the_logit(seed, alpha):
    """For y = 1 the loss falls as the logit grows (and rises for y = 0)."""
    x = torch.sort(_draw((50,), seed, scale=5.0)[0]).values
    up = sigmoid_focal_loss(x, torch.ones_like(x), alpha=alpha, reduction="none")
    down = sigmoid_focal_loss(x, torch.zeros_like(x), alpha=alpha, reduction="none")
    assert torch.all(up[1:] <= up[:-1]) and torch.all(down[1:] >= down[:-1])


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), soft=st.booleans())
def test_finite_value_and_gradient_for_extreme_logits(seed, soft):
    """float32 logits up to |100| (sigmoid saturates): loss and gradient stay finite."""
    x, y = _draw((4, 64), seed, soft=soft)
    x = (x / x.abs().max() * 100).float().requires_grad_(True)
    loss = sigmoid_focal_loss(x, y.float())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    hard = sigmoid_focal_loss(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 1.0]), reduction="none")
    torch.testing.assert_close(hard, torch.full((2,), 0.5 * 100.0), rtol=1e-6, atol=0)  # alpha_t (1)^2 |x|


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    x, y = _draw((3, 8, 8), 0)
    xh, yh = x.to(dtype), y.to(dtype)
    got = sigmoid_focal_loss(xh, yh, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sigmoid_focal_loss(xh.float(), yh.float(), reduction="none"), rtol=0, atol=0)


@given(B=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 1000))
def test_reductions_and_per_sample_mean(B, h, w, seed):
    x, y = _draw((B, 1, h, w), seed)
    none = sigmoid_focal_loss(x, y, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(x, y, reduction="mean"), none.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigmoid_focal_loss(x, y, reduction="sum"), none.sum(), rtol=1e-12, atol=0)
    per = focal_loss_per_sample(x, y)
    assert per.shape == (B,)
    for b in range(B):
        torch.testing.assert_close(per[b], none[b].mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(per.mean(), none.mean(), rtol=1e-12, atol=1e-15)  # equal pixel counts


def test_invalid_inputs_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sigmoid_focal_loss(x, torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sigmoid_focal_loss(x, torch.full((2, 3), -0.1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sigmoid_focal_loss(x, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, torch.zeros(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, torch.zeros(2, 3), gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, torch.zeros(2, 3), alpha=1.5)
    with pytest.raises(ValueError, match="hard targets"):
        sigmoid_focal_loss_literal(x, torch.full((2, 3), 0.5))
