"""The shifted timestep draw (spec ``train.t_shift``; raphael_ref/diffusion/timestep_shift.py, erratum E90):
t = floor(T tau_s(u)), tau_s(u) = s u / (1 + (s - 1) u), u ~ U[0, 1); index i has probability
p_s(i) = u((i + 1) / T) - u(i / T) with u(tau) = tau / (s - (s - 1) tau)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.config import get_preset
from raphael_ref.diffusion.timestep_shift import shift_time, shifted_timestep_probs, shifted_timesteps

shifts = st.floats(0.05, 20.0, allow_nan=False, allow_infinity=False)


def _literal_t(u: float, T: int, s: float) -> int:
    """One draw, written out in Python floats (the spec's formula as printed)."""
    return min(T - 1, math.floor(T * (s * u / (1 + (s - 1) * u))))


@pytest.mark.spec_id("train.t_shift")
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 2000), s=shifts, us=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=30))
def test_draw_is_the_printed_formula_in_range(T, s, us):
    t = shifted_timesteps(torch.tensor(us, dtype=torch.float64), T, s)
    assert t.dtype == torch.long
    assert t.tolist() == [_literal_t(u, T, s) for u in us]
    assert bool(((t >= 0) & (t <= T - 1)).all())


@pytest.mark.spec_id("train.t_shift")
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 1000), s=shifts)
def test_monotone_ends_and_mirror(T, s):
    u = torch.linspace(0, 1, 513, dtype=torch.float64)
    tau = shift_time(u, s)
    assert bool((tau.diff() >= 0).all())  # increasing: a larger u never draws a smaller t
    assert float(tau[0]) == 0.0 and math.isclose(float(tau[-1]), 1.0, rel_tol=1e-15)
    # a shift and its inverse are mirror images: tau_{1/s}(u) = 1 - tau_s(1 - u)
    torch.testing.assert_close(shift_time(u, 1 / s), 1 - shift_time(1 - u, s), rtol=0, atol=1e-14)
    t = shifted_timesteps(u[:-1], T, s)
    assert bool((t.diff() >= 0).all()) and int(t[0]) == 0


@pytest.mark.spec_id("train.t_shift")
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 2000), s=shifts)
def test_probs_sum_to_one_and_order_with_the_shift(T, s):
    p = shifted_timestep_probs(T, s)
    assert p.shape == (T,) and p.dtype == torch.float64
    assert bool((p >= 0).all()) and math.isclose(float(p.sum()), 1.0, rel_tol=0, abs_tol=1e-12)
    # s > 1: the density p_s(i) grows with i (more high-noise draws); s < 1: it falls; s = 1: 1 / T each
    d = p.diff()
    if s > 1:
        assert bool((d >= -1e-15).all())
    elif s < 1:
        assert bool((d <= 1e-15).all())
    # the mean index grows with s
    i = torch.arange(T, dtype=torch.float64)
    mean = float((p * i).sum())
    mean_more = float((shifted_timestep_probs(T, s * 1.5) * i).sum())
    assert mean_more >= mean - 1e-9


def test_shift_one_is_uniform():
    T = 1000
    torch.testing.assert_close(shifted_timestep_probs(T, 1.0), torch.full((T,), 1 / T, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(shifted_timesteps(u, T, 1.0), torch.floor(T * u).long())


@pytest.mark.spec_id("train.t_shift")
@pytest.mark.parametrize("T,s", [(1000, 3.0), (1000, 0.5), (10, 2.0)])
def test_empirical_frequencies_match_the_probs(T, s):
    """400k draws through shifted_timesteps against p_s, binned in 10 bands of t: each band's share within 5
    standard errors of a binomial (at most 4e-3 here)."""
    n = 400_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = shifted_timesteps(u, T, s)
    p = shifted_timestep_probs(T, s)
    bands = torch.arange(T) * 10 // T
    got = torch.bincount(bands[t], minlength=10).double() / n
    want = torch.zeros(10, dtype=torch.float64).index_add_(0, bands, p)
    se = (want * (1 - want) / n).sqrt()
    assert bool(((got - want).abs() <= 5 * se + 1e-12).all()), (got, want)


def test_shift_three_puts_two_thirds_of_the_draws_above_0_6_T():
    """The numbers the spec entry and E90 quote for the measured shift: P(t >= 0.6 T) = 1 - u(0.6) = 2/3 at s = 3
    (uniform: 0.4), and P(t < 0.2 T) = u(0.2) = 1/13 (uniform: 0.2)."""
    p = shifted_timestep_probs(1000, 3.0)
    assert math.isclose(float(p[600:].sum()), 2 / 3, rel_tol=1e-12)
    assert math.isclose(float(p[:200].sum()), 1 / 13, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "3"])
def test_bad_shift_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="timestep shift must be a finite number > 0"):
        shifted_timesteps(torch.rand(3, dtype=torch.float64), 1000, bad)
    with pytest.raises(ValueError, match="timestep shift"):
        shifted_timestep_probs(1000, bad)


def test_bad_draws_and_T_are_clear_errors():
    with pytest.raises(ValueError, match="float64"):
        shifted_timesteps(torch.rand(3), 1000, 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        shifted_timesteps(torch.tensor([0.5, 1.0], dtype=torch.float64), 1000, 2.0)
    with pytest.raises(ValueError, match="T must be an int"):
        shifted_timesteps(torch.rand(3, dtype=torch.float64), 0, 2.0)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf")])
def test_config_refuses_a_bad_shift(bad):
    with pytest.raises(ValueError, match="train.t_shift"):
        get_preset("toy", {"train.t_shift": bad})
