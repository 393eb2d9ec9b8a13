"""A tools/train.py run folder in seconds, for tests of everything that reads runs (the pipeline,
tools/sample.py, the README example): the toy preset shrunk to a 16 x 16 micro U-Net with random
weights, saved by ``training.save_checkpoint`` exactly as a training run saves its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# the toy preset at micro width (as tests/test_sample.py trains it); T = 1000, toy-clip text tower
MICRO = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
         "model.expert_mult": 2, "model.edge_width": 4, "sample.steps": 4}


# two transformer blocks (one per level) + a middle one, 16 px: the adapter tests' micro U-Net (LoRA, ControlNet)
MICRO_2LEVEL = {**MICRO, "model.channel_mult": [1, 2], "model.num_res_blocks": 1, "model.transformer_down": [1, 1],
                "model.transformer_up": [1, 1], "sample.steps": 2}


def micro_model(seed: int = 0, **overrides):
    """:func:`random_model` of the toy preset at ``MICRO_2LEVEL`` (plus ``overrides``, config field -> value)."""
    from raphael_ref.config import get_preset

    return random_model(get_preset("toy", {**MICRO_2LEVEL, **overrides}), seed)


def micro_inputs(model, B: int = 2, seed: int = 7):
    """U-Net inputs (x_t, t, y, y_valid, pooled_index) for ``model`` at 16 px, 77 text tokens, B <= 2."""
    g = torch.Generator().manual_seed(seed)
    n_y, d_y = 77, model.cfg.d_y
    pooled = torch.tensor([5, 9])[:B]
    return (torch.randn(B, model.cfg.in_channels, 16, 16, generator=g), torch.tensor([10, 700])[:B],
            torch.randn(B, n_y, d_y, generator=g), torch.arange(n_y)[None] <= pooled[:, None], pooled)


def random_model(cfg, seed: int = 0):
    """A RaphaelUNet of ``cfg.model`` whose zero-initialised layers (the output conv, the residual
    branches) get N(0, 0.05^2) weights too, so that eps != 0 and samples depend on the weights."""
    from raphael_ref.models import build_unet

    torch.manual_seed(seed)
    model = build_unet(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make_tiny_run(run_dir: str | Path, *, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/config.json`` and ``run_dir/checkpoints/step_0000001/`` (raw and EMA weights: the
    EMA ones are the raw ones plus 0.01 N(0, 1), so the two differ) for the micro toy config; returns run_dir."""
    from raphael_ref import training
    from raphael_ref.config import get_preset

    cfg = get_preset("toy", {**MICRO, **(overrides or {})})
    model = random_model(cfg, seed)
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 2)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
           for k, v in raw.items()}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run_dir / "config.json")  # as tools/train.py writes it beside checkpoints/
    training.save_checkpoint(run_dir, 1, model_state=raw, ema_state=ema,
                             optimizer_state={"state": {}, "param_groups": []}, cfg=cfg,
                             state={"step": 1, "world_size": 1}, rng={"rank0.torch": torch.get_rng_state()})
    return run_dir
