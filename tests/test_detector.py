"""The synthetic-domain detector reads every ground-truth render back exactly, tolerates noise, rejects non-scenes."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.data.synthetic import COLORS, POSITIONS, SyntheticShapes, make_scene, position_box, render, sample_scene
from raphael_ref.evaluation.detector import (
    BACKGROUND,
    DetectorConfig,
    background_rms,
    color_segmentation,
    connected_components,
    connected_components_literal,
    detect,
    detect_batch,
    position_of,
    summarize,
    to_uint8,
)


def _truth(scene) -> list[tuple[str, str, str]]:
    return sorted((o.shape, o.color, o.position) for o in scene.objects)


def _boxes_inside(scene, found) -> bool:
    """Every detected box lies inside the ground-truth box of the object at that position."""
    gt = {(o.color, o.position): o.box for o in scene.objects}
    for o in found:
        x0, y0, x1, y1 = gt[(o.color, o.position)]
        if not (x0 <= o.box[0] < o.box[2] <= x1 and y0 <= o.box[1] < o.box[3] <= y1):
            return False
    return True


@pytest.mark.spec_id("eval.detector")
def test_ground_truth_renders_are_recovered_exactly():
    """Acceptance: 100% on 500 generator scenes (shapes, colours, positions, counts; count scenes included)."""
    ds = SyntheticShapes(seed=7, image_size=32, max_objects=5)
    scenes = [ds.scene(i) for i in range(500)]
    images = torch.stack([render(s) for s in scenes])  # (500, 3, 32, 32)
    found = detect_batch(images)
    wrong = [(s.caption, summarize(f)) for s, f in zip(scenes, found) if summarize(f) != _truth(s)]
    assert not wrong, f"{len(wrong)} of 500 scenes misread, e.g. {wrong[:3]}"
    assert all(_boxes_inside(s, f) for s, f in zip(scenes, found))
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4, 5}, "the sample must cover every object count"
    assert sum(len({o.shape for o in s.objects}) == 1 and len(s.objects) > 1 for s in scenes) > 20, "count scenes"


@pytest.mark.spec_id("eval.detector")
@settings(max_examples=15)
@given(size=st.integers(16, 64), seed=st.integers(0, 2**31 - 1))
def test_exact_at_every_generator_size(size, seed):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, size, 5) for _ in range(8)]
    found = detect_batch(torch.stack([render(s) for s in scenes]))
    assert [summarize(f) for f in found] == [_truth(s) for s in scenes]


@pytest.mark.spec_id("eval.detector")
@pytest.mark.parametrize("sigma", [10.0, 25.0])
def test_robust_to_gaussian_noise(sigma):
    ds = SyntheticShapes(seed=3, image_size=32, max_objects=5)
    scenes = [ds.scene(i) for i in range(200)]
    clean = torch.stack([render(s) for s in scenes]).float()
    g = torch.Generator().manual_seed(int(sigma))
    noisy = (clean + sigma * torch.randn(clean.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    found = detect_batch(noisy)
    assert [summarize(f) for f in found] == [_truth(s) for s in scenes]


@pytest.mark.spec_id("eval.detector")
def test_model_range_images_round_trip_through_to_uint8():
    """Images handed to the model ([-1, 1], as SyntheticShapes yields them) come back to the exact render."""
    ds = SyntheticShapes(seed=1, image_size=32)
    items = [ds[i] for i in range(20)]
    x = torch.stack([it["image"] for it in items])  # (20, 3, 32, 32) float in [-1, 1]
    assert torch.equal(to_uint8(x), torch.stack([render(it["scene"]) for it in items]))
    assert [summarize(f) for f in detect_batch(to_uint8(x))] == [_truth(it["scene"]) for it in items]


@pytest.mark.spec_id("eval.detector")
def test_rejects_empty_and_noise_images():
    g = torch.Generator().manual_seed(0)
    assert detect(torch.zeros(3, 32, 32, dtype=torch.uint8)) == []
    uniform = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    saturated = to_uint8(2 * torch.randn(50, 3, 32, 32, generator=g))  # pixels at the RGB cube's corners
    for batch in (uniform, saturated):
        assert all(o.shape == "unknown" for f in detect_batch(batch) for o in f)
    flat = torch.tensor(COLORS["red"], dtype=torch.uint8)[:, None, None].expand(3, 32, 32).contiguous()
    (obj,) = detect(flat)  # one colour everywhere: an object, but no shape the generator draws
    assert obj.shape == "unknown" and obj.color == "red"


@pytest.mark.spec_id("eval.detector")
def test_fragments_of_one_object_in_one_cell_count_once():
    scene = make_scene([("square", "blue", "center"), ("circle", "red", "left")], 32)
    img = render(scene)
    x0, y0, x1, y1 = scene.objects[0].box
    img[:, y0:y1, (x0 + x1) // 2] = 0  # cut the square in two halves (both above the minimum area)
    found = detect(img)
    assert Counter((o.color, o.position) for o in found) == Counter({("blue", "center"): 1, ("red", "left"): 1})


@pytest.mark.spec_id("eval.detector")
@settings(max_examples=30)
@given(h=st.integers(1, 12), w=st.integers(1, 12), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_connected_components_fast_equals_flood_fill(h, w, p, seed):
    mask = torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) < p
    assert torch.equal(connected_components(mask), connected_components_literal(mask))


@pytest.mark.spec_id("eval.detector")
def test_connected_components_uses_8_connectivity_and_batches():
    diag = torch.eye(4, dtype=torch.bool)  # a diagonal line: one 8-connected component
    apart = torch.zeros(4, 4, dtype=torch.bool)
    apart[0, 0] = apart[0, 2] = True  # a one-pixel gap separates
    labels = connected_components(torch.stack([diag, apart]))
    assert labels[0][diag].unique().tolist() == [1]
    assert labels[1][apart].tolist() == [1, 3] and int(labels[1][~apart].abs().sum()) == 0


@pytest.mark.spec_id("eval.detector")
def test_palette_colours_segment_to_their_index():
    names = list(COLORS)
    img = torch.zeros(1, 3, 1, len(names) + 1, dtype=torch.uint8)
    for i, n in enumerate(names):
        img[0, :, 0, i] = torch.tensor(COLORS[n])
    seg = color_segmentation(img)
    assert seg[0, 0].tolist() == list(range(len(names))) + [BACKGROUND]
    # a pixel farther than color_tol from every palette colour is background
    grey = torch.full((1, 3, 1, 1), 128, dtype=torch.uint8)
    assert color_segmentation(grey).item() == BACKGROUND


@pytest.mark.spec_id("eval.detector")
@settings(max_examples=20)
@given(size=st.integers(16, 96), pos=st.sampled_from(POSITIONS), fx=st.floats(0, 0.999), fy=st.floats(0, 0.999))
def test_position_of_names_every_point_of_a_cell(size, pos, fx, fy):
    x0, y0, x1, y1 = position_box(pos, size)
    assert position_of((x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)), size) == pos


def test_invalid_inputs_raise_value_error():
    with pytest.raises(ValueError, match="uint8"):
        detect(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="square"):
        detect_batch(torch.zeros(1, 3, 32, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="floating"):
        to_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="triangle_cy"):
        DetectorConfig(triangle_cy=0.7)


def test_background_rms_is_zero_on_renders_and_reads_noise_outside_the_objects():
    scene = make_scene([("circle", "red", "left"), ("square", "blue", "right")], 24)
    img = render(scene)
    objs = detect(img)
    assert background_rms(img, objs) == 0.0  # the renders' background is pure black
    noisy = img.clone()
    noisy[:, 0, 0] = 30  # one background pixel (top-left corner, outside both boxes), all three channels
    n_bg = 24 * 24 - sum((min(24, o.box[2] + 1) - max(0, o.box[0] - 1)) * (min(24, o.box[3] + 1) - max(0, o.box[1] - 1))
                         for o in objs)
    assert background_rms(noisy, objs) == pytest.approx(30 / n_bg ** 0.5, rel=1e-12)  # sqrt(3 * 30^2 / (3 n_bg))
    inside = img.clone()
    x0, y0, x1, y1 = objs[0].box
    inside[:, y0, x0] = 30  # a pixel of an object's box is not background
    assert background_rms(inside, objs) == 0.0
    blob = dataclasses.replace(objs[0], shape="unknown", box=(0, 0, 24, 24))  # a noise cluster: stays background
    assert background_rms(noisy, [*objs, blob]) == background_rms(noisy, objs)
    full = torch.zeros(3, 24, 24, dtype=torch.uint8)
    whole = [dataclasses.replace(objs[0], box=(0, 0, 24, 24))]
    assert math.isnan(background_rms(full, whole))
    with pytest.raises(ValueError, match="margin"):
        background_rms(img, objs, margin=-1)
    with pytest.raises(ValueError, match="uint8"):
        background_rms(img.float(), objs)
