"""Ablations (Sec. 4.2, Fig. 6): pixel-FD, the plan of variants, the paper's orderings, the table and plot
writers, and tools/ablate.py end to end on a micro config (two short trainings in subprocesses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raphael_ref.testing import load_tool
from raphael_ref.evaluation import ablation as A
from raphael_ref.evaluation import plots
from raphael_ref.evaluation.metrics import frechet_distance, gaussian_statistics

# Two levels, five transformer blocks, 16 x 16 pixels (as tests/test_evaluate.py), tiny training batches.
MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.transformer_down=[1,1]", "model.transformer_up=[1,1]", "train.batch_size=4",
         "train.warmup_steps=2", "sample.steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def ablate():
    return load_tool("ablate")


def _images(seed: int, n: int, size: int, scale: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, scale, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------ paired bootstrap of a Frechet distance


@pytest.mark.spec_id("eval.fd_bootstrap")
def test_paired_bootstrap_fd_difference_direction_symmetry_and_checks():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(96, 8, generator=g, dtype=torch.float64)
    close = ref + 0.1 * torch.randn(96, 8, generator=g, dtype=torch.float64)  # near the references
    far = 1.5 * torch.randn(96, 8, generator=g, dtype=torch.float64) + 1.0  # shifted and wider

    def fd(x):
        return float(frechet_distance(*gaussian_statistics(x), *gaussian_statistics(ref)))

    b = A.paired_bootstrap_fd(close, far, ref, n_boot=40)
    assert b["n"] == 96 and b["n_boot"] == 40
    assert b["diff"] == pytest.approx(fd(close) - fd(far), rel=1e-12)  # the full sets' difference
    assert b["diff"] < -3 * b["se"] < 0  # far is clearly worse, beyond its sampling noise
    swapped = A.paired_bootstrap_fd(far, close, ref, n_boot=40)  # same seed: the same resamples, negated
    assert swapped["diff"] == pytest.approx(-b["diff"], rel=1e-12)
    assert swapped["se"] == pytest.approx(b["se"], rel=1e-9)
    assert A.paired_bootstrap_fd(close, far, ref, n_boot=40) == b  # seeded: reproducible
    assert A.paired_bootstrap_fd(close, far, ref, n_boot=40, seed=1)["se"] != b["se"]
    same = A.paired_bootstrap_fd(close, close, ref, n_boot=10)
    assert same["diff"] == 0.0 and same["se"] == 0.0  # identical sets: no difference in any resample
    with pytest.raises(ValueError, match="same N"):
        A.paired_bootstrap_fd(close[:50], far, ref)
    with pytest.raises(ValueError, match="N >= 3"):
        A.paired_bootstrap_fd(close[:2], far[:2], ref[:2])
    with pytest.raises(ValueError, match="n_boot"):
        A.paired_bootstrap_fd(close, far, ref, n_boot=1)


@pytest.mark.spec_id("eval.fd_bootstrap")
def test_ablate_fd_bootstrap_reads_the_saved_images_in_record_order(ablate, tmp_path):
    """The report's bootstrap table: full (the ground-truth renders) against a variant drawn with heavy noise."""
    import argparse

    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation.metrics import save_images
    from raphael_ref.evaluation.prompts import evaluation_prompts

    args = argparse.Namespace(out=str(tmp_path), categories=["colors", "single_object"], prompts_per_category=3,
                              seeds=[0], per_prompt=2, guidance=[3.0, 6.0])
    plan = A.ablation_plan(0.2, 500, modules=["full", "no_edge", "no_space_moe"])
    specs = evaluation_prompts(args.categories, 3, image_size=24)
    g = torch.Generator().manual_seed(0)
    for run in ("full", "no_edge", "no_space_moe"):
        for cat, cat_specs in specs.items():
            for spec in cat_specs:
                clean = render(spec.scene).unsqueeze(0).expand(2, -1, -1, -1)  # (2, 3, 24, 24)
                noise = torch.randint(-120, 121, clean.shape, generator=g)
                images = clean if run == "full" else (clean.int() + noise).clamp(0, 255).to(torch.uint8)
                for w in (3.0, 6.0):
                    if run == "no_space_moe" and w == 6.0:
                        continue  # an evaluation whose images are gone: its cells stay empty
                    save_images(images, tmp_path / run / "eval" / f"g{w:g}" / "images" / cat, prefix=f"{spec.uid}_s0_")
    order = ablate.eval_record_order(args)  # image i of a run is paired with the render of its own prompt
    assert torch.equal(ablate._eval_images(args, "full", 3.0, [n for _, n in order]),
                       torch.stack([render(spec.scene) for spec, _ in order]))
    assert ablate._eval_images(args, "no_space_moe", 6.0, [n for _, n in order]) is None
    boot = ablate.fd_bootstrap(args, plan, n_boot=20)
    cells = {(r["variant"], r["guidance"]): r for r in boot}
    assert set(cells) == {("no_edge", 3.0), ("no_edge", 6.0), ("no_space_moe", 3.0)}
    for r in boot:
        assert r["n"] == 12 and r["n_boot"] == 20
        assert r["diff"] < 0 and r["se"] > 0  # full (the renders themselves) is nearer the renders
    table = ablate.fd_bootstrap_table(boot, plan, [3.0, 6.0])
    assert "| no_edge | " in table and "| full |" not in table
    assert table.splitlines()[-1].startswith("| no_space_moe | ") and table.splitlines()[-1].endswith(" |  |")


# ------------------------------------------------------------------------------ pixel-FD


@pytest.mark.spec_id("eval.pixel_fd")
@settings(max_examples=15)
@given(n=st.integers(1, 4), size=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_pixel_features_match_a_per_pixel_count(n, size, seed):
    """Histogram = per-pixel count into the 27 colour cells (a plain loop), pooled part = block means."""
    imgs = _images(seed, n, size)
    f = A.pixel_features(imgs)
    assert f.shape == (n, 27 + 48) and f.dtype == torch.float64
    for i in range(n):
        counts = [0] * 27
        for y in range(size):
            for x in range(size):
                r, g, b = (int(imgs[i, c, y, x]) for c in range(3))
                counts[(r * 3 // 256) * 9 + (g * 3 // 256) * 3 + (b * 3 // 256)] += 1
        torch.testing.assert_close(f[i, :27], torch.tensor(counts, dtype=torch.float64) / size**2, rtol=0, atol=1e-15)
    assert torch.allclose(f[:, :27].sum(1), torch.ones(n, dtype=torch.float64))
    assert (f[:, 27:] >= 0).all() and (f[:, 27:] <= 1).all()
    if size % 4 == 0:  # the pooled grid is then exact block means
        k = size // 4
        blocks = imgs.double().reshape(n, 3, 4, k, 4, k).mean(dim=(3, 5)) / 255
        torch.testing.assert_close(f[:, 27:], blocks.reshape(n, -1), rtol=0, atol=1e-12)


@pytest.mark.spec_id("eval.pixel_fd")
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 10))
def test_pixel_fd_is_the_frechet_distance_of_the_features(seed, n):
    a, b = _images(seed, n, 8), _images(seed + 1, n + 1, 8, scale=128)
    fa, fb = A.pixel_features(a), A.pixel_features(b)
    expect = frechet_distance(*gaussian_statistics(fa), *gaussian_statistics(fb))
    assert A.pixel_fd(a, b) == pytest.approx(float(expect), rel=1e-12, abs=1e-12)
    assert A.pixel_fd(a, b) == pytest.approx(A.pixel_fd(b, a), rel=1e-6, abs=1e-9)  # symmetric


@pytest.mark.spec_id("eval.pixel_fd")
def test_pixel_fd_reductions():
    a = _images(0, 12, 16)
    assert A.pixel_fd(a, a) == pytest.approx(0.0, abs=1e-6)
    # the same set in another order is the same distribution
    assert A.pixel_fd(a, a[torch.randperm(12)]) == pytest.approx(0.0, abs=1e-6)
    # one constant image per set: zero covariances, so pixel-FD = ||mu_a - mu_b||^2 of the features
    red = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 255
    black = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    d = A.pixel_features(red[:1])[0] - A.pixel_features(black[:1])[0]
    assert A.pixel_fd(red, black) == pytest.approx(float(d @ d), rel=1e-9)
    assert float(d @ d) == pytest.approx(2 + 16 * 1.0, rel=1e-12)  # two histogram cells swap; 16 red cells at 1
    # farther from the reference is larger: noise of growing amplitude around the reference renders
    ref = torch.zeros(40, 3, 16, 16, dtype=torch.uint8)
    ref[:, 0, 4:12, 4:12] = 255
    g = torch.Generator().manual_seed(0)
    fds = [A.pixel_fd((ref.float() + s * torch.randn(ref.shape, generator=g)).clamp(0, 255).to(torch.uint8), ref)
           for s in (5.0, 40.0, 120.0)]
    assert fds[0] < fds[1] < fds[2]


def test_pixel_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        A.pixel_fd(torch.rand(4, 3, 8, 8), _images(0, 4, 8))
    with pytest.raises(ValueError, match=">= 2 images"):
        A.pixel_fd(_images(0, 1, 8), _images(1, 4, 8))


# ------------------------------------------------------------------------------ plan and orderings


def by_name(plan, name):
    return next(v for v in plan if v.name == name)


@pytest.mark.spec_id("eval.ablation_orderings")
def test_ablation_plan_variants_and_aliases():
    plan = A.ablation_plan(0.2, 500, alphas=[0.1, 0.2, 0.4], t_cs=[250, 500, 750])
    names = [v.name for v in plan]
    assert names[:5] == ["full", "no_space_moe", "no_time_moe", "no_edge", "ediff_intervals"]
    assert by_name(plan, "ediff_intervals").set_args == ["model.time_router=intervals"]
    assert names[5:] == ["alpha_0.1", "alpha_0.2", "alpha_0.4", "t_c_250", "t_c_500", "t_c_750"]
    by = {v.name: v for v in plan}
    assert by["alpha_0.2"].run == "full" and by["alpha_0.2"].overrides == ()
    assert by["t_c_500"].run == "full"
    assert by["alpha_0.4"].set_args == ["model.mask_alpha=0.4"] and by["alpha_0.4"].run == "alpha_0.4"
    assert by["t_c_750"].set_args == ["model.edge_t_cutoff=750"]
    assert by["no_space_moe"].set_args == ["model.use_space_moe=false"]
    assert len({v.run for v in plan}) == 9  # 5 module runs + 2 alpha + 2 T_c: the base points reuse "full"
    # a sweep point equal to the base config brings the full run in even when "full" was not asked for
    only = A.ablation_plan(0.3, 500, modules=["no_edge"], alphas=[0.3, 0.5])
    assert [v.name for v in only] == ["full", "no_edge", "alpha_0.3", "alpha_0.5"]
    with pytest.raises(ValueError, match="unknown module"):
        A.ablation_plan(0.2, 500, modules=["no_gates"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.ablation_plan(0.2, 500, alphas=[1.5])
    with pytest.raises(ValueError, match="twice"):
        A.ablation_plan(0.2, 500, t_cs=[250, 250])


def _rows(full_align, other_align, full_fd, other_fd, guidance=(1.5, 3.0, 4.5)):
    rows = []
    for name, al, fd in (("full", full_align, full_fd), ("no_space_moe", other_align, other_fd),
                         ("no_time_moe", other_align, other_fd), ("no_edge", other_align, other_fd)):
        v = next(x for x in A.MODULE_VARIANTS if x.name == name)
        for g, a, f in zip(guidance, al, fd):
            rows.append(A.result_row(v, g, {"overall": a, "categories": {"colors": {"accuracy": a}}}, f, "pixel-FD"))
    return rows


@pytest.mark.spec_id("eval.ablation_orderings")
@settings(max_examples=20)
@given(base=st.lists(st.floats(0.1, 0.8), min_size=3, max_size=3), fd=st.lists(st.floats(1, 50), min_size=3, max_size=3),
       gap=st.floats(0.01, 0.1))
def test_paper_orderings_follow_the_rows(base, fd, gap):
    better = A.paper_orderings(_rows([b + gap for b in base], base, [f - gap for f in fd], fd))
    module = [c for c in better if "helps" in c["claim"]]
    assert len(module) == 6 and all(c["verdict"] == "yes" for c in module)
    worse = A.paper_orderings(_rows(base, [b + gap for b in base], fd, [f - gap for f in fd]))
    assert all(c["verdict"] == "no" for c in worse if "helps" in c["claim"])
    mixed = A.paper_orderings(_rows([base[0] + gap, base[1] - gap, base[2]], base, fd, fd))
    align = next(c for c in mixed if c["claim"].startswith("space-MoE helps alignment"))
    assert align["verdict"] == "partly" and align["detail"].startswith("1/3")
    ties = next(c for c in mixed if c["claim"].startswith("space-MoE helps fidelity"))
    assert ties["verdict"] == "no"  # equal values are no win


@pytest.mark.spec_id("eval.ablation_orderings")
def test_best_guidance_and_sweep_orderings():
    full = next(v for v in A.MODULE_VARIANTS if v.name == "full")
    no = next(v for v in A.MODULE_VARIANTS if v.name == "no_space_moe")
    s = {"overall": 0.5, "categories": {}}
    rows = [A.result_row(full, g, s, f, "pixel-FD") for g, f in ((3.0, 5.0), (4.5, 4.0), (6.0, 4.5))]
    rows += [A.result_row(no, g, s, f, "pixel-FD") for g, f in ((3.0, 5.0), (4.5, 6.0), (6.0, 7.0))]
    assert A.best_guidance(rows[:3]) == 4.5 and A.best_guidance(rows[3:]) == 3.0
    shift = next(c for c in A.paper_orderings(rows) if "shifts" in c["claim"])
    assert shift["verdict"] == "yes"
    flat = [dict(r, fidelity=5.0 + 1e-4 * r["guidance"]) if r["variant"] == "full" else r for r in rows]
    assert next(c for c in A.paper_orderings(flat) if "shifts" in c["claim"])["verdict"] == "n/a"
    plan = A.ablation_plan(0.2, 500, modules=[], alphas=[0.1, 0.2, 0.4])
    sweep = [A.result_row(v, 4.5, {"overall": a, "categories": {}}, f, "pixel-FD")
             for v, a, f in zip(plan[1:], (0.3, 0.6, 0.4), (9.0, 3.0, 5.0))]
    claims = {c["claim"]: c["verdict"] for c in A.paper_orderings(sweep)}
    assert claims["alpha = 0.2 is the best sweep point in alignment"] == "yes"
    assert claims["alpha = 0.2 is the best sweep point in fidelity"] == "yes"


def test_markdown_report_and_plots(tmp_path):
    plan = A.ablation_plan(0.2, 500, alphas=[0.1, 0.2], t_cs=[500, 750])
    guidance = (1.5, 4.5)
    rows = [A.result_row(v, g, {"overall": 0.1 * i + g / 100, "categories": {}}, 10.0 - i - g, "pixel-FD")
            for i, v in enumerate(plan) for g in guidance]
    md = A.markdown_report(rows, plan, guidance, ["# study"])
    assert md.startswith("# study")
    for v in plan:
        assert f"| {v.name} |" in md
    assert "| alpha_0.2 | (= run full) |" in md and "model.edge_t_cutoff=750" in md
    assert "| g = 1.5 | g = 4.5 |" in md
    r = next(r for r in rows if r["variant"] == "no_edge" and r["guidance"] == 4.5)
    assert f"{r['alignment']:.3f} / {r['fidelity']:.4g}" in md
    assert "The paper's orderings" in md
    p1 = plots.tradeoff_plot([r for r in rows if r["group"] == "module"], tmp_path / "tradeoff.png")
    p2 = plots.sweep_plot([r for r in rows if r["group"] != "module"], tmp_path / "sweeps.png")
    for p in (p1, p2):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    with pytest.raises(ValueError, match="no rows"):
        plots.tradeoff_plot([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="alpha"):
        plots.sweep_plot([r for r in rows if r["group"] == "module"], tmp_path / "y.png")


def test_toy_clip_rows_table_and_plot(tmp_path):
    """Fig. 6b's own axes at toy scale: rows re-keyed to (toy CLIP score, FD in its features)."""
    plan = A.ablation_plan(0.2, 500)
    guidance = (3.0, 7.5)
    rows = [A.result_row(v, g, {"overall": 0.5, "categories": {}}, 1.0, "pixel-FD",
                         toy_clip=None if v.name == "no_edge" else
                         {"clip_score": 30.0 + i + g, "clip_score_se": 1.5, "fd_toy_clip": 40.0 - i, "pixel_fd": 2.0})
            for i, v in enumerate(plan) for g in guidance]
    clip_rows = A.toy_clip_rows(rows)
    assert len(clip_rows) == 2 * (len(plan) - 1)  # the rows without toy-CLIP values are left out
    r = next(r for r in clip_rows if r["variant"] == "no_space_moe" and r["guidance"] == 7.5)
    assert (r["alignment"], r["alignment_se"], r["fidelity"]) == (38.5, 1.5, 39.0)
    table = A.toy_clip_table(clip_rows, plan, guidance)
    assert "| no_space_moe | 34.00 +- 1.50 / 39 | 38.50 +- 1.50 / 39 |" in table
    assert "| no_edge |" not in table and "| ediff_intervals |" in table
    p = plots.tradeoff_plot(clip_rows, tmp_path / "clip.png", fidelity_name="FD (toy CLIP)",
                            alignment_name="toy CLIP score")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width > 300


# ------------------------------------------------------------------------------ tools/ablate.py


def _argv(out: Path, *extra: str, steps: int = 2, variants: tuple[str, ...] = ("full", "no_space_moe"),
          sweeps: tuple[str, ...] = ("--alphas", "0.2", "--t-cs", "500"), guidance: tuple[str, ...] = ("3", "6")) -> list[str]:
    return ["--out", str(out), "--budget", "smoke", "--steps", str(steps), "--set", *MICRO, "--guidance", *guidance,
            "--per-prompt", "2", "--sampler-steps", "2", "--threads", "1", "--variants", *variants, *sweeps, *extra]


def test_ablate_dry_run_prints_commands_and_writes_nothing(ablate, tmp_path, capsys):
    out = tmp_path / "study"
    res = ablate.main(_argv(out, "--dry-run", "--alphas", "0.2", "0.4"))
    text = capsys.readouterr().out
    assert res["runs"] == ["full", "no_space_moe", "alpha_0.4"]
    assert text.count("tools/train.py") == 3
    assert "--set model.use_space_moe=false" in text and "--set model.mask_alpha=0.4" in text
    assert "--set train.steps=2" in text and "OMP_NUM_THREADS=1" in text
    assert not out.exists()


def test_ablate_sweep_only_study_trains_no_module_variant(ablate, tmp_path, capsys):
    """--variants with no name: a Fig. 6a study of sweep points only; no full run unless a point is the base."""
    res = ablate.main(_argv(tmp_path / "dry", "--dry-run", variants=(), sweeps=("--alphas", "0.4", "--t-cs", "250")))
    assert res["runs"] == ["alpha_0.4", "t_c_250"]
    res = ablate.main(_argv(tmp_path / "dry", "--dry-run", variants=(), sweeps=("--alphas", "0.2", "0.4", "--t-cs", "250")))
    assert res["runs"] == ["full", "alpha_0.4", "t_c_250"]  # alpha 0.2 is the base config: the full run
    res = ablate.main(_argv(tmp_path / "dry", "--dry-run", variants=(), sweeps=("--alphas", "0.4", "--t-cs")))
    assert res["runs"] == ["alpha_0.4"]  # no T_c point (the default sweep would hold the base T_c: the full run)
    with pytest.raises(SystemExit):
        ablate.main(_argv(tmp_path / "dry", "--dry-run", variants=(), sweeps=("--no-sweeps",)))
    assert "nothing to run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main(_argv(tmp_path / "dry", "--dry-run", variants=(), sweeps=("--alphas", "--t-cs")))
    assert "nothing to run" in capsys.readouterr().err
    out = tmp_path / "study"
    res = ablate.main(_argv(out, variants=(), sweeps=("--alphas", "0.4", "--t-cs", "250"), guidance=("3",)))
    assert res["runs"] == ["alpha_0.4", "t_c_250"] and not (out / "full").exists()
    data = json.loads((out / "ablation.json").read_text())
    assert sorted((r["variant"], r["guidance"]) for r in data["rows"]) == [("alpha_0.4", 3.0), ("t_c_250", 3.0)]
    assert (out / "sweeps.png").is_file() and not (out / "tradeoff.png").exists()
    assert "alpha_0.4" in (out / "ablation.md").read_text()


@pytest.mark.spec_id("eval.ablation_orderings")
def test_ablate_end_to_end_micro(ablate, tmp_path, capsys):
    """Two micro trainings (2 steps), two guidance weights; then a rerun that trains and evaluates nothing."""
    out = tmp_path / "study"
    res = ablate.main(_argv(out))
    assert res["runs"] == ["full", "no_space_moe"]  # alpha 0.2 and T_c 500 are the base config: the full run
    for f in ("ablation.json", "ablation.md", "tradeoff.png", "sweeps.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "ablation.json").read_text())
    assert len(data["rows"]) == 4 * 2  # (full, no_space_moe, alpha_0.2, t_c_500) x 2 guidance weights
    by = {(r["variant"], r["guidance"]): r for r in data["rows"]}
    for g in (3.0, 6.0):
        assert by[("alpha_0.2", g)]["alignment"] == by[("full", g)]["alignment"]
        assert by[("t_c_500", g)]["fidelity"] == by[("full", g)]["fidelity"]
        assert 0.0 <= by[("full", g)]["alignment"] <= 1.0 and by[("full", g)]["fidelity"] >= 0
        assert by[("full", g)]["n_images"] == 6 * 1 * 1 * 2
    cfg = json.loads((out / "no_space_moe" / "config.json").read_text())
    assert cfg["model"]["use_space_moe"] is False and cfg["train"]["steps"] == 2 and cfg["model"]["sample_size"] == 16
    assert json.loads((out / "full" / "config.json").read_text())["model"]["use_space_moe"] is True
    md = (out / "ablation.md").read_text()
    assert "pixel-FD" in md and "NOT FID" in md and "| no_space_moe | model.use_space_moe=false |" in md
    capsys.readouterr()
    again = ablate.main(_argv(out))  # resumable: everything is reused
    text = capsys.readouterr().out
    assert text.count("skipped") == 2 and "reused" in text and "[eval] full g=" not in text
    assert again["rows"] == res["rows"]
    # a longer budget resumes the trained run from its checkpoint, then evaluates the new checkpoint
    ablate.main(_argv(out, steps=3, variants=("full",), sweeps=("--no-sweeps",), guidance=("3",)))
    text = capsys.readouterr().out
    assert "[train] full: resuming at step 2 -> 3 steps" in text and "[eval] full g=3:" in text
    res3 = json.loads((out / "full" / "eval" / "g3" / "result.json").read_text())
    assert res3["settings"]["checkpoint"] == "step_0000003"
    # bookkeeping fields (log and checkpoint cadence, sample grids) do not change the weights: accepted
    ablate.main(_argv(out, "--set", "train.log_every=5", "sample.steps=3", variants=("full",),
                      sweeps=("--no-sweeps",), guidance=("3",)))
    assert "[train] full: trained" in capsys.readouterr().out
    # a run folder trained with other settings is refused, not silently reused
    with pytest.raises(SystemExit, match="other settings"):
        ablate.main(_argv(out, "--set", "model.mask_alpha=0.3"))
    # a run trained before a config field existed (no such key in its config.json) reads it as its default
    for ck in (out / "full" / "checkpoints").iterdir():
        if (ck / "config.json").is_file():
            old = json.loads((ck / "config.json").read_text())
            del old["model"]["expert_act"]
            (ck / "config.json").write_text(json.dumps(old))
    ablate.main(_argv(out, variants=("full",), sweeps=("--no-sweeps",), guidance=("3",), steps=3))
    assert "[train] full: trained" in capsys.readouterr().out


def test_ablate_jobs_run_children_and_match_one_at_a_time(ablate, tmp_path, capsys):
    """--jobs 2: each run trained and evaluated in its own child process (log in <run>/ablate.log); the
    rows equal those of the same study run one at a time (same seeds, one thread each)."""
    seq = ablate.main(_argv(tmp_path / "seq", sweeps=("--no-sweeps",), guidance=("3",)))
    par = ablate.main(_argv(tmp_path / "par", "--jobs", "2", sweeps=("--no-sweeps",), guidance=("3",)))
    text = capsys.readouterr().out
    assert "[jobs] full: started" in text and "[jobs] no_space_moe: done" in text
    assert "skipped" in text and "reused" in text  # the parent only reuses what the children made
    for run in ("full", "no_space_moe"):
        assert "[train] " + run in (tmp_path / "par" / run / "ablate.log").read_text()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(par["rows"]) == strip(seq["rows"])
    with pytest.raises(SystemExit):
        ablate.parse_args(_argv(tmp_path / "x", "--jobs", "0"))


def test_sweep_points_use_their_own_guidance_weights(ablate):
    args = ablate.parse_args(["--out", "x", "--budget", "smoke", "--guidance", "1.5", "3", "6",
                              "--sweep-guidance", "3", "4.5", "--alphas", "0.2", "0.4", "--t-cs", "500"])
    plan = ablate.plan_of(args, ablate.base_config(args))
    by = {v.name: v for v in plan}
    assert ablate.guidance_of(args, by["no_edge"]) == [1.5, 3.0, 6.0]
    assert ablate.guidance_of(args, by["alpha_0.4"]) == [3.0, 4.5]
    # the full run also stands for alpha 0.2 and T_c 500: it is evaluated at the union
    assert ablate.run_guidance(args, plan, "full") == [1.5, 3.0, 4.5, 6.0]
    assert ablate.run_guidance(args, plan, "alpha_0.4") == [3.0, 4.5]
    default = ablate.parse_args(["--out", "x", "--budget", "smoke", "--guidance", "2", "5"])
    assert default.sweep_guidance == [2.0, 5.0]
    with pytest.raises(SystemExit):
        ablate.parse_args(["--out", "x", "--sweep-guidance", "3", "3"])


@pytest.mark.spec_id("eval.alignment_se")
def test_alignment_se_is_the_binomial_standard_error_of_the_category_mean():
    summary = {"overall": 0.5, "categories": {"a": {"accuracy": 0.25, "n": 16}, "b": {"accuracy": 0.75, "n": 16},
                                              "c": {"accuracy": 0.5, "n": 4}}}
    want = ((0.25 * 0.75 / 16 + 0.75 * 0.25 / 16 + 0.25 / 4) ** 0.5) / 3
    assert A.alignment_se(summary) == pytest.approx(want, rel=1e-12)
    assert A.alignment_se({"overall": 1.0, "categories": {"a": {"accuracy": 1.0, "n": 8}}}) == 0.0
    assert A.alignment_se({"overall": 0.1, "categories": {"a": {"accuracy": 0.1}}}) is None  # no counts
    full, no = A.MODULE_VARIANTS[0], A.MODULE_VARIANTS[1]
    rows = [A.result_row(full, 3.0, summary, 1.0, "pixel-FD"), A.result_row(no, 3.0, summary, 2.0, "pixel-FD")]
    assert rows[0]["alignment_se"] == pytest.approx(want)
    claim = next(c for c in A.paper_orderings(rows) if c["claim"].startswith("space-MoE helps alignment"))
    assert f"~{(2 * want * want) ** 0.5:.3f}" in claim["detail"]
    assert f"0.500 \u00b1 {want:.3f} / 1" in A.markdown_report(rows, [full, no], [3.0])


# ------------------------------------------------------------------------------ several training seeds

def _study(seed: int, rows: dict[tuple[str, float], tuple[float, float, float, float]], **settings) -> dict:
    """An ablation.json-like dict: rows (variant, guidance) -> (alignment, clip score, pixel-FD, toy-CLIP FD)."""
    base = {"train_seed": seed, "out": f"runs/s{seed}", "preset": "toy", "budget": "toy", "prompts_per_category": 4,
            "categories": ["colors"], "seeds": [0], "per_prompt": 4, "sampler_steps": 20, "jobs": 2}
    return {"settings": {**base, **settings},
            "rows": [{"variant": v, "group": "module", "guidance": g, "alignment": a, "fidelity": f,
                      "toy_clip": {"clip_score": c, "fd_toy_clip": fc}} for (v, g), (a, c, f, fc) in rows.items()]}


def test_combine_seeds_means_standard_errors_and_paired_differences():
    full = [(0.50, 40.0, 2.0, 30.0), (0.60, 42.0, 1.8, 28.0), (0.55, 44.0, 1.9, 29.0)]
    nsm = [(0.40, 39.0, 2.1, 32.0), (0.52, 41.5, 1.7, 31.0), (0.45, 43.0, 2.3, 31.5)]
    studies = [_study(s, {("full", 7.5): full[s], ("no_space_moe", 7.5): nsm[s]}, jobs=1 + s) for s in range(3)]
    c = A.combine_seeds(studies)
    assert c["seeds"] == [0, 1, 2]
    row = next(r for r in c["rows"] if r["variant"] == "full")
    xs = [0.50, 0.60, 0.55]
    sd = math.sqrt(sum((x - 0.55) ** 2 for x in xs) / 2)
    assert row["alignment"]["mean"] == pytest.approx(0.55) and row["alignment"]["sd"] == pytest.approx(sd)
    assert row["alignment"]["se"] == pytest.approx(sd / math.sqrt(3)) and row["alignment"]["per_seed"] == xs
    by = {cmp["metric"]: cmp for cmp in c["comparisons"]}
    assert set(by) == {"alignment", "clip_score", "fidelity", "fd_toy_clip"}
    d = [0.10, 0.08, 0.10]  # paired by seed: full - no_space_moe
    m = sum(d) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 2) / math.sqrt(3)
    al = by["alignment"]
    assert al["full_minus_variant"] == pytest.approx(d) and al["mean"] == pytest.approx(m)
    assert al["se"] == pytest.approx(se) and al["t"] == pytest.approx(m / se)
    assert al["reading"] == "full better" and al["full_wins_seeds"] == 3
    # lower is better for the Frechet distances: full wins on 2 seeds of 3, and the mean is a tie
    fd = by["fidelity"]
    assert fd["full_minus_variant"] == pytest.approx([-0.1, 0.1, -0.4]) and fd["full_wins_seeds"] == 2
    assert fd["reading"] == "tie"
    # lower is better: a consistently lower FD of the full model reads as "full better"
    fc = by["fd_toy_clip"]
    assert fc["full_minus_variant"] == pytest.approx([-2.0, -3.0, -2.5]) and fc["reading"] == "full better"
    # and a consistent win of the ablated variant is named as such
    swapped = A.combine_seeds([_study(s, {("full", 7.5): nsm[s], ("no_space_moe", 7.5): full[s]}) for s in range(3)])
    assert {x["metric"]: x["reading"] for x in swapped["comparisons"]}["alignment"] == "no_space_moe better"
    md = A.seeds_markdown(c, ["# title"])
    assert md.startswith("# title") and "0.55 ± " in md and "| no_space_moe | 7.5 | detector accuracy |" in md
    assert "Summary:" not in md  # one guidance weight: no per-guidance summary


def test_combine_seeds_over_guidance_weights_summary_and_tradeoff_plot(tmp_path):
    """Fig. 6b over seeds: the summary pivots the paired differences by guidance weight (bold where |t| > t95),
    and the trade-off plot draws each variant's mean curve over guidance."""
    full = {1.5: [(0.40, 50.0, 2.0, 30.0), (0.42, 52.0, 1.9, 29.0), (0.41, 51.0, 2.1, 31.0)],
            7.5: [(0.50, 60.0, 2.4, 33.0), (0.60, 62.0, 2.2, 32.0), (0.55, 64.0, 2.3, 34.0)]}
    nsm = {1.5: [(0.39, 49.0, 2.0, 30.5), (0.40, 50.5, 1.9, 29.5), (0.40, 50.0, 2.0, 31.0)],
           7.5: [(0.40, 59.0, 2.5, 35.0), (0.52, 61.5, 2.1, 36.0), (0.45, 63.0, 2.7, 35.5)]}
    studies = [_study(s, {**{("full", g): full[g][s] for g in full}, **{("no_space_moe", g): nsm[g][s] for g in nsm}})
               for s in range(3)]
    c = A.combine_seeds(studies)
    md = A.seeds_markdown(c)
    line = next(ln for ln in md.splitlines() if ln.startswith("| no_space_moe | detector accuracy |"))
    al = {x["guidance"]: x for x in c["comparisons"] if x["metric"] == "alignment"}
    assert al[7.5]["reading"] == "full better" and al[1.5]["reading"] == "tie"
    assert f"**{al[7.5]['mean']:+.3g} ({al[7.5]['t']:+.1f})**" in line  # the difference at 95% is bold
    assert f"| {al[1.5]['mean']:+.3g} ({al[1.5]['t']:+.1f}) |" in line
    # averaged over the guidance weights: each seed's mean difference, then one paired test
    og = next(x for x in c["over_guidance"] if x["variant"] == "no_space_moe" and x["metric"] == "alignment")
    per_seed = [(0.01 + 0.10) / 2, (0.02 + 0.08) / 2, (0.01 + 0.10) / 2]
    m = sum(per_seed) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in per_seed) / 2) / math.sqrt(3)
    assert og["guidance"] == [1.5, 7.5] and og["full_minus_variant"] == pytest.approx(per_seed)
    assert og["mean"] == pytest.approx(m) and og["t"] == pytest.approx(m / se) and og["reading"] == "full better"
    assert "| no_space_moe | detector accuracy | 2 | +0.055, +0.05, +0.055 |" in md
    assert A.combine_seeds([_study(s, {("full", 7.5): full[7.5][s], ("no_space_moe", 7.5): nsm[7.5][s]})
                            for s in range(3)])["over_guidance"] == []  # one weight: nothing to average
    png = plots.seeds_tradeoff_plot(c, tmp_path / "tradeoff.png")
    assert Image.open(png).size[0] > 600  # two panels: toy CLIP axes and detector / pixel-FD
    with pytest.raises(ValueError, match="2 or more guidance weights"):
        plots.seeds_tradeoff_plot({**c, "rows": [r for r in c["rows"] if r["guidance"] == 7.5]}, tmp_path / "x.png")


def test_t_critical_values_and_two_seed_reading():
    assert A.t_critical_95(1) == pytest.approx(12.706) and A.t_critical_95(2) == pytest.approx(4.303)
    assert A.t_critical_95(100) == 1.96
    with pytest.raises(ValueError):
        A.t_critical_95(0)
    # two seeds that agree in sign with t = 3 are a tie at 1 degree of freedom (t95 = 12.7)
    rows = [{("full", 7.5): (0.50, 40.0, 2.0, 30.0), ("no_edge", 7.5): (0.49, 40.0, 2.0, 30.0)},
            {("full", 7.5): (0.60, 40.0, 2.0, 30.0), ("no_edge", 7.5): (0.58, 40.0, 2.0, 30.0)}]
    c = A.combine_seeds([_study(s, rows[s]) for s in range(2)])
    al = next(x for x in c["comparisons"] if x["metric"] == "alignment")
    assert al["t"] == pytest.approx(3.0) and al["reading"] == "tie" and al["full_wins_seeds"] == 2


def test_equal_differences_up_to_round_off_have_no_t():
    """0.5 - 0.4 and 0.4 - 0.3 differ in the last bit: that is no spread, not a t of 1e14 read as a difference."""
    rows = [{("full", 7.5): (0.5, 40.0, 2.0, 30.0), ("no_edge", 7.5): (0.4, 39.0, 2.0, 30.0)},
            {("full", 7.5): (0.4, 41.0, 2.0, 30.0), ("no_edge", 7.5): (0.3, 39.5, 2.0, 30.0)}]
    assert 0.5 - 0.4 != 0.4 - 0.3
    al = next(x for x in A.combine_seeds([_study(s, rows[s]) for s in range(2)])["comparisons"]
              if x["metric"] == "alignment")
    assert al["mean"] == pytest.approx(0.1) and al["se"] is None and al["t"] is None and al["reading"] == "tie"


def test_combine_seeds_refuses_mixed_settings_and_repeated_seeds():
    r = {("full", 7.5): (0.5, 40.0, 2.0, 30.0)}
    with pytest.raises(ValueError, match="at least 2"):
        A.combine_seeds([_study(0, r)])
    with pytest.raises(ValueError, match="repeat a training seed"):
        A.combine_seeds([_study(0, r), _study(0, r)])
    with pytest.raises(ValueError, match=r"differ in more than the training seed: \['sampler_steps'\]"):
        A.combine_seeds([_study(0, r), _study(1, r, sampler_steps=50)])


def test_ablate_combine_cli(ablate, tmp_path, capsys):
    rows = {("full", 3.0): (0.5, 40.0, 2.0, 30.0), ("no_edge", 3.0): (0.4, 41.0, 2.0, 31.0)}
    dirs = []
    for s in range(2):
        d = tmp_path / f"s{s}"
        d.mkdir()
        (d / "ablation.json").write_text(json.dumps(_study(s, rows)))
        dirs.append(str(d))
    out = tmp_path / "seeds"
    combined = ablate.main(["--out", str(out), "--combine", *dirs])
    assert combined["seeds"] == [0, 1] and (out / "seeds.md").is_file()
    saved = json.loads((out / "seeds.json").read_text())
    assert saved["studies"] == dirs and len(saved["comparisons"]) == 4
    assert "no_edge" in capsys.readouterr().out
    png = out / "seeds_g3.png"
    assert png.is_file() and Image.open(png).size[0] > 400
    with pytest.raises(SystemExit, match="no ablation.json"):
        ablate.main(["--out", str(out), "--combine", dirs[0], str(tmp_path / "missing")])


def _write_studies(tmp_path, studies: list[dict]) -> list[str]:
    """Each study's ablation.json in its own folder tmp_path/s<i>, as --combine reads them; the folder paths."""
    dirs = []
    for s, study in enumerate(studies):
        d = tmp_path / f"s{s}"
        d.mkdir()
        (d / "ablation.json").write_text(json.dumps(study))
        dirs.append(str(d))
    return dirs


def _sweep_study(seed: int, alpha: dict[float, float], **settings) -> dict:
    """A study with the full model and an alpha sweep whose base point (0.2) reuses the full run."""
    study = _study(seed, {("full", 7.5): (alpha[0.2], 40.0, 2.0, 30.0)}, **settings)
    study["plan"] = [{"name": "full", "group": "module", "value": None, "run": "full", "overrides": {}}]
    for a, acc in alpha.items():
        name = f"alpha_{a:g}"
        study["plan"].append({"name": name, "group": "alpha", "value": a, "run": "full" if a == 0.2 else name,
                              "overrides": {}})
        study["rows"].append({"variant": name, "group": "alpha", "value": a, "guidance": 7.5, "alignment": acc,
                              "fidelity": 2.0, "toy_clip": {"clip_score": 40.0 + a, "fd_toy_clip": 30.0}})
    return study


def test_combine_seeds_with_sweeps_compares_each_point_with_the_base(ablate, tmp_path):
    """Fig. 6a over seeds: every sweep point is paired with the full model (the base value); the base point
    itself (same run as full) is listed but not compared with itself; rows sort by the swept value."""
    accs = [{0.1: 0.30, 0.2: 0.50, 0.5: 0.41}, {0.1: 0.36, 0.2: 0.52, 0.5: 0.46}, {0.1: 0.31, 0.2: 0.55, 0.5: 0.40}]
    studies = [_sweep_study(s, accs[s]) for s in range(3)]
    c = A.combine_seeds(studies)
    row = {r["variant"]: r for r in c["rows"]}
    assert row["alpha_0.5"]["value"] == 0.5 and row["alpha_0.1"]["group"] == "alpha"
    assert row["alpha_0.2"]["alignment"]["per_seed"] == row["full"]["alignment"]["per_seed"]
    compared = {x["variant"] for x in c["comparisons"]}
    assert compared == {"alpha_0.1", "alpha_0.5"}  # not alpha_0.2: it is the full run
    a01 = next(x for x in c["comparisons"] if x["variant"] == "alpha_0.1" and x["metric"] == "alignment")
    assert a01["full_minus_variant"] == pytest.approx([0.20, 0.16, 0.24]) and a01["reading"] == "full better"
    md = A.seeds_markdown(c)
    lines = [ln for ln in md.splitlines() if ln.startswith("| alpha_")]
    assert [ln.split(" | ")[0] for ln in lines[:3]] == ["| alpha_0.1", "| alpha_0.2", "| alpha_0.5"]
    dirs = _write_studies(tmp_path, studies)
    ablate.main(["--out", str(tmp_path / "seeds"), "--combine", *dirs])
    for png in ("seeds_g7.5.png", "seeds_sweeps_g7.5.png"):
        assert Image.open(tmp_path / "seeds" / png).size[0] > 300
    # the sweeps on two seeds only, the module variants on three: the rows say which seeds they have
    mixed = A.combine_seeds([*studies[:2], _study(2, {("full", 7.5): (0.55, 40.0, 2.0, 30.0)}, no_sweeps=True)])
    row = {r["variant"]: r for r in mixed["rows"]}
    assert row["full"]["seeds"] == [0, 1, 2] and row["alpha_0.1"]["seeds"] == [0, 1]
    a01 = next(x for x in mixed["comparisons"] if x["variant"] == "alpha_0.1" and x["metric"] == "alignment")
    assert a01["seeds"] == [0, 1] and a01["t_critical_95"] == pytest.approx(12.706)
    assert "| alpha_0.1 | 7.5 | 0,1 | " in A.seeds_markdown(mixed)
    # a seed's value is found by the row's own seeds, not by its position among all seeds
    swept12 = A.combine_seeds([_study(0, {("full", 7.5): (0.55, 40.0, 2.0, 30.0)}, no_sweeps=True), *studies[1:]])
    r01 = next(r for r in swept12["rows"] if r["variant"] == "alpha_0.1")
    assert r01["seeds"] == [1, 2] and plots._seed_value(r01, "alignment", 2) == 0.31
    assert math.isnan(plots._seed_value(r01, "alignment", 0))
    plots.seeds_sweep_plot(swept12, tmp_path / "sweeps12.png")
    with pytest.raises(ValueError, match=r"\['prompts_per_category'\]"):  # how a cell is measured must match
        A.combine_seeds([*studies[:2], _sweep_study(2, accs[2], prompts_per_category=8)])
    with pytest.raises(ValueError, match="no rows of the 'alpha' or 't_c'"):
        plots.seeds_sweep_plot({**c, "rows": [r for r in c["rows"] if r["group"] == "module"]}, tmp_path / "x.png")


def test_sweep_only_studies_take_their_base_point_from_the_module_studys_table(ablate, tmp_path, capsys):
    """--combine --base-table: sweep-only studies (no full run) are paired with the full model of the same seed
    from the module study's seeds.json, exactly as if full had been in their plans."""
    full_acc, a01_acc = [0.50, 0.52, 0.55], [0.30, 0.36, 0.31]
    with_full = [_sweep_study(s, {0.1: a01_acc[s], 0.2: full_acc[s]}) for s in range(3)]
    for study in with_full:
        study["base_config"] = {"model": {"mask_alpha": 0.2, "edge_t_cutoff": 500}}
    # the module study: full (and a variant) at two guidance weights, on seeds 0..2
    modules = A.combine_seeds([_study(s, {("full", 7.5): (full_acc[s], 40.0, 2.0, 30.0), ("full", 3.0): (0.1, 1, 1, 1),
                                          ("no_edge", 7.5): (0.4, 40.0, 2.0, 31.0)}) for s in range(3)])
    assert modules["settings"]["sampler_steps"] == 20 and "train_seed" not in modules["settings"]
    sweep_only = []
    for study in with_full:
        rows = [r for r in study["rows"] if r["variant"] not in ("full", "alpha_0.2")]
        plan = [p for p in study["plan"] if p["run"] != "full"]
        sweep_only.append({**study, "rows": rows, "plan": plan})
    completed = [A.with_base_model(s, modules) for s in sweep_only]
    names = {(r["variant"], r["guidance"]) for r in completed[1]["rows"]}
    assert names == {("alpha_0.1", 7.5), ("full", 7.5), ("alpha_0.2", 7.5)}  # only the sweeps' guidance weights
    twin = next(r for r in completed[1]["rows"] if r["variant"] == "alpha_0.2")
    assert twin["alignment"] == 0.52 and twin["value"] == 0.2 and twin["toy_clip"]["clip_score"] == 40.0
    # the result equals the combined table of the studies that trained full themselves
    want, got = A.combine_seeds(with_full), A.combine_seeds(completed)
    key = lambda c: (c["variant"], c["guidance"], c["metric"])  # noqa: E731
    assert sorted(map(key, got["comparisons"])) == sorted(map(key, want["comparisons"]))
    for a, b in zip(sorted(got["comparisons"], key=key), sorted(want["comparisons"], key=key)):
        assert a["full_minus_variant"] == pytest.approx(b["full_minus_variant"]) and a["reading"] == b["reading"]
    a01 = next(c for c in got["comparisons"] if c["variant"] == "alpha_0.1" and c["metric"] == "alignment")
    assert a01["full_minus_variant"] == pytest.approx([0.20, 0.16, 0.24])
    # refusals: a study with its own full model; a seed the base table lacks; other settings
    with pytest.raises(ValueError, match="has its own full model"):
        A.with_base_model(with_full[0], modules)
    with pytest.raises(ValueError, match="no full model of this seed at guidance 7.5"):
        A.with_base_model({**sweep_only[0], "settings": {**sweep_only[0]["settings"], "train_seed": 7}}, modules)
    with pytest.raises(ValueError, match=r"other settings: \['sampler_steps'\]"):
        A.with_base_model({**sweep_only[0], "settings": {**sweep_only[0]["settings"], "sampler_steps": 50}}, modules)
    # the command line: seeds.md names the base table; the Fig. 6a plot has the base point; no module plot
    dirs = _write_studies(tmp_path, sweep_only)
    table = tmp_path / "modules.json"
    table.write_text(json.dumps({k: v for k, v in modules.items() if k != "settings"}))  # an older table
    out = tmp_path / "sweeps"
    ablate.main(["--out", str(out), "--combine", *dirs, "--base-table", str(table)])
    assert "records no settings" in capsys.readouterr().out
    saved = json.loads((out / "seeds.json").read_text())
    assert saved["base_table"] == str(table) and {c["variant"] for c in saved["comparisons"]} == {"alpha_0.1"}
    assert str(table) in (out / "seeds.md").read_text()
    assert Image.open(out / "seeds_sweeps_g7.5.png").size[0] > 300 and not (out / "seeds_g7.5.png").exists()
    with pytest.raises(SystemExit):
        ablate.parse_args(["--out", str(out), "--base-table", str(table)])  # without --combine
    with pytest.raises(SystemExit):
        ablate.parse_args(["--out", str(out), "--combine", *dirs, "--base-table", str(tmp_path / "missing.json")])


def test_a_run_folder_is_trained_by_one_study_at_a_time(ablate, tmp_path):
    """Two studies on the same --out at once: the second stops at the run's lock before touching its files
    (it would otherwise restart the run over the first one's log)."""
    run = tmp_path / "study" / "full"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 10}\n')  # the first study's run, before its first checkpoint
    held = ablate.run_lock(run)
    try:
        with pytest.raises(SystemExit, match="another process is training"):
            ablate.main(_argv(tmp_path / "study", variants=("full",), sweeps=("--no-sweeps",), guidance=("3",)))
        assert (run / "log.jsonl").read_text() == '{"step": 10}\n'
    finally:
        held.close()
    again = ablate.run_lock(run)  # released: the next study may train it
    again.close()
