"""Start RAPHAEL from Stable Diffusion weights ("sparse upcycling", issue 13 item 3; erratum E76).

    python tools/convert_sd.py SD_UNET_FOLDER OUT_FOLDER [--preset paper] [--set model.n_space_experts=6 ...]

SD_UNET_FOLDER is a local diffusers ``UNet2DConditionModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``; e.g. the ``unet/`` folder of a Stable Diffusion 1.x or 2.x
release). Nothing is downloaded. When the release's ``scheduler/scheduler_config.json`` sits beside it,
it is checked: Stable Diffusion's scaled_linear betas (RAPHAEL's ``diffusion.schedule`` default) and the
prediction type. A v-prediction release (SD 2.x 768 px, ``stable-diffusion-2-1``) is converted with
``model.prediction = "v"`` (erratum E88): the U-Net's last layer then outputs SD's v and the converted model returns
the eps it implies, which RAPHAEL's loss and samplers read. OUT_FOLDER receives a RAPHAEL model checkpoint as
``raphael_ref.checkpoint.save_model`` writes it (``config.json``, ``model.safetensors``, and the same
weights as ``ema.safetensors``, which tools/sample.py reads), plus ``convert_sd.json`` (the source, its
SHA-256 and the mapping decisions). ``checkpoint.load_model(OUT_FOLDER)`` builds the converted U-Net.

What the converted U-Net is (tests/test_convert_sd.py: its eps equals diffusers' ``.sample`` on a tiny
random SD 1.x and SD 2.x layout, eval mode, float32): Stable Diffusion's U-Net, exactly, at step 0.

* Every ResBlock, down/up sampler, conv_in, the time-embedding MLP, norm_out / conv_out, and every
  transformer's GroupNorm, proj_in, proj_out, self-attention (to_q/to_k/to_v stacked into the fused
  ``qkv``), cross-attention and the LayerNorms norm1 / norm2 / norm3 are copied. SD 1.x's 1x1-conv
  ``proj_in``/``proj_out`` become linear maps (the same function on each position); SD 2.x's
  (``use_linear_projection``) are copied as they are. RAPHAEL's ``norm3`` (before the time-MoE) takes
  SD's norm3 (before its FFN).
* Time-MoE: SD's one FFN (GEGLU: Linear(d, 8d) -> a * GELU(g) -> Linear(4d, d)) is copied into every
  time expert (``model.expert_act = "geglu"``, ``model.expert_mult = 4``). Whatever the (fresh)
  time gate routes a sample to, the time-MoE computes the FFN: the route's weight is exactly 1 in
  value (straight-through gate mode, the default) and all experts are equal.
* Space-MoE: zero-initialised. Every space expert gets the FFN's first projection (w1, b1) and a zero
  second projection (w2 = 0, b2 = 0), so each expert's output, e(x) = 0 W2 + 0, is exactly zero at
  step 0 whatever its input, and so is the masked mean over text tokens; norm4 is left at its
  default (weight 1, bias 0). Why not the other way round (FFN into the space experts, time-MoE
  zeroed): the space-MoE output is (1/n_y) sum_i e(h o Mhat_i), a mean over text tokens of the
  expert applied to *masked* inputs; at a position covered by c of the 77 masks it is
  (c/77) e(h) + (1 - c/77) e(0), not e(h), so no copy of the FFN makes it reproduce SD, while the
  time-MoE (one expert per sample on all positions) is the FFN exactly. The zero W2 is
  ControlNet's zero convolution / LoRA's zero B: its gradient is not zero (it is the masked-mean
  of a(h) times the upstream gradient), so the space experts start learning at once, and they differ
  from each other as soon as the text gate sends different tokens to them.
* Gates (time G', text G), norm4 and the edge heads P_theta have no SD counterpart and keep the fresh
  initialisation of ``RaphaelUNet(cfg)`` under ``--seed`` (the edge heads only produce the auxiliary
  edge logits, never eps; the gates' routes do not change eps at step 0, see above).
* Numerics that must match and how they are matched: the timestep embedding (diffusers
  ``flip_sin_to_cos=True, freq_shift=0`` = RAPHAEL's [cos, sin] with frequencies exp(-ln(1e4) k / half);
  other values are refused); ResBlock / norm_out GroupNorm and the LayerNorms eps 1e-5
  (``norm_eps``; other values refused); the transformer GroupNorm eps 1e-6 (``model.transformer_norm_eps``);
  attention heads: SD 1.x has 8 heads at every width (``model.num_heads = 8``), SD 2.x a head width of 64
  (``model.head_dim = 64``; diffusers' ``attention_head_dim`` is a head *count* per level); the scale
  1/sqrt(head width) is SDPA's default on both sides; cross-attention over all 77 tokens
  (``model.attend_padding = true``); no position embedding (``model.pos_embed = "none"``); the skip
  concatenation order [h, skip], nearest x2 upsampling then a 3x3 conv, stride-2 3x3 downsampling, the
  mid block res -> transformer -> res. The configuration options without a RAPHAEL counterpart (class or
  addition embeddings, scale-shift ResBlocks, several transformer layers per block, dual or only cross
  attention, other block types, ...) are refused with the option's name.

Text towers (not converted here): the U-Net's cross-attention expects SD's text features. SD 2.x:
OpenCLIP ViT-H-14 (LAION-2B), penultimate layer then ln_final, d_y 1024: ``model.text_encoder =
"ViT-H-14"``, ``model.text_layer = "penultimate"`` with ``model.text_encoder_weights`` the local open_clip
checkpoint (``open_clip_pytorch_model.bin`` of laion/CLIP-ViT-H-14-laion2B-s32B-b79K), read by
``raphael_ref.text_encoder`` (SD 2.x's diffusers ``text_encoder/`` folder is a transformers CLIPTextModel,
which that module does not read). SD 1.x: OpenAI CLIP ViT-L/14, last layer, d_y 768: ``model.text_encoder =
"ViT-L-14-quickgelu"``, ``text_layer = "last"``, weights from the OpenAI ViT-L/14 checkpoint in open_clip
form; note that SD 1.x's tokenizer pads with the end-of-text token where open_clip pads with 0, so the
padding slots' features differ from SD 1.x's (fine-tuning adapts; SD 2.x pads with 0 as open_clip does).
The converter writes these names for d_y 768 / 1024 (others: ``--set model.text_encoder=...``); the
weights path is set with ``--set model.text_encoder_weights=FILE`` (or at training time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/convert_sd.py` from anywhere
    sys.path.insert(0, str(ROOT))

from raphael_ref.checkpoint import save_model  # noqa: E402
from raphael_ref.config import RaphaelConfig, get_preset, load_config, parse_assignments  # noqa: E402
from raphael_ref.edge import EdgePredictor  # noqa: E402
from raphael_ref.gates import GateFFN  # noqa: E402
from raphael_ref.models import TransformerBlock, build_on_meta  # noqa: E402
from raphael_ref.unet_parts import LayerNorm32  # noqa: E402

SD_CONFIG = "config.json"
SD_WEIGHTS = "diffusion_pytorch_model.safetensors"
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has transformers
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPE = "UNetMidBlock2DCrossAttn"
# diffusers UNet2DConditionModel options and the values RAPHAEL can express (the first: diffusers' default when
# the key is absent; a list value counts when all its entries are accepted, e.g. only_cross_attention per level)
REQUIRED = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "only_cross_attention": (False,),
    "downsample_padding": (1,), "mid_block_scale_factor": (1,), "act_fn": ("silu",), "norm_eps": (1e-5,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
}
# RAPHAEL fields the converter sets from the SD config: --set may not change them (eps would no longer be SD's)
DERIVED = ("in_channels", "sample_size", "model_channels", "channel_mult", "num_res_blocks", "transformer_down",
           "transformer_mid", "transformer_up", "head_dim", "num_heads", "norm_groups", "transformer_norm_eps",
           "d_y", "expert_mult", "expert_act", "attend_padding", "pos_embed", "prediction")
# diffusers' prediction_type -> model.prediction (E88); "sample" (x_0) has no RAPHAEL counterpart
SD_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
# text towers of the Stable Diffusion releases, by d_y (the U-Net's cross_attention_dim)
TEXT_TOWERS = {768: ("ViT-L-14-quickgelu", "last"), 1024: ("ViT-H-14", "penultimate")}


class ConversionError(ValueError):
    """The diffusers U-Net uses something RAPHAEL's U-Net cannot express, or its files are missing or damaged."""


# ---------------------------------------------------------------------------------------------- config

def _levels(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConversionError(f"SD config {name} = {value} needs one entry per level ({n})")
        return list(value)
    return [value] * n


def raphael_config(sd: Mapping[str, Any], base: RaphaelConfig | None = None) -> RaphaelConfig:
    """The RaphaelConfig whose U-Net computes the diffusers U-Net of config ``sd`` (``base``: other fields)."""
    cls = sd.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ConversionError(f"SD config _class_name {cls!r}: only a diffusers UNet2DConditionModel converts")
    def accepted(got: Any, ok: tuple) -> bool:
        if isinstance(got, (list, tuple)):
            return len(got) > 0 and all(accepted(g, ok) for g in got)
        return any(got is w if w is None or isinstance(w, bool) else
                   (isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(got, w))
                   if isinstance(w, (int, float)) else got == w for w in ok)

    for key, ok in REQUIRED.items():
        got = sd.get(key, ok[0])
        if not accepted(got, ok):
            raise ConversionError(f"SD config {key} = {got!r} is not supported (RAPHAEL's U-Net computes "
                                  f"{' or '.join(repr(w) for w in ok)}; see tools/convert_sd.py)")
    down, up = list(sd["down_block_types"]), list(sd["up_block_types"])
    levels = len(down)
    bad = [t for t in down if t not in DOWN_TYPES] + [t for t in up if t not in UP_TYPES]
    if bad:
        raise ConversionError(f"SD block types {bad} are not supported: down blocks must be one of {list(DOWN_TYPES)}, "
                              f"up blocks one of {list(UP_TYPES)}")
    if len(up) != levels:
        raise ConversionError(f"SD config has {levels} down blocks and {len(up)} up blocks; RAPHAEL's U-Net mirrors them")
    if sd.get("mid_block_type", MID_TYPE) != MID_TYPE:
        raise ConversionError(f"SD mid_block_type {sd.get('mid_block_type')!r} is not supported (only {MID_TYPE})")
    tl = _levels(sd.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(n != 1 for n in tl):
        raise ConversionError(f"SD transformer_layers_per_block = {sd['transformer_layers_per_block']}: RAPHAEL has one "
                              "transformer block per spatial transformer")
    lpb = _levels(sd.get("layers_per_block", 2), levels, "layers_per_block")
    if len(set(lpb)) != 1:
        raise ConversionError(f"SD layers_per_block = {sd['layers_per_block']}: RAPHAEL uses one count for all levels")
    nrb = int(lpb[0])
    widths = [int(c) for c in sd["block_out_channels"]]
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ConversionError(f"SD block_out_channels {widths} must be multiples of the first ({mc}): RAPHAEL's "
                              "widths are model_channels * channel_mult")
    if sd.get("in_channels", 4) != sd.get("out_channels", 4):
        raise ConversionError(f"SD in_channels {sd.get('in_channels')} != out_channels {sd.get('out_channels')}: "
                              "RAPHAEL predicts eps of the input's shape")
    if sd.get("time_embedding_dim") not in (None, 4 * mc):
        raise ConversionError(f"SD time_embedding_dim {sd['time_embedding_dim']} is not 4 x {mc} (RAPHAEL's d_t)")
    if float(sd.get("dropout", 0.0)) != 0.0:
        raise ConversionError(f"SD dropout {sd['dropout']}: only 0 is supported (the FFN dropout has no RAPHAEL place)")
    # heads: diffusers reads attention_head_dim as the head *count* of each level (mid: the last; up: reversed)
    heads = [int(h) for h in _levels(sd.get("attention_head_dim", 8), levels, "attention_head_dim")]
    used = [lvl for lvl in range(levels) if DOWN_TYPES[down[lvl]] or UP_TYPES[up[levels - 1 - lvl]]]
    pairs = {(widths[lvl], heads[lvl]) for lvl in used} | {(widths[-1], heads[-1])}
    if any(w % h for w, h in pairs):
        raise ConversionError(f"SD attention heads {heads} do not divide the widths {widths}")
    head_dims, counts = {w // h for w, h in pairs}, {h for _, h in pairs}
    base = get_preset("paper") if base is None else base
    cfg = load_config(base=base)  # a validated copy
    m = cfg.model
    if len(head_dims) == 1:
        m.head_dim, m.num_heads = head_dims.pop(), None
    elif len(counts) == 1:
        m.num_heads = counts.pop()
    else:
        raise ConversionError(f"SD attention heads {heads} at widths {widths} have neither one head width nor one "
                              "head count: RAPHAEL's model.head_dim / model.num_heads cannot express them")
    m.in_channels, m.sample_size = int(sd.get("in_channels", 4)), int(sd.get("sample_size", 64))
    m.model_channels, m.channel_mult, m.num_res_blocks = mc, tuple(w // mc for w in widths), nrb
    m.transformer_down = tuple(nrb if DOWN_TYPES[t] else 0 for t in down)
    m.transformer_up = tuple(nrb + 1 if UP_TYPES[t] else 0 for t in up)
    m.transformer_mid = 1
    m.norm_groups = int(sd.get("norm_num_groups", 32))
    m.transformer_norm_eps = 1e-6  # diffusers' Transformer2DModel GroupNorm
    m.d_y = int(sd["cross_attention_dim"])
    m.expert_act, m.expert_mult = "geglu", 4  # BasicTransformerBlock's FeedForward: GEGLU, inner width 4 d
    m.dropout = 0.0
    m.attend_padding, m.pos_embed = True, "none"
    if m.d_y in TEXT_TOWERS:
        m.text_encoder, m.text_layer = TEXT_TOWERS[m.d_y]
        m.text_encoder_weights = None
    return cfg.validate()


# ---------------------------------------------------------------------------------------------- weights

def _linear(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight (C_out, C_in, 1, 1) as a linear weight (C_out, C_in); a linear weight as it is."""
    return w[:, :, 0, 0] if w.ndim == 4 else w


def _module_map(cfg: RaphaelConfig) -> list[tuple[str, str, str]]:
    """(kind, SD prefix, RAPHAEL prefix) for every module with SD weights, in forward order."""
    m = cfg.model
    levels, nrb = len(m.channel_mult), m.num_res_blocks
    out = [("linear", "time_embedding.linear_1", "time_embed.net.0"),
           ("linear", "time_embedding.linear_2", "time_embed.net.2"), ("plain", "conv_in", "conv_in")]
    idx = 0
    for lvl in range(levels):
        for i in range(nrb):
            out.append(("res", f"down_blocks.{lvl}.resnets.{i}", f"down.{idx}.res"))
            if i < m.transformer_down[lvl]:
                out.append(("attn", f"down_blocks.{lvl}.attentions.{i}", f"down.{idx}.attn"))
            idx += 1
        if lvl < levels - 1:
            out.append(("plain", f"down_blocks.{lvl}.downsamplers.0.conv", f"down.{idx}.downsample.conv"))
            idx += 1
    out += [("res", "mid_block.resnets.0", "mid_res1"), ("attn", "mid_block.attentions.0", "mid_attn"),
            ("res", "mid_block.resnets.1", "mid_res2")]
    idx = 0
    for j in range(levels):
        for i in range(nrb + 1):
            out.append(("res", f"up_blocks.{j}.resnets.{i}", f"up.{idx}.res"))
            if i < m.transformer_up[j]:
                out.append(("attn", f"up_blocks.{j}.attentions.{i}", f"up.{idx}.attn"))
            if j < levels - 1 and i == nrb:
                out.append(("plain", f"up_blocks.{j}.upsamplers.0.conv", f"up.{idx}.upsample.conv"))
            idx += 1
    out += [("plain", "conv_norm_out", "norm_out"), ("plain", "conv_out", "conv_out")]
    return out


def convert_state_dict(cfg: RaphaelConfig, sd_state: Mapping[str, torch.Tensor], *, seed: int = 0
                       ) -> dict[str, torch.Tensor]:
    """RAPHAEL's state dict (float32) for ``cfg`` (from :func:`raphael_config`) holding the SD weights ``sd_state``.

    Gates, norm4 and the edge heads are built afresh (their modules' own initialisation) under
    ``torch.manual_seed(seed)``; the rest of the U-Net is built on the meta device only, for its keys and
    shapes. Every SD tensor must be used exactly once and every RAPHAEL tensor must be written or be one of
    the fresh ones; shapes are checked. Raises :class:`ConversionError` otherwise.
    """
    m = cfg.model
    model = build_on_meta(m)  # keys and shapes only
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, block in model.named_modules():
            if not isinstance(block, TransformerBlock):
                continue
            width = block.norm1.normalized_shape[0]
            parts = {"norm4": LayerNorm32(width)}
            for gate in ("time_gate", "text_gate"):
                g = getattr(block, gate, None)
                if g is not None:
                    parts[gate] = GateFFN(g.d_in, g.n_experts, hidden=g.hidden)
            if block.edge is not None:
                parts["edge"] = EdgePredictor(m.edge_layers, m.edge_width)
            for part, module in parts.items():
                fresh.update({f"{name}.{part}.{k}": v.detach() for k, v in module.state_dict().items()})
    src = {k: v.detach().to(torch.float32) for k, v in sd_state.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise ConversionError(f"SD weights lack {key} (the config promises it): a damaged or different file")
        used.add(key)
        return src[key]

    def put(key: str, value: torch.Tensor) -> None:
        if key not in shapes or key in fresh:
            raise ConversionError(f"internal mapping error: RAPHAEL has no SD-initialised {key}")
        if shapes[key] != tuple(value.shape):
            raise ConversionError(f"{key}: SD gives shape {tuple(value.shape)}, RAPHAEL's config needs {shapes[key]}")
        out[key] = value.contiguous()

    def copy(s: str, r: str, names: tuple[str, ...] = ("weight", "bias"), linear: bool = False) -> None:
        for n in names:
            v = take(f"{s}.{n}")
            put(f"{r}.{n}", _linear(v) if linear and n == "weight" else v)

    # (bank, experts, zero last projection): the FFN into every time expert; the space experts output zero
    banks = (("time_experts", m.n_time_experts) if m.use_time_moe else ("time_ffn", 1)) + (False,), \
        (("space_experts", m.n_space_experts) if m.use_space_moe else ("space_ffn", 1)) + (True,)
    for kind, s, r in _module_map(cfg):
        if kind in ("plain", "linear"):
            copy(s, r)
        elif kind == "res":
            for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "emb"), ("norm2", "norm2"),
                         ("conv2", "conv2")):
                copy(f"{s}.{a}", f"{r}.{b}")
            if f"{s}.conv_shortcut.weight" in src:
                copy(f"{s}.conv_shortcut", f"{r}.skip")
        else:  # Transformer2DModel -> SpatialTransformer
            copy(f"{s}.norm", f"{r}.norm")
            copy(f"{s}.proj_in", f"{r}.proj_in", linear=True)
            copy(f"{s}.proj_out", f"{r}.proj_out", linear=True)
            t, b = f"{s}.transformer_blocks.0", f"{r}.block"
            for n in ("norm1", "norm2", "norm3"):
                copy(f"{t}.{n}", f"{b}.{n}")
            put(f"{b}.self_attn.qkv.weight", torch.cat([take(f"{t}.attn1.to_{x}.weight") for x in "qkv"], dim=0))
            copy(f"{t}.attn1.to_out.0", f"{b}.self_attn.out")
            for x in "qkv":
                copy(f"{t}.attn2.to_{x}", f"{b}.to_{x}", names=("weight",))
            copy(f"{t}.attn2.to_out.0", f"{b}.to_out")
            w1, b1 = take(f"{t}.ff.net.0.proj.weight").T, take(f"{t}.ff.net.0.proj.bias")  # (d, 2h), (2h,)
            w2, b2 = take(f"{t}.ff.net.2.weight").T, take(f"{t}.ff.net.2.bias")  # (h, d), (d,)
            for bank, n, zero in banks:
                put(f"{b}.{bank}.w1", w1.expand(n, *w1.shape).clone())
                put(f"{b}.{bank}.b1", b1.expand(n, *b1.shape).clone())
                put(f"{b}.{bank}.w2", torch.zeros(n, *w2.shape) if zero else w2.expand(n, *w2.shape).clone())
                put(f"{b}.{bank}.b2", torch.zeros(n, *b2.shape) if zero else b2.expand(n, *b2.shape).clone())
    left = sorted(set(src) - used)
    if left:
        raise ConversionError(f"{len(left)} SD tensors have no place in the converted U-Net (e.g. {left[:5]}): the "
                              "file holds modules its config does not describe")
    out.update(fresh)
    if set(out) != set(shapes) or any(tuple(out[k].shape) != shapes[k] for k in shapes):
        raise ConversionError(f"internal mapping error: RAPHAEL keys without a weight {sorted(set(shapes) - set(out))[:5]}, "
                              f"extra {sorted(set(out) - set(shapes))[:5]}")
    return {k: out[k] for k in shapes}


# ---------------------------------------------------------------------------------------------- files

def read_sd_unet(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config, state dict, SHA-256 of the weights file) of a diffusers UNet2DConditionModel folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder: pass a local diffusers UNet2DConditionModel folder "
                              f"({SD_CONFIG} + {SD_WEIGHTS}, e.g. the unet/ folder of a Stable Diffusion release)")
    missing = [n for n in (SD_CONFIG, SD_WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise ConversionError(f"{folder} lacks {missing}: a diffusers UNet2DConditionModel folder holds {SD_CONFIG} "
                              f"and {SD_WEIGHTS} (save_pretrained with safe_serialization=True; nothing is downloaded)")
    try:
        sd_cfg = json.loads((folder / SD_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{folder / SD_CONFIG} is not valid JSON ({e})") from None
    h = hashlib.sha256()
    with open(folder / SD_WEIGHTS, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    try:
        state = load_file(str(folder / SD_WEIGHTS))
    except Exception as e:  # SafetensorError, OSError
        raise ConversionError(f"{folder / SD_WEIGHTS} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    return sd_cfg, state, h.hexdigest()


def check_scheduler(sd_folder: str | Path, allow_v_prediction: bool = False) -> dict[str, Any] | None:
    """The release's ``../scheduler/scheduler_config.json`` beside the U-Net folder, when there is one, checked
    against what RAPHAEL trains and samples: the scaled_linear betas 0.00085..0.012 over T steps
    (``diffusion.schedule``) and a prediction type RAPHAEL's U-Net can hold: "epsilon", or "v_prediction"
    (SD 2.x at 768 px), converted with ``model.prediction = "v"`` (E88). ``allow_v_prediction`` is obsolete
    (v releases convert exactly now) and ignored."""
    path = Path(sd_folder).parent / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        sched = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    pred = sched.get("prediction_type", "epsilon")
    if pred not in SD_PREDICTIONS:
        raise ConversionError(f"{path}: prediction_type {pred!r}; RAPHAEL's U-Net outputs eps or v "
                              f"(model.prediction), so only {sorted(SD_PREDICTIONS)} releases convert")
    kind, b0, b1 = sched.get("beta_schedule", "scaled_linear"), sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012)
    if kind != "scaled_linear" or not (math.isclose(b0, 0.00085) and math.isclose(b1, 0.012)):
        raise ConversionError(f"{path}: betas {kind} {b0}..{b1}; RAPHAEL's diffusion.schedule 'scaled_linear' is "
                              "0.00085..0.012 (Stable Diffusion's)")
    return sched


def convert(sd_folder: str | Path, out: str | Path, *, preset: str = "paper", overrides: Mapping[str, Any] | None = None,
            seed: int = 0, allow_v_prediction: bool = False) -> tuple[Path, RaphaelConfig]:
    """Convert ``sd_folder`` and write the checkpoint folder ``out``; returns (out, config)."""
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if k.startswith("model.") and k.split(".", 1)[1] in DERIVED)
    if fixed:
        raise ConversionError(f"--set {fixed}: these fields are set from the SD config (the converted U-Net would "
                              "no longer compute SD's); change them after conversion only by retraining")
    sd_cfg, state, digest = read_sd_unet(sd_folder)
    sched = check_scheduler(sd_folder, allow_v_prediction)
    cfg = raphael_config(sd_cfg, load_config(preset))
    cfg.diffusion.schedule, cfg.diffusion.zero_terminal_snr = "scaled_linear", False
    if sched is not None:
        cfg.diffusion.T = int(sched.get("num_train_timesteps", cfg.diffusion.T))
    # what SD's last layer outputs; without a scheduler file, eps (the U-Net's own config does not say)
    cfg.model.prediction = SD_PREDICTIONS[(sched or {}).get("prediction_type", "epsilon")]
    cfg = load_config(base=cfg, overrides=overrides)
    weights = convert_state_dict(cfg, state, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    holder = _StateHolder(weights)
    save_model(out, holder, cfg)
    save_model(out, holder, cfg, weights_name="ema.safetensors")
    (out / "convert_sd.json").write_text(json.dumps({
        "source": str(Path(sd_folder).resolve()), "source_sha256": digest, "seed": seed, "preset": preset,
        "overrides": {k: str(v) for k, v in overrides.items()}, "sd_config": sd_cfg, "sd_scheduler": sched,
        "mapping": "tools/convert_sd.py docstring; spec/errata.md E76: FFN -> every time expert; space experts "
                   "w1/b1 = FFN, w2/b2 = 0; gates, norm4, edge heads fresh",
    }, indent=1, sort_keys=True, default=str) + "\n")
    return out, cfg


class _StateHolder(torch.nn.Module):
    """A plain state dict with the ``state_dict()`` that ``checkpoint.save_model`` reads."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return self._state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sd_unet", type=Path, help="local diffusers UNet2DConditionModel folder (config.json + "
                                              "diffusion_pytorch_model.safetensors)")
    p.add_argument("out", type=Path, help="output checkpoint folder (config.json, model.safetensors, ema.safetensors)")
    p.add_argument("--preset", default="paper", help="preset for every field not derived from SD (default: paper)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field not derived from SD (e.g. model.n_space_experts=6, "
                        "model.text_encoder_weights=FILE); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh gates, norm4 and edge heads")
    p.add_argument("--allow-v-prediction", action="store_true",
                   help="obsolete, ignored: a v-prediction release is converted with model.prediction=v (E88)")
    args = p.parse_args(argv)
    try:
        out, cfg = convert(args.sd_unet, args.out, preset=args.preset, overrides=parse_assignments(args.set),
                           seed=args.seed, allow_v_prediction=args.allow_v_prediction)
    except (ConversionError, ValueError) as e:
        print(f"convert_sd: {e}", file=sys.stderr)
        return 2
    m = cfg.model
    heads = f"{m.num_heads} heads" if m.num_heads is not None else f"head width {m.head_dim}"
    print(f"converted {args.sd_unet} -> {out}: widths {[m.model_channels * c for c in m.channel_mult]}, {heads}, "
          f"d_y {m.d_y}, {cfg.n_transformer_blocks} transformer blocks, {m.n_time_experts} time experts (= SD's FFN), "
          f"{m.n_space_experts} space experts (zero output), text tower {m.text_encoder} ({m.text_layer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
