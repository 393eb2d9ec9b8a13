"""Shared test configuration: markers, hypothesis profiles, device/dtype helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "dev" (default) explores; "ci" is derandomized and smaller so CI is
# reproducible and fast on 2 cores. Pick with HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        elif "slow" not in item.keywords:
            item.add_marker(pytest.mark.spec)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tools' --threads set torch's process-wide thread count: restore it after every test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
