"""Total loss L = L_denoise + L_edge with the T_c pause (RAPHAEL Sec. 3.2, Table 2)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from raphael_ref.losses import edge_loss_gate, total_loss

pytestmark = pytest.mark.spec_id("loss.total")


@given(t=st.lists(st.integers(0, 999), min_size=1, max_size=16), T_c=st.integers(0, 1000))
def test_gate_is_t_below_T_c(t, T_c):
    tt = torch.tensor(t)
    gate = edge_loss_gate(tt, T_c)
    assert gate.dtype == torch.bool and gate.shape == (len(t),)
    assert gate.tolist() == [ti < T_c for ti in t]


def test_gate_boundary_and_extremes():
    t = torch.tensor([0, 499, 500, 999])
    assert edge_loss_gate(t).tolist() == [True, True, False, False]  # Table 2: T_c = 500, 0-based
    assert not edge_loss_gate(t, 0).any()  # T_c = 0 switches edge supervision off
    assert edge_loss_gate(t, 1000).all()  # T_c = T: always on
    with pytest.raises(ValueError, match="integer"):
        edge_loss_gate(t.float())
    with pytest.raises(ValueError, match="0-based"):
        edge_loss_gate(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="T_c"):
        edge_loss_gate(t, -5)


@given(B=st.integers(1, 8), K=st.integers(1, 4), seed=st.integers(0, 10**6), T_c=st.integers(0, 1000), per_block=st.booleans())
def test_total_loss_matches_the_per_sample_formula(B, K, seed, T_c, per_block):
    g = torch.Generator().manual_seed(seed)
    den = torch.rand(B, generator=g, dtype=torch.float64)
    edge = torch.rand(K, B, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B,), generator=g)
    out = total_loss(den, edge if per_block else edge[0], t, T_c)
    e = edge if per_block else edge[:1]
    # L = (1/B) sum_b [ L_denoise,b + 1[t_b < T_c] (1/K) sum_k L_edge,k,b ], written out as loops
    expected_edge = sum(sum(e[k, b].item() for k in range(e.shape[0])) / e.shape[0] for b in range(B) if t[b] < T_c) / B
    expected_den = sum(den.tolist()) / B
    assert out["denoise"].item() == pytest.approx(expected_den, rel=1e-12)
    assert out["edge"].item() == pytest.approx(expected_edge, rel=1e-12, abs=1e-15)
    assert out["total"].item() == pytest.approx(expected_den + expected_edge, rel=1e-12)


def test_edge_term_is_unbiased_over_t():
    """Averaged over every assignment of t, the edge term equals E_t[1[t < T_c] L_edge] = (T_c / T) L_edge.

    Normalising by the number of eligible samples instead would give P(any eligible) L_edge here.
    """
    T, T_c, c = 10, 5, 0.7
    den = torch.zeros(2, dtype=torch.float64)
    edge = torch.full((2,), c, dtype=torch.float64)
    values = [total_loss(den, edge, torch.tensor(pair), T_c)["edge"].item() for pair in itertools.product(range(T), repeat=2)]
    assert sum(values) / len(values) == pytest.approx(c * T_c / T, rel=1e-12)


def test_no_eligible_sample_gives_an_exact_zero_that_keeps_the_graph():
    den = torch.rand(4, requires_grad=True)
    edge = torch.rand(3, 4, requires_grad=True)
    out = total_loss(den, edge, torch.tensor([500, 700, 999, 650]))
    assert out["edge"].item() == 0.0 and out["edge"].requires_grad
    out["total"].backward()
    assert torch.equal(edge.grad, torch.zeros_like(edge))
    torch.testing.assert_close(den.grad, torch.full((4,), 0.25))


def test_nan_edge_loss_of_an_ineligible_sample_does_not_poison_value_or_gradient():
    den = torch.rand(3, requires_grad=True)
    raw = torch.tensor([[0.5, float("nan"), 0.2], [0.1, float("inf"), 0.3]], requires_grad=True)
    t = torch.tensor([10, 900, 499])  # sample 1 is ineligible
    out = total_loss(den, raw, t)
    assert torch.isfinite(out["total"])
    out["total"].backward()
    assert torch.isfinite(raw.grad).all() and torch.isfinite(den.grad).all()
    assert torch.equal(raw.grad[:, 1], torch.zeros(2))
    torch.testing.assert_close(raw.grad[:, 0], torch.full((2,), 1 / 6))  # 1/B * 1/K
    torch.testing.assert_close(out["edge"].detach(), torch.tensor((0.3 + 0.25) / 3))


def test_edge_none_and_dtypes():
    den = torch.rand(5)
    out = total_loss(den, None, torch.arange(5))
    assert out["edge"].item() == 0.0 and out["total"].item() == pytest.approx(den.mean().item())
    half = total_loss(den.half(), torch.rand(5).half(), torch.arange(5))
    assert all(torch.isfinite(v) for v in half.values())


def test_invalid_inputs_raise():
    t = torch.arange(4)
    with pytest.raises(ValueError, match="denoise_per_sample"):
        total_loss(torch.rand(4, 2), torch.rand(4), t)
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        total_loss(torch.rand(4), torch.rand(2, 3), t)
    with pytest.raises(ValueError, match="integer"):
        total_loss(torch.rand(4), torch.rand(4), t.float())
    with pytest.raises(ValueError, match="empty batch"):
        total_loss(torch.rand(0), torch.rand(0), torch.zeros(0, dtype=torch.long))
