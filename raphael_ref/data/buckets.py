"""RAPHAEL Sec. 4, "Multi-scale Training": aspect-ratio buckets.

"we resize an image to its nearest size in a bucket, which has 9 different image scales" with
(footnote) [height, width] = [448, 832], [512, 768], [512, 704], [640, 640], [576, 640],
[640, 576], [704, 512], [768, 512], [832, 448]; "the GPU resources will be automatically allocated
to each bucket depending on the number of images it contains".

Decisions (spec/errata.md):
- nearest = smallest |log(h / w) - log(H_b / W_b)| (aspect ratio in log space, so h:w and w:h are
  equally far from 1:1); evaluated exactly with integer arithmetic. Ties (an image ratio exactly
  at the geometric mean of two bucket ratios): the larger bucket area wins, then the lower index.
  For the paper's list this keeps the choice transpose-equivariant (the list is closed under
  transposition and transposed buckets have equal areas).
- resize-to-cover then center-crop: scale = max(H_b / h, W_b / w), so the resized image covers the
  bucket and only the overhang along one side is cut, split evenly (extra pixel at the bottom/right).
- the batch budget is split across buckets in proportion to their image counts by largest
  remainders (Hamilton's method), so the shares sum exactly to the budget.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

__all__ = [
    "BUCKETS",
    "bucket_nearest",
    "bucket_nearest_literal",
    "resize_crop_plan",
    "scaled_buckets",
    "bucket_batch_shares",
]

# Sec. 4 footnote, (height, width) in pixels, in the printed order (indices refer to this order).
BUCKETS: tuple[tuple[int, int], ...] = (
    (448, 832),
    (512, 768),
    (512, 704),
    (640, 640),
    (576, 640),
    (640, 576),
    (704, 512),
    (768, 512),
    (832, 448),
)


def _check_size(height: int, width: int, fn: str) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {name} must be a positive int (pixels); got {v!r}.")


def _check_buckets(buckets: Sequence[tuple[int, int]], fn: str) -> None:
    if len(buckets) == 0:
        raise ValueError(f"{fn}: need at least one bucket; got an empty list.")
    for b in buckets:
        if len(b) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in b):
            raise ValueError(f"{fn}: each bucket must be a (height, width) pair of positive ints; got {b!r}.")


def _ratio_distance(height: int, width: int, bucket: tuple[int, int]) -> Fraction:
    """exp|log(h/w) - log(H_b/W_b)| as an exact fraction: max(q, 1/q) with q = (h W_b) / (w H_b)."""
    q = Fraction(height * bucket[1], width * bucket[0])
    return max(q, 1 / q)


def bucket_nearest(height: int, width: int, buckets: Sequence[tuple[int, int]] = BUCKETS) -> int:
    """RAPHAEL Sec. 4, Multi-scale Training: index of the bucket nearest to the image's aspect ratio.

    Exact form: exp(.) is increasing, so comparing |log(h/w) - log(H_b/W_b)| is comparing the
    fractions max(q, 1/q), q = h W_b / (w H_b); ties go to the larger area, then the lower index.
    """
    _check_size(height, width, "bucket_nearest")
    _check_buckets(buckets, "bucket_nearest")
    keys = [(_ratio_distance(height, width, b), -b[0] * b[1], i) for i, b in enumerate(buckets)]
    return min(keys)[2]


def bucket_nearest_literal(height: int, width: int, buckets: Sequence[tuple[int, int]] = BUCKETS) -> int:
    """RAPHAEL Sec. 4, Multi-scale Training, literal: argmin_b |log(h/w) - log(H_b/W_b)| in floats.

    Agrees with :func:`bucket_nearest` except where two distances differ by float rounding only.
    """
    _check_size(height, width, "bucket_nearest_literal")
    _check_buckets(buckets, "bucket_nearest_literal")
    dist = [abs(math.log(height / width) - math.log(h_b / w_b)) for h_b, w_b in buckets]
    return min(range(len(buckets)), key=lambda i: (dist[i], -buckets[i][0] * buckets[i][1], i))


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def resize_crop_plan(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """RAPHAEL Sec. 4, "resize an image to its nearest size in a bucket": (resize_h, resize_w, top, left).

    Resize (h, w) by scale = max(H_b / h, W_b / w) so that it covers the bucket (the side that
    binds becomes exactly H_b or W_b, the other is rounded half up and is >= its bucket side),
    then crop the window [top, top + H_b) x [left, left + W_b), centered (floor of the overhang / 2).
    """
    _check_size(height, width, "resize_crop_plan")
    _check_buckets([bucket], "resize_crop_plan")
    h_b, w_b = bucket
    if h_b * width >= w_b * height:  # H_b / h >= W_b / w: the height binds
        resize_h, resize_w = h_b, _round_half_up(Fraction(width * h_b, height))
    else:  # the width binds
        resize_h, resize_w = _round_half_up(Fraction(height * w_b, width)), w_b
    top, left = (resize_h - h_b) // 2, (resize_w - w_b) // 2
    return resize_h, resize_w, top, left


def scaled_buckets(
    buckets: Sequence[tuple[int, int]] = BUCKETS, factor: float = 8, step: int = 1
) -> tuple[tuple[int, int], ...]:
    """RAPHAEL Sec. 4 buckets for smaller presets: each side / factor, rounded (half up) to a multiple of step.

    E.g. factor 8 gives the latent sizes of the paper's buckets (all sides are multiples of 64,
    so they stay exact); toy presets use larger factors. Raises if a side would round to 0 or if
    two buckets would collapse to the same size (indices must keep their meaning).
    """
    _check_buckets(buckets, "scaled_buckets")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"scaled_buckets: step must be a positive int; got {step!r}.")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"scaled_buckets: factor must be a finite number > 0; got {factor!r}.")
    f = Fraction(factor)
    out = tuple(tuple(step * _round_half_up(Fraction(side) / (f * step)) for side in b) for b in buckets)
    if any(side < 1 for b in out for side in b):
        raise ValueError(f"scaled_buckets: factor {factor} with step {step} rounds a side to 0: {out}. Use a smaller factor.")
    if len(set(out)) != len(out):
        raise ValueError(
            f"scaled_buckets: factor {factor} with step {step} makes buckets collapse: {out}. "
            f"Use a smaller factor or step."
        )
    return out


def bucket_batch_shares(counts: Sequence[int], total_batch: int) -> tuple[int, ...]:
    """RAPHAEL Sec. 4, "GPU resources ... allocated to each bucket depending on the number of images".

    Splits a global batch budget across buckets in proportion to their image counts by largest
    remainders: quota_i = total * c_i / sum(c); each bucket gets floor(quota_i), and the seats
    left go to the largest remainders (ties: larger count, then lower index). The shares sum
    exactly to total_batch, |share_i - quota_i| < 1, empty buckets get 0, and c_i > c_j implies
    share_i >= share_j.
    """
    if isinstance(total_batch, bool) or not isinstance(total_batch, int) or total_batch < 0:
        raise ValueError(f"bucket_batch_shares: total_batch must be an int >= 0; got {total_batch!r}.")
    if len(counts) == 0 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"bucket_batch_shares: counts must be a non-empty list of ints >= 0; got {list(counts)!r}.")
    n = sum(counts)
    if n == 0:
        raise ValueError("bucket_batch_shares: every bucket is empty (sum of counts is 0); nothing to allocate.")
    floors = [c * total_batch // n for c in counts]
    remainders = [c * total_batch % n for c in counts]  # exact: quota_i - floor_i = remainder_i / n
    left = total_batch - sum(floors)
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], -counts[i], i))
    shares = list(floors)
    for i in order[:left]:
        shares[i] += 1
    return tuple(shares)
