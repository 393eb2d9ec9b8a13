"""Smoke test of tools/bench.py at tiny sizes (no timing assertions: speed goals are checked by running it)."""

from __future__ import annotations

import json

import pytest
import torch

from raphael_ref.testing import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench")


def test_space_moe_tiny_run_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "smoe.json"
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["space-moe", "--n-y", "5", "--experts", "3", "--positions", "16", "--dim", "8", "--hidden", "16",
                         "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads sets a process-wide value; keep it out of other tests
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["command"] == "space-moe" and rec["threads"] == 1 and rec["torch"]
    assert rec["sizes"] == {"batch": 2, "positions": 16, "n_y": 5, "experts": 3, "dim": 8, "hidden": 16, "alpha": 0.2}
    assert set(rec["times_s"]) == {"literal", "dense", "gather"}
    assert set(rec["speedup_vs_literal"]) == set(rec["max_rel_error"]) == {"dense", "gather"}
    assert rec["equal_within_tol"] and max(rec["max_rel_error"].values()) <= rec["rel_tol"] == 1e-6
    assert 0 < rec["mask_density"] <= 1
    assert "speed-up" in capsys.readouterr().out


def test_cli_lists_subcommands_and_rejects_unknown(bench, capsys):
    assert [c.name for c in bench.COMMANDS][0] == "space-moe"
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "space-moe" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["no-such-benchmark"])


def test_block_tiny_run_writes_json(bench, tmp_path):
    out = tmp_path / "block.json"
    rc = bench.main(["block", "--latent", "4", "--width", "64", "--expert-mult", "2", "--repeats", "1", "--warmup", "0",
                     "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["sizes"]["width"] == 64 and rec["sizes"]["latent"] == 4 and rec["sizes"]["space_experts"] == 6
    assert set(rec["times_s"]) == {"moe", "dense"} and rec["moe_over_dense"] > 0
    assert rec["params"]["moe"] > rec["params"]["dense"]


def test_params_counts_the_paper_preset(bench, tmp_path, capsys):
    out = tmp_path / "params.json"
    assert bench.main(["params", "--preset", "paper", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert abs(rec["unet"]["total"] - 3.0e9) <= 0.1 * 3.0e9
    assert rec["text_tower"] > 3e8  # the ViT-g-14 text tower, listed separately
    assert "space_experts" in capsys.readouterr().out


def test_train_step_variants_run_and_report_ratios(bench, tmp_path, capsys):
    out = tmp_path / "step.json"
    names = ["24px pixels, gather, b16", "24px s2d f3 (8x8x27), width 32, gather, b32"]
    rc = bench.main(["train-step", "--variants", *names, "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert list(rec["times"]) == names and rec["clock"] == "process"
    assert all(v["s_per_step"] > 0 and v["images_per_s"] > 0 for v in rec["times"].values())
    assert rec["times"][names[1]]["batch"] == 32
    assert "images/s vs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main(["train-step", "--variants", "nope"])
