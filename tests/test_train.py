"""tools/train.py and raphael_ref.training: run folder, resume exactness, atomic checkpoints, Ctrl-C,
bad config fields, a 2-process torchrun (gloo, CPU) smoke run, and the helpers' invariants.

The end-to-end tests train a micro model (16x16 pixels, width 16, all 16 transformer blocks) for a
few steps in subprocesses, as a user would run the script.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from raphael_ref import training as T
from raphael_ref.checkpoint import load_model
from raphael_ref.config import get_preset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tools" / "train.py"
MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.log_every=1",
         "train.warmup_steps=2", "sample.steps=2", "train.keep_ckpts=0"]
LOSS_KEYS = ("step", "loss", "denoise", "edge", "lr")


def _args(*sets: str, out: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    argv = [] if out is None else ["--out", str(out)]
    for s in (*MICRO, *sets):
        argv += ["--set", s]
    return argv + list(extra)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: list[str], timeout: float = 120, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(TRAIN)] + argv
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _losses(run: Path) -> list[tuple]:
    return [tuple(r[k] for k in LOSS_KEYS) for r in T.read_log(run / "log.jsonl")]


def _tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(ckpt / f"{n}.safetensors")) for n in ("model", "ema", "optimizer", "rng")}


def _train_module():
    from raphael_ref.testing import load_tool

    return load_tool("train")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """4 uninterrupted steps; checkpoints and sample grids at steps 2 and 4."""
    out = tmp_path_factory.mktemp("full") / "run"
    _ok(_run(_args("train.steps=4", "train.ckpt_every=2", "sample.every=2", out=out)))
    return out


# ------------------------------------------------------------------------------ end to end


def test_run_folder_has_every_artifact(full_run):
    run = full_run
    cfg = json.loads((run / "config.json").read_text())
    # no --preset: the default run, the toy with the binding options (E87): its loss adds the weighted token term
    assert cfg["name"] == _train_module().DEFAULT_PRESET == "toy-binding" and cfg["model"]["sample_size"] == 16
    w = get_preset("toy-binding").train.token_loss
    assert cfg["train"]["token_loss"] == w > 0 and cfg["model"]["text_phrases_apart"] is True
    records = T.read_log(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(k in r for k in LOSS_KEYS) and r["token"] > 0
        assert r["loss"] == pytest.approx(r["denoise"] + r["edge"] + w * r["token"], rel=1e-6)
    # warm-up over 2 steps: lr/2, then lr (toy lr 1e-3)
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    with Image.open(run / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    for s in (2, 4):
        with Image.open(run / "samples" / f"step_{s:07d}.png") as im:
            assert im.format == "PNG"
    assert len((run / "samples" / "prompts.txt").read_text().splitlines()) == len(get_preset("toy-binding").sample.prompts)
    ckpt = T.latest_checkpoint(run)
    assert ckpt.name == "step_0000004"
    for name in ("model.safetensors", "ema.safetensors", "config.json", "optimizer.safetensors",
                 "optimizer.json", "rng.safetensors", "state.json"):
        assert (ckpt / name).is_file(), name
    assert not list((run / "checkpoints").glob("*.tmp")), "a temporary checkpoint folder was left behind"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["data_start_step"] == 4 and state["world_size"] == 1
    # checkpoint.load_model reads the raw and the EMA weights; they differ after training
    raw, cfg2 = load_model(ckpt)
    ema, _ = load_model(ckpt, weights_name="ema.safetensors")
    assert cfg2.model.sample_size == 16
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))


def test_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    """Run 3 steps with a checkpoint at 2 and lose the checkpoint of step 3 (a kill after logging step 3),
    resume to 4: the log is cut back to step 2 and the resumed run logs the same losses as the
    uninterrupted one, and ends with the same weights, EMA, optimizer state and RNG streams."""
    half = tmp_path / "half"
    _ok(_run(_args("train.steps=3", "train.ckpt_every=2", "sample.every=2", out=half)))
    import shutil

    shutil.rmtree(half / "checkpoints" / "step_0000003")
    (half / "checkpoints" / "latest").write_text("step_0000002\n")
    assert [r["step"] for r in T.read_log(half / "log.jsonl")] == [1, 2, 3]
    proc = _ok(_run(["--out", str(half), "--resume", "--set", "train.steps=4"]))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    # the last line counts this command's steps (2 -> 4) and its wall time
    assert re.search(r"done: 4 steps; .*this command: 2 steps in \d+ min \d+ s of wall time", proc.stdout)
    assert _losses(half) == _losses(full_run)
    a, b = _tensors(full_run / "checkpoints" / "step_0000004"), _tensors(half / "checkpoints" / "step_0000004")
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        bad = [k for k in a[group] if not torch.equal(a[group][k], b[group][k])]
        assert not bad, f"{group}: {bad[:5]}"


def test_existing_run_needs_resume(full_run, capsys):
    assert _train_module().main(["--out", str(full_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_init_starts_a_new_run_from_a_checkpoints_weights(full_run, tmp_path, capsys):
    """--init CKPT: the checkpoint's weights in the model and the EMA at step 0. One step at lr 1e-30 (the config
    wants lr > 0) moves no weight by more than a float32 rounding (an AdamW step is ~lr per entry), so after it the
    run's weights are the checkpoint's to rtol 1e-6 (a fresh init differs by O(1)); a run whose model.* differs is
    refused naming the field; --init and --resume exclude each other."""
    src = T.latest_checkpoint(full_run)
    out = tmp_path / "ft"
    proc = _ok(_run(_args("train.steps=1", "train.lr=1e-30", "train.ckpt_every=1", "sample.every=0", out=out,
                          extra=("--init", str(src)))))
    assert f"initialised from {src / 'model.safetensors'}" in proc.stdout + proc.stderr
    ckpt = T.latest_checkpoint(out)
    want = load_file(str(src / "model.safetensors"))
    for name in ("model", "ema"):
        got = load_file(str(ckpt / f"{name}.safetensors"))
        assert set(got) == set(want), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-30, msg=f"{name} {k}")
    train = _train_module()
    assert train.main(["--init", str(src), "--out", str(tmp_path / "x"), *sum((["--set", a] for a in MICRO), []),
                       "--set", "model.expert_mult=4"]) == 2
    assert "model.expert_mult (checkpoint 2, now 4)" in capsys.readouterr().err
    assert train.main(["--init", str(src), "--resume", str(src), "--out", str(tmp_path / "y")]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("override,field", [
    ("model.nonexistent=3", "model.nonexistent"),
    ("train.lr=-1", "train.lr"),
    ("train.steps=many", "train.steps"),
    ("sample.sampler=euler", "sample.sampler"),
    ("model.codec=jpeg", "model.codec"),
    ("train.lr_decay=step", "train.lr_decay"),
    ("train.lr_decay_start=1.0", "train.lr_decay_start"),
    ("train.lr_decay_start=0.5", "train.lr_decay_start"),  # a start without a decay
])
def test_bad_config_field_is_named(override, field, tmp_path, capsys):
    code = _train_module().main(["--out", str(tmp_path / "r"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and field in err and err.startswith("error:")
    assert not (tmp_path / "r").exists(), "a bad config must fail before creating the run folder"


def test_bad_config_file_field_is_named(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"warmup_stepz": 10}}))
    assert _train_module().main(["--config", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "train.warmup_stepz" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    """SIGINT mid-run: the step finishes, a checkpoint of that step is written, exit code 130."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN)] + _args("train.steps=10000", "sample.every=0", out=run)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # not a TTY: one line per logged step
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out
    ckpt = T.latest_checkpoint(run)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 2 and ckpt.name == f"step_{step:07d}"
    assert [r["step"] for r in T.read_log(run / "log.jsonl")] == list(range(1, step + 1))
    loaded = T.load_checkpoint(run)
    assert loaded["state"]["step"] == step and loaded["cfg"].train.steps == 10000


def test_torchrun_two_processes_gloo(tmp_path):
    """2 ranks on the CPU with DDP over gloo: one log, one checkpoint holding both ranks' RNG streams."""
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # timeout: a hang guard, not a speed goal (alone on 2 cores it takes ~100 s; a busy machine doubles that)
    proc = _ok(_run(_args("train.steps=2", "sample.every=2", out=run), timeout=400, launcher=launcher))
    assert "x 2 rank(s), DDP" in proc.stdout
    assert [r["step"] for r in T.read_log(run / "log.jsonl")] == [1, 2]
    ckpt = T.latest_checkpoint(run)
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert {"rank0.torch", "rank1.torch", "rank0.gen", "rank1.gen"} <= set(rng)
    assert not torch.equal(rng["rank0.gen"], rng["rank1.gen"]), "ranks must draw from different streams"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert (run / "samples" / "step_0000002.png").exists()


@pytest.mark.slow
def test_fsdp_matches_ddp_on_cpu(tmp_path):
    """FSDP2 (fully_shard per transformer block + root) and DDP give the same losses and weights (gloo, CPU)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {}
    for kind in ("ddp", "fsdp"):
        runs[kind] = tmp_path / kind
        extra = ("--fsdp",) if kind == "fsdp" else ()
        _ok(_run(_args("train.steps=3", "sample.every=3", out=runs[kind], extra=extra), timeout=300, launcher=launcher))
    la, lb = _losses(runs["ddp"]), _losses(runs["fsdp"])
    for ra, rb in zip(la, lb):
        assert ra[0] == rb[0] and ra[1:] == pytest.approx(rb[1:], rel=1e-5)
    a = load_file(str(runs["ddp"] / "checkpoints" / "step_0000003" / "model.safetensors"))
    b = load_file(str(runs["fsdp"] / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # reduce-scatter vs all-reduce: the gradient sums differ only in rounding (float32)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ helpers


@pytest.mark.spec_id("train.warmup_lr")
@settings(max_examples=40)
@given(lr=st.floats(1e-6, 1.0), warmup=st.integers(0, 1000), step=st.integers(0, 5000))
def test_warmup_lr_is_linear_then_constant(lr, warmup, step):
    got = T.warmup_lr(step, lr, warmup)
    assert 0 < got <= lr * (1 + 1e-12)
    if step >= warmup - 1:
        assert got == lr
    else:
        assert got == pytest.approx(lr * (step + 1) / warmup)
        assert T.warmup_lr(step + 1, lr, warmup) > got  # strictly increasing during the warm-up


def test_warmup_lr_rejects_bad_input():
    with pytest.raises(ValueError, match="step"):
        T.warmup_lr(-1, 1e-4, 10)


@pytest.mark.spec_id("train.warmup_lr")
@settings(max_examples=60)
@given(lr=st.floats(1e-6, 1.0), warmup=st.integers(0, 300), total=st.integers(1, 2000),
       start=st.floats(0.0, 0.99), decay=st.sampled_from(T.LR_DECAYS), frac=st.floats(0.0, 1.0))
def test_scheduled_lr_is_the_warmup_then_a_decay_to_zero(lr, warmup, total, start, decay, frac):
    """E86: before s0 = max(warmup, round(start * total)) the schedule is warmup_lr exactly; from s0 it falls
    monotonically from lr, stays > 0 on the last step (total - 1) and is 0 at total; "none" is warmup_lr always."""
    step = int(frac * (total + 10))
    got = T.scheduled_lr(step, lr, warmup, total, decay, start)
    s0 = max(warmup, round(start * total))
    if decay == "none" or step < s0 or s0 >= total:
        assert got == T.warmup_lr(step, lr, warmup)
        return
    p = min(1.0, (step - s0) / (total - s0))
    assert got == pytest.approx(lr * (1 - p) if decay == "linear" else lr * (1 + math.cos(math.pi * p)) / 2,
                                abs=1e-15)
    assert T.scheduled_lr(s0, lr, warmup, total, decay, start) == lr  # continuous at s0
    assert 0 <= T.scheduled_lr(step + 1, lr, warmup, total, decay, start) <= got  # non-increasing
    assert T.scheduled_lr(total - 1, lr, warmup, total, decay, start) > 0  # the last step still moves the weights
    assert T.scheduled_lr(total, lr, warmup, total, decay, start) == pytest.approx(0.0, abs=1e-15)


def test_scheduled_lr_known_values():
    # warm-up 2, 10 steps, decay from the middle (s0 = 5): the warm-up, the plateau, then 1 - p or (1 + cos pi p) / 2
    lin = [T.scheduled_lr(s, 1.0, 2, 10, "linear", 0.5) for s in range(10)]
    assert lin == pytest.approx([0.5, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    cos = [T.scheduled_lr(s, 1.0, 2, 10, "cosine", 0.5) for s in range(5, 10)]
    assert cos == pytest.approx([(1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)])
    assert T.scheduled_lr(7, 1.0, 2, 10, "cosine", 0.0) == pytest.approx((1 + math.cos(math.pi * 5 / 8)) / 2)
    for bad, match in [(dict(decay="step"), "decay"), (dict(decay_start=1.0), "decay_start"),
                       (dict(decay_start=-0.1), "decay_start")]:
        with pytest.raises(ValueError, match=match):
            T.scheduled_lr(3, 1.0, 2, 10, **{"decay": "linear", **bad})
    with pytest.raises(ValueError, match="total_steps"):
        T.scheduled_lr(0, 1.0, 2, 0)


@settings(max_examples=20)
@given(decay=st.sampled_from([0.0, 0.5, 0.9, 0.999]), seed=st.integers(0, 100))
def test_update_ema_is_the_moving_average(decay, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = T.make_ema(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()))
    assert not any(p.requires_grad for p in ema.parameters())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    T.update_ema(ema, model, decay)
    for k, p in model.state_dict().items():
        expected = decay * before[k] + (1 - decay) * p
        torch.testing.assert_close(ema.state_dict()[k], expected, rtol=1e-6, atol=1e-6)  # float32 lerp vs mul-add


def test_optimizer_state_round_trip_continues_identically():
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)

    def step(m, opt, i):
        opt.zero_grad()
        m(torch.full((2, 3), float(i))).pow(2).sum().backward()
        opt.step()

    a, oa = make()
    b, ob = make()
    for i in range(3):
        step(a, oa, i)
        step(b, ob, i)
    opts = StateDictOptions(full_state_dict=True)
    tensors, meta = T.optimizer_state_to_tensors(get_optimizer_state_dict(b, ob, options=opts))
    meta = json.loads(json.dumps(meta))  # as written to optimizer.json
    c, oc = make()
    c.load_state_dict(b.state_dict())
    set_optimizer_state_dict(c, oc, T.optimizer_state_from_tensors(tensors, meta), options=opts)
    step(a, oa, 3)
    step(c, oc, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _fake_state(step):
    w = {"w": torch.full((2,), float(step))}
    return dict(model_state=w, ema_state=w, optimizer_state={"state": {}, "param_groups": []},
                state={"step": step, "world_size": 1, "window": [0, 0, 0, 0]}, rng={"rank0.torch": torch.get_rng_state()})


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = get_preset("toy")
    T.save_checkpoint(tmp_path, 10, cfg=cfg, **_fake_state(10))
    real = T.save_tensors

    def dying_save_tensors(tensors, path, *a, **k):  # the process "dies" after the weights are written
        if str(path).endswith("optimizer.safetensors"):
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(T, "save_tensors", dying_save_tensors)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(tmp_path, 20, cfg=cfg, **_fake_state(20))
    assert (tmp_path / "checkpoints" / "step_0000020.tmp").exists()
    assert T.latest_checkpoint(tmp_path).name == "step_0000010"
    assert json.loads((T.resolve_checkpoint(tmp_path) / "state.json").read_text())["step"] == 10
    monkeypatch.setattr(T, "save_tensors", real)
    T.save_checkpoint(tmp_path, 20, cfg=cfg, keep=1, **_fake_state(20))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000020"]


def test_truncate_log_and_torn_lines(tmp_path):
    log = T.JsonlLog(tmp_path / "log.jsonl")
    for s in range(1, 6):
        log.write({"step": s, "loss": 1.0 / s})
    log.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    assert [r["step"] for r in T.read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5]
    T.truncate_log(tmp_path / "log.jsonl", 3)
    assert [r["step"] for r in T.read_log(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_images_and_loss_curve(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    u8 = T.to_uint8(x)
    assert u8.shape == (1, 2, 2, 3) and u8.dtype == torch.uint8
    assert u8[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]  # 127.5 rounds half to even; 2 clamps
    T.save_image_grid(torch.zeros(5, 3, 8, 8), tmp_path / "g.png", nrow=4, min_tile=32, pad=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (4 * 34 + 2, 2 * 34 + 2)
    T.plot_loss_curve([{"step": s, "loss": 1 / s, "denoise": 0.9 / s, "edge": 0.1} for s in range(1, 50)],
                      tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="B, 3, H, W"):
        T.to_uint8(torch.zeros(3, 4, 4))


def test_frozen_parts_check_the_config():
    cfg = get_preset("toy")
    enc = T.build_text_encoder(cfg)
    assert enc.d_y == cfg.model.d_y and not any(p.requires_grad for p in enc.parameters())
    bad = get_preset("toy", {"model.d_y": 64, "model.norm_groups": 8})
    with pytest.raises(ValueError, match="model.d_y"):
        T.build_text_encoder(bad)
    with pytest.raises(ValueError, match="model.vae_path"):
        T.build_codec(get_preset("small"))
    with pytest.raises(ValueError, match="train.hed_weights"):
        T.build_edge_detector(get_preset("toy", {"train.hed_weights": "/nonexistent.safetensors"}))


def test_run_with_lr_decay_logs_the_schedule(tmp_path):
    """train.lr_decay (E86): the lr each step logs is scheduled_lr's: warm-up over 2 steps, then linear from the
    end of the warm-up (s0 = 2) towards 0 at step 4."""
    out = tmp_path / "run"
    _ok(_run(_args("train.steps=4", "train.ckpt_every=4", "sample.every=0", "train.lr_decay=linear", out=out)))
    assert [r["lr"] for r in T.read_log(out / "log.jsonl")] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_toy_binding_preset_trains(tmp_path):
    """--preset toy-binding (E87): phrases apart and the position-word token loss are on, the log records the
    token term (> 0: the batches' position words are supervised), and the config is named after the preset."""
    out = tmp_path / "runs"
    proc = _ok(_run(["--preset", "toy-binding"] + _args("train.steps=2", "train.ckpt_every=2", "sample.every=0")
                    + ["--out", str(out)]))
    assert "later object phrases encoded apart (E85)" in proc.stdout + proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "toy-binding" and cfg["train"]["token_loss"] == 0.05
    assert all(r["token"] > 0 for r in T.read_log(out / "log.jsonl"))
    # the printed step lines show the weighted token term, so that the printed terms add up to the loss (each
    # printed to 4 decimals: the sum of three roundings is off by at most 1.5e-4, plus the loss's own 0.5e-4)
    lines = re.findall(r"step \d+/2  loss (\S+)  denoise (\S+)  edge (\S+)  token (\S+)  lr", proc.stdout)
    assert len(lines) == 2, proc.stdout
    for loss, denoise, edge, token in (map(float, m) for m in lines):
        assert token > 0 and abs(loss - (denoise + edge + token)) <= 2.01e-4


def test_run_with_phrases_apart_text(tmp_path):
    """model.text_phrases_apart (E85): a run trains and samples through the wrapped tower; its config records it,
    so sampling and evaluating the checkpoint encode prompts the same way."""
    out = tmp_path / "run"
    proc = _ok(_run(_args("train.steps=1", "train.ckpt_every=1", "sample.every=1", "model.text_phrases_apart=true",
                          out=out)))
    assert "later object phrases encoded apart (E85)" in proc.stdout + proc.stderr
    ckpt = T.latest_checkpoint(out)
    assert json.loads((ckpt / "config.json").read_text())["model"]["text_phrases_apart"] is True
    assert sorted((out / "samples").glob("*.png"))


def test_draw_timesteps_uniform_is_randint_and_shifted_is_e90():
    """train.t_shift (E90): shift 1 draws exactly what every earlier run drew (torch.randint on the run's generator);
    another shift draws float64 u from the same generator and maps it through shifted_timesteps. The per-sample
    streams (train.rng = sample) do the same per stream."""
    from raphael_ref.diffusion import shifted_timesteps

    tr = _train_module()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(tr.draw_timesteps(g1, 64, 1000, 1.0), torch.randint(0, 1000, (64,), generator=g2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = tr.draw_timesteps(g1, 4096, 1000, 3.0)
    assert torch.equal(t, shifted_timesteps(torch.rand(4096, generator=g2, dtype=torch.float64), 1000, 3.0))
    assert 0.6 < float((t >= 600).double().mean()) < 0.73  # 2/3 expected (uniform: 0.4); 7 se either side
    a, b = tr.SampleDraws(0, [0, 1, 2]), tr.SampleDraws(0, [0, 1, 2])
    assert torch.equal(a.timesteps(1000), torch.stack([torch.randint(0, 1000, (), generator=g) for g in b.gens]))
    a, b = tr.SampleDraws(0, [0, 1, 2]), tr.SampleDraws(0, [0, 1, 2])
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in b.gens])
    assert torch.equal(a.timesteps(1000, 3.0), shifted_timesteps(u, 1000, 3.0))


def test_run_with_t_shift_records_it_and_draws_other_timesteps(tmp_path):
    """A run with train.t_shift = 3 trains, records the shift in its config, and its losses differ from the same run
    with uniform t from the first step on (the same data, noise generator and seed: only the t draws differ)."""
    runs = {}
    for shift in (1, 3):
        out = tmp_path / f"s{shift}"
        _ok(_run(_args("train.steps=2", "train.ckpt_every=2", "sample.every=0", f"train.t_shift={shift}", out=out)))
        assert json.loads((out / "config.json").read_text())["train"]["t_shift"] == shift
        runs[shift] = _losses(out)
    assert runs[1][0][1] != runs[3][0][1]


def test_log_records_the_gradient_norm_of_its_window_and_keeps_it_across_a_resume(tmp_path, monkeypatch):
    """Each log line holds the mean and the max over its window of the norm clip_grad_norm_ returned (before
    clipping) at every step; a resume from a checkpoint in the middle of a window logs what the uninterrupted run
    logs, because the window's (sum, max) is saved in state.json."""
    train = _train_module()
    real, norms = train.grad_norm, []

    def recording(model, clip):
        n = real(model, clip)
        norms.append(float(n))
        return n

    monkeypatch.setattr(train, "grad_norm", recording)
    sets = [*MICRO, "train.log_every=2", "train.ckpt_every=3", "sample.every=0"]

    def run(out, steps, resume=False):
        argv = ["--out", str(out)] + (["--resume"] if resume else [])
        for s in (sets if not resume else []) + [f"train.steps={steps}"]:
            argv += ["--set", s]
        assert train.main(argv) == 0

    def records(out):
        return [{k: v for k, v in r.items() if k not in ("sec_per_step", "images_per_sec")}
                for r in T.read_log(out / "log.jsonl")]

    run(tmp_path / "full", 4)
    full = records(tmp_path / "full")
    assert [r["step"] for r in full] == [2, 4] and len(norms) == 4 and all(0 < n < math.inf for n in norms)
    for r, pair in zip(full, (norms[:2], norms[2:])):
        assert r["grad_norm"] == pytest.approx(sum(pair) / 2, rel=1e-12)
        assert r["grad_norm_max"] == max(pair)
    assert len(set(norms)) == 4  # a constant norm would let a wrong window pass
    # the same 4 steps, killed after step 4 was logged but before its checkpoint: the resume starts from the
    # checkpoint of step 3, inside the window that step 4 logs
    import shutil

    half = tmp_path / "half"
    run(half, 4)
    shutil.rmtree(half / "checkpoints" / "step_0000004")
    (half / "checkpoints" / "latest").write_text("step_0000003\n")
    window = json.loads((half / "checkpoints" / "step_0000003" / "state.json").read_text())["grad_norm_window"]
    assert window == [norms[6], norms[6]]  # this run's step 3: the sum and max of a window of one step
    run(half, 4, resume=True)
    assert records(tmp_path / "half") == full
