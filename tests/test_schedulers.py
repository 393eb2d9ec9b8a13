"""diffusers' schedulers driving RaphaelUNet (raphael_ref/schedulers.py): DDIM and DDPM through the adapter
equal the project's own samplers; every sampler reaches the data of an exact denoiser (which checks the
sigma scaling of Euler/Heun's model input) and runs the micro U-Net to finite images; clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from raphael_ref.diffusion import NoiseSchedule  # noqa: E402
from raphael_ref.sampling import sample  # noqa: E402
from raphael_ref.schedulers import SCHEDULERS, make_scheduler, sample_with_scheduler  # noqa: E402
from raphael_ref.testing.tiny_run import random_model  # noqa: E402
from raphael_ref.text_encoder import TextEncoder  # noqa: E402

SHAPE = (2, 3, 16, 16)


@pytest.fixture(scope="module")
def micro():
    """The micro toy U-Net with random weights (eps != 0), the tiny text tower's cond and uncond tokens."""
    from raphael_ref.config import get_preset
    from raphael_ref.testing.tiny_run import MICRO

    # the paper's eps: one model meets several schedules here (T = 10 and 1000), which a "v" U-Net refuses (E88)
    model = random_model(get_preset("toy", {**MICRO, "model.prediction": "eps"}))
    enc = TextEncoder.tiny(seed=0)
    c, u = enc(["a red circle on the left", "two blue squares"]), enc([""])
    return model, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index)


def _both(model, cond, uncond, schedule, steps, sampler="ddim", seed=1):
    kw = dict(shape=SHAPE, steps=steps, guidance=4.0)
    ref, _ = sample(model, schedule, cond, uncond, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kw)
    ours, _ = sample_with_scheduler(model, schedule, cond, uncond, scheduler=sampler,
                                    generator=torch.Generator().manual_seed(seed), **kw)
    return ours, ref


class SmoothModel(torch.nn.Module):
    """A float64 stand-in for the U-Net: eps = tanh(conv3x3(x)) (1 + t / T) + y-pooled shift, all in the
    dtype of its weights (the U-Net keeps float32 islands, GroupNorm32, even when cast to float64)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, t, y, y_valid, pooled_index, return_masks=False):
        shift = y[torch.arange(len(t)), pooled_index, :3].to(x.dtype)  # (B, 3): the prompt matters
        return torch.tanh(self.conv(x)) * (1 + t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + shift[..., None, None], []


@pytest.mark.parametrize("steps", [3, 10])
def test_ddim_through_diffusers_equals_the_project_ddim(micro, steps):
    """Same timesteps ("leading", offset 1), same abar table, same eta = 0 update, same guided model calls.

    On the micro U-Net in float32: the two updates round differently (diffusers divides by sqrt(abar_t),
    we multiply by the float32 table of 1/sqrt(abar_t): a few ulp per step, scaled up by 1/sqrt(abar_t)
    <= 15 in x0_hat and by the random model's gain along the trajectory). Measured: 4.6e-7 of max|x| at 10
    steps; asserted: 1e-5 of max|x| (170 float32 ulp, 20x the measured), far below the O(1) gap of a wrong
    timestep rule (E62/E65: 0.4 to 3.1). The U-Net keeps float32 islands in float64 (GroupNorm32), so the
    formulas are compared in float64 on a smooth float64 stand-in: equal to 1e-12 of max|x|.
    """
    model, cond, uncond = micro
    schedule = NoiseSchedule.make(T=1000)
    ours, ref = _both(model, cond, uncond, schedule, steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # both samplers draw their noise in the default dtype
    try:
        c64, u64 = ((h.double(), v, p) for h, v, p in (cond, uncond))
        ours, ref = _both(SmoothModel(), c64, u64, schedule, steps)
    finally:
        torch.set_default_dtype(old)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12 * ref.abs().max().item())


def test_ddpm_through_diffusers_equals_the_project_ddpm(micro):
    """Ancestral DDPM over all T = 10 steps: the same posterior mean and std, and the same noise stream
    (both draw N(0, I) on the CPU from the generator after each model call, none at t = 0)."""
    model, cond, uncond = micro
    ours, ref = _both(model, cond, uncond, NoiseSchedule.make(T=10), None, sampler="ddpm")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


class ExactDenoiser(torch.nn.Module):
    """The exact eps-prediction of data that is always the image ``c``: eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t).

    Every sampler must return ``c``: the x_0 estimate is c at every step. It is only right when the model
    sees x_t of the training parameterisation, so Euler/Heun without ``scale_model_input`` miss c."""

    def __init__(self, c, schedule):
        super().__init__()
        self.c, self.abar = c, schedule.alphas_cumprod
        self.w = torch.nn.Parameter(torch.zeros(()))  # for next(model.parameters()).device

    def forward(self, x, t, y, y_valid, pooled_index, return_masks=False):
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        c = self.c.repeat(len(x) // len(self.c), 1, 1, 1)  # the guided batch holds cond and uncond halves
        return (x - a.sqrt() * c) / (1 - a).sqrt(), []


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_returns_the_data_of_an_exact_denoiser(micro, name, zero_snr):
    _, cond, uncond = micro
    if zero_snr and name in ("ddim", "ddpm"):  # eps prediction cannot invert x_{T-1} at abar = 0 (any sampler)
        pytest.skip("DDIM/DDPM keep abar_{T-1} = 0, where an eps model's x_0 estimate is undefined")
    schedule = NoiseSchedule.make(T=1000 if name != "ddpm" else 50, zero_terminal_snr=zero_snr)
    c = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x, _ = sample_with_scheduler(ExactDenoiser(c, schedule), schedule, cond, uncond, shape=SHAPE, scheduler=name,
                                 steps=None if name == "ddpm" else 8, guidance=4.0,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, c, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_sigma_schedulers_need_the_scaled_model_input(micro, name, monkeypatch):
    """The control of the test above: without scale_model_input Euler and Heun end far from the data."""
    _, cond, uncond = micro
    schedule = NoiseSchedule.make(T=1000)
    c = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    sched = make_scheduler(name, schedule)
    monkeypatch.setattr(sched, "scale_model_input", lambda x, t: x)
    x, _ = sample_with_scheduler(ExactDenoiser(c, schedule), schedule, cond, uncond, shape=SHAPE, scheduler=sched,
                                 steps=8, guidance=4.0, generator=torch.Generator().manual_seed(0))
    assert (x - c).abs().max() > 0.1  # 100x the tolerance of the scaled run


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler", "heun"])
def test_each_sampler_runs_the_unet_seeded_with_paths(micro, name):
    model, cond, uncond = micro
    schedule = NoiseSchedule.make(T=1000)
    kw = dict(shape=SHAPE, scheduler=name, steps=3, guidance=4.0, collect_paths=True, collect_masks=[0])
    x, paths = sample_with_scheduler(model, schedule, cond, uncond, generator=torch.Generator().manual_seed(5), **kw)
    x2, _ = sample_with_scheduler(model, schedule, cond, uncond, generator=torch.Generator().manual_seed(5), **kw)
    assert x.shape == SHAPE and torch.isfinite(x).all() and torch.equal(x, x2)
    calls = 5 if name == "heun" else 3  # Heun: two model calls per step but the last
    assert paths.timesteps.dtype == torch.long and len(paths.timesteps) == calls
    assert paths.timesteps[0] == 999  # "trailing": the solvers start at T - 1
    assert paths.space_routes.shape == (calls, 16, 2, cond[0].shape[1])
    assert paths.mask_steps == [0] and paths.masks[0][0].dtype == torch.bool


def test_clear_errors(micro, monkeypatch):
    model, cond, uncond = micro
    schedule = NoiseSchedule.make(T=1000)
    kw = dict(shape=SHAPE, guidance=4.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_with_scheduler(model, schedule, cond, uncond, scheduler="plms", **kw)
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        sample_with_scheduler(model, schedule, cond, uncond, scheduler="dpmpp_2m", eta=0.5, **kw)
    with pytest.raises(ValueError, match="steps must be an int"):
        sample_with_scheduler(model, schedule, cond, uncond, scheduler="euler", steps=0, **kw)
    with pytest.raises(ValueError, match="outside"):  # "leading" with n = T and steps_offset 1 reaches t = T
        sample_with_scheduler(model, schedule, cond, uncond, scheduler="ddim", steps=1000, **kw)
    with pytest.raises(ValueError, match="takes no setting"):
        make_scheduler("heun", schedule, solver_order=3)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"raphael_ref\[samplers\]"):
        make_scheduler("unipc", schedule)
