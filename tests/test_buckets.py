"""Aspect-ratio buckets (RAPHAEL Sec. 4, Multi-scale Training): nearest bucket, resize-crop, shares."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raphael_ref.data.buckets import (
    BUCKETS,
    bucket_batch_shares,
    bucket_nearest,
    bucket_nearest_literal,
    resize_crop_plan,
    scaled_buckets,
)

pytestmark = pytest.mark.spec_id("data.bucket_nearest")

sizes = st.integers(1, 8192)


def test_paper_buckets_as_printed():
    assert BUCKETS == ((448, 832), (512, 768), (512, 704), (640, 640), (576, 640),
                       (640, 576), (704, 512), (768, 512), (832, 448))  # Sec. 4 footnote
    assert set(BUCKETS) == {(w, h) for h, w in BUCKETS}  # closed under transposition (erratum: it is)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in BUCKETS)
    ratios = [h / w for h, w in BUCKETS]
    assert len(set(ratios)) == len(ratios)  # no two buckets share an aspect ratio


@given(h=sizes, w=sizes)
def test_nearest_is_in_range_and_minimises_the_log_ratio_distance(h, w):
    i = bucket_nearest(h, w)
    assert 0 <= i < len(BUCKETS)
    d = [abs(math.log(h / w) - math.log(hb / wb)) for hb, wb in BUCKETS]
    assert d[i] <= min(d) + 1e-12


@given(k=st.integers(1, 20), i=st.integers(0, len(BUCKETS) - 1), num=st.integers(1, 4), den=st.integers(1, 4))
def test_exact_ratio_maps_to_its_bucket(k, i, num, den):
    h_b, w_b = BUCKETS[i]
    assert bucket_nearest(k * h_b, k * w_b) == i
    assert bucket_nearest(h_b * num, w_b * num) == i
    if (h_b * num) % den == 0 and (w_b * num) % den == 0:
        assert bucket_nearest(h_b * num // den, w_b * num // den) == i


@given(h=sizes, w=sizes)
def test_transposed_image_maps_to_the_transposed_bucket(h, w):
    h_b, w_b = BUCKETS[bucket_nearest(h, w)]
    assert BUCKETS[bucket_nearest(w, h)] == (w_b, h_b)


@given(h=sizes, w=sizes)
def test_exact_form_equals_literal_form_away_from_float_ties(h, w):
    d = sorted(abs(math.log(h / w) - math.log(hb / wb)) for hb, wb in BUCKETS)
    if d[1] - d[0] > 1e-12:
        assert bucket_nearest(h, w) == bucket_nearest_literal(h, w)


def test_tie_break_prefers_the_larger_area_then_the_lower_index():
    # a square image is equally far (log 2) from 1:2 and 2:1
    assert bucket_nearest(10, 10, [(2, 4), (2, 1)]) == 0  # larger area
    assert bucket_nearest(10, 10, [(2, 1), (2, 4)]) == 1  # larger area, whatever the order
    assert bucket_nearest(10, 10, [(2, 4), (4, 2)]) == 0  # equal areas: lower index
    assert bucket_nearest(10, 10, [(4, 2), (2, 4)]) == 0


def test_invalid_sizes_raise():
    for bad in [(0, 5), (5, -1), (2.5, 4), (True, 3)]:
        with pytest.raises(ValueError, match="positive int"):
            bucket_nearest(*bad)
    with pytest.raises(ValueError, match="at least one bucket"):
        bucket_nearest(4, 4, [])


@given(h=sizes, w=sizes, i=st.integers(0, len(BUCKETS) - 1))
def test_plan_covers_the_bucket_and_crops_inside_the_resized_image(h, w, i):
    h_b, w_b = BUCKETS[i]
    rh, rw, top, left = resize_crop_plan(h, w, (h_b, w_b))
    assert rh >= h_b and rw >= w_b and (rh == h_b or rw == w_b)  # covers, one side binds exactly
    assert 0 <= top and top + h_b <= rh and 0 <= left and left + w_b <= rw  # crop inside
    assert abs((rh - h_b) - 2 * top) <= 1 and abs((rw - w_b) - 2 * left) <= 1  # centered
    scale = max(h_b / h, w_b / w)
    assert abs(rh - h * scale) <= 0.5 + 1e-9 and abs(rw - w * scale) <= 0.5 + 1e-9  # aspect ratio kept


def test_plan_examples():
    assert resize_crop_plan(1024, 1024, (512, 768)) == (768, 768, 128, 0)  # width binds, crop rows
    assert resize_crop_plan(448, 832, (448, 832)) == (448, 832, 0, 0)  # already the bucket
    assert resize_crop_plan(100, 300, (640, 640)) == (640, 1920, 0, 640)


@given(factor=st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
def test_scaled_buckets_divide_exactly_when_they_can(factor):
    assert scaled_buckets(BUCKETS, factor) == tuple((h // factor, w // factor) for h, w in BUCKETS)


@given(factor=st.floats(1.0, 64.0), step=st.integers(1, 8))
def test_scaled_buckets_round_to_the_step(factor, step):
    try:
        out = scaled_buckets(BUCKETS, factor, step)
    except ValueError as e:
        assert "collapse" in str(e) or "rounds a side to 0" in str(e)
        return
    assert len(out) == len(BUCKETS) and len(set(out)) == len(out)
    for (h, w), (hs, ws) in zip(BUCKETS, out):
        assert hs % step == 0 and ws % step == 0 and hs >= step and ws >= step
        assert abs(hs - h / factor) <= step / 2 + 1e-9 and abs(ws - w / factor) <= step / 2 + 1e-9


def test_scaled_buckets_refuse_to_collapse():
    with pytest.raises(ValueError, match="collapse"):
        scaled_buckets(BUCKETS, 64, 4)


@given(counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=12).filter(lambda c: sum(c) > 0),
       total=st.integers(0, 5000))
def test_shares_sum_to_the_budget_and_follow_the_counts(counts, total):
    shares = bucket_batch_shares(counts, total)
    assert len(shares) == len(counts) and sum(shares) == total
    n = sum(counts)
    for c, s in zip(counts, shares):
        assert abs(s - c * total / n) < 1  # largest remainder: within one of the exact quota
        if c == 0:
            assert s == 0
    for (ci, si) in zip(counts, shares):
        for (cj, sj) in zip(counts, shares):
            if ci > cj:
                assert si >= sj  # monotone in the counts


def test_shares_examples_and_errors():
    assert bucket_batch_shares([1, 1, 1], 2000) == (667, 667, 666)
    assert bucket_batch_shares([5, 3, 2], 10) == (5, 3, 2)
    assert bucket_batch_shares([0, 7], 9) == (0, 9)
    with pytest.raises(ValueError, match="every bucket is empty"):
        bucket_batch_shares([0, 0], 4)
    with pytest.raises(ValueError, match="counts"):
        bucket_batch_shares([3, -1], 4)
    with pytest.raises(ValueError, match="total_batch"):
        bucket_batch_shares([3, 1], -4)
