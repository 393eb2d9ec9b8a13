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
    names = ["24px pixels, gather, b16", "24px s2d f3 (8x8x27), width 32, gather, b32",
             "toy + token loss (position words)", "toy, text cut to its 10 valid slots"]
    rc = bench.main(["train-step", "--variants", *names, "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert list(rec["times"]) == names and rec["clock"] == "process"
    assert all(v["s_per_step"] > 0 and v["images_per_s"] > 0 for v in rec["times"].values())
    assert rec["times"][names[1]]["batch"] == 32
    assert rec["variants"][names[3]] == {"bench.text_slots": 10}  # a bench setting, not a config override
    assert "images/s vs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main(["train-step", "--variants", "nope"])


# ---------------------------------------------------------------------------------------------
# gpu: the one-command GPU suite, run at tiny sizes on the CPU so that it is known to work before a GPU sees it

GPU_TINY = ["gpu", "--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--sample-steps", "2"]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and 0 < x < float("inf")


def test_gpu_suite_tiny_on_cpu_measures_every_section(bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    # a budget no machine reaches: on a loaded CPU the tiny suite can take minutes, and budget skips have their own test
    assert bench.main([*GPU_TINY, "--no-compile", "--budget-s", "7200", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    s = rec["sections"]
    assert list(s) == ["matmul_ceiling", "train_small", "train_paper", "toy_default_step", "infer_moe_vs_dense",
                       "sample_ddim50_cfg"]
    assert not rec["failed_sections"] and all("error" not in v and "skipped" not in v for v in s.values())
    assert rec["device_name"] and rec["torch"] == torch.__version__ and rec["dtype"].startswith("bfloat16")
    assert _finite_positive(rec["peak_flops"]["measured_matmul"]) and rec["peak_flops"]["datasheet_bf16"] is None
    for preset in ("small", "paper"):
        tr = s[f"train_{preset}"]
        # the batch search doubles from 1 up to the --tiny cap of 2; FLOPs scale with the batch
        assert tr["batch"] == 2 and tr["oom_at"] == [] and tr["activation_checkpointing"]
        assert all(_finite_positive(tr[k]) for k in ("s_per_step", "tokens_per_s", "model_flops_per_step",
                                                      "mfu_vs_measured_matmul"))
        assert tr["tokens_per_s"] == pytest.approx(2 * tr["latent"] ** 2 / tr["s_per_step"])
        assert tr["mfu_vs_datasheet_bf16"] is None  # no datasheet peak for a CPU
    toy = s["toy_default_step"]
    assert toy["batch"] == 16 and toy["model_time_of_default_run_s"] == pytest.approx(800 * toy["s_per_step"])
    inf = s["infer_moe_vs_dense"]
    assert set(inf["times_s"]) == {"moe_dense", "moe_gather", "dense_ffn"}
    assert inf["params"]["moe"] > inf["params"]["dense_ffn"]  # 6 space + 4 time experts vs one FFN each
    assert inf["moe_over_dense"]["moe_dense"] == pytest.approx(inf["times_s"]["moe_dense"] / inf["times_s"]["dense_ffn"])
    smp = s["sample_ddim50_cfg"]
    assert smp["cfg_batch"] == 2 * smp["batch_images"] and set(smp["times_s"]) == {"raphael", "sd15"}
    assert smp["raphael_over_sd15"] == pytest.approx(smp["times_s"]["raphael"] / smp["times_s"]["sd15"])
    assert "RAPHAEL / SD1.5" in capsys.readouterr().out


def test_gpu_suite_records_failures_and_budget_skips(bench, tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"

    class Broken(torch.nn.Module):
        def __init__(self, unet):
            raise RuntimeError("diffusers model unavailable")

    # a section that fails is recorded with its error, the others still run, and the exit code says so
    monkeypatch.setattr(bench, "_EpsWrapper", Broken)
    # a budget no machine reaches: on a loaded CPU the default (450 s) could skip sections and fail this part
    rc = bench.main([*GPU_TINY, "--no-compile", "--train-presets", "--budget-s", "1e9", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rc == 1 and rec["failed_sections"] == ["sample_ddim50_cfg"]
    assert "diffusers model unavailable" in rec["sections"]["sample_ddim50_cfg"]["error"]
    assert "times_s" in rec["sections"]["infer_moe_vs_dense"]
    # past the wall-clock budget nothing more starts: every section is recorded as skipped, not silently absent
    assert bench.main([*GPU_TINY, "--budget-s", "0", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["sections"] and all("skipped" in v for v in rec["sections"].values())


def test_gpu_suite_refuses_full_sizes_on_cpu(bench):
    with pytest.raises(SystemExit, match="--tiny"):
        bench.main(["gpu", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--sdpa"):
        bench.main([*GPU_TINY, "--sdpa", "warp", "--no-compile"])
    with pytest.raises(SystemExit, match="unknown preset"):
        bench.main([*GPU_TINY, "--infer-preset", "huge", "--no-compile"])
    with pytest.raises(SystemExit, match="--max-batch"):
        bench.main([*GPU_TINY, "--train-presets", "small", "paper", "--max-batch", "1", "2", "3", "--no-compile"])


@pytest.mark.slow
def test_gpu_suite_tiny_compiled_vs_eager(bench, tmp_path):
    """(d): the compiled sampling and training sections run (inductor on the CPU: minutes of C++ compilation)."""
    out = tmp_path / "gpu.json"
    assert bench.main([*GPU_TINY, "--train-presets", "small", "--compile-train-presets", "small", "--budget-s", "7200",
                       "--out", str(out)]) == 0
    s = json.loads(out.read_text())["sections"]
    assert _finite_positive(s["train_small_compiled"]["speedup_vs_eager"])
    assert _finite_positive(s["train_small_compiled"]["compile_s"])
    assert set(s["sample_ddim50_cfg_compiled"]["speedup_vs_eager"]) == {"raphael", "sd15"}
