"""tools/convert_sd.py: a RAPHAEL U-Net upcycled from Stable Diffusion weights computes SD's U-Net at step 0.

Two tiny random diffusers ``UNet2DConditionModel``s with the Stable Diffusion layouts (CrossAttnDownBlock2D x3
+ DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3, 2 layers per block): SD 1.x (8 heads
at every width, 1x1-conv proj_in/proj_out) and SD 2.x (a head count per level giving one head width, linear
projections, upcast attention). Every norm's affine parameters are perturbed so that a norm mapped to the wrong
place, or left at its default, would show. Converted with the tool's CLI, loaded with ``checkpoint.load_model``.

Tolerance: float32, ``|eps_raphael - eps_sd| <= 1e-5 * max(1, max|eps_sd|)`` (``ATOL``). The two U-Nets
run the same operations in a different order (one fused qkv matmul instead of three, SDPA kernels on both
sides, float32 GroupNorm/LayerNorm), through ~60 layers: the measured difference is ~8e-7 at an output scale
of ~1 (a few float32 ulps of each of the layers it went through), so 1e-5 leaves ~10x margin, while a wrong
mapping shows by 1e-2 or more (``test_a_wrong_head_count_is_caught``: 4 instead of 8 heads gives ~6e-2).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from raphael_ref.checkpoint import load_model  # noqa: E402
from raphael_ref.config import RaphaelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_convert_sd_tool", ROOT / "tools" / "convert_sd.py")
convert_sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_sd)

RTOL = 1e-5  # relative to the output scale; see the module docstring
LAYOUT = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
              norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
VARIANTS = {
    "sd1": dict(attention_head_dim=8),  # SD 1.x: 8 heads everywhere (diffusers' attention_head_dim is a head count)
    "sd2": dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True),  # head width 16
}


def _sd_unet(variant: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**LAYOUT, **VARIANTS[variant])
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name:  # GroupNorm / LayerNorm affine parameters away from (1, 0)
                p.add_(0.2 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (diffusers U-Net, converted checkpoint folder, SD's eps on _inputs())}, converted through the CLI."""
    root = tmp_path_factory.mktemp("convert_sd")
    out = {}
    x, t, y, _, _ = _inputs()
    for variant in VARIANTS:
        unet = _sd_unet(variant)
        unet.save_pretrained(root / variant)
        ckpt = root / f"{variant}_raphael"
        assert convert_sd.main([str(root / variant), str(ckpt), "--set", "model.text_encoder=tiny"]) == 0
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=y).sample
        out[variant] = (unet, ckpt, ref)
    return out


def _inputs(B: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 16, 16, generator=gen)
    t = torch.tensor([17, 803])[:B]
    y = torch.randn(B, 77, 32, generator=gen)  # all 77 text tokens (SD attends them all)
    valid = torch.arange(77)[None].expand(B, 77) < torch.tensor([[9], [30]])[:B]  # realistic caption lengths
    return x, t, y, valid, torch.tensor([8, 29])[:B]


def _eps(model, x, t, y, valid, pooled):
    return model(x, t, y, valid, pooled)[0]


def _assert_eps_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    atol = RTOL * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= atol, f"max |eps_raphael - eps_sd| = {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_eps_equals_diffusers(converted, variant):
    _, ckpt, ref = converted[variant]
    model, cfg = load_model(ckpt)
    model.eval()
    m = cfg.model
    assert (m.expert_act, m.expert_mult, m.transformer_norm_eps, m.attend_padding) == ("geglu", 4, 1e-6, True)
    assert (m.num_heads, m.head_dim) == ((8, m.head_dim) if variant == "sd1" else (None, 16))
    assert cfg.n_transformer_blocks == 16 and (m.model_channels, m.channel_mult) == (32, (1, 2, 2, 2))
    x, t, y, valid, pooled = _inputs()
    with torch.no_grad():
        got = _eps(model, x, t, y, valid, pooled)
    assert got.shape == ref.shape
    _assert_eps_close(got, ref)
    # the checkpoint folder is what tools/sample.py reads: EMA weights equal to the model's, and the provenance
    ema, _ = load_model(ckpt, weights_name="ema.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()))
    info = json.loads((ckpt / "convert_sd.json").read_text())
    assert len(info["source_sha256"]) == 64 and info["sd_config"]["block_out_channels"] == [32, 64, 64, 64]


def test_routes_do_not_change_eps_and_space_experts_learn(converted):
    """In training mode (noisy gates: other routes) eps is still SD's, and the zero-initialised space experts get a
    gradient on their last projection (the ControlNet-style zero init learns), none yet on their first."""
    _, ckpt, ref = converted["sd1"]
    model, _ = load_model(ckpt)
    x, t, y, valid, pooled = _inputs()
    model.train()
    model.gradient_checkpointing = False  # the same function; only faster here
    torch.manual_seed(3)
    got = _eps(model, x, t, y, valid, pooled)
    _assert_eps_close(got.detach(), ref)
    got.square().mean().backward()
    blocks = model.transformer_blocks()
    assert all(b.space_experts.w2.grad is not None for b in blocks)
    assert sum(b.space_experts.w2.grad.abs().sum().item() for b in blocks) > 0
    assert all(torch.equal(b.space_experts.w1.grad, torch.zeros_like(b.space_experts.w1)) for b in blocks)
    assert all(torch.equal(b.space_experts.w2, torch.zeros_like(b.space_experts.w2)) for b in blocks)
    te = blocks[0].time_experts.w1
    assert all(torch.equal(te[0], te[e]) for e in range(te.shape[0]))  # the FFN in every time expert


def test_a_wrong_head_count_is_caught(converted):
    """Control for the tolerance: the same weights with 4 heads instead of SD 1.x's 8 are far outside it."""
    _, ckpt, ref = converted["sd1"]
    _, cfg = load_model(ckpt)
    wrong = copy.deepcopy(cfg)
    wrong.model.num_heads = 4
    model, _ = load_model(ckpt, cfg=wrong)
    x, t, y, valid, pooled = _inputs()
    with torch.no_grad():
        err = (_eps(model.eval(), x, t, y, valid, pooled) - ref).abs().max()
    assert err > 100 * RTOL


def test_dense_ffn_ablation_layout_converts(converted):
    """With the MoEs off (model.use_*_moe=false, the Fig. 6b ablations) the FFN goes to time_ffn, space_ffn is zero."""
    unet = converted["sd1"][0]
    sd_cfg = dict(unet.config)
    base = RaphaelConfig.from_dict({"model": {"use_space_moe": False, "use_time_moe": False, "text_encoder": "tiny"}})
    cfg = convert_sd.raphael_config(sd_cfg, base)
    state = convert_sd.convert_state_dict(cfg, unet.state_dict())
    key = "down.0.attn.block"
    w = unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"]
    assert torch.equal(state[f"{key}.time_ffn.w2"][0], w.T)
    assert torch.equal(state[f"{key}.space_ffn.w2"], torch.zeros_like(state[f"{key}.space_ffn.w2"]))


# ------------------------------------------------------------------------------------------ errors

def _sd_folder(converted, tmp_path, variant="sd1", **changes) -> Path:
    src = Path(converted[variant][1]).parent / variant
    dst = tmp_path / "sd"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_folder_and_files(converted, tmp_path, capsys):
    with pytest.raises(convert_sd.ConversionError, match="is not a folder"):
        convert_sd.convert(tmp_path / "nope", tmp_path / "out")
    folder = _sd_folder(converted, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(convert_sd.ConversionError, match="lacks.*diffusion_pytorch_model.safetensors"):
        convert_sd.convert(folder, tmp_path / "out")
    assert convert_sd.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "convert_sd:" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, match", [
    ({"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
     "block types.*AttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
     "block types.*SimpleCrossAttnUpBlock2D"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"attention_head_dim": [1, 2, 4, 8]}, "neither one head width nor one head count"),
    ({"_class_name": "UNet2DModel"}, "UNet2DConditionModel"),
])
def test_unsupported_configs_are_refused(converted, tmp_path, changes, match):
    folder = _sd_folder(converted, tmp_path, **changes)
    with pytest.raises(convert_sd.ConversionError, match=match):
        convert_sd.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_disagree_with_the_config_are_refused(converted, tmp_path):
    folder = _sd_folder(converted, tmp_path, "sd1", cross_attention_dim=48)  # the file's to_k are 32 wide
    with pytest.raises(convert_sd.ConversionError, match="attn2.to_k.weight|to_k.weight"):
        convert_sd.convert(folder, tmp_path / "out")


def test_derived_fields_cannot_be_overridden(converted, tmp_path):
    folder = _sd_folder(converted, tmp_path)
    with pytest.raises(convert_sd.ConversionError, match="model.head_dim"):
        convert_sd.convert(folder, tmp_path / "out", overrides={"model.head_dim": "16"})


# ------------------------------------------------------------------------------------------ config fields

@pytest.mark.parametrize("key, value, match", [
    ("expert_act", "swiglu", "model.expert_act"),
    ("num_heads", 0, "model.num_heads"),
    ("num_heads", 3, "model.num_heads"),  # 320 is not a multiple of 3
    ("transformer_norm_eps", 0.0, "model.transformer_norm_eps"),
    ("transformer_norm_eps", float("nan"), "model.transformer_norm_eps"),
])
def test_new_model_fields_are_validated(key, value, match):
    cfg = RaphaelConfig()
    setattr(cfg.model, key, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_the_release_scheduler_is_checked(converted, tmp_path):
    """A v-prediction release (SD 2.x 768) converts to a "v" U-Net (E88) whose eps is the one SD's v implies; an x_0
    release and other betas than SD's are refused."""
    from raphael_ref.diffusion import NoiseSchedule, eps_from_v

    folder = _sd_folder(converted, tmp_path, variant="sd2")
    (tmp_path / "scheduler").mkdir()
    sched = tmp_path / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({"prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
                                 "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}))
    out, cfg = convert_sd.convert(folder, tmp_path / "out", overrides={"model.text_encoder": "tiny"})
    assert cfg.diffusion.schedule == "scaled_linear" and cfg.diffusion.T == 1000 and cfg.model.prediction == "v"
    assert json.loads((out / "convert_sd.json").read_text())["sd_scheduler"]["prediction_type"] == "v_prediction"
    model, cfg2 = load_model(out)
    assert cfg2.model.prediction == "v"
    x, t, y, valid, pooled = _inputs()
    with torch.no_grad():
        got = _eps(model.eval(), x, t, y, valid, pooled)
    v_sd = converted["sd2"][2]  # the same weights' .sample, read as v
    _assert_eps_close(got, eps_from_v(x, t, v_sd, NoiseSchedule.make("scaled_linear", 1000)))
    with pytest.raises(convert_sd.ConversionError, match="derived|set from the SD config"):
        convert_sd.convert(folder, tmp_path / "out_eps", overrides={"model.prediction": "eps"})
    sched.write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(convert_sd.ConversionError, match="prediction_type 'sample'"):
        convert_sd.convert(folder, tmp_path / "out_x0")
    sched.write_text(json.dumps({"prediction_type": "epsilon", "beta_schedule": "linear"}))
    with pytest.raises(convert_sd.ConversionError, match="betas linear"):
        convert_sd.convert(folder, tmp_path / "out2")
