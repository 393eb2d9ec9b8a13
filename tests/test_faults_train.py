"""Issue 10 (hardening), training-run faults: each test reproduces one fault of tools/train.py and the
training / checkpoint helpers and checks the fix (errata E66 for the divergence policy).

1 a diverging run (NaN loss) stops with exit 3 and keeps its last finite checkpoint;
2 log.jsonl stays strict JSON and the loss plot ignores non-finite values;
3 the final checkpoint is written before the final sample grid, whose failure is an ``error:``;
5 damaged or truncated checkpoint files are named (SHA-256 in the safetensors metadata);
6 resuming with another model config or preset is a short error listing the fields;
8 ``--out`` never overwrites another run's folder.

The runs are micro models (16 x 16 px, width 16) trained for a few steps in-process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raphael_ref import training as T
from raphael_ref.checkpoint import CheckpointError, load_model, save_tensors, verify_tensors
from raphael_ref.config import get_preset

MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.log_every=1",
         "train.warmup_steps=2", "sample.steps=2", "sample.every=0", "train.keep_ckpts=0"]


def _train():
    from raphael_ref.testing import load_tool

    return load_tool("train")


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _strict_json(line: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    """2 healthy steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("healthy") / "run"
    code = _train().main(["--out", str(out)] + _sets(*MICRO, "train.steps=2", "train.ckpt_every=1"))
    assert code == 0
    return out


@pytest.fixture
def run(healthy, tmp_path) -> Path:
    """A private copy of the healthy run."""
    dst = tmp_path / "run"
    shutil.copytree(healthy, dst)
    return dst


def _all_finite(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for n in ("model", "ema")
               for v in load_file(str(ckpt / f"{n}.safetensors")).values() if v.is_floating_point())


# ------------------------------------------------------------------------------ 1: divergence guard

DIVERGE = ("train.lr=1000", "train.warmup_steps=0", "train.ckpt_every=1", "train.keep_ckpts=2", "train.steps=6")


def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(run, capsys):
    """lr 1000: the loss is NaN from step 4 on. Before: NaN checkpoints replaced the good ones, exit 0."""
    code = _train().main(["--out", str(run), "--resume"] + _sets(*DIVERGE))
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("error:") and "diverged at step 4" in err and "step_0000003" in err
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_0000002", "step_0000003"]  # rotation (keep 2) kept the newest finite one
    assert T.latest_checkpoint(run).name == "step_0000003"
    assert all(_all_finite(run / "checkpoints" / n) for n in names)
    assert not (run / "samples" / "step_0000006.png").exists()
    for line in (run / "log.jsonl").read_text().splitlines():  # 2: strict JSON, NaN as null + flag
        rec = _strict_json(line)
        if rec["step"] == 4:
            assert rec["loss"] is None and "loss" in rec["nonfinite"]


def test_skip_policy_skips_counts_and_stops_after_the_limit(run, capsys):
    code = _train().main(["--out", str(run), "--resume"]
                         + _sets(*DIVERGE, "train.nonfinite=skip", "train.nonfinite_max_skips=2"))
    err = capsys.readouterr().err
    assert code == 3 and "2 steps in a row" in err and "diverged at step 5" in err
    recs = [_strict_json(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in recs if "skipped" in r] == [(3, 0), (4, 1), (5, 1)]
    ckpt = T.latest_checkpoint(run)
    assert ckpt.name == "step_0000004" and _all_finite(ckpt)
    assert json.loads((ckpt / "state.json").read_text())["skipped_steps"] == 1
    # the skipped step changed neither the weights nor the EMA
    a, b = (load_file(str(run / "checkpoints" / s / "ema.safetensors")) for s in ("step_0000003", "step_0000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_and_checkpoint_refuse_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = T.make_ema(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    T.update_ema(ema, model, 0.9, skip=torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    T.update_ema(ema, model, 0.9, skip=torch.tensor(False))
    assert torch.isnan(ema.weight).all()

    cfg = get_preset("toy")
    good = {"w": torch.ones(2)}
    kw = dict(optimizer_state={"state": {}, "param_groups": []}, rng={"rank0.torch": torch.get_rng_state()}, cfg=cfg)
    T.save_checkpoint(tmp_path, 1, model_state=good, ema_state=good, state={"step": 1}, **kw)
    with pytest.raises(T.NonFiniteError, match="step 2"):
        T.save_checkpoint(tmp_path, 2, model_state={"w": torch.tensor([1.0, math.inf])}, ema_state=good,
                          state={"step": 2}, keep=1, **kw)
    assert T.latest_checkpoint(tmp_path).name == "step_0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


# ------------------------------------------------------------------------------ 2: log and loss plot


def test_log_is_strict_json_and_plot_ignores_non_finite(tmp_path):
    log = T.JsonlLog(tmp_path / "log.jsonl")
    log.write({"step": 1, "loss": 0.5, "denoise": 0.4, "edge": 0.1})
    log.write({"step": 2, "loss": math.inf, "denoise": math.nan, "edge": 0.1})
    log.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    rec = _strict_json(lines[1])
    assert rec["loss"] is None and rec["denoise"] is None and rec["nonfinite"] == ["denoise", "loss"]
    assert rec["edge"] == 0.1
    T.truncate_log(tmp_path / "log.jsonl", 5)  # rewriting keeps it strict
    [_strict_json(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]

    # an old log (before this fix) holding Infinity / NaN: still read, and the plot no longer overflows
    old = tmp_path / "old.jsonl"
    old.write_text('{"step": 1, "loss": 1.0, "denoise": 0.9, "edge": 0.1}\n'
                   '{"step": 2, "loss": Infinity, "denoise": NaN, "edge": 0.1}\n'
                   '{"step": 3, "loss": 0.8, "denoise": 0.7, "edge": 0.1}\n')
    records = T.read_log(old)
    assert [r["step"] for r in records] == [1, 2, 3] and math.isinf(records[1]["loss"])
    T.plot_loss_curve(records, tmp_path / "loss.png")  # before: OverflowError
    T.plot_loss_curve(T.read_log(tmp_path / "log.jsonl"), tmp_path / "loss2.png")  # nulls
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "loss2.png").is_file()


def test_resume_after_an_infinite_log_line_saves(run, capsys):
    """An inf line in log.jsonl made every later checkpoint save crash in the plot, also after a resume."""
    with open(run / "log.jsonl", "a") as f:  # as an older version wrote it, at a step the resume keeps
        f.write('{"step": 0, "loss": Infinity, "denoise": Infinity, "edge": 0.1}\n')
    assert _train().main(["--out", str(run), "--resume"] + _sets("train.steps=3")) == 0, capsys.readouterr().err
    assert T.latest_checkpoint(run).name == "step_0000003"


# ------------------------------------------------------------------------------ 3: final checkpoint first


def test_final_grid_failure_keeps_the_final_checkpoint(run, capsys, monkeypatch):
    def broken(*a, **k):
        raise ValueError("x_t contains NaN or inf")

    monkeypatch.setattr(T, "generate_images", broken)
    code = _train().main(["--out", str(run), "--resume"] + _sets("train.steps=3", "train.ckpt_every=100"))
    err = capsys.readouterr().err
    assert code == 4 and err.startswith("error:") and "sample grid of step 3" in err, err
    assert T.latest_checkpoint(run).name == "step_0000003" and "step_0000003" in err
    assert json.loads((run / "checkpoints" / "step_0000003" / "state.json").read_text())["step"] == 3


def test_nan_guidance_is_a_config_error_before_training(tmp_path, capsys):
    code = _train().main(["--out", str(tmp_path / "r")] + _sets(*MICRO, "train.steps=2", "sample.guidance=NaN"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "sample.guidance" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ 5: damaged checkpoints


def _flip(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_damaged_checkpoint_names_the_file_and_an_intact_one(run, capsys, damage):
    bad_dir = run / "checkpoints" / "step_0000002"
    if damage == "flip":  # a flipped bit in a tensor: loaded silently before (loss inf)
        target = bad_dir / "model.safetensors"
        _flip(target)
    elif damage == "truncate":  # a raw SafetensorError before
        target = bad_dir / "ema.safetensors"
        target.write_bytes(target.read_bytes()[:1000])
    else:  # a raw JSONDecodeError before
        target = bad_dir / "state.json"
        target.write_text(target.read_text()[:10])
    code = _train().main(["--out", str(run), "--resume"] + _sets("train.steps=3"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert str(target) in err and "step_0000001" in err and "Traceback" not in err
    assert (run / "log.jsonl").read_text().count("\n") == 2, "nothing may be written before the error"


def test_load_model_checks_the_hash_and_old_files_load(run, tmp_path):
    ckpt = run / "checkpoints" / "step_0000002"
    model, _ = load_model(ckpt)
    assert verify_tensors(ckpt / "model.safetensors") is True
    _flip(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert str(ckpt / "model.safetensors") in str(e.value) and "step_0000001" in str(e.value)
    # a file without the hash (written before it existed, or by another tool) loads unchecked
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints" / "step_0000001", old)
    save_file(load_file(str(old / "model.safetensors")), str(old / "model.safetensors"))
    assert verify_tensors(old / "model.safetensors") is False
    load_model(old)
    # save_tensors round trip
    p = save_tensors({"a": torch.arange(5.0)}, tmp_path / "a.safetensors", {"k": "v"})
    assert verify_tensors(p) and torch.equal(load_file(str(p))["a"], torch.arange(5.0))


# ------------------------------------------------------------------------------ 6: resume with another config


def test_resume_with_another_model_is_a_short_error(run, capsys):
    code = _train().main(["--out", str(run), "--resume"] + _sets("model.model_channels=32", "model.head_dim=16"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "model.model_channels (checkpoint 16, now 32)" in err and "model.head_dim" in err


def test_resume_with_another_preset_is_an_error(run, capsys):
    """Before: --resume --preset small silently trained the checkpoint's toy config."""
    code = _train().main(["--out", str(run), "--resume", "--preset", "small"])
    err = capsys.readouterr().err
    # the differing fields are listed (sorted, the first 8): model fields such as model.attend_padding lead; the
    # healthy run was made with no --preset, so its preset is train.py's default
    assert code == 2 and "--preset small" in err and f"'{_train().DEFAULT_PRESET}'" in err, err
    assert "model.attend_padding (checkpoint False, now True)" in err, err
    assert "more" in err  # the toy and small presets differ in more than 8 fields
    assert len(err.splitlines()) == 1


def test_resume_may_change_the_run_settings(run, capsys):
    code = _train().main(["--out", str(run), "--resume", "--preset", _train().DEFAULT_PRESET]
                         + _sets("train.steps=3", "train.log_every=3", "train.lr=5e-4", "sample.guidance=2",
                                 "model.moe_impl=gather"))
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3


# ------------------------------------------------------------------------------ 8: --out never overwrites a run


def test_out_never_overwrites_another_run(tmp_path, healthy, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(healthy / "config.json", other / "config.json")
    shutil.copy(healthy / "log.jsonl", other / "log.jsonl")
    before = {n: (other / n).read_bytes() for n in ("config.json", "log.jsonl")}
    code = _train().main(["--out", str(other)] + _sets(*MICRO, "train.steps=1"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "another --out" in err, err
    assert {n: (other / n).read_bytes() for n in before} == before
    # an empty folder is fine (checked without training)
    (tmp_path / "empty").mkdir()
    assert _train().check_run_folder(str(tmp_path / "empty"), None) is None
    assert _train().check_run_folder(str(tmp_path / "absent"), None) is None
