"""Edge predictor P_theta (RAPHAEL Sec. 3.2, App. 7.2): shapes, literal chain, normalisation, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.edge import (
    EdgePredictor,
    attention_to_grid,
    edge_predictor_functional,
    edge_target_to_grid,
    normalize_attention_map,
    pooled_attention_map,
)

pytestmark = pytest.mark.spec_id("edge.predictor")


def _attention(B: int, h: int, w: int, n_y: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(B, h * w, n_y, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _conv3x3_by_shifts(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Independent oracle: zero-padded 3x3 cross-correlation as a sum of 9 shifted maps."""
    B, C, H, W = x.shape
    xp = torch.zeros(B, C, H + 2, W + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = b.view(1, -1, 1, 1).expand(B, -1, H, W).clone()
    for di in range(3):
        for dj in range(3):
            patch = xp[:, :, di : di + H, dj : dj + W]  # (B, C, H, W)
            out = out + torch.einsum("bchw,oc->bohw", patch, w[:, :, di, dj])
    return out


@given(B=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7))
def test_attention_to_grid_is_row_major(B, h, w):
    col = torch.arange(B * h * w, dtype=torch.float64).view(B, h * w)
    grid = attention_to_grid(col, h, w)
    assert grid.shape == (B, 1, h, w)
    for b in range(B):
        for r in range(h):
            for c in range(w):
                assert grid[b, 0, r, c] == col[b, r * w + c]
    # the inverse of the U-Net's flatten: a feature map flattened row-major comes back unchanged
    fmap = torch.randn(B, 1, h, w, dtype=torch.float64)
    assert torch.equal(attention_to_grid(fmap.flatten(2).squeeze(1), h, w), fmap)


def test_attention_to_grid_rejects_wrong_grid():
    with pytest.raises(ValueError, match="cannot be laid out"):
        attention_to_grid(torch.rand(2, 12), 3, 5)
    with pytest.raises(ValueError, match=r"\(B, n_x\)"):
        attention_to_grid(torch.rand(2, 12, 4), 3, 4)


@given(B=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), n_y=st.integers(1, 6), data=st.data())
def test_pooled_attention_map_selects_each_samples_column(B, h, w, n_y, data):
    m = _attention(B, h, w, n_y, seed=B * 100 + h * 10 + w)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, n_y - 1), min_size=B, max_size=B)), dtype=torch.long)
    got = pooled_attention_map(m, idx, h, w)
    for b in range(B):
        assert torch.equal(got[b, 0].flatten(), m[b, :, idx[b]])
    with pytest.raises(ValueError, match="pooled_index"):
        pooled_attention_map(m, torch.full((B,), n_y, dtype=torch.long), h, w)


@settings(max_examples=20)
@given(B=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), n_layers=st.integers(1, 5), width=st.integers(1, 6))
def test_edge_predictor_keeps_resolution_and_equals_conv_chain(B, h, w, n_layers, width):
    torch.manual_seed(h * 31 + w)
    net = EdgePredictor(n_layers=n_layers, width=width).double()
    attn = attention_to_grid(_attention(B, h, w, 5, seed=h + w)[:, :, 2], h, w)
    out = net(attn)
    assert out.shape == (B, 1, h, w)
    assert len(net.convs) == n_layers
    weights = [c.weight for c in net.convs]
    biases = [c.bias for c in net.convs]
    torch.testing.assert_close(out, edge_predictor_functional(attn, weights, biases), rtol=0, atol=0)
    # independent oracle: the same chain with convolutions written as sums of shifted maps
    x = attn / attn.amax(dim=(2, 3), keepdim=True)
    for k, (wk, bk) in enumerate(zip(weights, biases)):
        x = _conv3x3_by_shifts(x, wk.detach(), bk.detach())
        if k < n_layers - 1:
            x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU
    torch.testing.assert_close(out.detach(), x, rtol=1e-12, atol=1e-12)  # float64 roundoff only


def test_paper_default_architecture():
    net = EdgePredictor()
    assert len(net.convs) == 5  # Sec. 3.2: N = 5
    assert [c.kernel_size for c in net.convs] == [(3, 3)] * 5
    assert [(c.in_channels, c.out_channels) for c in net.convs] == [(1, 32), (32, 32), (32, 32), (32, 32), (32, 1)]
    with pytest.raises(ValueError, match="odd"):
        EdgePredictor(kernel_size=4)
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        net(torch.rand(2, 16))


@given(scale=st.floats(1e-4, 1e4), h=st.integers(1, 6), w=st.integers(1, 6))
def test_prediction_is_invariant_to_the_scale_of_the_map(scale, h, w):
    """Max-normalisation: P(c M) = P(M) for c > 0 (the map's absolute scale carries no edge information)."""
    torch.manual_seed(0)
    net = EdgePredictor(width=4).double()
    attn = attention_to_grid(_attention(2, h, w, 4, seed=h * w)[:, :, 1], h, w)
    with torch.no_grad():
        torch.testing.assert_close(net(scale * attn), net(attn), rtol=1e-10, atol=1e-10)


@given(h=st.integers(1, 6), w=st.integers(1, 6))
def test_normalised_map_peaks_at_one(h, w):
    attn = attention_to_grid(_attention(3, h, w, 4, seed=h + 7 * w)[:, :, 0], h, w)
    x = normalize_attention_map(attn)
    assert torch.all(x > 0) and torch.all(x <= 1)
    torch.testing.assert_close(x.amax(dim=(2, 3)), torch.ones(3, 1, dtype=x.dtype), rtol=0, atol=0)
    assert torch.equal(normalize_attention_map(torch.zeros(1, 1, h, w)), torch.zeros(1, 1, h, w))  # no 0/0


@pytest.mark.parametrize("prior", [0.01, 0.1, 0.3])
def test_initial_prediction_is_the_prior(prior):
    """RetinaNet-style init: before training sigmoid(P(M)) ~ prior on every pixel."""
    torch.manual_seed(0)
    net = EdgePredictor(prior_prob=prior)
    assert net.convs[-1].bias.item() == pytest.approx(math.log(prior / (1 - prior)), rel=1e-6)
    attn = attention_to_grid(_attention(2, 8, 8, 6, seed=1, dtype=torch.float32)[:, :, 3], 8, 8)
    with torch.no_grad():
        p = torch.sigmoid(net(attn))
    assert (p - prior).abs().max() < 0.2 * prior


def test_gradient_reaches_the_attention_map():
    torch.manual_seed(0)
    net = EdgePredictor(width=8)
    m = _attention(2, 6, 6, 5, seed=3, dtype=torch.float32).requires_grad_(True)
    logits = net(pooled_attention_map(m, torch.tensor([4, 1]), 6, 6))
    logits.square().mean().backward()
    assert torch.isfinite(m.grad).all()
    assert m.grad[0, :, 4].abs().sum() > 0 and m.grad[1, :, 1].abs().sum() > 0
    assert m.grad[0, :, 0].abs().sum() == 0  # only the pooled column feeds P_theta


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_forward_tracks_float32(dtype, tol):
    """Under bf16/fp16 the normalisation runs in float32; the result follows float32 to ~6 u."""
    torch.manual_seed(0)
    net = EdgePredictor(width=8)
    attn = attention_to_grid(_attention(2, 8, 8, 6, seed=2, dtype=torch.float32)[:, :, 3], 8, 8)
    with torch.no_grad():
        ref = net(attn)
        got = net.to(dtype)(attn.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@given(B=st.integers(1, 2), H=st.integers(1, 40), W=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12))
def test_edge_target_to_grid_stays_a_probability(B, H, W, h, w):
    g = torch.Generator().manual_seed(H * 41 + W)
    edge = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    out = edge_target_to_grid(edge, h, w)
    assert out.shape == (B, 1, h, w)
    assert torch.all(out >= 0) and torch.all(out <= 1)
    assert out.min() >= edge.min() - 1e-12 and out.max() <= edge.max() + 1e-12  # convex combination
    const = torch.full((B, 1, H, W), 0.3, dtype=torch.float64)
    torch.testing.assert_close(edge_target_to_grid(const, h, w), torch.full((B, 1, h, w), 0.3, dtype=torch.float64))
    assert torch.equal(edge_target_to_grid(edge, H, W), edge)


def test_edge_target_downsampling_does_not_skip_thin_edges():
    """A 1-pixel line between the bilinear sample points must still reach the coarse target."""
    edge = torch.zeros(1, 1, 64, 64)
    edge[..., :, 1] = 1.0  # a vertical line at x = 1, inside the first 8-pixel cell, off its sample points
    out = edge_target_to_grid(edge, 8, 8)
    plain = F.interpolate(edge, size=(8, 8), mode="bilinear", align_corners=False)
    assert plain[..., 0].max() == 0  # plain bilinear misses it
    assert out[..., 0].min() > 0.05  # the antialiased resize keeps it (soft)
