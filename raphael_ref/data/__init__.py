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

# Synthetic compositional data set (not in the paper; for end-to-end training and evaluation).
from raphael_ref.data.synthetic import (  # noqa: E402
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    SyntheticShapes,
    collate_synthetic,
    export_shards,
    make_scene,
    render,
    sample_scene,
)

__all__ += [
    "SHAPES", "COLORS", "POSITIONS", "SceneObject", "Scene", "sample_scene", "make_scene", "render",
    "SyntheticShapes", "collate_synthetic", "export_shards",
]

# Real-data readers with the Sec. 4 "Dataset" filters.
from raphael_ref.data.shards import (  # noqa: E402
    AESTHETIC_MIN,
    PWATERMARK_MAX,
    DataStats,
    DataWarning,
    iter_image_folder,
    iter_tar_samples,
    list_shards,
)

__all__ += [
    "AESTHETIC_MIN", "PWATERMARK_MAX", "DataStats", "DataWarning", "iter_tar_samples", "iter_image_folder",
    "list_shards",
]

# Training batches (synthetic or real, single- or multi-scale).
from raphael_ref.data.loader import SYNTHETIC, make_train_loader  # noqa: E402

__all__ += ["SYNTHETIC", "make_train_loader"]
