"""tools/lora_toy.py (issue 12, item 1): the new-concept set, its prompt sets and the measures, checked on the
renderer's own ground truth (where every verdict is known), and the report writers; the end-to-end study on a
micro run is ``-m slow``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raphael_ref.data.synthetic import COLORS, NOVEL_COLORS, POSITIONS, SHAPES, render
from raphael_ref.evaluation.detector import DetectorConfig, detect_batch
from raphael_ref.evaluation.prompts import CATEGORIES, evaluation_prompts

from raphael_ref.testing import load_tool


S = 24  # the toy preset's image side


@pytest.fixture(scope="module")
def tool():
    return load_tool("lora_toy")


def _unit(scenes) -> torch.Tensor:
    return torch.stack([render(s) for s in scenes]).float() / 127.5 - 1.0


def test_concept_set_is_narrow_distinct_and_deterministic(tool):
    scenes = tool.concept_scenes(28, S)
    assert len(scenes) == 28
    assert len({frozenset((o.shape, o.color, o.position) for o in s.objects) for s in scenes}) == 28
    for s in scenes:
        cyan = [o for o in s.objects if o.color == "cyan"]
        assert len(cyan) == 1 and cyan[0].position == "center"  # the concept only ever in the centre
        assert all(o.color in COLORS for o in s.objects if o.color != "cyan")
        assert s.caption.startswith(f"a cyan {cyan[0].shape} in the center")
    assert sum(len(s.objects) == 1 for s in scenes) == 3  # a lone cyan object of each shape; the rest carry a known one
    assert [s.caption for s in tool.concept_scenes(28, S)] == [s.caption for s in scenes]
    assert [s.caption for s in tool.concept_scenes(28, S, seed=1)] != [s.caption for s in scenes]
    with pytest.raises(ValueError, match="--n-images"):
        tool.concept_scenes(0, S)


def test_concept_set_folder_is_read_by_the_image_folder_loader(tool, tmp_path):
    from raphael_ref.data.loader import make_train_loader

    scenes = tool.concept_scenes(6, S)
    tool.write_concept_set(tmp_path / "concept", scenes)
    assert sorted(p.name for p in (tmp_path / "concept").iterdir())[:2] == ["000.png", "000.txt"]
    batch = next(iter(make_train_loader(str(tmp_path / "concept"), image_size=S, batch_size=6, seed=0)))
    assert sorted(batch["caption"]) == sorted(s.caption for s in scenes)
    x = ((batch["image"] + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] floats back to bytes
    by_caption = {s.caption: render(s) for s in scenes}
    for cap, img in zip(batch["caption"], x):
        assert torch.equal(img, by_caption[cap])  # 24 px stays 24 px: no resampling


def test_prompt_sets(tool):
    concept = tool.concept_prompts(S)
    assert len(concept) == len(SHAPES) * len(POSITIONS) == 15
    assert {(r.shape, r.position) for s in concept for r in s.requirements} == {(a, b) for a in SHAPES for b in POSITIONS}
    combo = tool.combo_prompts(24, S)
    assert len({s.prompt for s in combo}) == 24
    for s in combo:
        cyan, old = s.requirements
        assert cyan.color == "cyan" and cyan.position != "center" and old.color in COLORS
        assert cyan.shape != old.shape and cyan.position != old.position
    assert [s.prompt for s in tool.combo_prompts(24, S)] == [s.prompt for s in combo]


def test_measures_on_the_ground_truth_renders(tool):
    """The rendered scene of every prompt passes every verdict; no old prompt shows cyan; a concept render asked
    off-centre is not 'in the centre anyway'."""
    sets = {"concept": tool.concept_prompts(S), "combo": tool.combo_prompts(6, S),
            "old": [s for c in evaluation_prompts(CATEGORIES, 2, image_size=S).values() for s in c]}
    per_prompt = {"concept": 2, "combo": 1, "old": 1}
    images = {k: _unit([s.scene for s in v for _ in range(per_prompt[k])]) for k, v in sets.items()}
    m = tool.measure(images, sets, per_prompt)
    assert len(m["concept"]["verdict"]) == 30 and len(m["concept"]["cyan_at_named_position_offcentre"]) == 24
    for key in ("verdict", "cyan_present", "cyan_shape", "cyan_at_named_position_offcentre"):
        assert m["concept"][key] == [1.0] * len(m["concept"][key]), key
    assert m["concept"]["cyan_in_centre_when_asked_elsewhere"] == [0.0] * 24
    assert m["combo"]["verdict"] == m["combo"]["cyan_half"] == m["combo"]["old_half"] == [1.0] * 6
    assert m["old"]["verdict"] == [1.0] * 12 and m["old"]["cyan_present"] == [0.0] * 12
    assert set(m["old"]) >= {f"verdict_{c}" for c in CATEGORIES}
    # the same concept renders with their cyan object swapped for a centred one: position verdicts fail
    centred = _unit([tool.concept_prompts(S)[POSITIONS.index("center")].scene] * 30)
    m2 = tool.measure({**images, "concept": centred}, sets, per_prompt)
    assert m2["concept"]["cyan_in_centre_when_asked_elsewhere"] == [1.0] * 24
    assert m2["concept"]["cyan_at_named_position_offcentre"] == [0.0] * 24
    assert sum(m2["concept"]["verdict"]) == 2  # the two images of the one prompt that asked for this scene


def test_cyan_needs_the_extended_palette():
    """Without cyan in its palette the detector reads a cyan object as background (>= 255 from every colour), so a
    verdict on the new concept needs ``DetectorConfig(extra_colors=("cyan",))``; the palette's colours keep their
    readings either way."""
    from raphael_ref.data.synthetic import make_scene

    imgs = torch.stack([render(make_scene([(sh, "cyan", pos), ("square" if sh != "square" else "circle", "red",
                                                               "top" if pos != "top" else "bottom")], S))
                        for sh in SHAPES for pos in POSITIONS])
    plain = detect_batch(imgs)
    extended = detect_batch(imgs, DetectorConfig(extra_colors=("cyan",)))
    for (sh, pos), a, b in zip([(sh, pos) for sh in SHAPES for pos in POSITIONS], plain, extended):
        assert [o.color for o in a] == ["red"]
        assert sorted((o.shape, o.color, o.position) for o in b if o.color == "cyan") == [(sh, "cyan", pos)]
        assert [(o.shape, o.position) for o in a] == [(o.shape, o.position) for o in b if o.color == "red"]
    assert min(math.dist(NOVEL_COLORS["cyan"], c) for c in [*COLORS.values(), (0, 0, 0)]) >= 255
    with pytest.raises(ValueError, match="extra_colors"):
        DetectorConfig(extra_colors=("orange",))
    with pytest.raises(ValueError, match="extra_colors"):
        DetectorConfig(extra_colors="cyan")


def _fake_per_model(tool, bases, seeds, rng):
    names = [f"{b}/base" for b in bases] + [f"{b}/lora_s{q}" for b in bases for q in seeds]
    return {n: {s: {m: rng.integers(0, 2, 10).astype(float).tolist() for ss, m, _ in tool.MEASURES if ss == s}
                for s in ("concept", "combo", "old")} for n in names}


def test_summary_and_markdown(tool, tmp_path):
    rng = np.random.default_rng(0)
    per_model = _fake_per_model(tool, ["raphael", "dense"], [0, 1, 2], rng)
    rows = tool.summarize(per_model, ["raphael", "dense"], [0, 1, 2])
    cell = rows["concept/verdict"]
    seeds = [float(np.mean(per_model[f"raphael/lora_s{q}"]["concept"]["verdict"])) for q in (0, 1, 2)]
    assert cell["raphael + LoRA"]["per_seed"] == seeds
    assert cell["raphael + LoRA"]["mean_se_over_seeds"][0] == pytest.approx(np.mean(seeds))
    assert cell["raphael + LoRA"]["mean_se_over_seeds"][1] == pytest.approx(np.std(seeds, ddof=1) / math.sqrt(3))
    dense = [float(np.mean(per_model[f"dense/lora_s{q}"]["concept"]["verdict"])) for q in (0, 1, 2)]
    assert cell["difference"]["per_seed"] == pytest.approx([a - b for a, b in zip(seeds, dense)])
    p = float(np.mean(per_model["dense/base"]["concept"]["verdict"]))
    assert cell["dense base"] == pytest.approx([p, math.sqrt(p * (1 - p) / 10)])
    result = {"command": "python tools/lora_toy.py ...", "args": {"n_images": 28, "targets": "attention", "rank": 4,
              "steps": 3, "batch_size": 8, "lr": 1e-3, "lora_seeds": [0, 1, 2], "sampler_steps": 20, "guidance": 7.5},
              "bases": {"raphael": "runs/a", "dense": "runs/b"}, "concept_set": "runs/x/concept",
              "adapter_parameters": {"raphael": 10, "dense": 10},
              "n_images_per_set": {"concept": 10, "combo": 10, "old": 10}, "rows": rows, "seconds": 1.0}
    md = tmp_path / "r.md"
    tool.write_markdown(result, md)
    text = md.read_text()
    assert text.count("\n| ") == len(tool.MEASURES) + 1 and "raphael - dense" in text
    md.write_text(text + "\n## Reading\nhand-written\n")
    tool.write_markdown(result, md)
    assert md.read_text().endswith("## Reading\nhand-written\n")


@pytest.mark.slow
def test_study_end_to_end_on_a_micro_run(tool, tmp_path):
    """Two micro bases, two LoRA seeds, a few steps: adapters written, every model measured, the report written;
    a second call reuses the adapters (no new fine-tune)."""
    from raphael_ref.testing.tiny_run import make_tiny_run

    a = make_tiny_run(tmp_path / "a", seed=0)
    b = make_tiny_run(tmp_path / "b", seed=1, overrides={"model.use_space_moe": False, "model.use_time_moe": False})
    argv = ["--base", f"raphael={a}", "--base", f"dense={b}", "--work", str(tmp_path / "work"), "--out",
            str(tmp_path / "report"), "--n-images", "4", "--lora-seeds", "0", "1", "--steps", "2", "--batch-size", "2",
            "--per-prompt", "1", "--n-combo", "2", "--n-old", "1", "--sampler-steps", "2", "--jobs", "2"]
    result = tool.main(argv)
    assert sorted(result["per_image"]) == ["dense/base", "dense/lora_s0", "dense/lora_s1", "raphael/base",
                                           "raphael/lora_s0", "raphael/lora_s1"]
    assert result["n_images_per_set"] == {"concept": 15, "combo": 2 * 2, "old": 6}  # --combo-per-prompt 2
    for ext in (".md", ".json", ".png"):
        assert (tmp_path / f"report{ext}").exists()
    assert json.loads((tmp_path / "report.json").read_text())["rows"]["old/verdict"]["difference"]["per_seed"]
    stamp = (tmp_path / "work" / "raphael_s0" / "adapter.safetensors").stat().st_mtime_ns
    tool.main(argv)
    assert (tmp_path / "work" / "raphael_s0" / "adapter.safetensors").stat().st_mtime_ns == stamp
