"""Synthetic compositional data set: coloured shapes at named positions, rendered procedurally.

Not in the paper. RAPHAEL's claim (Sec. 1, Sec. 3.1) is that space-MoE paths tie text concepts
(nouns, adjectives) to image regions; a data set where every caption names each object's colour,
shape and position, and the ground truth boxes are known, lets a small model be trained and its
text-image alignment be measured without any download.

Every item is a pure function of (seed, index): the scene is drawn from
``numpy.random.default_rng([seed, index])`` and rendered without randomness.

Layout (for an image of side S): objects are squares of side s = (S - 2) // 3 (10 px at S = 32)
placed in the five cells of a plus sign (left, right, top, bottom, center) of a 3 x 3 grid whose
cells are s + gap apart, gap = (S - 3 s) // 2 >= 1, so two objects never overlap or touch.
Shapes: "square" fills its box, "circle" is the inscribed disk (pixel centres within s / 2 of the
box centre), "triangle" has its apex at the top middle and its base on the bottom edge. No
anti-aliasing: each pixel is either black or exactly the object's colour.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "COLORS",
    "NOVEL_COLORS",
    "POSITIONS",
    "POSITION_PHRASES",
    "COUNT_WORDS",
    "SceneObject",
    "Scene",
    "object_size",
    "position_box",
    "is_count_scene",
    "caption_for",
    "make_scene",
    "sample_scene",
    "object_mask",
    "render",
    "scene_to_dict",
    "scene_from_dict",
    "SyntheticShapes",
    "collate_synthetic",
    "export_shards",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Corners of the RGB cube (plus a violet): every pair is >= 200 apart in RGB (Euclidean), so a
# nearest-colour detector separates them robustly on a black background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (200, 0, 255),
    "white": (255, 255, 255),
}
# Colours the training generator never draws (``sample_scene`` draws from COLORS only): a concept a
# trained toy model has never seen, for fine-tuning demonstrations (issue 12: LoRA on ~28 images of
# a new concept). Cyan is the one corner of the RGB cube left: >= 255 from every palette colour and
# from black, so the detector (given ``DetectorConfig(extra_colors=("cyan",))``) separates it as
# robustly as the palette. ``make_scene`` and ``render`` accept these names.
NOVEL_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 255, 255),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NOVEL_COLORS}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five"}
# (row, column) of each position in the 3 x 3 grid.
_CELLS: dict[str, tuple[int, int]] = {
    "left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "center": (1, 1)
}
MIN_IMAGE_SIZE = 16
# Probability that a scene with max_objects >= 2 is a count scene ("two red circles ...").
COUNT_SCENE_PROB = 0.2


@dataclass(frozen=True)
class SceneObject:
    """One object: shape, colour name, position name and its box (x0, y0, x1, y1), ends exclusive."""

    shape: str
    color: str
    position: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """A synthetic image's ground truth: its objects, its caption and its side in pixels."""

    objects: tuple[SceneObject, ...]
    caption: str
    image_size: int


def _check_image_size(image_size: int, fn: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"{fn}: image_size must be an int >= {MIN_IMAGE_SIZE} (pixels, square images); got {image_size!r}."
        )


def _check_max_objects(max_objects: int, fn: str) -> None:
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(
            f"{fn}: max_objects must be an int in [1, {len(POSITIONS)}] (one object per position); got {max_objects!r}."
        )


def object_size(image_size: int) -> int:
    """Side s of an object's box: (S - 2) // 3, so three boxes and two gaps of >= 1 px fit across S."""
    _check_image_size(image_size, "object_size")
    return (image_size - 2) // 3


def position_box(position: str, image_size: int) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1), ends exclusive, of the cell named `position` in an S x S image."""
    _check_image_size(image_size, "position_box")
    if position not in _CELLS:
        raise ValueError(f"position_box: position must be one of {POSITIONS}; got {position!r}.")
    s = object_size(image_size)
    gap = (image_size - 3 * s) // 2
    start = (image_size - 3 * s - 2 * gap) // 2  # 0 or 1: centres the 3 x 3 grid
    row, col = _CELLS[position]
    x0, y0 = start + col * (s + gap), start + row * (s + gap)
    return (x0, y0, x0 + s, y0 + s)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def is_count_scene(objects: Sequence[SceneObject]) -> bool:
    """True when >= 2 objects all share shape and colour: the caption counts them ("two green triangles ...")."""
    return len(objects) >= 2 and len({(o.shape, o.color) for o in objects}) == 1


def caption_for(objects: Sequence[SceneObject]) -> str:
    """The caption template: every object named with its colour, shape and position.

    Distinct objects: "a red circle on the left", "a red circle on the left and a blue square at
    the top", "a, b and c". Objects that all share shape and colour (a count scene, >= 2 of them):
    "two green triangles on the left and in the center".
    """
    if len(objects) == 0:
        raise ValueError("caption_for: need at least one object; got none.")
    if is_count_scene(objects):
        if len(objects) not in COUNT_WORDS:
            raise ValueError(f"caption_for: no count word for {len(objects)} objects; at most {max(COUNT_WORDS)}.")
        o = objects[0]
        where = _join([POSITION_PHRASES[p.position] for p in objects])
        return f"{COUNT_WORDS[len(objects)]} {o.color} {o.shape}s {where}"
    return _join([f"{_article(o.color)} {o.color} {o.shape} {POSITION_PHRASES[o.position]}" for o in objects])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_scene(objects: Sequence[tuple[str, str, str]], image_size: int = 32) -> Scene:
    """A Scene from (shape, color, position) triples: boxes from the layout, caption from the template.

    Positions must be distinct (one object per cell). Useful to build evaluation prompts whose
    ground truth is known.
    """
    _check_image_size(image_size, "make_scene")
    if len(objects) == 0:
        raise ValueError("make_scene: need at least one (shape, color, position) triple; got none.")
    built = []
    for triple in objects:
        if len(triple) != 3:
            raise ValueError(f"make_scene: each object is a (shape, color, position) triple; got {triple!r}.")
        shape, color, position = triple
        if shape not in SHAPES or color not in _ALL_COLORS or position not in POSITIONS:
            raise ValueError(
                f"make_scene: unknown object {triple!r}; shapes are {SHAPES}, colours {tuple(COLORS)} "
                f"(and the novel {tuple(NOVEL_COLORS)}), positions {POSITIONS}."
            )
        built.append(SceneObject(shape, color, position, position_box(position, image_size)))
    if len({o.position for o in built}) != len(built):
        raise ValueError(f"make_scene: positions must be distinct (objects may not overlap); got {list(objects)!r}.")
    return Scene(objects=tuple(built), caption=caption_for(built), image_size=image_size)


def _check_scene_mix(count_prob: float, distinct_shapes: bool, max_objects: int, fn: str) -> None:
    if isinstance(count_prob, bool) or not isinstance(count_prob, (int, float)) or not 0.0 <= count_prob <= 1.0:
        raise ValueError(f"{fn}: count_prob must be a probability in [0, 1]; got {count_prob!r}.")
    if not isinstance(distinct_shapes, bool):
        raise ValueError(f"{fn}: distinct_shapes must be True or False; got {distinct_shapes!r}.")
    if distinct_shapes and max_objects > len(SHAPES):
        raise ValueError(f"{fn}: distinct_shapes=True gives each object of a scene its own shape, so max_objects "
                         f"must be <= {len(SHAPES)} (the number of shapes); got max_objects={max_objects}.")


def sample_scene(rng: np.random.Generator, image_size: int = 32, max_objects: int = 3, *,
                 count_prob: float = COUNT_SCENE_PROB, distinct_shapes: bool = False) -> Scene:
    """Draw a scene: 1..max_objects objects at distinct positions, or a count scene.

    With probability ``count_prob`` (when max_objects >= 2) the scene is k in [2, max_objects]
    copies of one (shape, colour) at k positions; otherwise n ~ U{1..max_objects} objects with
    distinct (shape, colour) pairs, so the caption names each one unambiguously.

    distinct_shapes: if True, the objects of a scene that is not a count scene also have distinct
    shapes (each a uniform colour, repeats allowed), as in the evaluation's two-object prompts; the
    default draws distinct (shape, colour) pairs, so "a red circle ... and a blue circle ..." occurs.
    The defaults reproduce the data every run before this option was trained on, draw for draw.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"sample_scene: rng must be a numpy.random.Generator; got {type(rng).__name__}.")
    _check_image_size(image_size, "sample_scene")
    _check_max_objects(max_objects, "sample_scene")
    _check_scene_mix(count_prob, distinct_shapes, max_objects, "sample_scene")
    colors = tuple(COLORS)
    if max_objects >= 2 and rng.random() < count_prob:
        k = int(rng.integers(2, max_objects + 1))
        shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
        kinds = [(shape, color)] * k
    elif distinct_shapes:
        k = int(rng.integers(1, max_objects + 1))
        shapes = [SHAPES[j] for j in rng.choice(len(SHAPES), size=k, replace=False)]
        kinds = [(s, colors[j]) for s, j in zip(shapes, rng.integers(len(colors), size=k))]
    else:
        k = int(rng.integers(1, max_objects + 1))
        pairs = [(s, c) for s in SHAPES for c in colors]
        kinds = [pairs[j] for j in rng.choice(len(pairs), size=k, replace=False)]
    positions = [POSITIONS[j] for j in rng.choice(len(POSITIONS), size=k, replace=False)]
    return make_scene([(s, c, p) for (s, c), p in zip(kinds, positions)], image_size)


def _shape_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (h, w) mask of the shape inside its box, tested at pixel centres."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, box-local
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return (xs - w / 2) ** 2 + (ys - h / 2) ** 2 <= (min(h, w) / 2) ** 2
    if shape == "triangle":  # apex (w/2, 0), base from (0, h) to (w, h): |x - w/2| <= (w/2) (y / h)
        return np.abs(xs - w / 2) <= (w / 2) * (ys / h)
    raise ValueError(f"render: unknown shape {shape!r}; expected one of {SHAPES}.")


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Float32 (S, S) mask of one object's pixels in the image (1 on the shape, 0 elsewhere), as render draws it."""
    m = np.zeros((image_size, image_size), dtype=np.float32)
    x0, y0, x1, y1 = obj.box
    m[y0:y1, x0:x1] = _shape_mask(obj.shape, obj.box)
    return m


def render(scene: Scene) -> torch.Tensor:
    """Render a scene: uint8 (3, S, S), black background, crisp (not anti-aliased) shapes."""
    if not isinstance(scene, Scene):
        raise ValueError(f"render: expected a Scene; got {type(scene).__name__}.")
    _check_image_size(scene.image_size, "render")
    s = scene.image_size
    img = np.zeros((s, s, 3), dtype=np.uint8)  # (H, W, 3)
    for o in scene.objects:
        if o.color not in _ALL_COLORS:
            raise ValueError(f"render: unknown colour {o.color!r}; expected one of {tuple(_ALL_COLORS)}.")
        x0, y0, x1, y1 = o.box
        if not (0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s):
            raise ValueError(f"render: box {o.box} does not lie inside the {s} x {s} image.")
        mask = _shape_mask(o.shape, o.box)  # (h, w)
        img[y0:y1, x0:x1][mask] = _ALL_COLORS[o.color]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()  # (3, H, W)


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """JSON-ready ground truth of a scene (the `.json` member of exported shards, minus key and filters)."""
    return {
        "caption": scene.caption,
        "image_size": scene.image_size,
        "objects": [
            {
                "shape": o.shape, "color": o.color, "rgb": list(_ALL_COLORS[o.color]),
                "position": o.position, "box": list(o.box),
            }
            for o in scene.objects
        ],
    }


def scene_from_dict(d: dict[str, Any]) -> Scene:
    """Inverse of :func:`scene_to_dict` (extra keys are ignored)."""
    try:
        objects = tuple(
            SceneObject(o["shape"], o["color"], o["position"], tuple(int(v) for v in o["box"])) for o in d["objects"]
        )
        return Scene(objects=objects, caption=str(d["caption"]), image_size=int(d["image_size"]))
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"scene_from_dict: expected a dict with 'objects' (shape, color, position, box), 'caption' and "
            f"'image_size' as written by scene_to_dict; got {d!r} ({e})."
        ) from e


class SyntheticShapes(torch.utils.data.Dataset):
    """Map-style synthetic data set; item i is a pure function of (seed, i).

    Item: {"image": float32 (3, S, S) in [-1, 1], "caption": str, "scene": Scene,
    "key": f"synth-{seed}-{i:09d}"}.
    """

    def __init__(self, seed: int = 0, image_size: int = 32, length: int = 1_000_000, max_objects: int = 3, *,
                 count_prob: float = COUNT_SCENE_PROB, distinct_shapes: bool = False):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SyntheticShapes: seed must be an int >= 0; got {seed!r}.")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"SyntheticShapes: length must be an int >= 1; got {length!r}.")
        _check_image_size(image_size, "SyntheticShapes")
        _check_max_objects(max_objects, "SyntheticShapes")
        _check_scene_mix(count_prob, distinct_shapes, max_objects, "SyntheticShapes")
        self.seed, self.image_size, self.length, self.max_objects = seed, image_size, length, max_objects
        self.count_prob, self.distinct_shapes = float(count_prob), distinct_shapes

    def __len__(self) -> int:
        return self.length

    def key(self, index: int) -> str:
        return f"synth-{self.seed}-{index:09d}"

    def scene(self, index: int) -> Scene:
        """The scene of item `index` (no rendering)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.length:
            raise IndexError(f"SyntheticShapes: index must be an int in [0, {self.length}); got {index!r}.")
        rng = np.random.default_rng([self.seed, int(index)])
        return sample_scene(rng, self.image_size, self.max_objects, count_prob=self.count_prob,
                            distinct_shapes=self.distinct_shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        image = render(scene).float() / 127.5 - 1.0  # (3, S, S) in [-1, 1]
        return {"image": image, "caption": scene.caption, "scene": scene, "key": self.key(int(index))}


def collate_synthetic(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of SyntheticShapes: image (B, 3, S, S); caption, scene and key as lists."""
    if len(batch) == 0:
        raise ValueError("collate_synthetic: got an empty batch.")
    return {
        "image": torch.stack([b["image"] for b in batch]),  # (B, 3, S, S)
        "caption": [b["caption"] for b in batch],
        "scene": [b["scene"] for b in batch],
        "key": [b["key"] for b in batch],
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _png_bytes(image_uint8: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_uint8.permute(1, 2, 0).numpy(), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def export_shards(dataset: SyntheticShapes, out_dir: str | Path, n: int, shard_size: int = 1000) -> list[Path]:
    """Write items 0..n-1 as img2dataset-style tar shards {out_dir}/{00000..}.tar.

    Members per item: {key}.png (the rendered image), {key}.txt (the caption) and {key}.json
    (scene_to_dict plus "key", "aesthetic": null and "pwatermark": null, so the real-data filters
    of raphael_ref.data.shards keep every item). The bytes depend only on (seed, n, shard_size).
    """
    if not isinstance(dataset, SyntheticShapes):
        raise ValueError(f"export_shards: dataset must be a SyntheticShapes; got {type(dataset).__name__}.")
    for name, v in (("n", n), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"export_shards: {name} must be an int >= 1; got {v!r}.")
    if n > len(dataset):
        raise ValueError(f"export_shards: n = {n} exceeds the data set's length {len(dataset)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, n, shard_size)):
        path = out / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + shard_size, n)):
                scene, key = dataset.scene(i), dataset.key(i)
                meta = {"key": key, **scene_to_dict(scene), "aesthetic": None, "pwatermark": None}
                _add_member(tar, f"{key}.png", _png_bytes(render(scene)))
                _add_member(tar, f"{key}.txt", scene.caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        paths.append(path)
    return paths
