"""A Canny ControlNet for the RAPHAEL U-Net (RAPHAEL Sec. 4.1 / App. 7.8, Fig. 21; Zhang et al. 2023).

RAPHAEL's equations hold no ControlNet; the paper shows one (Fig. 21, Canny edges) and prints nothing of
it. We follow ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a *trainable copy* of the U-Net's encoder half -- input conv, time embedding, the down blocks with
their transformer blocks (self- and cross-attention, time-MoE, space-MoE exactly as the U-Net has them) and
the middle block -- reads ``x_t + E_c(edge map)``, and each of its skip activations c_i (and its middle
output c_mid) reaches the frozen U-Net through a zero-initialised 1x1 convolution Z_i whose output is ADDED
to the U-Net's skip h_i (and middle output h_mid) before the decoder reads them (spec ``controlnet.zero_join``):

    h_i'   = h_i   + s (W_i c_i + b_i)                 W_i (C_i, C_i), b_i (C_i,): Z_i, zero at init
    h_mid' = h_mid + s (W_mid c_mid + b_mid)           s: the conditioning scale (sampling strength, default 1)
    c      = ControlNet copy(conv_in(x_t) + E_c(edge map), t, E(y))

Because every W_i, b_i starts at 0, the untrained ControlNet leaves the U-Net's output bit-identical; the
gradient of the loss w.r.t. W_i at step 0 is not zero (it is d L / d h_i' times c_i, and c_i != 0), so one
optimizer step makes the join non-zero (tests/test_controlnet.py). E_c (:class:`ControlConditioning`) is a
small conv net with SiLU that strides the edge map (image resolution) down to the latent grid (factor f of
the codec: 1 for the pixel-space toy, 2 for the space-to-depth toy, 8 for a VAE), its last conv
zero-initialised as in ControlNet. The copy drops the U-Net's edge heads P_theta (nothing reads them).
Decisions: erratum E79.

``RaphaelUNet.forward(..., control_residuals=ControlResiduals)`` applies the join (:func:`add_control`);
``control_residuals=None`` (the default) leaves the forward bit for bit as it is without ControlNet.
:class:`ControlledUNet` wraps U-Net + ControlNet + control map as a model with the U-Net's call signature, so
the project's samplers and diffusers' schedulers drive it unchanged; under classifier-free guidance the
control map is repeated over both halves of the batch (conditional and unconditional), as ControlNet does.

Files (:func:`save_controlnet`): ``NAME.safetensors`` holds only the ControlNet's weights (SHA-256 in the
metadata, ``checkpoint.save_tensors``) and ``NAME.json`` beside it the base's config, the codec factor, the
Canny settings of the control maps and the base checkpoint it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from raphael_ref.config import ModelConfig, RaphaelConfig
from raphael_ref.gates import interval_route
from raphael_ref.models import RaphaelUNet, SpatialTransformer
from raphael_ref.unet_parts import Downsample, ResBlock, TimestepMLP

__all__ = [
    "CANNY_DEFAULTS", "ControlResiduals", "ControlConditioning", "RaphaelControlNet", "ControlledUNet",
    "zero_conv_join_literal", "add_control", "check_control_map", "canny_control", "read_control_image",
    "save_controlnet", "load_controlnet", "controlnet_json_path",
]

FORMAT = "raphael_ref.controlnet"
FORMAT_VERSION = 1
# Canny of the control maps: edge_gt.CannyEdgeDetector's defaults (step contrasts of the [0, 1] grayscale image)
CANNY_DEFAULTS = {"low_contrast": 0.1, "high_contrast": 0.2, "sigma": 1.0, "kernel_size": 5}
# config fields that do not change the encoder half (the copy has no edge heads and no decoder)
_NOT_ENCODER = ("use_edge", "edge_layers", "edge_width", "edge_t_cutoff", "transformer_up", "checkpoint", "vae_path",
                "text_encoder_weights", "text_encoder_clip_weights", "sample_size", "dropout")


# ------------------------------------------------------------------------------ the join (controlnet.zero_join)


@dataclasses.dataclass
class ControlResiduals:
    """What a ControlNet hands the U-Net: s Z_i(c_i) for every U-Net skip (forward order) and s Z_mid(c_mid)."""

    down: tuple[torch.Tensor, ...]  # (B, C_i, H_i, W_i) each, the shapes of the U-Net's skips
    mid: torch.Tensor  # (B, C_mid, H_mid, W_mid)


def zero_conv_join_literal(skips: Sequence[torch.Tensor], mid: torch.Tensor, features: Sequence[torch.Tensor],
                           mid_feature: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                           mid_weight: torch.Tensor, mid_bias: torch.Tensor, scale: float = 1.0
                           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ControlNet (Zhang et al. 2023) join, literal: h_i' = h_i + s (W_i c_i + b_i), h_mid' = h_mid + s (W_mid c_mid + b_mid).

    skips h_i (B, C_i, H_i, W_i) and mid (B, C, H, W): the U-Net's activations; features c_i / mid_feature: the
    ControlNet copy's, same shapes; weights W_i (C_i, C_i) and biases b_i (C_i,): the 1x1 zero convolutions (a 1x1
    conv is a per-pixel matrix product); s: the conditioning scale. One output channel at a time, plain torch.
    """
    _check_scale(scale)
    if not (len(skips) == len(features) == len(weights) == len(biases)):
        raise ValueError(f"one feature, weight and bias per skip: got {len(skips)} skips, {len(features)} features, "
                         f"{len(weights)} weights, {len(biases)} biases")

    def join(h, c, W, b, name):
        if c.shape != h.shape or h.ndim != 4:
            raise ValueError(f"{name}: the control feature must have the skip's shape (B, C, H, W) {tuple(h.shape)}; "
                             f"got {tuple(c.shape)}")
        C = h.shape[1]
        if W.shape != (C, C) or b.shape != (C,):
            raise ValueError(f"{name}: the zero conv must be W ({C}, {C}), b ({C},); got {tuple(W.shape)}, {tuple(b.shape)}")
        z = torch.zeros_like(h)  # (B, C, H, W)
        for o in range(C):  # output channel o: sum over input channels k of W[o, k] c[:, k] + b[o]
            z[:, o] = (W[o][None, :, None, None] * c).sum(dim=1) + b[o]  # (B, H, W)
        return h + scale * z  # (B, C, H, W)

    out = [join(h, c, W, b, f"skip {i}") for i, (h, c, W, b) in enumerate(zip(skips, features, weights, biases))]
    return out, join(mid, mid_feature, mid_weight, mid_bias, "mid")


def add_control(skips: Sequence[torch.Tensor], mid: torch.Tensor,
                residuals: ControlResiduals) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The join in the U-Net (fast form): h_i + r_i for every skip, h_mid + r_mid; r = :class:`ControlResiduals`
    (already s Z(c)). ValueError when the residuals do not fit this U-Net's skips."""
    if not isinstance(residuals, ControlResiduals):
        raise ValueError(f"control_residuals must be a raphael_ref.controlnet.ControlResiduals or None, got "
                         f"{type(residuals).__name__}")
    if len(residuals.down) != len(skips):
        raise ValueError(f"control_residuals has {len(residuals.down)} skip residuals, the U-Net has {len(skips)} skips: "
                         f"a ControlNet of another architecture")
    for i, (h, r) in enumerate(zip(skips, residuals.down)):
        if r.shape != h.shape:
            raise ValueError(f"control residual {i} has shape {tuple(r.shape)}, the U-Net's skip {tuple(h.shape)}")
    if residuals.mid.shape != mid.shape:
        raise ValueError(f"the middle control residual has shape {tuple(residuals.mid.shape)}, the U-Net's middle "
                         f"output {tuple(mid.shape)}")
    return [h + r.to(h.dtype) for h, r in zip(skips, residuals.down)], mid + residuals.mid.to(mid.dtype)


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"the conditioning scale must be a finite number (0: no control, 1: as trained), got {scale!r}")
    return float(scale)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


# ------------------------------------------------------------------------------ the network


class ControlConditioning(nn.Module):
    """E_c: control map (B, c_in, f H, f W) in [0, 1] -> (B, out, H, W) on the latent grid.

    conv3x3 -> SiLU, then per factor of 2 of f: conv3x3 -> SiLU -> conv3x3 stride 2 -> SiLU (f = 1: one
    conv3x3 -> SiLU), then a zero-initialised conv3x3 to the U-Net's width (ControlNet's "hint" network).
    """

    def __init__(self, out_channels: int, factor: int = 1, in_channels: int = 1,
                 hidden: Sequence[int] = (16, 32, 96, 256)):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"the codec's downsample factor must be a power of 2 (1, 2, 4, 8, ...), got {factor!r}")
        n_down = factor.bit_length() - 1
        chans = [hidden[min(k, len(hidden) - 1)] for k in range(n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.SiLU()]
        for k in range(n_down):
            layers += [nn.Conv2d(chans[k], chans[k], 3, padding=1), nn.SiLU(),
                       nn.Conv2d(chans[k], chans[k + 1], 3, padding=1, stride=2), nn.SiLU()]
        if n_down == 0:
            layers += [nn.Conv2d(chans[0], chans[0], 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.factor, self.in_channels = factor, in_channels

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))  # (B, out, H, W)


def check_control_map(control: Any, batch: int, latent_hw: tuple[int, int], factor: int, channels: int = 1,
                      name: str = "control") -> None:
    """ValueError unless ``control`` is a finite float tensor (batch or 1, channels, f H, f W) with values in [0, 1]."""
    H, W = latent_hw[0] * factor, latent_hw[1] * factor
    if not isinstance(control, torch.Tensor) or not control.is_floating_point():
        raise ValueError(f"{name} must be a floating-point edge map tensor (B, {channels}, {H}, {W}) in [0, 1], got "
                         f"{control.dtype if isinstance(control, torch.Tensor) else type(control).__name__}")
    if control.ndim != 4 or control.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W) (an edge map), got {tuple(control.shape)}")
    if tuple(control.shape[2:]) != (H, W):
        raise ValueError(f"{name} is {control.shape[2]}x{control.shape[3]} px but the images are {H}x{W} px (latent "
                         f"{latent_hw[0]}x{latent_hw[1]} times the codec's factor {factor}): resize the control image "
                         f"to {H}x{W}")
    if control.shape[0] not in (1, batch):
        raise ValueError(f"{name} has a batch of {control.shape[0]}; expected 1 (one map for every sample) or {batch}")
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(control).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if not bool(((control >= 0) & (control <= 1)).all()):
        raise ValueError(f"{name} must hold edge values in [0, 1] (a Canny map is 0/1); got values in "
                         f"[{float(control.min()):.3g}, {float(control.max()):.3g}]")


class RaphaelControlNet(nn.Module):
    """ControlNet for :class:`~raphael_ref.models.RaphaelUNet` (Zhang et al. 2023; RAPHAEL Fig. 21; erratum E79).

    A trainable copy of the U-Net's encoder half (``time_embed``, ``conv_in``, ``down``, ``mid_res1``,
    ``mid_attn``, ``mid_res2``: same module names, so :meth:`from_unet` copies the weights by name), the
    conditioning network ``cond_embed`` (:class:`ControlConditioning`) and the zero convolutions
    ``zero_convs`` (one per U-Net skip) and ``mid_zero_conv``. ``factor``: the codec's downsample factor
    (control maps are at image resolution). ``canny``: the Canny settings the control maps are made with.

    ``forward(x_t, t, y, y_valid, pooled_index, control, conditioning_scale)`` -> :class:`ControlResiduals`.
    """

    def __init__(self, cfg: ModelConfig, *, factor: int = 1, conditioning_channels: int = 1,
                 canny: dict[str, float] | None = None):
        super().__init__()
        if getattr(cfg, "cond_channels", 0):
            raise ValueError("a ControlNet for an SR stage (model.cond_channels > 0) is not supported: build it for the "
                             "base text-to-image U-Net")
        self.base_cfg = cfg
        cfg = dataclasses.replace(cfg, use_edge=False, checkpoint=False)  # the copy has no edge heads P_theta
        self.cfg = cfg
        self.factor, self.conditioning_channels = factor, conditioning_channels
        self.canny = dict(CANNY_DEFAULTS if canny is None else canny)
        mc, groups = cfg.model_channels, cfg.norm_groups
        d_t = 4 * mc
        self.d_t = d_t
        self.time_embed = TimestepMLP(mc, d_t)
        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.cond_embed = ControlConditioning(mc, factor, conditioning_channels)
        # the encoder half, built as RaphaelUNet.__init__ builds it (test: same names and shapes as the U-Net's)
        self.down = nn.ModuleList()
        skip_ch, ch = [mc], mc
        levels = len(cfg.channel_mult)
        for lvl, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                layer = nn.ModuleDict({"res": ResBlock(ch, mc * mult, d_t, groups, cfg.dropout)})
                ch = mc * mult
                if i < cfg.transformer_down[lvl]:
                    layer["attn"] = SpatialTransformer(ch, cfg.d_y, d_t, cfg)
                self.down.append(layer)
                skip_ch.append(ch)
            if lvl < levels - 1:
                self.down.append(nn.ModuleDict({"downsample": Downsample(ch)}))
                skip_ch.append(ch)
        self.mid_res1 = ResBlock(ch, ch, d_t, groups, cfg.dropout)
        self.mid_attn = SpatialTransformer(ch, cfg.d_y, d_t, cfg) if cfg.transformer_mid else None
        self.mid_res2 = ResBlock(ch, ch, d_t, groups, cfg.dropout)
        # the join: zero-initialised 1x1 convolutions
        self.zero_convs = nn.ModuleList([_zero_conv(c) for c in skip_ch])
        self.mid_zero_conv = _zero_conv(ch)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(cls, unet: RaphaelUNet, *, factor: int = 1, conditioning_channels: int = 1,
                  canny: dict[str, float] | None = None) -> "RaphaelControlNet":
        """A ControlNet whose encoder copy holds ``unet``'s weights (copied, not shared); zero convs at 0."""
        if not isinstance(unet, RaphaelUNet):
            raise ValueError(f"from_unet needs a RaphaelUNet, got {type(unet).__name__}")
        net = cls(unet.cfg, factor=factor, conditioning_channels=conditioning_channels, canny=canny)
        source = unet.state_dict()
        mine = net.encoder_state_keys()
        missing = [k for k in mine if k not in source]
        if missing:
            raise ValueError(f"the U-Net lacks encoder weights {missing[:5]}: a U-Net of another layout")
        net.load_state_dict({k: source[k].detach().clone() for k in mine}, strict=False)
        p = next(unet.parameters())
        return net.to(device=p.device, dtype=p.dtype)

    def encoder_state_keys(self) -> list[str]:
        """State-dict keys of the encoder copy (the ones :meth:`from_unet` copies from the U-Net)."""
        return [k for k in self.state_dict() if not k.startswith(("cond_embed.", "zero_convs.", "mid_zero_conv."))]

    def join_parameters(self) -> list[nn.Parameter]:
        """The zero convolutions' weights and biases (the join)."""
        return [*self.zero_convs.parameters(), *self.mid_zero_conv.parameters()]

    def check_fits(self, unet: RaphaelUNet) -> None:
        """ValueError unless this ControlNet was built for ``unet``'s architecture (encoder config fields)."""
        a, b = _encoder_fields(self.base_cfg), _encoder_fields(unet.cfg)
        diff = sorted(k for k in a if a[k] != b.get(k))
        if diff:
            raise ValueError("the ControlNet does not fit this U-Net: model config differs in "
                             + ", ".join(f"{k} (ControlNet {a[k]!r}, U-Net {b.get(k)!r})" for k in diff))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_valid: torch.Tensor,
                pooled_index: torch.Tensor, control: torch.Tensor, conditioning_scale: float = 1.0) -> ControlResiduals:
        """s Z_i(c_i) for every skip and s Z_mid(c_mid), with c the copy's activations on conv_in(x_t) + E_c(control).

        x_t, t, y, y_valid, pooled_index: as :meth:`RaphaelUNet.forward`; control (B, c, f H, f W) in [0, 1]
        (the Canny map at image resolution; batch B or 1); conditioning_scale s (finite).
        """
        scale = _check_scale(conditioning_scale)
        RaphaelUNet._check_inputs(self, x, t, y, y_valid, pooled_index)  # the U-Net's own checks, on self.cfg
        B = x.shape[0]
        check_control_map(control, B, tuple(x.shape[-2:]), self.factor, self.conditioning_channels)
        if control.shape[0] != B:
            control = control.expand(B, -1, -1, -1)
        temb = self.time_embed(t)  # (B, d_t)
        fixed = None
        if self.cfg.use_time_moe and self.cfg.time_router == "intervals":
            routes, w = interval_route(t, self.cfg.n_time_experts, self.cfg.time_router_T)
            fixed = (routes, w.to(temb.dtype))

        def attn(module, h):
            return module(h, y, y_valid, pooled_index, temb, False, fixed, False, None)[0]

        h = self.conv_in(x) + self.cond_embed(control.to(x.dtype))  # (B, mc, H, W)
        feats = [h]
        for layer in self.down:
            if "downsample" in layer:
                h = layer["downsample"](h)
            else:
                h = layer["res"](h, temb)
                if "attn" in layer:
                    h = attn(layer["attn"], h)
            feats.append(h)
        h = self.mid_res1(h, temb)
        if self.mid_attn is not None:
            h = attn(self.mid_attn, h)
        h = self.mid_res2(h, temb)
        down = tuple(zc(c) * scale for zc, c in zip(self.zero_convs, feats))  # (B, C_i, H_i, W_i) each
        return ControlResiduals(down, self.mid_zero_conv(h) * scale)

    def edge_detector(self):
        """The Canny detector of this ControlNet's control maps (``edge_gt.CannyEdgeDetector``)."""
        from raphael_ref.edge_gt import CannyEdgeDetector

        return CannyEdgeDetector(**self.canny)


def _encoder_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ENCODER}


class ControlledUNet(nn.Module):
    """U-Net + ControlNet + a control map, called like the U-Net: ``model(x_t, t, y, y_valid, pooled_index, ...)``.

    ``control`` (B_c, c, f H, f W) in [0, 1]: one map per sample of the first B_c rows; a call with a batch of
    k B_c (classifier-free guidance: [conditional, unconditional]) repeats it k times, so both branches of
    CFG see the control, as ControlNet does. ``scale`` 0 calls the U-Net alone (no ControlNet forward).
    """

    def __init__(self, unet: RaphaelUNet, controlnet: RaphaelControlNet, control: torch.Tensor, scale: float = 1.0):
        super().__init__()
        controlnet.check_fits(unet)
        self.unet, self.controlnet = unet, controlnet
        self.scale = _check_scale(scale)
        if not isinstance(control, torch.Tensor) or control.ndim != 4:
            raise ValueError(f"control must be an edge map tensor (B, c, H, W), got "
                             f"{tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__}")
        self.control = control

    @property
    def cfg(self) -> ModelConfig:
        return self.unet.cfg

    def transformer_blocks(self):
        return self.unet.transformer_blocks()

    def forward(self, x, t, y, y_valid, pooled_index, return_masks: bool = False, return_probs: bool = False,
                paint=None):
        if self.scale == 0.0:
            return self.unet(x, t, y, y_valid, pooled_index, return_masks=return_masks, return_probs=return_probs,
                             paint=paint)
        B, Bc = x.shape[0], self.control.shape[0]
        if B % Bc:
            raise ValueError(f"the control map has a batch of {Bc}, the model call {B}: not a multiple")
        control = self.control.to(device=x.device, dtype=x.dtype).repeat(B // Bc, 1, 1, 1)  # (B, c, f H, f W)
        res = self.controlnet(x, t, y, y_valid, pooled_index, control, self.scale)
        return self.unet(x, t, y, y_valid, pooled_index, return_masks=return_masks, return_probs=return_probs,
                         paint=paint, control_residuals=res)


# ------------------------------------------------------------------------------ control maps


def canny_control(images: torch.Tensor, canny: dict[str, float] | None = None) -> torch.Tensor:
    """Canny control maps (B, 1, H, W) in {0, 1} of RGB images (B, 3, H, W) in [-1, 1] (``edge_gt.CannyEdgeDetector``)."""
    from raphael_ref.edge_gt import CannyEdgeDetector

    return CannyEdgeDetector(**(CANNY_DEFAULTS if canny is None else canny))(images).float()


def read_control_image(path: str | os.PathLike, kind: str = "image", canny: dict[str, float] | None = None) -> torch.Tensor:
    """A control map (1, 1, H, W) in [0, 1] from an image file: ``kind="image"`` runs Canny on it (an ordinary
    picture), ``kind="edges"`` reads it as an edge map already (grayscale / 255, white = edge)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if kind not in ("image", "edges"):
        raise ValueError(f"control image kind must be 'image' (Canny is run on it) or 'edges' (already an edge map), got {kind!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no control image {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if kind == "edges" else "RGB")
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            W, H = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"control image {path} cannot be read as an image ({type(e).__name__}: {e})") from None
    if kind == "edges":
        return (data.reshape(1, 1, H, W).float() / 255.0)
    rgb = data.reshape(1, H, W, 3).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
    return canny_control(rgb, canny)


# ------------------------------------------------------------------------------ files


def controlnet_json_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_controlnet(net: RaphaelControlNet, path: str | os.PathLike, *, base: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the ControlNet's weights to ``path`` (safetensors, SHA-256 recorded, atomic) and its config to
    ``path.json`` (atomic). ``base``: the base checkpoint (``lora.base_weights_info``); ``extra``: more JSON."""
    from raphael_ref.checkpoint import save_tensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a ControlNet file name must end in .safetensors, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"the ControlNet holds NaN or inf in {bad[:5]}: not saved")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "model": dataclasses.asdict(net.base_cfg), "factor": net.factor,
           "conditioning_channels": net.conditioning_channels, "canny": net.canny,
           "n_parameters": sum(v.numel() for v in state.values()), "base": base or {}, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(state, tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)
    jpath = controlnet_json_path(path)
    jtmp = jpath.with_name(jpath.name + ".tmp")
    jtmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(jtmp, jpath)
    return path


def load_controlnet(path: str | os.PathLike, unet: RaphaelUNet | None = None,
                    device: str | torch.device | None = None) -> RaphaelControlNet:
    """A ControlNet from :func:`save_controlnet`'s files (weights checked by SHA-256, every key and shape); with
    ``unet``, checked to fit it and moved to its device and dtype. Errors name the file and the problem."""
    from raphael_ref.checkpoint import check_state_dict, load_tensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ControlNet file {path} (tools/train_controlnet.py writes <run>/controlnet.safetensors)")
    jpath = controlnet_json_path(path)
    if not jpath.is_file():
        raise FileNotFoundError(f"no ControlNet config {jpath} beside {path.name} (save_controlnet writes both)")
    doc = json.loads(jpath.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{jpath} is not a ControlNet config (format {doc.get('format')!r}, expected {FORMAT!r})")
    cfg = RaphaelConfig.from_dict({"model": doc["model"]}).model
    net = RaphaelControlNet(cfg, factor=int(doc["factor"]), conditioning_channels=int(doc["conditioning_channels"]),
                            canny=doc.get("canny"))
    state = load_tensors(path)
    try:
        check_state_dict(net.state_dict(), state, str(path))
    except ValueError as e:
        raise ValueError(f"{path} does not fit the ControlNet its config describes: {e}") from None
    net.load_state_dict(state)
    if unet is not None:
        net.check_fits(unet)
        p = next(unet.parameters())
        net = net.to(device=p.device, dtype=p.dtype)
    elif device is not None:
        net = net.to(device)
    return net.eval()
