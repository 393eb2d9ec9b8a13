"""RAPHAEL Sec. 4 data-side rules: aspect-ratio buckets (Multi-scale Training) and caption cleaning (Dataset)."""

from raphael_ref.data.buckets import (
    BUCKETS,
    bucket_batch_shares,
    bucket_nearest,
    resize_crop_plan,
    scaled_buckets,
)
from raphael_ref.data.captions import clean_caption

__all__ = ["BUCKETS", "bucket_nearest", "resize_crop_plan", "scaled_buckets", "bucket_batch_shares", "clean_caption"]
