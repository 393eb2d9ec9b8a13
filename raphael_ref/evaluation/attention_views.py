"""Attention views over generated images (RAPHAEL Sec. 3.1 Fig. 3b/4, App. 7.2 Fig. 7a, App. 7.5 Fig. 11).

Two pictures per generated image, written as PNG:

* per-token masks: for a chosen transformer block and sampling step, the binary mask
  Mhat_i (Sec. 3.1, ``M[j, i] >= alpha max_j M[j, i]``) of every real text token i, upsampled
  to the image and laid over it, labelled with the token and the space expert it was routed to;
* the pooled-token map: the cross-attention column of the pooled (end-of-text) token, the map
  that edge supervision reads (Sec. 3.2; Fig. 7a), as a heat map next to the image.

``sampling.sample`` keeps routes and masks but not the pooled map, so :func:`collect_attention`
runs ``sample`` with forward hooks on the transformer blocks and keeps, for the steps asked for,
each block's pooled map, masks and routes (conditional branch only). Views can also be drawn from
``DiffusionPaths.masks`` (``sample(..., collect_paths=True, collect_masks=True)``) with
:func:`token_masks_figure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from raphael_ref.models import RaphaelUNet, TransformerBlock
from raphael_ref.sampling import sample

__all__ = [
    "AttentionRecord",
    "collect_attention",
    "default_view_block",
    "heat_colors",
    "middle_step",
    "pooled_map_figure",
    "record_attention",
    "token_labels",
    "token_masks_figure",
    "write_attention_views",
]

# Anchors of a black -> red -> yellow -> white heat ramp (no plotting library needed).
_HEAT = torch.tensor([[0, 0, 0], [180, 0, 0], [255, 160, 0], [255, 255, 255]], dtype=torch.float32)


@dataclasses.dataclass
class AttentionRecord:
    """What the hooks kept, per recorded step s (index into the sampler's steps) and block k.

    timesteps: {s: model timestep t}; grids: (h, w) per block.
    pooled:    {s: [(B, h, w) float32 per block]}: attention column of the pooled token.
    masks:     {s: [(B, n_x, n_y) bool per block]} (empty lists where the block has no space-MoE).
    routes:    {s: [(B, n_y) long or None per block]}: space expert of each text token.
    """

    timesteps: dict[int, int] = dataclasses.field(default_factory=dict)
    grids: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    pooled: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    masks: dict[int, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    routes: dict[int, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def record_attention(model: RaphaelUNet, steps: Sequence[int] | None, n_cond: int) -> Iterator[AttentionRecord]:
    """Hooks that record each transformer block's pooled map, masks and routes during ``sample``.

    steps: indices of the model calls (0 = first sampling step) to keep; ``None`` keeps all.
    n_cond: batch rows of the conditional branch (``sample`` puts them first under CFG).
    """
    rec = AttentionRecord()
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    state = {"call": -1, "block": 0, "skip": False}
    keep = None if steps is None else set(steps)

    def on_unet(module, args, kwargs):
        # a call that asks for the maps with gradient is Attend-and-Excite's update (raphael_ref/excite.py, E84),
        # not a sampler step: it is neither counted nor recorded
        state["skip"] = bool(kwargs.get("return_maps", False))
        if state["skip"]:
            return
        state["call"] += 1
        state["block"] = 0
        if keep is None or state["call"] in keep:
            rec.timesteps[state["call"]] = int(args[1][0])

    def on_block(module, args, output):
        if state["skip"]:
            return
        s, k = state["call"], state["block"]
        state["block"] += 1
        if s == 0:
            rec.grids.append(tuple(args[1]))
        if keep is not None and s not in keep:
            return
        s_routes, _, pooled, _, masks = output[1]
        rec.pooled.setdefault(s, []).append(pooled[:n_cond, 0].detach().float().cpu())  # (B, h, w)
        rec.masks.setdefault(s, []).append(None if masks is None else masks[:n_cond].cpu())
        rec.routes.setdefault(s, []).append(None if s_routes is None else s_routes[:n_cond].cpu())

    handles = [model.register_forward_pre_hook(on_unet, with_kwargs=True)]
    handles += [b.register_forward_hook(on_block) for b in blocks]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def collect_attention(model: RaphaelUNet, schedule, cond, uncond, *, shape: tuple[int, ...],
                      record_steps: Sequence[int] | None = None, **sample_kwargs) -> tuple[torch.Tensor, AttentionRecord]:
    """``sample(...)`` with masks on, recording attention at ``record_steps`` (sampler step indices).

    Returns ``(x_0, record)``; ``sample_kwargs`` go to :func:`raphael_ref.sampling.sample`.
    """
    with record_attention(model, record_steps, shape[0]) as rec:
        x0, _ = sample(model, schedule, cond, uncond, shape=shape, collect_masks=True, **sample_kwargs)
    if not rec.pooled:
        raise ValueError(f"no step recorded: record_steps {list(record_steps or [])} lie outside the "
                         f"{sample_kwargs.get('steps', 50)} sampler steps")
    return x0, rec


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (...,) -> uint8 RGB (..., 3) on a black-red-yellow-white ramp."""
    v = values.float().clamp(0, 1) * (len(_HEAT) - 1)
    lo = v.floor().long().clamp(max=len(_HEAT) - 2)
    frac = (v - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).round().to(torch.uint8)


def token_labels(ids: torch.Tensor) -> list[str]:
    """Readable labels of CLIP token ids (n_y,): "<sot>", words without the "</w>" marker, "<eot>"."""
    from raphael_ref.text_encoder import clip_tokenizer

    tok = clip_tokenizer()
    names = []
    for i in ids.tolist():
        if i == tok.sot_token_id:
            names.append("<sot>")
        elif i == tok.eot_token_id:
            names.append("<eot>")
        else:
            names.append(tok.decoder.get(int(i), "?").replace("</w>", ""))
    return names


def _upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) -> (size, size) by nearest neighbour (keeps each token's cell visible)."""
    return F.interpolate(grid_map[None, None].float(), size=(size, size), mode="nearest")[0, 0]


def _tile(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (3, S, S) -> (S*scale, S*scale, 3) uint8, nearest upsampling."""
    return image.permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def _label_strip(width: int, text: str, height: int = 12):
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 0), text, fill=(0, 0, 0))
    return strip


def _row(tiles: Sequence[torch.Tensor], labels: Sequence[str], pad: int = 2):
    from PIL import Image

    w = tiles[0].shape[1]
    h = tiles[0].shape[0] + 12
    canvas = Image.new("RGB", (len(tiles) * (w + pad) - pad, h), (255, 255, 255))
    for k, (t, lab) in enumerate(zip(tiles, labels)):
        canvas.paste(_label_strip(w, lab), (k * (w + pad), 0))
        canvas.paste(Image.fromarray(t.numpy()), (k * (w + pad), 12))
    return canvas


def token_masks_figure(image: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], labels: Sequence[str],
                       routes: torch.Tensor | None = None, scale: int = 4):
    """RAPHAEL Sec. 3.1 / Fig. 3b: the image, then the mask Mhat_i of each labelled token over it (PIL image).

    image: uint8 (3, S, S); masks: (n_x, n_y) bool of one sample with n_x = h * w; labels: one per
    token to draw (the first ``len(labels)`` tokens); routes: (n_y,) expert of each token, or None.
    Inside a mask the image shows as is; outside it is dimmed to a quarter.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3, S, S); got {image.dtype} {tuple(image.shape)}")
    h, w = grid
    if masks.ndim != 2 or masks.shape[0] != h * w or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (n_x = {h}*{w}, n_y); got {masks.dtype} {tuple(masks.shape)}")
    if len(labels) > masks.shape[1]:
        raise ValueError(f"{len(labels)} labels for {masks.shape[1]} tokens")
    S = image.shape[-1]
    base = _tile(image, scale).float()  # (S*scale, S*scale, 3)
    tiles, names = [base.to(torch.uint8)], ["image"]
    for i, lab in enumerate(labels):
        m = _upsample(masks[:, i].reshape(h, w), S * scale)[..., None]  # (S*scale, S*scale, 1)
        tiles.append((base * (0.25 + 0.75 * m)).round().to(torch.uint8))
        names.append(lab if routes is None else f"{lab}:{int(routes[i])}")
    return _row(tiles, names)


def pooled_map_figure(image: torch.Tensor, pooled: torch.Tensor, scale: int = 4):
    """RAPHAEL App. 7.2 / Fig. 7a: image, pooled-token attention map (max-normalised heat), overlay."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3, S, S); got {image.dtype} {tuple(image.shape)}")
    if pooled.ndim != 2:
        raise ValueError(f"pooled must be one map (h, w); got {tuple(pooled.shape)}")
    S = image.shape[-1]
    m = pooled.float() / pooled.float().max().clamp_min(1e-12)  # (h, w) in [0, 1]
    heat = heat_colors(F.interpolate(m[None, None], size=(S * scale, S * scale), mode="bilinear",
                                     align_corners=False)[0, 0])  # (S*scale, S*scale, 3)
    base = _tile(image, scale)
    overlay = (0.5 * base.float() + 0.5 * heat.float()).round().to(torch.uint8)
    return _row([base, heat, overlay], ["image", "pooled map", "overlay"])


def write_attention_views(out_dir: str | Path, images: torch.Tensor, record: AttentionRecord, ids: torch.Tensor,
                          valid: torch.Tensor, *, step: int, block: int, names: Sequence[str] | None = None,
                          scale: int = 4) -> list[Path]:
    """Write ``{name}_masks_s{step}_b{block}.png`` and ``{name}_pooled_s{step}_b{block}.png`` per image.

    images: uint8 (B, 3, S, S); ids, valid: (B, n_y) token ids and real-token mask of the prompts.
    """
    if step not in record.pooled:
        raise ValueError(f"step {step} was not recorded; recorded steps: {sorted(record.pooled)}")
    if not 0 <= block < len(record.grids):
        raise ValueError(f"block must lie in [0, {len(record.grids)}); got {block}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    B = images.shape[0]
    names = list(names) if names is not None else [f"{b:03d}" for b in range(B)]
    masks, routes, pooled = record.masks[step][block], record.routes[step][block], record.pooled[step][block]
    written = []
    for b in range(B):
        n_real = int(valid[b].sum())
        if masks is not None:
            fig = token_masks_figure(images[b], masks[b], record.grids[block], token_labels(ids[b, :n_real]),
                                     None if routes is None else routes[b], scale)
            p = out / f"{names[b]}_masks_s{step}_b{block}.png"
            fig.save(p)
            written.append(p)
        p = out / f"{names[b]}_pooled_s{step}_b{block}.png"
        pooled_map_figure(images[b], pooled[b], scale).save(p)
        written.append(p)
    return written


def default_view_block(record: AttentionRecord) -> int:
    """The first block with the finest grid (largest h * w): its masks show the most detail."""
    sizes = [h * w for h, w in record.grids]
    return sizes.index(max(sizes)) if sizes else 0


def middle_step(n_steps: int) -> int:
    """Index of the middle sampler step (a mid-noise timestep, where maps are already sharp)."""
    return max(0, math.ceil(n_steps / 2) - 1)
