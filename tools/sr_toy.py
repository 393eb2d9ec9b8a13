#!/usr/bin/env python
"""Toy demonstration of the cascade's SR diffusion stage (seed 004; raphael_ref/sr.py, erratum E80).

    OMP_NUM_THREADS=1 nice -n 5 python tools/train_sr.py --out runs/sr_toy --threads 1    # ~10 min, 2 CPU cores
    OMP_NUM_THREADS=1 nice -n 5 python tools/sr_toy.py --base runs/default_v2 --sr runs/sr_toy --threads 1

Writes ``docs/results/sr_toy.md`` (+ ``.json`` and ``sr_toy.png``):

1. **Reconstruction** on held-out scenes (``tools/train_sr.HELDOUT_SEED``, a stream training never draws): the
   ground-truth render at the high resolution (48 px), its area-downsampled 24 px image as the condition, and
   PSNR / SSIM (on [0, 1], Gaussian window 11, sigma 1.5, Wang et al. 2004) against the ground truth of
   (a) bicubic upsampling, (a') bilinear upsampling (the SR stage's own input at s = 0) and (b) the SR stage,
   at augmentation level 0 and at the run's sampling level. Mean +- standard error over scenes, and the
   paired difference SR - bicubic.
2. **Detector** (raphael_ref/evaluation, GenEval-style verdicts as tools/evaluate.py) on the base run's images
   of the evaluation prompts (``evaluation.prompts.evaluation_prompts``) before and after the SR stage: the
   24 px base images, the 48 px SR images read at their native size (the detector takes the layout from the
   image side) and area-downsampled back to 24 px, and bicubic 48 px as the control of resizing alone.
   Accuracy +- binomial standard error; the paired change against the base with its standard error.

The figure: rows of held-out scenes (low-res | bicubic | SR | ground truth), then rows of base prompts
(base | bicubic | SR | SR downsampled to 24 px).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from raphael_ref import sr as SR  # noqa: E402
from raphael_ref import training as T  # noqa: E402
from raphael_ref.testing import load_tool  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/default_v2", help="the base run (tools/train.py)")
    p.add_argument("--sr", default="runs/sr_toy", help="the SR run (tools/train_sr.py)")
    p.add_argument("--n-scenes", type=int, default=32, help="held-out scenes for PSNR / SSIM (default 32)")
    p.add_argument("--n-per-category", type=int, default=8, help="evaluation prompts per category (default 8)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of both stages (default 20)")
    p.add_argument("--sr-guidance", type=float, default=None, help="SR guidance (default: the SR run's)")
    p.add_argument("--aug-level", type=int, default=None, help="sampling level s (default: the SR run's sr.aug_sample)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results", help="folder of <name>.md / .json / .png")
    p.add_argument("--name", default="sr_toy", help="file stem of the results (default sr_toy)")
    p.add_argument("--train-cmd", default="OMP_NUM_THREADS=1 nice -n 5 python tools/train_sr.py --out runs/sr_toy --threads 1",
                   help="the tools/train_sr.py command of --sr, written into the report")
    p.add_argument("--update", action="store_true",
                   help="only (re)compute the teacher-forced diagnostic and rewrite <name>.md from <name>.json")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ metrics


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.double().clamp(-1, 1) + 1) / 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (compared on [0, 1]): (B,)."""
    mse = ((_to01(a) - _to01(b)) ** 2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1] on [0, 1]: Gaussian window, valid positions, channel mean."""
    x, y = _to01(a), _to01(b)  # (B, C, H, W) float64
    C = x.shape[1]
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, window, window).contiguous()  # (C, 1, w, w)

    def blur(v):
        return F.conv2d(v, k, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))  # (B, C, h, w)
    return m.flatten(1).mean(1)  # (B,)


def mean_se(v) -> dict:
    v = torch.as_tensor(v, dtype=torch.float64)
    n = v.numel()
    return {"mean": float(v.mean()), "se": float(v.std() / math.sqrt(n)) if n > 1 else None, "n": n}


def fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['se']:.{digits}f}" if d.get("se") is not None else f"{d['mean']:.{digits}f}"


def area(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.float(), size=(size, size), mode="area")


def bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ main


@torch.no_grad()
def teacher_forced(stage, gt, lr, caps, ts=(50, 200, 500, 800, 950), seed: int = 0) -> dict:
    """PSNR of the one-step x0 estimate (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) from x_t = q_sample(gt, t)
    with the true condition z (s = 0), with z = 0 and with another scene's z: how much the stage uses z per t."""
    from raphael_ref.diffusion import predict_x0_from_eps, q_sample

    g = torch.Generator().manual_seed(seed)
    enc = stage.text_encoder(caps)
    B, H = gt.shape[0], gt.shape[-1]
    s = torch.zeros(B, dtype=torch.long)
    z = SR.lowres_condition(lr, H, s, torch.zeros(gt.shape), stage.schedule.alphas_cumprod, stage.config.sr.upsample)
    stage.model.eval()
    out = {}
    for t in ts:
        tt = torch.full((B,), t)
        xt = q_sample(gt, tt, torch.randn(gt.shape, generator=g), stage.schedule)
        row = {}
        for name, zz in (("z", z), ("zero z", torch.zeros_like(z)), ("another scene's z", z.roll(1, 0))):
            eps, _ = stage.model(xt, tt, enc.hidden, enc.valid, enc.pooled_index, cond=zz, aug_level=s)
            row[name] = mean_se(psnr(predict_x0_from_eps(xt, tt, eps, stage.schedule), gt))
        out[str(t)] = row
    return out


def command(args, argv) -> str:
    """The two commands of the report: training (``--train-cmd``), then this script without --update / --train-cmd."""
    import shlex

    given = list(argv if argv is not None else sys.argv[1:])
    keep, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a == "--train-cmd":
            skip = True
        elif a != "--update" and not a.startswith("--train-cmd="):
            keep.append(a)
    return args.train_cmd + "\nOMP_NUM_THREADS=1 nice -n 5 python tools/sr_toy.py " + shlex.join(keep)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.update:
        out = Path(args.out)
        result = json.loads((out / f"{args.name}.json").read_text())
        stage = SR.SRStage.from_run(args.sr)
        gt, lr, caps = load_tool("train_sr").heldout_batch(stage.config, list(range(result["n_scenes"])),
                                                           source="downsample")
        result["teacher_forced_x0_psnr"] = teacher_forced(stage, gt, lr, caps)
        result["command"] = command(args, argv)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{args.name}.md").write_text(markdown(result, f"SR stage, s = {result['aug_level']}", args.name) + "\n")
        print((out / f"{args.name}.md").read_text())
        return 0
    from raphael_ref import RaphaelPipeline
    from raphael_ref.data.synthetic import sample_scene
    from raphael_ref.evaluation.detector import detect_batch, to_uint8
    from raphael_ref.evaluation.prompts import CATEGORIES, evaluation_prompts, score

    train_sr = load_tool("train_sr")
    t_start = time.time()
    stage = SR.SRStage.from_run(args.sr)
    cfg = stage.config
    H, h = stage.size, stage.lowres_size
    level = cfg.sr.aug_sample if args.aug_level is None else args.aug_level
    sr_kw = dict(steps=args.steps, guidance=args.sr_guidance)
    ckpt = T.resolve_checkpoint(args.sr)
    sr_step = json.loads((ckpt / "state.json").read_text())["step"]
    print(f"SR stage {ckpt} (step {sr_step}): {h} -> {H} px, sampling level s = {level}", flush=True)

    def run_sr(images, prompts, s):
        outs = []
        for i in range(0, len(prompts), args.batch_size):
            gen = torch.Generator().manual_seed(args.seed * 1000 + i)
            outs.append(stage(images[i:i + args.batch_size], prompts[i:i + args.batch_size], aug_level=s,
                              generator=gen, **sr_kw))
        return torch.cat(outs).clamp(-1, 1)

    # ---- 1. reconstruction of held-out scenes
    ids = list(range(args.n_scenes))
    gt, lr, caps = train_sr.heldout_batch(cfg, ids, source="downsample")  # (N, 3, H, H), (N, 3, h, h)
    train_caps = {sample_scene(np.random.default_rng([cfg.train.seed, i]), image_size=H).caption
                  for i in range(sr_step * cfg.train.batch_size)}
    seen = sum(c in train_caps for c in caps)
    recon = {"bicubic": bicubic(lr, H), "bilinear (SR input at s = 0)": SR.upsample_lowres(lr, H, "bilinear")}
    levels = sorted({0, level})
    for s in levels:
        t0 = time.time()
        recon[f"SR stage, s = {s}"] = run_sr(lr, caps, s)
        print(f"reconstruction at s = {s}: {time.time() - t0:.0f}s", flush=True)
    rec_rows = {}
    for name, imgs in recon.items():
        rec_rows[name] = {"psnr": psnr(imgs, gt), "ssim": ssim(imgs, gt)}
    table1 = {name: {"psnr": mean_se(v["psnr"]), "ssim": mean_se(v["ssim"])} for name, v in rec_rows.items()}
    paired = {name: {"psnr": mean_se(v["psnr"] - rec_rows["bicubic"]["psnr"]),
                     "ssim": mean_se(v["ssim"] - rec_rows["bicubic"]["ssim"])}
              for name, v in rec_rows.items() if name.startswith("SR")}

    # ---- 2. detector on base images before / after SR
    base = RaphaelPipeline.from_run(args.base)
    specs = [sp for cat in evaluation_prompts(CATEGORIES, args.n_per_category).values() for sp in cat]
    prompts = [sp.prompt for sp in specs]
    t0 = time.time()
    base_imgs = []
    for i in range(0, len(prompts), args.batch_size):
        res = base(prompts[i:i + args.batch_size], num_inference_steps=args.steps, output_type="pt",
                   generator=torch.Generator().manual_seed(args.seed * 1000 + i))
        base_imgs.append(res.images)
    base_imgs = torch.cat(base_imgs).clamp(-1, 1)  # (P, 3, h, h)
    if base_imgs.shape[-1] != h:
        raise SystemExit(f"error: the base draws {base_imgs.shape[-1]} px, the SR stage upscales {h} px")
    print(f"base images: {time.time() - t0:.0f}s", flush=True)
    t0 = time.time()
    sr_imgs = run_sr(base_imgs, prompts, level)
    print(f"SR of base images: {time.time() - t0:.0f}s", flush=True)
    variants = {f"base ({h} px)": base_imgs, f"bicubic ({H} px)": bicubic(base_imgs, H),
                f"SR stage, s = {level} ({H} px, native)": sr_imgs, f"SR stage, s = {level}, area to {h} px": area(sr_imgs, h)}
    verdicts = {name: torch.tensor([float(score(sp, objs)) for sp, objs in zip(specs, detect_batch(to_uint8(v)))])
                for name, v in variants.items()}
    b0 = verdicts[f"base ({h} px)"]
    table2 = {name: {"accuracy": mean_se(v), "change_vs_base": mean_se(v - b0)} for name, v in verdicts.items()}
    per_cat = {name: {cat: float(v[[i for i, sp in enumerate(specs) if sp.category == cat]].mean()) for cat in CATEGORIES}
               for name, v in verdicts.items()}

    # ---- figure: held-out rows (low-res | bicubic | SR | GT), base rows (base | bicubic | SR | SR -> 24)
    k = 4
    srname = f"SR stage, s = {level}"
    rows = []
    for i in range(k):
        rows += [SR.upsample_lowres(lr[i:i + 1], H, "nearest"), recon["bicubic"][i:i + 1], recon[srname][i:i + 1],
                 gt[i:i + 1]]
    for i in range(0, len(prompts), max(1, len(prompts) // k))[:k]:
        rows += [SR.upsample_lowres(base_imgs[i:i + 1], H, "nearest"), bicubic(base_imgs[i:i + 1], H),
                 sr_imgs[i:i + 1], SR.upsample_lowres(area(sr_imgs[i:i + 1], h), H, "nearest")]
    out = T.writable_dir(args.out)
    T.save_image_grid(torch.cat(rows), out / f"{args.name}.png", nrow=4, min_tile=96)

    cmd = command(args, argv)
    log = T.read_log(Path(args.sr) / "log.jsonl") if (Path(args.sr) / "log.jsonl").exists() else []
    train_s, prev = 0.0, 0
    for rec in log:  # sec_per_step is the mean over the steps since the previous line
        if rec["step"] <= sr_step:
            train_s += rec["sec_per_step"] * (rec["step"] - prev)
            prev = rec["step"]
    result = {"command": cmd.strip(), "base_run": args.base, "sr_run": str(ckpt), "sr_step": sr_step,
              "sr_batch_size": cfg.train.batch_size, "sr_train_seconds": round(train_s, 1),
              "sizes": [h, H], "aug_level": level, "steps": args.steps,
              "sr_guidance": cfg.sample.guidance if args.sr_guidance is None else args.sr_guidance,
              "n_scenes": len(ids), "heldout_seen_in_training": seen, "reconstruction": table1,
              "reconstruction_minus_bicubic": paired, "n_prompts": len(prompts), "detector": table2,
              "detector_per_category": per_cat, "seconds": round(time.time() - t_start, 1)}
    result["teacher_forced_x0_psnr"] = teacher_forced(stage, gt, lr, caps)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result, srname, args.name) + "\n")
    print((out / f"{args.name}.md").read_text())
    return 0


def markdown(r: dict, srname: str, name: str = "sr_toy") -> str:
    h, H = r["sizes"]
    L = [f"# SR diffusion stage at toy scale ({h} -> {H} px)", "",
         "Seed 004's cascade on RAPHAEL's U-Net: `raphael_ref/sr.py`, spec `sr.noise_augmentation`, erratum E80. "
         "Written by `tools/sr_toy.py`.", "", "```bash", r["command"], "```", "",
         f"SR run `{r['sr_run']}` (step {r['sr_step']}), base run `{r['base_run']}`; {r['steps']} DDIM steps per stage, "
         f"SR guidance {r['sr_guidance']}, sampling augmentation level s = {r['aug_level']}. Total {r['seconds']:.0f} s.",
         "", f"![low-res | bicubic | SR | ground truth; then base | bicubic | SR | SR at {h} px]({name}.png)", "",
         "Top rows: held-out scenes, low-res (nearest) | bicubic | SR stage | ground-truth render. Bottom rows: base "
         f"images of evaluation prompts, base | bicubic | SR stage | SR area-downsampled to {h} px.", "",
         f"## 1. Reconstruction of {r['n_scenes']} held-out scenes", "",
         f"Condition: the {H} px ground-truth render area-downsampled to {h} px; metrics against that render, on [0, 1] "
         f"(PSNR in dB; SSIM with an 11 px Gaussian window, sigma 1.5). Mean ± standard error over scenes. "
         f"{r['heldout_seen_in_training']} of the {r['n_scenes']} held-out scenes also occur in the SR run's training "
         f"stream (the scene space is small: shapes x colours x positions).", "",
         "| upsampling | PSNR (dB) | SSIM | PSNR − bicubic (paired) | SSIM − bicubic (paired) |", "|---|---|---|---|---|"]
    for name, v in r["reconstruction"].items():
        d = r["reconstruction_minus_bicubic"].get(name)
        L.append(f"| {name} | {fmt(v['psnr'], 2)} | {fmt(v['ssim'])} | {fmt(d['psnr'], 2) if d else '—'} | "
                 f"{fmt(d['ssim']) if d else '—'} |")
    L += ["", f"## 2. Detector score of {r['n_prompts']} base images before and after SR", "",
          "GenEval-style verdicts of the programmatic detector (`raphael_ref/evaluation`, as `tools/evaluate.py`) on "
          f"the evaluation prompts (six categories). The detector takes its layout from the image side, so the "
          f"{H} px images are read at their native size; they are also read area-downsampled back to {h} px. Accuracy "
          "± binomial standard error; the change against the base image of the same prompt, paired.", "",
          "| images | accuracy | change vs base (paired) | " + " | ".join(r["detector_per_category"][f"base ({h} px)"])
          + " |", "|---|---|---|" + "---|" * len(r["detector_per_category"][f"base ({h} px)"])]
    for name, v in r["detector"].items():
        cats = " | ".join(f"{x:.2f}" for x in r["detector_per_category"][name].values())
        L.append(f"| {name} | {fmt(v['accuracy'])} | {fmt(v['change_vs_base'])} | {cats} |")
    tf = r.get("teacher_forced_x0_psnr")
    if tf:
        L += ["", "## 3. Does the stage use the low-res image? (teacher-forced diagnostic)", "",
              "PSNR (dB) against the ground truth of the one-step estimate x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / "
              "sqrt(abar_t), x_t = q_sample(ground truth, t), condition at s = 0: the true z, z = 0, and another "
              "scene's z. A stage that uses z fully reaches high PSNR at every t; the gap to z = 0 is what z adds.", "",
              "| t | " + " | ".join(next(iter(tf.values()))) + " |", "|---|" + "---|" * len(next(iter(tf.values())))]
        for t, row in tf.items():
            L.append(f"| {t} | " + " | ".join(fmt(v, 2) for v in row.values()) + " |")
    rec = r["reconstruction_minus_bicubic"][srname]["psnr"]
    ss = r["reconstruction_minus_bicubic"][srname]["ssim"]
    det = r["detector"][f"SR stage, s = {r['aug_level']} ({H} px, native)"]["change_vs_base"]

    def verdict(d, unit):
        lo, hi = d["mean"] - 2 * d["se"], d["mean"] + 2 * d["se"]
        if lo > 0:
            return f"better than bicubic by {d['mean']:.3g} {unit} (± {d['se']:.2g}, more than 2 standard errors)"
        if hi < 0:
            return f"worse than bicubic by {-d['mean']:.3g} {unit} (± {d['se']:.2g}, more than 2 standard errors)"
        return f"not distinguishable from bicubic ({d['mean']:+.3g} ± {d['se']:.2g} {unit})"

    L += ["", "## Reading (generated from the numbers above)", "",
          f"- Reconstruction at s = {r['aug_level']}: the SR stage is {verdict(rec, 'dB')} in PSNR and "
          f"{verdict(ss, '')} in SSIM.",
          f"- Detector: the SR images read at {H} px change the base accuracy by {det['mean']:+.3f} ± {det['se']:.3f} "
          f"(paired); bicubic alone changes it by "
          f"{r['detector'][f'bicubic ({H} px)']['change_vs_base']['mean']:+.3f}.",
          *([f"- Use of the low-res image (section 3): at t = {max(tf, key=int)} the one-step estimate reaches "
              f"{fmt(tf[max(tf, key=int)]['z'], 2)} dB with z and {fmt(tf[max(tf, key=int)]['zero z'], 2)} dB with z = 0; at "
              f"t = {min(tf, key=int)}, {fmt(tf[min(tf, key=int)]['z'], 2)} vs {fmt(tf[min(tf, key=int)]['zero z'], 2)} dB."]
            if tf else []),
          f"- Scale: {r['sr_step']} training steps of batch {r['sr_batch_size']} ({r['sr_train_seconds'] / 60:.1f} min "
          "of training steps on CPU); the base toy run trained 800 steps of batch 16. The numbers describe this "
          "budget, not what the cascade can reach."]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
