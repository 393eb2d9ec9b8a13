"""The SR diffusion stage of the cascade (seed 004, Imagen; raphael_ref/sr.py, spec sr.noise_augmentation, E80)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from raphael_ref import sr as SR
from raphael_ref.config import PRESETS, get_preset
from raphael_ref.diffusion.schedule import alphas_cumprod, make_betas
from raphael_ref.models import RaphaelUNet
from raphael_ref.testing import load_tool
from raphael_ref.testing.tiny_run import MICRO, make_tiny_run, random_model

ABAR = alphas_cumprod(make_betas("scaled_linear", 1000))  # (T,) float64
# the micro SR stage: 16 -> 32 px on the micro toy U-Net (MICRO), every RAPHAEL component on
SR_MICRO = {**MICRO, "model.sample_size": 32, "model.cond_channels": 3, "sr.lowres_size": 16}
# float32 against the float64 literal: a blend of 4 inputs and a multiply-add, ~4 roundings of O(1) values
# (measured <= 1.4 u in the golden case); 1e-6 relative + 1e-6 absolute is ~17 u of margin, never loosened
F32_TOL = dict(rtol=1e-6, atol=1e-6)
# float64: the vectorised CPU kernel may fuse a * x + b * eps into one FMA (raphael_ref/testing/golden.py, "Across
# CPUs"), which the literal's two roundings do not: a last-bit difference; 1e-15 is ~4 ulp of O(1) values
F64_TOL = dict(rtol=1e-15, atol=1e-15)


def _text(B: int, n_y: int = 77, d_y: int = 32, g: torch.Generator | None = None):
    valid = torch.arange(n_y)[None].expand(B, -1) <= 6  # (B, n_y)
    return torch.randn(B, n_y, d_y, generator=g), valid, torch.full((B,), 6, dtype=torch.long)


# ------------------------------------------------------------------------------------------ the equation


@pytest.mark.spec_id("sr.noise_augmentation")
@given(B=st.integers(1, 3), C=st.integers(1, 3), hw=st.integers(1, 6), seed=st.integers(0, 2**16),
       levels=st.lists(st.integers(0, 1000), min_size=3, max_size=3))
def test_fast_form_equals_literal(B, C, hw, seed, levels):
    """float64: the broadcast form equals the per-sample literal form to F64_TOL; float32: within F32_TOL."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, hw, hw, generator=g, dtype=torch.float64)
    eps = torch.randn(B, C, hw, hw, generator=g, dtype=torch.float64)
    s = torch.tensor(levels[:B], dtype=torch.long)
    lit = SR.noise_augment_literal(x, s, eps, ABAR)
    torch.testing.assert_close(SR.noise_augment(x, s, eps, ABAR), lit, **F64_TOL)
    torch.testing.assert_close(SR.noise_augment(x.float(), s, eps.float(), ABAR).double(), lit, **F32_TOL)


@pytest.mark.spec_id("sr.noise_augmentation")
@pytest.mark.parametrize("mode", SR.UPSAMPLE_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_level_zero_leaves_the_conditioning_image_unchanged(mode, dtype):
    """s = 0 is abar = 1: z is the upsampled low-res image bit for bit, whatever eps holds."""
    g = torch.Generator().manual_seed(0)
    x_lr = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).to(dtype)
    eps = (100 * torch.randn(2, 3, 32, 32, generator=g)).to(dtype)
    s = torch.zeros(2, dtype=torch.long)
    z = SR.lowres_condition(x_lr, 32, s, eps, ABAR, mode)
    assert z.dtype == dtype and torch.equal(z, SR.upsample_lowres(x_lr, 32, mode))
    assert float(SR.aug_abar(ABAR, s)[0]) == 1.0


@pytest.mark.spec_id("sr.noise_augmentation")
def test_levels_follow_the_diffusion_schedule_and_preserve_variance():
    """s >= 1 is the diffusion's timestep s - 1; a unit-variance image stays unit variance at every level; the
    noise share grows with s."""
    s = torch.tensor([1, 2, 500, 1000])
    torch.testing.assert_close(SR.aug_abar(ABAR, s), ABAR[s - 1], rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 200, 200, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 200, 200, generator=g, dtype=torch.float64)
    z = SR.noise_augment(x, s, eps, ABAR)
    var = z.flatten(1).var(dim=1)  # (4,): 40000 samples each, sd of the estimate ~ 0.007
    assert bool(((var - 1).abs() < 0.04).all()), var
    corr = ((z - x) ** 2).flatten(1).mean(1)  # (4,) distance to the clean image grows with s
    assert bool((corr[1:] > corr[:-1]).all())


@pytest.mark.spec_id("sr.noise_augmentation")
def test_upsampling_modes():
    """nearest by an integer factor repeats pixels; bilinear keeps a constant image and the input range."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    near = SR.upsample_lowres(x, 24, "nearest")
    assert torch.equal(near, x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))
    bil = SR.upsample_lowres(x, 24, "bilinear")
    assert bil.shape == (2, 3, 24, 24) and float(bil.max()) <= float(x.max()) and float(bil.min()) >= float(x.min())
    const = torch.full((1, 3, 8, 8), 0.25)
    assert torch.equal(SR.upsample_lowres(const, 16, "bilinear"), torch.full((1, 3, 16, 16), 0.25))


def test_augmentation_input_errors():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"lie in \[0, T=1000\]"):
        SR.noise_augment(x, torch.tensor([0, 1001]), x, ABAR)
    with pytest.raises(ValueError, match="integer tensor"):
        SR.noise_augment(x, torch.tensor([0.0, 1.0]), x, ABAR)
    with pytest.raises(ValueError, match="one shape"):
        SR.noise_augment(x, torch.tensor([0, 1]), torch.zeros(2, 3, 4, 4), ABAR)
    with pytest.raises(ValueError, match="upsample mode"):
        SR.upsample_lowres(x, 16, "bicubic")
    with pytest.raises(ValueError, match="NaN or inf"):
        SR.lowres_condition(torch.full((1, 3, 8, 8), math.nan), 16, torch.tensor([3]), torch.zeros(1, 3, 16, 16), ABAR)
    with pytest.raises(ValueError, match="high-res grid"):
        SR.lowres_condition(torch.zeros(1, 3, 8, 8), 16, torch.tensor([3]), torch.zeros(1, 3, 8, 8), ABAR)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        SR.check_lowres(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="16 x 16 pixels"):
        SR.check_lowres(torch.zeros(1, 3, 8, 8), 16)


# ------------------------------------------------------------------------------------------ the model


def _sr_cfg(**extra):
    return get_preset("toy", {**SR_MICRO, **extra})


def test_sr_unet_shapes_and_conditioning():
    """[x_t, z] in, eps_hat of x_t's shape out; 16 BlockAux; the output depends on z and (once trained) on s."""
    cfg = _sr_cfg()
    model = random_model(cfg, seed=3)
    assert model.conv_in.in_channels == 6 and model.conv_out.out_channels == 3 and model.aug_embed is not None
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([10, 900])
    y, valid, pooled = _text(2, g=g)
    z = torch.randn(2, 3, 32, 32, generator=g)
    s = torch.tensor([0, 200])
    with torch.no_grad():
        out, aux = model(x, t, y, valid, pooled, cond=z, aug_level=s)
        assert out.shape == x.shape and len(aux) == 16
        out_z, _ = model(x, t, y, valid, pooled, cond=-z, aug_level=s)
        out_s, _ = model(x, t, y, valid, pooled, cond=z, aug_level=torch.tensor([300, 50]))
    assert not torch.equal(out, out_z)
    assert not torch.equal(out, out_s)  # random_model filled the zero-initialised last layer of aug_embed
    fresh = RaphaelUNet(cfg.model).eval()  # untrained: the zero last layer adds nothing to E'(t)
    with torch.no_grad():
        a, _ = fresh(x, t, y, valid, pooled, cond=z, aug_level=s)
        b, _ = fresh(x, t, y, valid, pooled, cond=z, aug_level=torch.tensor([1000, 7]))
    assert torch.equal(a, b)


def test_sr_unet_input_errors():
    cfg = _sr_cfg()
    model = RaphaelUNet(cfg.model).eval()
    x = torch.zeros(2, 3, 32, 32)
    t = torch.tensor([1, 2])
    y, valid, pooled = _text(2)
    s = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="this U-Net is an SR stage"):
        model(x, t, y, valid, pooled)
    with pytest.raises(ValueError, match=r"cond must be a float tensor \(B, 3, H, W\)"):
        model(x, t, y, valid, pooled, cond=torch.zeros(2, 3, 16, 16), aug_level=s)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x, t, y, valid, pooled, cond=torch.full((2, 3, 32, 32), math.nan), aug_level=s)
    with pytest.raises(ValueError, match="aug_level must be integer"):
        model(x, t, y, valid, pooled, cond=x, aug_level=torch.zeros(2))
    base = RaphaelUNet(get_preset("toy", MICRO).model).eval()
    with pytest.raises(ValueError, match="model.cond_channels > 0"):
        base(torch.zeros(2, 3, 16, 16), t, y, valid, pooled, cond=torch.zeros(2, 3, 16, 16), aug_level=s)


def test_default_config_is_the_base_unet(monkeypatch):
    """model.cond_channels = 0 (every preset): no aug_embed, conv_in over in_channels, the same state-dict keys as
    before the SR stage existed, and a forward that never reaches the SR code (so its output is the base U-Net's
    bit for bit; the U-Net golden ``model.unet`` pins the values)."""
    for name in sorted(PRESETS):
        assert get_preset(name).model.cond_channels == 0 and get_preset(name).sr.lowres_size == 0
    cfg = get_preset("toy", MICRO)
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()
    assert model.aug_embed is None and model.conv_in.in_channels == cfg.model.in_channels
    assert not any("aug_embed" in k for k in model.state_dict())
    sr_keys = set(RaphaelUNet(_sr_cfg().model).state_dict())
    assert sr_keys - set(model.state_dict()) == {k for k in sr_keys if k.startswith("aug_embed.")}
    monkeypatch.setattr(RaphaelUNet, "_sr_inputs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("SR path")))
    y, valid, pooled = _text(2)
    with torch.no_grad():
        out, _ = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 500]), y, valid, pooled)
    assert out.shape == (2, 3, 16, 16)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.cond_channels: an SR stage needs sr.lowres_size"):
        get_preset("toy", {"model.cond_channels": 3})
    with pytest.raises(ValueError, match="sr.lowres_size: is for SR stages"):
        get_preset("toy", {"sr.lowres_size": 16})
    with pytest.raises(ValueError, match="sr.lowres_size: must lie in"):
        get_preset("toy", {**SR_MICRO, "sr.lowres_size": 32})
    with pytest.raises(ValueError, match="model.cond_channels: an SR stage conditions on the RGB"):
        get_preset("toy", {**SR_MICRO, "model.cond_channels": 4})
    with pytest.raises(ValueError, match="sr.upsample"):
        get_preset("toy", {**SR_MICRO, "sr.upsample": "bicubic"})
    with pytest.raises(ValueError, match=r"sr.aug_max: must lie in \[0, T=1000\]"):
        get_preset("toy", {**SR_MICRO, "sr.aug_max": 1001})
    with pytest.raises(ValueError, match="model.cond_channels: must be >= 0"):
        get_preset("toy", {"model.cond_channels": -1})


def test_training_loss_and_sampling_run_through_the_base_code():
    """sr_training_losses is objective.training_losses through SRDenoiser: finite, with a gradient into the
    conditioning path; SRStage samples the high-res size, deterministic for a seed, CFG batch doubled."""
    from raphael_ref import training as T
    from raphael_ref.diffusion import NoiseSchedule

    cfg = _sr_cfg()
    model = random_model(cfg, seed=5).train()
    sched = NoiseSchedule.make("scaled_linear", 1000)
    g = torch.Generator().manual_seed(6)
    hr = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    lr = SR._area_down(hr, 16)
    enc = T.build_text_encoder(cfg)
    text = enc(["a red circle on the left", ""])
    edges = T.build_edge_detector(cfg)(hr)
    out = SR.sr_training_losses(model, sched, hr, lr, torch.tensor([5, 600]), torch.randn(hr.shape, generator=g),
                                torch.tensor([0, 250]), torch.randn(hr.shape, generator=g), text.hidden, text.valid,
                                text.pooled_index, edges, loss_weight="v", loss_weight_max=5.0)
    out["total"].backward()
    assert math.isfinite(float(out["total"].detach())) and float(model.conv_in.weight.grad[:, 3:].abs().sum()) > 0
    stage = SR.SRStage(model.eval(), enc, sched, cfg)
    kw = dict(steps=2, guidance=3.0, generator=None)
    a = stage(lr, ["a red circle on the left", "two blue circles"], **{**kw, "generator": torch.Generator().manual_seed(0)})
    b = stage(lr, ["a red circle on the left", "two blue circles"], **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and bool(torch.isfinite(a).all())
    with pytest.raises(ValueError, match="16 x 16 pixels"):
        stage(hr, ["a", "b"], steps=2)
    with pytest.raises(ValueError, match="one prompt per image"):
        stage(lr, ["a"], steps=2)
    with pytest.raises(ValueError, match="aug_level must be an int"):
        stage(lr, ["a", "b"], steps=2, aug_level=-1)


# ------------------------------------------------------------------------------------------ the tools


def _train_args(out, *extra):
    return ["--out", str(out), "--threads", "1", "--no-samples", "--set", "train.batch_size=2", "--set", "train.log_every=1",
            "--set", "train.ckpt_every=2", "--set", "model.model_channels=16", "--set", "model.head_dim=8",
            "--set", "model.norm_groups=4", "--set", "model.edge_width=4", "--set", "model.sample_size=32",
            "--set", "sr.lowres_size=16", "--set", "sample.steps=2", *extra]


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    """A 4-step micro SR run (16 -> 32 px), written by tools/train_sr.py with its final sample grid."""
    tool = load_tool("train_sr")
    out = tmp_path_factory.mktemp("sr") / "run"
    args = [a for a in _train_args(out, "--set", "train.steps=4") if a != "--no-samples"]
    assert tool.main(args) == 0
    return out


def test_train_sr_writes_a_run_folder(sr_run):
    from raphael_ref.config import RaphaelConfig

    records = [json.loads(line) for line in (sr_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    for name in ("config.json", "loss.png", "samples/final.png", "checkpoints/latest",
                 "checkpoints/step_0000004/ema.safetensors", "checkpoints/step_0000004/optimizer.safetensors"):
        assert (sr_run / name).exists(), name
    cfg = RaphaelConfig.from_json(sr_run / "config.json")
    assert cfg.model.cond_channels == 3 and cfg.sr.lowres_size == 16 and cfg.model.sample_size == 32


def test_train_sr_resume_equals_an_uninterrupted_run(tmp_path):
    """2 steps + resume to 4 gives the weights of 4 steps in one go, bit for bit (data is a function of the item
    index; RNG states and optimizer are in the checkpoint)."""
    from raphael_ref.checkpoint import load_tensors

    tool = load_tool("train_sr")
    assert tool.main(_train_args(tmp_path / "a", "--set", "train.steps=4")) == 0
    assert tool.main(_train_args(tmp_path / "b", "--set", "train.steps=2")) == 0
    assert tool.main(["--out", str(tmp_path / "b"), "--resume", "--threads", "1", "--no-samples",
                      "--set", "train.steps=4"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_tensors(tmp_path / "a" / "checkpoints" / "step_0000004" / name)
        b = load_tensors(tmp_path / "b" / "checkpoints" / "step_0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_sr_user_errors(tmp_path, sr_run, capsys):
    tool = load_tool("train_sr")
    assert tool.main(_train_args(tmp_path / "x", "--set", "model.cond_channels=0")) == 2
    assert "model.cond_channels" in capsys.readouterr().err
    assert tool.main(_train_args(tmp_path / "x", "--set", "sr.lowres_size=40")) == 2
    assert "sr.lowres_size" in capsys.readouterr().err
    assert tool.main(_train_args(sr_run)) == 2  # never overwrites a run
    assert "holds another run" in capsys.readouterr().err
    assert tool.main(["--out", str(sr_run), "--resume", "--set", "model.sample_size=64"]) == 2
    assert "cannot change on resume" in capsys.readouterr().err
    assert tool.main(["--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_sample_upscale_runs_base_and_sr_in_one_call(tmp_path, sr_run, capsys):
    """tools/sample.py BASE --upscale SR: the SR images at 32 px plus the 16 px base images; RaphaelPipeline.from_run
    (sr_run=...) gives the same images; a base of the wrong size is refused by name."""
    from PIL import Image

    from raphael_ref import RaphaelPipeline

    base = make_tiny_run(tmp_path / "base")
    out = tmp_path / "out"
    rc = load_tool("sample").main([str(base), "--upscale", str(sr_run), "--prompt", "a red circle on the left",
                                   "--prompt", "a blue square on the right", "--out", str(out), "--steps", "2",
                                   "--sr-steps", "2", "--aug-level", "100", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out / "000_a_red_circle_on_the_left.png").size == (32, 32)
    assert Image.open(out / "000_a_red_circle_on_the_left.base.png").size == (16, 16)
    pipe = RaphaelPipeline.from_run(base, sr_run=sr_run)
    pipe.sr_options = {"steps": 2, "aug_level": 100}
    res = pipe(["a red circle on the left", "a blue square on the right"], num_inference_steps=2, generator=3,
               output_type="pt")
    assert res.images.shape == (2, 3, 32, 32) and res.lowres.shape == (2, 3, 16, 16)
    got = torch.from_numpy(__import__("numpy").array(Image.open(out / "001_a_blue_square_on_the_right.png")))
    from raphael_ref.training import to_uint8

    assert torch.equal(got, to_uint8(res.images)[1])
    big = make_tiny_run(tmp_path / "big", overrides={"model.sample_size": 24})
    rc = load_tool("sample").main([str(big), "--upscale", str(sr_run), "--prompt", "a", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "upscales 16 px images, the base model draws 24 px" in capsys.readouterr().err
    rc = load_tool("sample").main([str(base), "--upscale", str(base), "--prompt", "a", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "not an SR stage" in capsys.readouterr().err
    rc = load_tool("sample").main([str(base), "--upscale", str(sr_run), "--aug-level", "5000", "--prompt", "a",
                                   "--out", str(tmp_path / "o4")])
    assert rc == 2 and "--aug-level" in capsys.readouterr().err


def test_sr_denoiser_keeps_the_unet_mode():
    """The conditioning wrapper takes the wrapped U-Net's mode, so a sampler that restores the mode it found leaves
    an eval U-Net in eval (a fresh Module starts in train mode: gate noise and dropout would follow a sample)."""
    net = RaphaelUNet(_sr_cfg().model).eval()
    z, s = torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long)
    assert not SR.SRDenoiser(net, z, s).training
    net.train()
    assert SR.SRDenoiser(net, z, s).training


def test_sampler_starts_at_q_sample_of_start_from():
    """``sampling.sample(start_from=m)`` feeds the model sqrt(abar_t0) m + sqrt(1 - abar_t0) n at the first step,
    n the very noise the default start (x = n) uses; a bad start is an error naming start_from."""
    from raphael_ref.diffusion import NoiseSchedule, ddim_timesteps
    from raphael_ref.sampling import sample

    schedule = NoiseSchedule.make("scaled_linear", 1000)
    seen = []

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y, y_valid, pooled_index, **kw):
            seen.append((x.clone(), t.clone()))
            return torch.zeros_like(x), []

    B, shape = 2, (2, 3, 4, 4)
    y = (torch.zeros(B, 5, 8), torch.ones(B, 5, dtype=torch.bool), torch.zeros(B, dtype=torch.long))
    m = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    sample(Stub(), schedule, y, None, shape=shape, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(0))
    x_plain, t0 = seen[0]
    seen.clear()
    sample(Stub(), schedule, y, None, shape=shape, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(0),
           start_from=m)
    x_start, t0b = seen[0]
    assert int(t0[0]) == int(t0b[0]) == int(ddim_timesteps(4, 1000)[0])
    a = float(schedule.alphas_cumprod[int(t0[0])])
    torch.testing.assert_close(x_start, math.sqrt(a) * m + math.sqrt(1 - a) * x_plain, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(x_start, x_plain)
    for bad in (m[:1], m * float("nan")):
        with pytest.raises(ValueError, match="start_from"):
            sample(Stub(), schedule, y, None, shape=shape, steps=4, guidance=1.0, start_from=bad)
