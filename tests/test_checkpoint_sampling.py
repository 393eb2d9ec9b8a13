"""Checkpoint round trips (safetensors + JSON, checked shapes) and sampling with diffusion paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from raphael_ref.checkpoint import load_model, save_model
from raphael_ref.config import get_preset
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.models import RaphaelUNet
from raphael_ref.sampling import sample
from raphael_ref.text_encoder import TextEncoder

MICRO = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
         "model.expert_mult": 2, "model.edge_width": 4}


def _model(seed=0):
    """A micro model whose zero-initialised output layers get random weights (so eps != 0)."""
    cfg = get_preset("toy", MICRO)
    torch.manual_seed(seed)
    model = RaphaelUNet(cfg.model).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, cfg


def test_save_load_round_trip(tmp_path):
    model, cfg = _model()
    save_model(tmp_path, model, cfg)
    assert (tmp_path / "model.safetensors").exists() and json.loads((tmp_path / "config.json").read_text())["name"] == "toy"
    back, cfg2 = load_model(tmp_path)
    assert cfg2 == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"


def test_load_names_shape_mismatch_and_missing_keys(tmp_path):
    model, cfg = _model()
    save_model(tmp_path, model, cfg)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in state if k.endswith("to_k.weight"))
    state[key] = torch.zeros(3, 3)
    dropped = next(k for k in state if "time_gate" in k)
    del state[dropped]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    assert key in str(err.value) and dropped in str(err.value) and "(3, 3)" in str(err.value)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_seeded_and_collects_paths(sampler):
    model, cfg = _model()
    enc = TextEncoder.tiny(seed=0)
    c = enc(["a red circle", "two blue squares"])
    u = enc([""])
    sched = NoiseSchedule.make(T=20 if sampler == "ddpm" else 1000)
    kw = dict(shape=(2, 3, 16, 16), steps=4 if sampler == "ddim" else None, guidance=3.0, sampler=sampler,
              collect_paths=True)
    x1, p1 = sample(model, sched, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index),
                    generator=torch.Generator().manual_seed(5), **kw)
    x2, p2 = sample(model, sched, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index),
                    generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(x1, x2) and torch.isfinite(x1).all()
    S = 4 if sampler == "ddim" else 20
    assert p1.space_routes.shape == (S, 16, 2, cfg.model.n_y)
    assert p1.time_routes.shape == (S, 16, 2)
    assert torch.equal(p1.space_routes, p2.space_routes)
    assert p1.space_routes.min() >= 0 and p1.space_routes.max() < cfg.model.n_space_experts
    assert len(p1.path_of_token(0, 0, 1)) == 16
    x3, _ = sample(model, sched, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index),
                   generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(x1, x3)


def test_collect_masks_keeps_only_the_chosen_steps():
    """collect_masks=[i, ...] keeps those steps' masks, equal to the all-steps masks there; samples unchanged."""
    model, cfg = _model()
    enc = TextEncoder.tiny(seed=0)
    c, u = enc(["a red circle on the left", "two blue squares"]), enc([""])
    sched = NoiseSchedule.make(T=1000)
    args = (model, sched, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index))
    kw = dict(shape=(2, 3, 16, 16), steps=4, guidance=3.0, collect_paths=True)
    x_all, p_all = sample(*args, generator=torch.Generator().manual_seed(2), collect_masks=True, **kw)
    x_two, p_two = sample(*args, generator=torch.Generator().manual_seed(2), collect_masks=[3, 1], **kw)
    x_none, p_none = sample(*args, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(x_all, x_two) and torch.equal(x_all, x_none)
    assert p_all.mask_steps == [0, 1, 2, 3] and len(p_all.masks) == 4
    assert p_two.mask_steps == [1, 3] and len(p_two.masks) == 2
    for j, step in enumerate(p_two.mask_steps):
        assert len(p_two.masks[j]) == cfg.n_transformer_blocks
        assert all(torch.equal(a, b) for a, b in zip(p_two.masks[j], p_all.masks[step]))
    assert p_none.masks is None and p_none.mask_steps is None
    with pytest.raises(ValueError, match="step indices"):
        sample(*args, collect_masks=[4], **kw)


def test_sample_equals_a_hand_written_guided_ddim_loop():
    """CFG batching, chunk order and the DDIM update, against separate cond/uncond model calls."""
    from raphael_ref.diffusion import cfg_combine, ddim_step, ddim_timesteps

    model, cfg = _model()
    model.train()  # sample() must switch to eval and restore this afterwards
    enc = TextEncoder.tiny(seed=0)
    c, u = enc(["a red circle", "two blue squares"]), enc(["", ""])
    sched = NoiseSchedule.make(T=1000)
    x, paths = sample(model, sched, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index),
                      shape=(2, 3, 16, 16), steps=3, guidance=4.0, generator=torch.Generator().manual_seed(9),
                      collect_paths=True)
    assert model.training
    model.eval()
    ref = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(9))
    ts = ddim_timesteps(3, 1000, "leading")
    routes = []
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            tb = torch.full((2,), t)
            e_c, aux = model(ref, tb, c.hidden, c.valid, c.pooled_index)
            e_u, _ = model(ref, tb, u.hidden, u.valid, u.pooled_index)
            routes.append(torch.stack([a.space_routes for a in aux]))
            ref = ddim_step(ref, t, ts[i + 1].item() if i + 1 < len(ts) else -1, cfg_combine(e_u, e_c, 4.0), sched)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(paths.space_routes, torch.stack(routes))  # the conditional half's routes
    assert (x - ref).abs().max() < 1e-4 < (ref.abs().max())


def test_ddpm_runs_all_steps_only():
    model, _ = _model()
    enc = TextEncoder.tiny(seed=0)
    c = enc(["a"])
    with pytest.raises(ValueError, match="DDPM"):
        sample(model, NoiseSchedule.make(T=20), (c.hidden, c.valid, c.pooled_index), None, shape=(1, 3, 16, 16),
               steps=4, sampler="ddpm")


def test_clip_x0_keeps_ddim_samples_in_range():
    model, _ = _model()
    enc = TextEncoder.tiny(seed=0)
    c = enc(["a red circle"])
    kw = dict(shape=(1, 3, 16, 16), steps=1, guidance=1.0, generator=None)
    torch.manual_seed(0)
    x, _ = sample(model, NoiseSchedule.make(T=1000), (c.hidden, c.valid, c.pooled_index), None,
                  clip_x0=0.5, **kw)
    # one DDIM step to t_prev = -1 returns x0_hat itself, so clipping bounds the result exactly
    assert x.abs().max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="ddim"):
        sample(model, NoiseSchedule.make(T=20), (c.hidden, c.valid, c.pooled_index), None, shape=(1, 3, 16, 16),
               steps=None, sampler="ddpm", clip_x0=1.0)
