"""Properties of eDiff-I-style time-interval routing (spec ``gate.interval_route``; raphael_ref/gates.py, E69):
route(t) = floor(t n / T) splits [0, T) into n contiguous intervals of lengths floor(T / n) or ceil(T / n),
in order of t, each expert taking one, with gate weight exactly 1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.gates import interval_route


@pytest.mark.spec_id("gate.interval_route")
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 2000), n=st.integers(1, 16))
def test_intervals_are_contiguous_ordered_and_near_equal(T, n):
    t = torch.arange(T)
    routes, w = interval_route(t, n, T)
    assert routes.dtype == torch.long and torch.equal(w, torch.ones(T))
    assert routes.tolist() == [(i * n) // T for i in range(T)]  # exact integer floor, no float rounding
    assert int(routes[0]) == 0 and int(routes[-1]) == (n - 1 if T >= n else ((T - 1) * n) // T)
    assert bool((routes.diff() >= 0).all())  # ordered in t
    if T >= n:
        assert bool((routes.diff() <= 1).all())  # no expert skipped
    counts = torch.bincount(routes, minlength=n)
    if T >= n:  # every expert gets an interval of floor(T/n) or ceil(T/n) timesteps
        assert int(counts.min()) >= T // n and int(counts.max()) <= -(-T // n)
    assert int(counts.sum()) == T


@pytest.mark.spec_id("gate.interval_route")
@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 1000), n=st.integers(1, 8), data=st.data())
def test_route_depends_on_t_only_and_clamps_out_of_range(T, n, data):
    """A batch's routes are those of its timesteps one by one (no coupling across the batch); t outside
    [0, T) is clamped to the end intervals."""
    ts = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=12))
    t = torch.tensor(ts)
    routes, _ = interval_route(t, n, T)
    for i, ti in enumerate(ts):
        assert int(routes[i]) == int(interval_route(torch.tensor([ti]), n, T)[0])
    edge, _ = interval_route(torch.tensor([-5, T, T + 7]), n, T)
    last = ((T - 1) * n) // T  # n - 1 when T >= n
    assert edge.tolist() == [0, last, last]
    assert torch.equal(interval_route(t, 1, T)[0], torch.zeros_like(t))  # one expert: the dense time FFN
