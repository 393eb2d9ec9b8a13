"""tools/sample.py on a checkpoint written by tools/train.py: files, determinism (same seed, same bytes),
paths and masks, EMA vs raw weights, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN, SAMPLE = ROOT / "tools" / "train.py", ROOT / "tools" / "sample.py"
MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
         "sample.steps=2", "sample.every=0"]
PROMPTS = ["a red circle on the left", "two blue squares at the top and at the bottom", "a green triangle"]


def _run(script: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    argv = ["--out", str(out)]
    for s in MICRO:
        argv += ["--set", s]
    _ok(_run(TRAIN, argv))
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _sample(run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [str(run_dir), "--out", str(out), "--steps", "3", "--batch-size", "2", "--seed", "7"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return _run(SAMPLE, argv + list(extra))


@pytest.fixture(scope="module")
def sampled(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "a"
    _ok(_sample(run_dir, out, "--save-paths", "--save-masks"))
    return out


def test_writes_one_png_per_prompt_grid_paths_and_masks(sampled):
    names = sorted(p.name for p in sampled.iterdir())
    stems = [n[:-4] for n in names if n.endswith(".png") and n.count(".") == 1 and n != "grid.png"]
    assert len(stems) == len(PROMPTS) and stems[0].startswith("000_a_red_circle")
    for stem in stems:
        with Image.open(sampled / f"{stem}.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"  # the toy's pixels, one per latent position
        for suffix in (".paths.png", ".masks.png"):
            with Image.open(sampled / f"{stem}{suffix}") as im:
                assert im.format == "PNG"
    with Image.open(sampled / "grid.png") as im:
        assert im.format == "PNG"
    assert (sampled / "prompts.txt").read_text().splitlines() == PROMPTS


def test_paths_json_has_one_route_per_block_and_token(sampled):
    rec = json.loads(next(sampled.glob("001_*.paths.json")).read_text())
    assert rec["prompt"] == PROMPTS[1]
    n_tok = len(rec["tokens"])
    assert rec["tokens"][0] == "<start_of_text>" and rec["tokens"][-1] == "<end_of_text>"
    S = len(rec["timesteps"])
    assert S == 3 and rec["timesteps"] == sorted(rec["timesteps"], reverse=True)
    space, time_r = rec["space_routes"], rec["time_routes"]
    assert len(space) == S and all(len(blocks) == 16 for blocks in space)
    assert all(len(tok) == n_tok for blocks in space for tok in blocks)
    assert all(0 <= e < 6 for blocks in space for tok in blocks for e in tok)  # toy: 6 space experts
    assert all(len(blocks) == 16 and all(0 <= e < 4 for e in blocks) for blocks in time_r)
    # eval routes of a text token depend on the text only (Sec. 3.1 text gate): equal at every step
    assert rec["space_routes_same_every_step"] and all(s == space[0] for s in space)


def test_same_seed_same_bytes_other_seed_other_images(run_dir, sampled, tmp_path):
    again = tmp_path / "again"
    _ok(_sample(run_dir, again, "--save-paths", "--save-masks"))
    assert _hashes(again) == _hashes(sampled)
    other = tmp_path / "other"
    _ok(_sample(run_dir, other, "--seed", "8"))
    assert _hashes(other)["grid.png"] != _hashes(sampled)["grid.png"]


def _sample_module():
    from raphael_ref.testing import load_tool

    return load_tool("sample")


def test_raw_weights_differ_from_ema(run_dir, sampled, tmp_path, capsys):
    raw = tmp_path / "raw"
    argv = [str(run_dir), "--out", str(raw), "--steps", "3", "--batch-size", "2", "--seed", "7", "--raw"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert _sample_module().main(argv) == 0
    assert "raw weights" in capsys.readouterr().out
    assert _hashes(raw)["grid.png"] != _hashes(sampled)["grid.png"]


def test_ddpm_runs_all_steps(run_dir, tmp_path, capsys):
    """Ancestral DDPM runs all T steps; the checkpoint's config is given T = 20 so the test stays fast
    (the weights do not depend on T)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(next((run_dir / "checkpoints").glob("step_*")), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["diffusion"]["T"], cfg["model"]["edge_t_cutoff"] = 20, 10
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ddpm"
    assert _sample_module().main([str(ckpt), "--out", str(out), "--prompt", PROMPTS[0], "--sampler", "ddpm",
                                  "--save-paths"]) == 0
    assert "ddpm 20 steps" in capsys.readouterr().out
    rec = json.loads(next(out.glob("000_*.paths.json")).read_text())
    assert rec["timesteps"] == list(range(19, -1, -1))


def test_clear_errors(run_dir, tmp_path, capsys):
    main = _sample_module().main
    assert main([str(run_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "x"), "--prompt", "a"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main([str(run_dir), "--out", str(tmp_path / "x"), "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
