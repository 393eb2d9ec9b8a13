"""Evaluation prompt sets, GenEval-style scoring, tools/evaluate.py on a tiny random checkpoint, attention views."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.testing import load_tool
from raphael_ref.checkpoint import save_model
from raphael_ref.config import get_preset
from raphael_ref.data.synthetic import COLORS, SHAPES, make_scene, render
from raphael_ref.evaluation.detector import detect, detect_batch
from raphael_ref.evaluation.prompts import (
    CATEGORIES,
    HELDOUT_PAIRS,
    binding_summary,
    evaluation_prompts,
    prompt_set,
    rescore_binding,
    score,
    uses_pair,
)
from raphael_ref.models import RaphaelUNet

# Two levels and five transformer blocks (one per down level, middle, one per up level): every code
# path of the full layout at a fraction of its cost on two shared CPU cores.
MICRO = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
         "model.expert_mult": 2, "model.edge_width": 4, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
         "model.transformer_down": [1, 1], "model.transformer_up": [1, 1]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def evaluate():
    return load_tool("evaluate")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = get_preset("toy", MICRO)
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("ckpt"), RaphaelUNet(cfg.model), cfg)


# ------------------------------------------------------------------------------ prompt sets and scoring


@pytest.mark.spec_id("eval.geneval_score")
def test_ground_truth_renders_of_every_prompt_score_correct():
    """The benchmark's ceiling is reachable: each prompt's own scene passes, in every category."""
    specs = evaluation_prompts(n_per_category=24, image_size=32)
    assert set(specs) == set(CATEGORIES)
    for cat, cat_specs in specs.items():
        found = detect_batch(torch.stack([render(s.scene) for s in cat_specs]))
        assert all(score(s, f) for s, f in zip(cat_specs, found)), cat
        assert all(not score(s, []) for s in cat_specs), f"{cat}: an empty image must fail"


@pytest.mark.spec_id("eval.geneval_score")
def test_each_category_checks_its_own_attribute():
    two = prompt_set("color_attribution", 10)
    for s in two:
        (a, b) = s.scene.objects
        swapped = make_scene([(a.shape, b.color, a.position), (b.shape, a.color, b.position)], 32)
        assert not score(s, detect(render(swapped))), "a swapped colour binding must fail color_attribution"
    for s in prompt_set("position", 10):
        (a, b) = s.scene.objects
        moved = make_scene([(a.shape, a.color, b.position), (b.shape, b.color, a.position)], 32)
        assert not score(s, detect(render(moved))), "objects at each other's places must fail position"
    for s in prompt_set("counting", 10):
        o = s.scene.objects
        free = [p for p in ("left", "right", "top", "bottom", "center") if p not in {x.position for x in o}]
        more = make_scene([(x.shape, x.color, x.position) for x in o] + [(o[0].shape, "white", free[0])], 32)
        fewer = make_scene([(x.shape, x.color, x.position) for x in o[:-1]], 32)
        assert not score(s, detect(render(more))) and not score(s, detect(render(fewer)))
    for s in prompt_set("colors", 10):
        (a,) = s.scene.objects
        other = next(c for c in COLORS if c != a.color)
        assert not score(s, detect(render(make_scene([(a.shape, other, a.position)], 32))))
        # the shape alone suffices for single_object (GenEval: the class is present)
    for s in prompt_set("single_object", 10):
        (a,) = s.scene.objects
        recoloured = make_scene([(a.shape, next(c for c in COLORS if c != a.color), "center")], 32)
        assert score(s, detect(render(recoloured)))
        other_shape = next(x for x in SHAPES if x != a.shape)
        assert not score(s, detect(render(make_scene([(other_shape, a.color, a.position)], 32))))


@pytest.mark.spec_id("eval.geneval_score")
@settings(max_examples=10)
@given(cat=st.sampled_from(CATEGORIES), n=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_prompt_sets_are_deterministic_distinct_and_in_the_caption_template(cat, n, seed):
    a, b = prompt_set(cat, n, seed=seed), prompt_set(cat, n, seed=seed)
    assert a == b and len(a) == n
    assert len({frozenset((o.shape, o.color, o.position) for o in s.scene.objects) for s in a}) == n
    assert all(s.prompt == s.scene.caption and s.category == cat for s in a)
    assert [s.uid for s in a] == [f"{cat}-{i:03d}" for i in range(n)]


def test_holdout_pairs_and_bad_arguments():
    for cat in CATEGORIES:
        assert all(uses_pair(s.scene, HELDOUT_PAIRS) for s in prompt_set(cat, 8, holdout_pairs=HELDOUT_PAIRS))
    assert max(len(s.scene.objects) for s in prompt_set("counting", 40, max_count=4)) == 4
    with pytest.raises(ValueError, match="unknown category"):
        prompt_set("colour", 3)
    with pytest.raises(ValueError, match="distinct"):
        prompt_set("single_object", 91)  # only 3 shapes x 6 colours x 5 positions exist
    with pytest.raises(ValueError, match="holdout_pairs"):
        prompt_set("colors", 3, holdout_pairs=[("pink", "circle")])


# ------------------------------------------------------------------------------ the evaluation loop


def test_perfect_and_blank_generators_bound_the_scores(evaluate, tmp_path):
    specs = evaluation_prompts(n_per_category=2)
    perfect = lambda spec, seed, n: render(spec.scene)[None].expand(n, -1, -1, -1).contiguous()  # noqa: E731
    blank = lambda spec, seed, n: torch.zeros(n, 3, 32, 32, dtype=torch.uint8)  # noqa: E731
    for fn, acc in ((perfect, 1.0), (blank, 0.0)):
        records, by_cat = evaluate.evaluate_specs(specs, fn, [0, 1], 2, tmp_path / str(acc), log=lambda s: None)
        summary = evaluate.summarize(records, CATEGORIES)
        assert summary["overall"] == acc
        assert all(v == {"accuracy": acc, "correct": int(8 * acc), "n": 8, "n_prompts": 2}
                   for v in summary["categories"].values())
        assert all(t.shape == (8, 3, 32, 32) for t in by_cat.values())
    assert len(list((tmp_path / "1.0" / "images" / "counting").glob("*.png"))) == 8


def test_evaluate_cli_on_a_tiny_random_checkpoint(evaluate, tiny_checkpoint, tmp_path):
    """Acceptance: the table for a checkpoint saved with save_model; FID (tiny extractor), CLIP, attention views."""
    import open_clip
    from safetensors.torch import save_file

    from raphael_ref.evaluation import metrics as M

    clip_cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_cfg}))
    state = open_clip.model.CLIP(**clip_cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(clip_dir / "open_clip_model.safetensors"))

    out = tmp_path / "eval"
    result = evaluate.main([str(tiny_checkpoint), "--out", str(out), "--steps", "1", "--per-prompt", "2",
                            "--prompts-per-category", "1", "--seeds", "0", "--fid", "--fid-extractor", M.TINY_EXTRACTOR,
                            "--clip", str(clip_dir), "--attention", "1", "--device", "cpu"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == result["summary"] and saved["weights"] == "model.safetensors"
    # a random-init model paints noise: its background is far from black (renders: 0)
    assert saved["background"]["n"] + saved["background"]["n_undefined"] == 12
    assert saved["background"]["rms_mean"] > 8.0
    for cat in CATEGORIES:
        v = saved["summary"]["categories"][cat]
        assert v["n"] == 2 and v["n_prompts"] == 1 and 0.0 <= v["accuracy"] <= 1.0
        assert (out / "grids" / f"{cat}.png").is_file()
        assert (out / "attention" / f"{cat}-000_pooled_s0_b0.png").is_file()
        assert (out / "attention" / f"{cat}-000_masks_s0_b0.png").is_file()
    assert len(saved["records"]) == 12 and all((out / r["image"]).is_file() for r in saved["records"])
    assert saved["fid_kid"]["n_generated"] == 12 and saved["fid_kid"]["fid"] >= 0
    assert 0.0 <= saved["clip_score"]["mean"] <= 100.0 and saved["clip_score"]["n"] == 12
    table = (out / "results.md").read_text()
    assert "| category | accuracy | correct / n | prompts |" in table
    assert all(f"| {cat} |" in table for cat in CATEGORIES) and "overall" in table
    assert "FID" in table and "CLIP score" in table
    # the same seed gives the same images (noise per prompt and seed, independent of other options)
    again = evaluate.main([str(tiny_checkpoint), "--out", str(tmp_path / "again"), "--steps", "1", "--per-prompt", "2",
                           "--prompts-per-category", "1", "--categories", "counting", "--attention", "0",
                           "--device", "cpu"])
    first = [r for r in saved["records"] if r["category"] == "counting"]
    assert [r["detected"] for r in again["records"]] == [r["detected"] for r in first]
    a = (out / first[0]["image"]).read_bytes()
    assert a == (tmp_path / "again" / again["records"][0]["image"]).read_bytes()


def test_reference_renders_bound_the_metric(evaluate, tmp_path):
    """--reference: each prompt's own scene scores 1.0; another prompt's scene (a perfect painter that
    ignores the text) scores far lower in every category that names more than one attribute."""
    base = ["--prompts-per-category", "6", "--per-prompt", "2", "--seeds", "0", "1"]
    matched = evaluate.main(["--reference", "matched", "--out", str(tmp_path / "m"), *base])
    shuffled = evaluate.main(["--reference", "shuffled", "--out", str(tmp_path / "s"), *base])
    assert matched["summary"]["overall"] == 1.0 and matched["checkpoint"] is None
    # renders have a pure black background: no residual noise, every image clean
    assert matched["background"] == {"rms_mean": 0.0, "rms_se": 0.0, "clean_fraction": 1.0, "n": 144,
                                      "n_undefined": 0}
    assert all(r["background_rms"] == 0.0 for r in matched["records"])
    assert "background noise" in (tmp_path / "m" / "results.md").read_text()
    cats = shuffled["summary"]["categories"]
    assert all(v["n"] == 24 for v in cats.values())
    assert shuffled["summary"]["overall"] < 0.4
    assert cats["position"]["accuracy"] < 0.5 and cats["color_attribution"]["accuracy"] < 0.5
    # the shuffled images are other prompts' scenes (two captions can name one scene, so: nearly all differ)
    same = sum(r["detected"] == m["detected"] for r, m in zip(shuffled["records"], matched["records"]))
    assert same <= 0.1 * len(matched["records"])
    again = evaluate.main(["--reference", "shuffled", "--out", str(tmp_path / "s2"), *base])
    assert [r["detected"] for r in again["records"]] == [r["detected"] for r in shuffled["records"]]
    assert "shuffled" in (tmp_path / "s" / "results.md").read_text()
    with pytest.raises(SystemExit):  # a checkpoint and --reference, or neither
        evaluate.parse_args(["runs/x", "--reference", "matched", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--out", str(tmp_path)])


def test_evaluate_cli_unconditional_and_weight_choice(evaluate, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "uncond"
    result = evaluate.main([str(tiny_checkpoint), "--out", str(out), "--steps", "1", "--per-prompt", "1",
                            "--prompts-per-category", "1", "--categories", "colors", "--unconditional",
                            "--attention", "0", "--device", "cpu"])
    assert result["settings"]["unconditional"] and "unconditional" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="2"):  # a user error: an `error:` line before any sampling (issue 10)
        evaluate.main([str(tiny_checkpoint), "--out", str(out), "--ema", "--device", "cpu"])
    assert "ema.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --fid without a local Inception file is refused up front
        evaluate.parse_args([str(tiny_checkpoint), "--out", str(out), "--fid"])


# ------------------------------------------------------------------------------ attention views


def test_attention_record_matches_sampling_paths(tiny_checkpoint, tmp_path):
    """The hooks see what sample() collects: masks equal DiffusionPaths.masks, pooled maps are the EOT column."""
    from raphael_ref.checkpoint import load_model
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.evaluation import attention_views as AV
    from raphael_ref.sampling import sample
    from raphael_ref.text_encoder import TextEncoder

    model, cfg = load_model(tiny_checkpoint)
    enc = TextEncoder.tiny(seed=0)
    c, u = enc(["a red circle on the left", "two blue squares at the top and at the bottom"]), enc([""])
    sched = NoiseSchedule.make(T=1000)
    kw = dict(shape=(2, cfg.model.in_channels, 16, 16), steps=3, guidance=3.0)  # steps 0, 1, 2; record the last two
    cond, uncond = (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index)
    x_ref, paths = sample(model, sched, cond, uncond, generator=torch.Generator().manual_seed(1),
                          collect_paths=True, collect_masks=True, **kw)
    x, rec = AV.collect_attention(model, sched, cond, uncond, record_steps=[1, 2],
                                  generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(x, x_ref), "recording must not change the samples"
    assert sorted(rec.pooled) == [1, 2] and rec.timesteps[1] == int(paths.timesteps[1])
    assert len(rec.grids) == cfg.n_transformer_blocks
    for s in (1, 2):
        for k in range(cfg.n_transformer_blocks):
            assert torch.equal(rec.masks[s][k], paths.masks[s][k])
            assert torch.equal(rec.routes[s][k], paths.space_routes[s, k])
            h, w = rec.grids[k]
            assert rec.pooled[s][k].shape == (2, h, w)
            # a column of a row-stochastic map: each entry in [0, 1]
            assert (rec.pooled[s][k] >= 0).all() and (rec.pooled[s][k] <= 1 + 1e-6).all()
    from raphael_ref import training as T

    images = ((T.build_codec(cfg).decode(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (2, 3, 16, 16)
    block = AV.default_view_block(rec)
    written = AV.write_attention_views(tmp_path, images, rec, c.ids, c.valid, step=2, block=block, names=["a", "b"])
    from PIL import Image

    assert len(written) == 4
    n_tokens = int(c.valid[0].sum())
    with Image.open(tmp_path / f"a_masks_s2_b{block}.png") as im:
        assert im.width == (1 + n_tokens) * (16 * 4 + 2) - 2  # the image and one tile per real token
    with pytest.raises(ValueError, match="not recorded"):
        AV.write_attention_views(tmp_path, images, rec, c.ids, c.valid, step=0, block=block)
    assert AV.token_labels(c.ids[0, :n_tokens])[:3] == ["<sot>", "a", "red"]


# ------------------------------------------------------------------------------ diagnostic category


def test_single_position_is_a_diagnostic_outside_the_overall_mean(evaluate, tmp_path):
    """single_position: one object, scored on its shape at its named cell; reported, never averaged in."""
    from raphael_ref.evaluation.prompts import ALL_CATEGORIES, DIAGNOSTIC_CATEGORIES

    assert DIAGNOSTIC_CATEGORIES == ("single_position",) and ALL_CATEGORIES[:len(CATEGORIES)] == CATEGORIES
    specs = prompt_set("single_position", 20, image_size=24)
    assert len({s.prompt for s in specs}) == 20
    for s in specs:
        (obj,) = s.scene.objects
        assert [(r.shape, r.color, r.position) for r in s.requirements] == [(obj.shape, None, obj.position)]
        assert score(s, detect(render(s.scene)))  # its own render passes
        moved = [p for p in ("left", "right", "top", "bottom", "center") if p != obj.position][0]
        assert not score(s, detect(render(make_scene([(obj.shape, obj.color, moved)], 24))))  # elsewhere fails
    # the GenEval categories keep their prompt sets (their seeds did not move)
    assert [s.prompt for s in prompt_set("position", 5)] == [s.prompt for s in evaluation_prompts(["position"], 5)["position"]]
    # a painter that draws the right shape in the wrong place: 0 on single_position, 1 on single_object
    records = [{"category": "single_object", "correct": True, "uid": "a"},
               {"category": "single_position", "correct": False, "uid": "b"}]
    summary = evaluate.summarize(records, ["single_object", "single_position"])
    assert summary["overall"] == 1.0 and summary["categories"]["single_position"]["accuracy"] == 0.0
    table = evaluate.markdown_table(summary, ["# t"])
    assert "| single_position | 0.000 |" in table and "without single_position" in table
    out = evaluate.main(["--reference", "matched", "--out", str(tmp_path / "m"), "--prompts-per-category", "3",
                         "--per-prompt", "1", "--seeds", "0", "--categories", "colors", "single_position"])
    assert out["summary"]["categories"]["single_position"]["accuracy"] == 1.0


def test_background_summary_counts_undefined_images_as_not_clean(evaluate):
    recs = [{"background_rms": 0.0}, {"background_rms": 20.0}, {"background_rms": float("nan")}]
    got = evaluate.background_summary(recs)
    # mean and se over the two defined images (sd of [0, 20] is 14.14..., / sqrt 2 = 10); clean: 1 of all 3
    assert got == {"rms_mean": 10.0, "rms_se": pytest.approx(10.0, rel=1e-12), "clean_fraction": 1 / 3, "n": 2,
                   "n_undefined": 1}
    assert evaluate.background_summary([{"background_rms": float("nan")}])["clean_fraction"] == 0.0


# ------------------------------------------------------------------------------ two-object binding diagnostic


def test_binding_outcome_names_why_a_two_object_prompt_failed():
    """bound / swapped / one_shape / other, from renders whose failure is known by construction."""
    from raphael_ref.evaluation.prompts import binding_outcome

    for cat, attr in (("position", "position"), ("color_attribution", "color")):
        for s in prompt_set(cat, 12):
            (a, b) = s.scene.objects
            assert binding_outcome(s, detect(render(s.scene))) == "bound"
            # each shape with the other's attribute: the words read, the binding exchanged
            if attr == "position":
                swapped = [(a.shape, a.color, b.position), (b.shape, b.color, a.position)]
            else:
                swapped = [(a.shape, b.color, a.position), (b.shape, a.color, b.position)]
            assert binding_outcome(s, detect(render(make_scene(swapped, 32)))) == "swapped"
            # object b copies a's shape (both attributes still drawn): one of the two shapes is missing
            copied = [(a.shape, a.color, a.position), (a.shape, b.color, b.position)]
            assert binding_outcome(s, detect(render(make_scene(copied, 32)))) == "one_shape"
            assert binding_outcome(s, []) == "one_shape"
            # both shapes drawn, but b's attribute on neither: not bound, not swapped
            free_pos = next(p for p in ("left", "right", "top", "bottom", "center") if p not in (a.position, b.position))
            free_col = next(c for c in COLORS if c not in (a.color, b.color))
            other = ([(a.shape, a.color, a.position), (b.shape, b.color, free_pos)] if attr == "position"
                     else [(a.shape, a.color, a.position), (b.shape, free_col, b.position)])
            assert binding_outcome(s, detect(render(make_scene(other, 32)))) == "other"
    with pytest.raises(ValueError, match="two-object prompts"):
        binding_outcome(prompt_set("two_objects", 1)[0], [])


def test_binding_summary_counts_and_the_chance_rate(evaluate, tmp_path):
    recs = ([{"category": "position", "binding": "bound"}] * 3 + [{"category": "position", "binding": "swapped"}] * 3
            + [{"category": "position", "binding": "one_shape"}] * 4 + [{"category": "colors", "correct": True}]
            + [{"category": "color_attribution", "binding": "other"}])
    got = binding_summary(recs)
    assert got["position"] == {"bound": 3, "swapped": 3, "one_shape": 4, "other": 0, "n": 10, "binding_rate": 0.5}
    assert got["color_attribution"]["n"] == 1 and got["color_attribution"]["binding_rate"] != got["color_attribution"]["binding_rate"]
    assert binding_summary([{"category": "colors"}]) == {}
    # the CLI writes it: matched renders bind every image
    out = evaluate.main(["--reference", "matched", "--out", str(tmp_path / "m"), "--prompts-per-category", "3",
                         "--per-prompt", "1", "--seeds", "0", "--categories", "position", "color_attribution", "colors"])
    assert out["binding"]["position"] == {"bound": 3, "swapped": 0, "one_shape": 0, "other": 0, "n": 3, "binding_rate": 1.0}
    assert all("binding" not in r for r in out["records"] if r["category"] == "colors")
    assert "bound / (bound + swapped) 1.00" in (tmp_path / "m" / "results.md").read_text()
    order = out["shape_order"]["position"]
    assert {k: order[k] for k in ("both", "first_only", "second_only", "neither", "n")} == {
        "both": 3, "first_only": 0, "second_only": 0, "neither": 0, "n": 3}
    assert math.isnan(order["first_share"])  # no image lost a shape
    assert "colors" not in out["shape_order"] and "both 3, first only 0" in (tmp_path / "m" / "results.md").read_text()


def test_rescore_binding_matches_the_recorded_outcomes(evaluate, tmp_path):
    """Old results (no "binding" in their records) are rescored from their detections to the same outcomes."""
    out = evaluate.main(["--reference", "shuffled", "--out", str(tmp_path / "s"), "--prompts-per-category", "6",
                         "--per-prompt", "2", "--seeds", "0", "--categories", "position", "color_attribution"])
    stripped = [{k: v for k, v in r.items() if k != "binding"} for r in out["records"]]
    again = rescore_binding(stripped)
    assert [r["binding"] for r in again] == [r["binding"] for r in out["records"]]
    assert json.dumps(binding_summary(again)) == json.dumps(out["binding"])  # NaN rates (none paired) alike
    assert {r["binding"] for r in again} - {"bound"}  # shuffled scenes fail: the test sees more than one outcome
    bad = dict(stripped[0], prompt="a red circle on the left and a blue square at the top")
    if bad["prompt"] != stripped[0]["prompt"]:
        with pytest.raises(ValueError, match="other prompt options"):
            rescore_binding([bad])


def test_binding_table_tool(evaluate, tmp_path):
    from raphael_ref.testing import load_tool

    bt = load_tool("binding_table")
    evaluate.main(["--reference", "matched", "--out", str(tmp_path / "m"), "--prompts-per-category", "3",
                   "--per-prompt", "1", "--seeds", "0", "--categories", "position", "color_attribution"])
    rows = bt.main([f"renders={tmp_path / 'm'}", "--out", str(tmp_path / "t")])
    assert rows["renders"]["position"]["binding_rate"] == 1.0 and rows["renders"]["position"]["binding_rate_se"] == 0.0
    assert "| renders | position | 3 | 0 | 0 | 0 | 3 | 1.00 ± 0.00 |" in (tmp_path / "t.md").read_text()
    # the shape-order table: matched renders draw both named shapes in every image; no one-shape image, no share
    assert "| renders | position | 3 | 0 | 0 | 0 | 3 | - |" in (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["shape_order"]["renders"]["color_attribution"]["both"] == 3
    with pytest.raises(SystemExit, match="LABEL=EVAL"):
        bt.main([str(tmp_path / "m")])
    evaluate.main(["--reference", "matched", "--out", str(tmp_path / "c"), "--prompts-per-category", "2",
                   "--per-prompt", "1", "--seeds", "0", "--categories", "colors"])
    with pytest.raises(SystemExit, match="no position or color_attribution"):
        bt.main([f"c={tmp_path / 'c'}"])


def test_named_shapes_drawn_splits_one_shape_images_by_caption_order():
    """both / first_only / second_only / neither, from renders whose drawn shapes are known by construction."""
    from raphael_ref.evaluation.prompts import named_shapes_drawn, shape_order_summary

    records = []
    for cat in ("two_objects", "position", "color_attribution"):
        for s in prompt_set(cat, 6):
            (a, b) = s.scene.objects
            assert a.shape != b.shape and s.prompt.index(a.shape) < s.prompt.index(b.shape)  # caption order
            cases = {
                "both": s.scene,
                "first_only": make_scene([(a.shape, a.color, a.position), (a.shape, b.color, b.position)], 32),
                "second_only": make_scene([(b.shape, b.color, a.position), (b.shape, b.color, b.position)], 32),
            }
            for want, scene in cases.items():
                objs = detect(render(scene))
                assert named_shapes_drawn(s, objs) == want
                records.append({"category": cat, "uid": s.uid, "prompt": s.prompt,
                                "detected": [[o.shape, o.color, o.position] for o in objs]})
            assert named_shapes_drawn(s, []) == "neither"
    got = shape_order_summary(records)
    for cat in ("two_objects", "position", "color_attribution"):
        assert got[cat] == {"both": 6, "first_only": 6, "second_only": 6, "neither": 0, "n": 18,
                            "first_share": 0.5, "first_share_se": math.sqrt(0.25 / 12)}
    assert shape_order_summary([r for r in records if r["uid"].startswith("position")][1:2])["position"][
        "first_share"] == 1.0
    with pytest.raises(ValueError, match="two-object prompts"):
        named_shapes_drawn(prompt_set("counting", 1)[0], [])
    with pytest.raises(ValueError, match="other prompt options"):
        shape_order_summary([dict(records[0], prompt="a red circle on the left")])


def test_evaluate_cli_with_excite_and_phrases_apart(evaluate, tiny_checkpoint, tmp_path, monkeypatch):
    """The sampling-time options reach the sampler: Attend-and-Excite (E84) with the shape words' tokens as
    subjects, and the phrases-apart encoding; the attention views still record (the recorder skips the update);
    --prompt-seed draws prompts off the benchmark."""
    import raphael_ref.evaluation.attention_views as AV
    import raphael_ref.sampling as S

    seen = []
    orig = S.sample

    def spy(*a, **kw):
        seen.append((kw.get("excite"), a[2][0].clone()))
        return orig(*a, **kw)

    monkeypatch.setattr(S, "sample", spy)
    monkeypatch.setattr(AV, "sample", spy)  # the attention views sample through their own import
    argv = [str(tiny_checkpoint), "--steps", "2", "--per-prompt", "2", "--prompts-per-category", "1",
            "--categories", "two_objects", "--device", "cpu", "--seeds", "0"]
    plain = evaluate.main(argv + ["--out", str(tmp_path / "plain"), "--attention", "0"])
    result = evaluate.main(argv + ["--out", str(tmp_path / "on"), "--excite-scale", "30", "--excite-steps", "1",
                                   "--phrases-apart", "--prompt-seed", "777"])
    assert result["settings"]["excite_scale"] == 30 and result["settings"]["phrases_apart"]
    text = (tmp_path / "on" / "results.md").read_text()
    assert "Attend-and-Excite (E84) scale 30 on the first 1 steps (shape words)" in text and "encoded apart" in text
    assert "prompt seed 777 (not the benchmark set)" in text  # tuning prompts, off the benchmark
    assert result["records"][0]["prompt"] != plain["records"][0]["prompt"]
    assert result["attention_views"] and plain["summary"].keys() == result["summary"].keys()
    (ex_off, h_off), (ex_on, h_on) = seen[0], seen[-1]
    assert ex_off is None and ex_on is not None and ex_on.scale == 30 and ex_on.steps == 1
    assert len(ex_on.subjects) == 2 and len(ex_on.subjects[0]) == 2  # two named shapes, one token each
    assert not torch.equal(h_off, h_on)  # the second phrase's states changed
