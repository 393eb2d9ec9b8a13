"""GPU smoke test of the toy ablation pipeline on CUDA: train (tools/train.py), evaluate (tools/ablate.py,
tools/evaluate.py), sample (tools/sample.py), plus the CUDA-specific pieces in-process, at tiny sizes.

    python -m pytest -m gpu tests/test_gpu_smoke.py -x -q

Every test is marked ``gpu`` (skipped without CUDA by tests/conftest.py). The in-process checks come
first, so a failure names the piece that breaks on CUDA before the end-to-end runs. To check the test
logic on a CPU-only machine: ``RAPHAEL_SMOKE_DEVICE=cpu python -m pytest --noconftest tests/test_gpu_smoke.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("RAPHAEL_SMOKE_DEVICE", "cuda")
STEPS = 20
RUN = "full"  # the run folder name tools/ablate.py gives the full model
# the --set list of the run: exactly what tools/ablate.py passes (run_sets), so ablate reuses the run
STUDY_SETS = ["train.batch_size=8", "train.log_every=10", "train.ckpt_every=20", "sample.steps=2"]
RUN_SETS = [*STUDY_SETS, f"train.steps={STEPS}", "train.seed=0", "sample.every=0"]
TIMEOUT = 300

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"),
]


def _run(cmd: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}", pytrace=False)
    return proc


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------ in-process pieces


def test_canny_edges_on_device():
    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation.prompts import evaluation_prompts
    from raphael_ref.edge_gt import make_edge_detector

    specs = evaluation_prompts(["two_objects"], 2, image_size=24)["two_objects"]
    images = torch.stack([render(s.scene) for s in specs]).float() / 127.5 - 1  # (2, 3, 24, 24)
    det = make_edge_detector("canny")
    on_dev = det(images.to(DEVICE))
    on_cpu = det(images)
    assert on_dev.device.type == torch.device(DEVICE).type and on_dev.shape == (2, 1, 24, 24)
    assert set(on_dev.unique().cpu().tolist()) <= {0.0, 1.0}
    assert (on_dev.cpu() == on_cpu).float().mean() > 0.98  # float64 both: the same edges but for rare ties


def test_unet_train_step_under_autocast_and_sampling_paths():
    """One bf16-autocast training step of the toy U-Net on the device (as tools/train.py runs it), an EMA
    update with the on-device skip flag, then DDIM sampling with CFG, routes and masks collected."""
    from raphael_ref import training as T
    from raphael_ref.config import load_config
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.models import RaphaelUNet
    from raphael_ref.monitoring import ExpertUsage
    from raphael_ref.objective import training_losses
    from raphael_ref.sampling import sample

    dev = torch.device(DEVICE)
    cfg = load_config("toy", overrides=["train.batch_size=4"])
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).to(dev).train()
    ema = T.make_ema(model)
    enc = T.build_text_encoder(cfg, dev)
    edge = T.build_edge_detector(cfg, dev)
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T, cfg.diffusion.zero_terminal_snr)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 3, 24, 24, generator=gen) * 2 - 1).to(dev)
    text = enc(["a red circle on the left", "two blue squares", "", "a green triangle"])
    t = torch.randint(0, schedule.T, (4,), generator=gen).to(dev)
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    with amp:
        out = training_losses(model, schedule, x0, t, noise, text.hidden, text.valid, text.pooled_index, edge(x0),
                              loss_weight="v", loss_weight_max=5.0)
    out["total"].backward()
    assert torch.isfinite(out["total"]) and out["total"].device.type == dev.type
    usage = ExpertUsage.for_config(cfg, dev)
    usage.update(out["aux"], text.valid)
    assert usage.summary()["steps"] == 1
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    T.update_ema(ema, model, 0.99, skip=torch.zeros((), dtype=torch.bool, device=dev))
    with amp:  # the sample grid of tools/train.py runs under the same autocast
        images, paths = T.generate_images(ema, schedule, enc, T.build_codec(cfg, dev), ["a red circle", "two squares"],
                                          size=(24, 24), steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0),
                                          collect_paths=True, collect_masks=[1])
    assert images.device.type == "cpu" and images.shape == (2, 3, 24, 24) and torch.isfinite(images).all()
    assert paths.space_routes.shape[:3] == (2, cfg.n_transformer_blocks, 2) and paths.space_routes.device.type == "cpu"
    u = enc([""])
    x, _ = sample(ema, schedule, (text.hidden[:2], text.valid[:2], text.pooled_index[:2]),
                  (u.hidden, u.valid, u.pooled_index), shape=(2, 3, 24, 24), steps=2, guidance=1.0, eta=1.0,
                  generator=torch.Generator().manual_seed(1))  # eta > 0: noise drawn on the CPU, moved
    assert x.device.type == dev.type and torch.isfinite(x).all()


def test_toy_clip_axes_and_frechet_distances_on_device():
    from raphael_ref import toy_clip as TC
    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation import metrics as M
    from raphael_ref.evaluation.prompts import evaluation_prompts

    specs = evaluation_prompts(["colors", "position"], 2, image_size=24)
    flat = [s for c in specs.values() for s in c]
    images = torch.stack([render(s.scene) for s in flat])  # (4, 3, 24, 24) uint8
    scorer = M.load_clip(TC.TOY_CLIP_DIR, device=DEVICE)
    clip = M.clip_score(images, [s.prompt for s in flat], scorer)
    assert clip.shape == (4,) and torch.isfinite(clip).all()
    other = images.flip(0)
    fd = M.fid_kid(images, other, device=DEVICE, feature_extractor=TC.register_toy_clip_extractor(), kid=False)
    assert _finite(fd["fid"])
    tiny = M.fid_kid(images, other, device=DEVICE, feature_extractor=M.register_tiny_feature_extractor(),
                     kid=True, kid_subset_size=2, kid_subsets=2)
    assert _finite(tiny["fid"]) and _finite(tiny["kid_mean"])


# ------------------------------------------------------------------------------ the tools, end to end


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A 20-step toy run trained by tools/train.py on the device, in the folder layout of tools/ablate.py."""
    out = tmp_path_factory.mktemp("abl")
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--preset", "toy"]
    for s in RUN_SETS:
        cmd += ["--set", s]
    proc = _run(cmd + ["--out", str(out / RUN), "--device", DEVICE])
    (out / RUN / "train_stdout.txt").write_text(proc.stdout)
    return out


def test_train_writes_a_finite_checkpoint(study):
    run = study / RUN
    stdout = (run / "train_stdout.txt").read_text()
    assert f"device {DEVICE}" in stdout
    if DEVICE.startswith("cuda"):
        assert "bf16 autocast" in stdout
    ckpt = run / "checkpoints" / f"step_{STEPS:07d}"
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (ckpt / f).is_file(), f
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert all(_finite(r["loss"]) and _finite(r["denoise"]) and _finite(r["edge"]) for r in records)
    assert (run / "samples" / f"step_{STEPS:07d}.png").is_file()  # the final sample grid (under autocast)
    rng = __import__("raphael_ref.checkpoint", fromlist=["load_tensors"]).load_tensors(ckpt / "rng.safetensors")
    if DEVICE.startswith("cuda"):
        assert "rank0.cuda" in rng


def test_ablate_evaluates_the_run(study):
    """tools/ablate.py on the trained run: training skipped (same settings), evaluation on the device (DDIM 2
    steps, 1 prompt per category), detector accuracy, pixel-FD and the toy-CLIP axes, the reports."""
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--out", str(study), "--budget", "smoke",
           "--variants", "full", "--no-sweeps", "--steps", str(STEPS), "--train-seed", "0", "--guidance", "3",
           "--prompts-per-category", "1", "--per-prompt", "1", "--sampler-steps", "2", "--device", DEVICE,
           "--threads", "1", "--set", *STUDY_SETS]
    proc = _run(cmd)
    assert "skipped" in proc.stdout, proc.stdout[-3000:]  # the run of the fixture was reused, not retrained
    res = json.loads((study / RUN / "eval" / "g3" / "result.json").read_text())
    assert res["n_images"] == 6
    assert 0.0 <= res["summary"]["overall"] <= 1.0 and _finite(res["fidelity"])
    tc = res["toy_clip"]
    assert _finite(tc["clip_score"]) and _finite(tc["fd_toy_clip"]) and _finite(tc["pixel_fd"])
    assert (study / "ablation.md").is_file() and (study / "ablation.json").is_file()


def test_evaluate_tool_with_attention_fd_and_toy_clip(study, tmp_path):
    out = tmp_path / "eval"
    _run([sys.executable, str(ROOT / "tools" / "evaluate.py"), str(study / RUN), "--out", str(out), "--device", DEVICE,
          "--steps", "2", "--guidance", "3", "--prompts-per-category", "1", "--per-prompt", "2",
          "--categories", "single_object", "position", "--attention", "1",
          "--fid", "--fid-extractor", "raphael-tiny-random", "--toy-clip"])
    res = json.loads((out / "results.json").read_text())
    assert len(res["records"]) == 4 and 0.0 <= res["summary"]["overall"] <= 1.0
    assert _finite(res["fid_kid"]["fid"]) and _finite(res["toy_clip"]["fd_toy_clip"])
    assert res["attention_views"] and all((out / p).is_file() for p in res["attention_views"])


def test_sample_tool_with_paths_and_masks(study, tmp_path):
    out = tmp_path / "samples"
    _run([sys.executable, str(ROOT / "tools" / "sample.py"), str(study / RUN), "--prompt", "a red circle on the left",
          "--prompt", "two blue squares", "--out", str(out), "--device", DEVICE, "--steps", "2", "--guidance", "3",
          "--save-paths", "--save-masks"])
    assert (out / "grid.png").is_file()
    paths = sorted(out.glob("*.paths.json"))
    assert len(paths) == 2 and len(sorted(out.glob("*.masks.png"))) == 2
    rec = json.loads(paths[0].read_text())
    assert len(rec["timesteps"]) == 2 and rec["space_routes"]
