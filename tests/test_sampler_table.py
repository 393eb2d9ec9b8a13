"""tools/sampler_table.py (docs/results/samplers_toy.md): argument checks, the Fréchet distance it computes from
features, and the table it writes."""

from __future__ import annotations

import pytest
import torch

from raphael_ref.testing import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("sampler_table")


def test_bad_arguments(tool):
    with pytest.raises(SystemExit):
        tool.parse_args(["runs/x", "--out", "o", "--samplers", "ddim"])
    with pytest.raises(SystemExit):
        tool.parse_args(["runs/x", "--out", "o", "--jobs", "0"])
    a = tool.parse_args(["runs/x", "--out", "o", "--samplers", "ddim:50", "euler:20"])
    assert a.samplers == ["ddim:50", "euler:20"] and a.boot == 200


def test_fd_of_is_the_frechet_distance_of_the_fitted_gaussians(tool):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    b = a + 2.0  # a shifted copy: FD = |shift|^2 = 3 * 4 (same covariance)
    assert tool.fd_of(a, b) == pytest.approx(12.0, rel=1e-9)
    assert tool.fd_of(a, a) == pytest.approx(0.0, abs=1e-9)


def test_table_markdown_rows_and_paired_columns(tool):
    row = dict(sampler="ddim", steps=50, model_calls=50, n=96, accuracy=0.5, accuracy_se=0.04, acc_diff=0.0,
               acc_diff_se=0.0, clip_score=57.6, clip_score_se=2.4, pixel_fd=0.98, pixel_fd_se=0.08, clip_fd=27.8,
               clip_fd_se=2.6, pixel_fd_diff=0.0, pixel_fd_diff_se=0.0, clip_fd_diff=0.0, clip_fd_diff_se=0.0,
               categories={"colors": 0.8}, agree_with_reference=96)
    other = {**row, "sampler": "euler", "steps": 20, "model_calls": 20, "acc_diff": -0.0104, "acc_diff_se": 0.018,
             "pixel_fd_diff": -0.053, "pixel_fd_diff_se": 0.011, "agree_with_reference": 93}
    md = tool.table_markdown([row, other], "ddim:50")
    lines = md.splitlines()
    assert "diff. vs ddim 50" in lines[0] and "(reference)" in lines[2]
    assert "| euler | 20 | 20 x 2 (CFG) | 0.500 ± 0.040 | -0.010 ± 0.018 |" in lines[3]
    assert "-0.053 ± 0.011" in lines[3] and "93/96" in md
