"""Golden cases of the ablation and path-analysis statistics: pixel-FD, the paired bootstrap of an FD difference,
time-expert usage, space-expert frequency (helper J)."""

from __future__ import annotations

import torch

from raphael_ref.evaluation.ablation import paired_bootstrap_fd, pixel_fd, pixel_features
from raphael_ref.evaluation.routes import space_expert_frequency, time_expert_usage
from raphael_ref.testing.golden import GoldenCase, Tensors

# Every input here is an integer tensor (uint8 images, long routes and labels), which the harness
# does not cast, and the functions compute in float64 whatever the compute dtype: the outputs are
# the same in every dtype, so only float64 and float32 are listed (as for eval.fid).
#   pixel-FD: counts and means of <= 256 terms are exact to ~1e-16; the eigh-based Frechet distance
#       of a 75 x 75 rank-deficient covariance (8 images) varies across LAPACK builds by ~1e-12 of
#       its O(10) value, and with the thread count by up to ~2e-10 of it (measured: 4.0314926946 with
#       2 threads, 4.0314926955 with OMP_NUM_THREADS=1): (1e-9, 1e-9).
#   usage and frequency: ratios of small integers, correctly rounded: (1e-12, 1e-12) (DEFAULT_TOL float64).
_FD_TOL = {"float64": (1e-9, 1e-9), "float32": (1e-9, 1e-9)}
_COUNT_TOL = {"float64": (1e-12, 1e-12), "float32": (1e-12, 1e-12)}


def _pixel_fd_inputs(gen: torch.Generator) -> Tensors:
    a = torch.randint(0, 256, (8, 3, 8, 8), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (8, 3, 8, 8), generator=gen, dtype=torch.uint8) // 2  # darker: a different distribution
    return {"generated": a, "reference": b}


def _pixel_fd_compute(x: Tensors) -> Tensors:
    return {"features": pixel_features(x["generated"]),
            "pixel_fd": torch.tensor(pixel_fd(x["generated"], x["reference"]), dtype=torch.float64)}


def _bootstrap_inputs(gen: torch.Generator) -> Tensors:
    ref = torch.randint(0, 10, (16, 3), generator=gen)  # integer features: the harness does not cast them
    return {"a": ref + torch.randint(-1, 2, (16, 3), generator=gen), "b": torch.randint(0, 20, (16, 3), generator=gen),
            "reference": ref}


def _bootstrap_compute(x: Tensors) -> Tensors:
    b = paired_bootstrap_fd(x["a"], x["b"], x["reference"], n_boot=20, seed=0)
    return {"diff": torch.tensor(b["diff"], dtype=torch.float64), "se": torch.tensor(b["se"], dtype=torch.float64)}


def _usage_inputs(gen: torch.Generator) -> Tensors:
    return {"time_routes": torch.randint(0, 4, (5, 3, 6), generator=gen)}  # (S, K, B), 4 experts


def _usage_compute(x: Tensors) -> Tensors:
    return {"usage": time_expert_usage(x["time_routes"], 4)}


def _freq_inputs(gen: torch.Generator) -> Tensors:
    labels = torch.arange(12) % 3  # (N,) three concepts, four paths each
    return {"features": torch.randint(0, 6, (12, 4), generator=gen), "labels": labels}


def _freq_compute(x: Tensors) -> Tensors:
    return {"frequency": space_expert_frequency(x["features"], x["labels"], 3, 6)}


CASES = [
    GoldenCase("eval.pixel_fd", _pixel_fd_inputs, _pixel_fd_compute, _FD_TOL),
    GoldenCase("eval.fd_bootstrap", _bootstrap_inputs, _bootstrap_compute, _FD_TOL),  # 3 x 3 eigh: as pixel-FD or better
    GoldenCase("eval.time_expert_usage", _usage_inputs, _usage_compute, _COUNT_TOL),
    GoldenCase("eval.space_expert_frequency", _freq_inputs, _freq_compute, _COUNT_TOL),
]
