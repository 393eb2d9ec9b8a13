"""A programmatic object detector for the synthetic shapes domain (evaluation; not in the paper).

RAPHAEL Sec. 4 measures text-image alignment with human raters (ViLG-300) and the CLIP score. On the
synthetic domain of :mod:`raphael_ref.data.synthetic` the ground truth is programmatic, so
alignment can be *read back* from a generated image, in the spirit of GenEval (Ghosh et al., 2023):

    1. colour:    every pixel takes the nearest palette colour (black background included) if it
                  lies within ``color_tol`` of it (Euclidean RGB, 0..255), else background;
    2. objects:   8-connected components of each colour (:func:`connected_components`), components
                  smaller than ``min_area_frac`` of an object's box s x s dropped, same-colour
                  components in the same grid cell merged (fragments of one noisy object);
                  a component too large or too ragged (fill < ``min_fill``) is an "unknown" object;
    3. shape:     from the component's bounding box: vertical centroid ``cy`` (0 top .. 1 bottom)
                  and fill ratio ``fill`` = area / box area (:func:`classify_shape`);
    4. position:  the 3 x 3 grid cell nearest to the centroid, with the cell centres of the
                  generator's own layout (:func:`position_of`); the five plus-sign cells carry the
                  generator's names, corners are named "top-left" etc. (never a prompt position);
    5. count:     number of objects.

Calibration on the generator's renders (``tests/test_detector.py`` checks 100% recovery):
ideal shapes have fill 1 (square), pi/4 (disk), 1/2 (triangle) and cy 1/2 (square, disk), 2/3
(triangle, apex up). Rasterised at the generator's sizes (S = 16..96) discs have fill 0.75..0.80 and
cy = 0.5, squares fill 1 and cy = 0.5, triangles cy 0.58..0.67. Thresholds sit between:
``cy > 0.55`` -> triangle, else ``fill > 0.9`` -> square, else circle. Palette colours are >= 200
apart and >= 255 from black, so ``color_tol = 100`` assigns every rendered pixel exactly and
leaves Gaussian noise of std <= 25 (per channel) harmless.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Sequence

import torch
import torch.nn.functional as F

from raphael_ref.data.synthetic import COLORS, NOVEL_COLORS, POSITIONS, SHAPES, object_size, position_box

__all__ = [
    "DetectedObject",
    "background_rms",
    "DetectorConfig",
    "classify_shape",
    "color_segmentation",
    "connected_components",
    "connected_components_literal",
    "detect",
    "detect_batch",
    "grid_centres",
    "position_of",
    "summarize",
    "to_uint8",
]

CORNERS = {(0, 0): "top-left", (0, 2): "top-right", (2, 0): "bottom-left", (2, 2): "bottom-right"}
_PLUS = {(1, 0): "left", (1, 2): "right", (0, 1): "top", (2, 1): "bottom", (1, 1): "center"}
BACKGROUND = -1  # colour index of background pixels in color_segmentation's output


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Tolerances of the detector (defaults calibrated on the generator's renders; module docstring).

    color_tol:        max Euclidean RGB distance (0..255 units) of a pixel to its palette colour.
    min_area_frac:    components smaller than this fraction of an object box s^2 are noise
                      (rendered shapes cover >= 0.5 s^2).
    min_fill:         components filling less of their bounding box are no shape ("unknown");
                      rendered shapes fill >= 0.5, clusters of saturated noise pixels 0.25..0.45.
    triangle_cy:      vertical centroid (0 top, 1 bottom, within the box) above which -> triangle.
    square_fill:      fill ratio above which a non-triangle is a square (else a circle).
    max_extent_frac:  a component whose box side exceeds this many object sides is no single
                      object (shape "unknown": it still counts, so it can only make a prompt fail).
    extra_colors:     names from ``synthetic.NOVEL_COLORS`` added to the palette (default none: a novel
                      colour's pixels are > ``color_tol`` from every palette colour, so background).
    """

    color_tol: float = 100.0
    min_area_frac: float = 0.3
    min_fill: float = 0.4
    triangle_cy: float = 0.55
    square_fill: float = 0.9
    max_extent_frac: float = 1.6
    extra_colors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [c for c in self.extra_colors if c not in NOVEL_COLORS]
        if not isinstance(self.extra_colors, tuple) or bad:
            raise ValueError(f"DetectorConfig.extra_colors must be a tuple of names from synthetic.NOVEL_COLORS "
                             f"{tuple(NOVEL_COLORS)}; got {self.extra_colors!r}")
        if not 0 < self.color_tol:
            raise ValueError(f"DetectorConfig.color_tol must be > 0 (RGB distance, 0..255 units); got {self.color_tol}")
        if not 0 <= self.min_area_frac < 1:
            raise ValueError(f"DetectorConfig.min_area_frac must lie in [0, 1); got {self.min_area_frac}")
        if not 0.5 < self.triangle_cy < 2 / 3:
            raise ValueError(f"DetectorConfig.triangle_cy must lie in (1/2, 2/3) (between a disk's and a "
                             f"triangle's centroid); got {self.triangle_cy}")
        if not torch.pi / 4 < self.square_fill < 1:
            raise ValueError(f"DetectorConfig.square_fill must lie in (pi/4, 1) (between a disk's and a "
                             f"square's fill ratio); got {self.square_fill}")
        if not 0 <= self.min_fill < 0.5:
            raise ValueError(f"DetectorConfig.min_fill must lie in [0, 1/2) (below a triangle's fill); got {self.min_fill}")
        if self.max_extent_frac <= 1:
            raise ValueError(f"DetectorConfig.max_extent_frac must be > 1; got {self.max_extent_frac}")


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object read back from an image.

    shape: "circle" | "square" | "triangle" | "unknown"; color: a palette name; position: a
    generator position name or a corner name; box (x0, y0, x1, y1), ends exclusive; centroid
    (x, y) in pixels (pixel centres at +0.5); fill and cy: the shape features.
    """

    shape: str
    color: str
    position: str
    box: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    fill: float
    cy: float


# ---------------------------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype; the model's output range) -> uint8 in [0, 255], clamped."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"to_uint8 expects a floating tensor with values in [-1, 1]; got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')}. uint8 images need no conversion.")
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _check_image(image: torch.Tensor, fn: str) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        raise ValueError(f"{fn}: expected a uint8 image tensor (3, H, W) as render() returns; got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')}. Convert model outputs in [-1, 1] "
                         f"with to_uint8().")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"{fn}: expected a square RGB image of shape (3, S, S); got {tuple(image.shape)}")


# ---------------------------------------------------------------------------------------------
# 1. colour segmentation
# ---------------------------------------------------------------------------------------------


def _palette(extra_colors: tuple[str, ...] = ()) -> tuple[list[str], torch.Tensor]:
    table = {**COLORS, **{c: NOVEL_COLORS[c] for c in extra_colors}}
    names = list(table)
    rgb = torch.tensor([table[n] for n in names] + [(0, 0, 0)], dtype=torch.float32)  # (P + 1, 3), black last
    return names, rgb


def color_segmentation(images: torch.Tensor, color_tol: float = 100.0, extra_colors: tuple[str, ...] = ()) -> torch.Tensor:
    """Palette index of each pixel (nearest palette colour, black included, within ``color_tol``).

    images (B, 3, H, W) uint8 -> (B, H, W) long: index into ``list(COLORS) + list(extra_colors)``, or
    BACKGROUND (-1) for pixels nearest to black or farther than ``color_tol`` from every palette colour.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"color_segmentation expects uint8 images (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
    names, rgb = _palette(extra_colors)
    x = images.float().permute(0, 2, 3, 1)  # (B, H, W, 3)
    dist = torch.cdist(x.reshape(-1, 3), rgb).reshape(*x.shape[:3], -1)  # (B, H, W, P + 1)
    d_min, idx = dist.min(dim=-1)  # (B, H, W)
    idx = torch.where((idx == len(names)) | (d_min > color_tol), BACKGROUND, idx)  # (B, H, W)
    return idx


# ---------------------------------------------------------------------------------------------
# 2. connected components: literal flood fill and fast min-label propagation
# ---------------------------------------------------------------------------------------------


def connected_components_literal(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a (H, W) bool mask by breadth-first flood fill (literal form).

    Returns (H, W) long: 0 on background; each component labelled 1 + the smallest row-major
    flat index of its pixels (a canonical labelling, so two implementations can be compared).
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"connected_components_literal expects a (H, W) bool mask; got {mask.dtype} {tuple(mask.shape)}")
    H, W = mask.shape
    m = mask.tolist()
    labels = [[0] * W for _ in range(H)]
    for y0 in range(H):
        for x0 in range(W):
            if not m[y0][x0] or labels[y0][x0]:
                continue
            label = 1 + y0 * W + x0  # row-major scan: the first pixel met is the smallest index
            labels[y0][x0] = label
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < H and 0 <= u < W and m[v][u] and not labels[v][u]:
                            labels[v][u] = label
                            queue.append((v, u))
    return torch.tensor(labels, dtype=torch.long)


def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """8-connected components of bool masks (..., H, W), same labelling as the literal flood fill.

    Fast form: every foreground pixel starts with its own label 1 + flat index; each step takes
    the minimum over the 3 x 3 neighbourhood (restricted to foreground) until nothing changes,
    which happens after at most (longest shortest path inside a component) steps.
    """
    if masks.dtype != torch.bool or masks.ndim < 2:
        raise ValueError(f"connected_components expects bool masks (..., H, W); got {masks.dtype} {tuple(masks.shape)}")
    lead, (H, W) = masks.shape[:-2], masks.shape[-2:]
    fg = masks.reshape(-1, 1, H, W)  # (N, 1, H, W)
    big = float(H * W + 1)
    index = torch.arange(1, H * W + 1, dtype=torch.float32).reshape(1, 1, H, W)  # exact in float32 up to 2^24
    labels = torch.where(fg, index, big)  # (N, 1, H, W)
    while True:
        new = -F.max_pool2d(-labels, kernel_size=3, stride=1, padding=1)  # 3x3 minimum
        new = torch.where(fg, new, big)
        if torch.equal(new, labels):
            break
        labels = new
    labels = torch.where(fg, labels, 0.0).to(torch.long)  # (N, 1, H, W)
    return labels.reshape(*lead, H, W)


# ---------------------------------------------------------------------------------------------
# 3. shape, 4. position
# ---------------------------------------------------------------------------------------------


def classify_shape(fill: float, cy: float, cfg: DetectorConfig = DetectorConfig()) -> str:
    """Shape from the box features: ``cy > triangle_cy`` -> triangle, ``fill > square_fill`` -> square, else circle."""
    if cy > cfg.triangle_cy:
        return "triangle"
    if fill > cfg.square_fill:
        return "square"
    return "circle"


def grid_centres(image_size: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Column and row centres (x, then y, in pixels) of the generator's 3 x 3 grid."""
    xs = tuple((position_box(p, image_size)[0] + position_box(p, image_size)[2]) / 2 for p in ("left", "center", "right"))
    ys = tuple((position_box(p, image_size)[1] + position_box(p, image_size)[3]) / 2 for p in ("top", "center", "bottom"))
    return xs, ys


def position_of(centroid: tuple[float, float], image_size: int) -> str:
    """Name of the grid cell whose centre is nearest to ``centroid`` (per axis), as the generator names it."""
    xs, ys = grid_centres(image_size)
    col = min(range(3), key=lambda k: abs(centroid[0] - xs[k]))
    row = min(range(3), key=lambda k: abs(centroid[1] - ys[k]))
    return _PLUS.get((row, col)) or CORNERS[(row, col)]


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------


def _object_from_pixels(ys: torch.Tensor, xs: torch.Tensor, color: str, image_size: int,
                        cfg: DetectorConfig) -> DetectedObject:
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    area = int(ys.numel())
    h, w = y1 - y0, x1 - x0
    fill = area / (h * w)
    cy = (float(ys.double().mean()) + 0.5 - y0) / h  # pixel centres, 0 top .. 1 bottom of the box
    centroid = (float(xs.double().mean()) + 0.5, float(ys.double().mean()) + 0.5)
    s = object_size(image_size)
    if max(h, w) > cfg.max_extent_frac * s or fill < cfg.min_fill:
        shape = "unknown"  # no single rendered shape: too large, or too ragged
    else:
        shape = classify_shape(fill, cy, cfg)
    return DetectedObject(shape, color, position_of(centroid, image_size), (x0, y0, x1, y1), area, centroid,
                          round(fill, 4), round(cy, 4))


def detect_batch(images: torch.Tensor, cfg: DetectorConfig = DetectorConfig()) -> list[list[DetectedObject]]:
    """RAPHAEL Sec. 4.1 (image-text alignment), synthetic stand-in: the objects of each uint8 image (B, 3, S, S).

    Colour, shape, position per object, count = number of objects; rules in the module docstring.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"detect_batch expects uint8 images (B, 3, S, S); got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}. Convert model "
                         f"outputs in [-1, 1] with to_uint8().")
    B, _, H, W = images.shape
    if images.shape[1] != 3 or H != W:
        raise ValueError(f"detect_batch expects square RGB images (B, 3, S, S); got {tuple(images.shape)}")
    object_size(H)  # validates the image size against the generator's minimum
    names, _ = _palette(cfg.extra_colors)
    seg = color_segmentation(images.cpu(), cfg.color_tol, cfg.extra_colors)  # (B, S, S)
    per_color = seg[:, None] == torch.arange(len(names))[None, :, None, None]  # (B, P, S, S)
    present = per_color.flatten(2).any(dim=-1)  # (B, P): label only the colours an image holds
    labels = torch.zeros(per_color.shape, dtype=torch.long)  # (B, P, S, S)
    if present.any():
        labels[present] = connected_components(per_color[present])  # (N, S, S)
    min_area = cfg.min_area_frac * object_size(H) ** 2
    out: list[list[DetectedObject]] = []
    for b in range(B):
        found: list[DetectedObject] = []
        for c, color in enumerate(names):
            if not present[b, c]:
                continue
            lab = labels[b, c]  # (S, S)
            ids = lab.unique()
            groups: dict[str, list[torch.Tensor]] = {}
            for i in ids[ids > 0].tolist():
                ys, xs = torch.nonzero(lab == i, as_tuple=True)
                if ys.numel() < min_area:
                    continue
                cell = position_of((float(xs.double().mean()) + 0.5, float(ys.double().mean()) + 0.5), H)
                groups.setdefault(cell, []).append(torch.stack([ys, xs]))
            for parts in groups.values():
                yx = torch.cat(parts, dim=1)  # (2, area): fragments of one object in one cell, merged
                found.append(_object_from_pixels(yx[0], yx[1], color, H, cfg))
        found.sort(key=lambda o: (o.box[1], o.box[0], o.color))
        out.append(found)
    return out


def background_rms(image: torch.Tensor, objects: Sequence[DetectedObject], margin: int = 1) -> float:
    """Residual noise of the background: RMS of the RGB values (0..255) outside every detected shape.

    The synthetic scenes have a pure black background, so a render scores 0. The background is every pixel
    outside the boxes of the objects read as a shape (circle, square or triangle), each box grown by
    ``margin`` pixels (anti-aliased or blurred edges count as the object's). Everything else counts as
    background: blobs too small or too far from the palette to be detected, and the "unknown" objects (the
    detector's label for clusters too large or too ragged to be a shape, which is what noise forms). That
    is the residual noise the toy issue asks to be gone. ``nan`` when the boxes cover the whole image.
    """
    _check_image(image, "background_rms")
    if margin < 0:
        raise ValueError(f"background_rms: margin must be >= 0; got {margin}")
    S = image.shape[-1]
    bg = torch.ones(S, S, dtype=torch.bool)
    for o in objects:
        if o.shape == "unknown":
            continue
        x0, y0, x1, y1 = o.box
        bg[max(0, y0 - margin):min(S, y1 + margin), max(0, x0 - margin):min(S, x1 + margin)] = False
    if not bg.any():
        return float("nan")
    v = image.cpu().double()[:, bg]  # (3, n background pixels)
    return float(v.pow(2).mean().sqrt())


def detect(image: torch.Tensor, cfg: DetectorConfig = DetectorConfig()) -> list[DetectedObject]:
    """Objects of one uint8 image (3, S, S): colour, shape, position (count = ``len``)."""
    _check_image(image, "detect")
    return detect_batch(image[None], cfg)[0]


def summarize(objects: Sequence[DetectedObject]) -> list[tuple[str, str, str]]:
    """Sorted (shape, color, position) triples of detected objects (comparable with a Scene's)."""
    return sorted((o.shape, o.color, o.position) for o in objects)


if set(SHAPES) != {"circle", "square", "triangle"} or set(_PLUS.values()) != set(POSITIONS):
    raise RuntimeError(f"detector: the generator's shapes {SHAPES} / positions {POSITIONS} changed; "
                       f"recalibrate classify_shape and position_of")
