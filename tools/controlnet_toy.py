#!/usr/bin/env python
"""The Canny ControlNet on the toy model (issue 12, item 2; raphael_ref/controlnet.py, errata E79): does the generated
image follow the control edges, and does the prompt still hold when text and edges agree?

    OMP_NUM_THREADS=1 python tools/controlnet_toy.py --run runs/default_v2 \\
        --controlnet runs/default_v2_controlnet/controlnet.safetensors --out docs/results/controlnet_toy

Held-out scenes: the evaluation set's prompts (``evaluation.prompts``, its own seed EVAL_SEED, never a training
seed) of the categories below; each prompt's scene is rendered (the ground truth), its Canny edges
(the ControlNet's settings) are the control, so text and edges agree. For every prompt, one image per setting
from the same noise (seed), DDIM, CFG against the empty prompt:

    without       the base U-Net alone
    with          U-Net + ControlNet, control on both CFG branches, scale 1
    edges only    U-Net + ControlNet with the empty prompt (guidance 1: no text at all)

Edge F1 (per image, then averaged): the control edges E_c against the Canny edges E_g of the generated image (same
detector), precision = |E_g within r px of E_c| / |E_g|, recall = |E_c within r px of E_g| / |E_c|, r = 1 (a 3x3
neighbourhood; r = 0 in the JSON), F1 = 2 P R / (P + R) (0 when an image has no edges). References: the rendered
scene itself (F1 = 1 by construction) and another prompt's render (the "shuffled" floor: how much two unrelated
scenes of this layout overlap). Prompt-following: the project's detector (``detect_batch`` + ``prompts.score``, the
GenEval-style verdict of tools/evaluate.py). Standard errors: sd / sqrt(n) over images (binomial for the verdicts);
paired differences with the SE of the per-image differences. Writes <out>.md, <out>.json and <out>.png
(columns: control edges | without | with | edges only, first --grid prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from raphael_ref.controlnet import canny_control  # noqa: E402
from raphael_ref.data.synthetic import render  # noqa: E402
from raphael_ref.evaluation.detector import detect_batch, to_uint8  # noqa: E402
from raphael_ref.evaluation.prompts import evaluation_prompts, score  # noqa: E402
from raphael_ref.pipeline import RaphaelPipeline  # noqa: E402

CATEGORIES = ("single_object", "two_objects", "colors", "position", "color_attribution")


def edge_f1(pred: torch.Tensor, ref: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Per-image F1 (B,) of binary edge maps pred, ref (B, 1, H, W), matches within ``radius`` px (a square window).

    NaN where the reference has no edge (F1 undefined: a scene whose objects Canny cannot tell from the black
    background); 0 where the prediction has none and the reference has some."""
    k = 2 * radius + 1
    near_ref = F.max_pool2d(ref, k, 1, radius) > 0 if radius else ref > 0
    near_pred = F.max_pool2d(pred, k, 1, radius) > 0 if radius else pred > 0
    n_pred, n_ref = pred.sum((1, 2, 3)), ref.sum((1, 2, 3))
    precision = ((pred > 0) & near_ref).sum((1, 2, 3)) / n_pred.clamp(min=1)
    recall = ((ref > 0) & near_pred).sum((1, 2, 3)) / n_ref.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    f1 = torch.where(n_pred > 0, f1, torch.zeros_like(f1))
    return torch.where(n_ref > 0, f1, torch.full_like(f1, float("nan")))


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error over the finite entries (NaN: undefined F1, left out)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[torch.isfinite(x)]
    n = x.numel()
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/default_v2")
    ap.add_argument("--controlnet", required=True, help="controlnet.safetensors of tools/train_controlnet.py")
    ap.add_argument("--n-per-category", type=int, default=12)
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--grid", type=int, default=10, help="prompts shown in the PNG")
    ap.add_argument("--out", default="docs/results/controlnet_toy")
    ap.add_argument("--command", default=None, help="the command line to record (default: this one)")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite <out>.md from <out>.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        result = json.loads(out.with_suffix(".json").read_text())
        write_markdown(result, out.with_suffix(".md"))
        return result
    t_start = time.time()
    pipe = RaphaelPipeline.from_run(args.run).load_controlnet(args.controlnet)
    f = pipe.codec.downsample_factor
    S = pipe.model.cfg.sample_size * f
    specs = [s for cat in evaluation_prompts(args.categories, args.n_per_category, image_size=S).values() for s in cat]
    prompts = [s.prompt for s in specs]
    gt = torch.stack([render(s.scene) for s in specs]).float() / 127.5 - 1.0  # (N, 3, S, S) in [-1, 1]
    control = canny_control(gt, pipe.controlnet.canny)  # (N, 1, S, S)
    settings = {"without": dict(), "with": dict(control=True), "edges only": dict(control=True, empty=True)}
    images = {}
    for name, opt in settings.items():
        outs = []
        t0 = time.time()
        for i in range(0, len(specs), args.batch_size):
            batch = prompts[i:i + args.batch_size]
            # one generator per batch start: the same noise for every setting
            gen = torch.Generator().manual_seed(args.seed * 100003 + i)
            kw = dict(num_inference_steps=args.steps, sampler="ddim", generator=gen, output_type="pt")
            if opt.get("control"):
                kw["control_image"] = control[i:i + args.batch_size]
            if opt.get("empty"):
                res = pipe([""] * len(batch), guidance_scale=1.0, **kw)
            else:
                res = pipe(batch, guidance_scale=args.guidance, **kw)
            outs.append(res.images)
        images[name] = torch.cat(outs)
        print(f"{name}: {len(specs)} images in {time.time() - t0:.0f} s", flush=True)
    images["render"] = gt
    images["shuffled render"] = gt.roll(1, dims=0)  # another prompt's scene (the floor)
    rows, per_image = {}, {}
    for name, imgs in images.items():
        edges = canny_control(imgs.clamp(-1, 1), pipe.controlnet.canny)
        f1 = edge_f1(edges, control, 1)
        f1_0 = edge_f1(edges, control, 0)
        dets = detect_batch(to_uint8(imgs))
        ok = torch.tensor([float(score(s, d)) for s, d in zip(specs, dets)])
        per_image[name] = {"f1_r1": f1, "f1_r0": f1_0, "score": ok}
        by_cat = {}
        for c in args.categories:
            idx = [j for j, s in enumerate(specs) if s.category == c]
            by_cat[c] = {"f1_r1": mean_se(f1[idx]), "score": mean_se(ok[idx])}
        p = float(ok.mean())
        rows[name] = {"f1_r1": mean_se(f1), "f1_r0": mean_se(f1_0), "score": (p, math.sqrt(p * (1 - p) / len(ok))),
                      "edge_pixels": float(edges.sum((1, 2, 3)).mean()), "by_category": by_cat}
    diffs = {}
    for a, b in (("with", "without"), ("edges only", "without"), ("with", "edges only")):
        diffs[f"{a} - {b}"] = {k: mean_se(per_image[a][k] - per_image[b][k]) for k in ("f1_r1", "f1_r0", "score")}
    cn_doc = json.loads(Path(args.controlnet).with_suffix(".json").read_text())
    command = args.command or "python tools/controlnet_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "args": vars(args), "n": len(specs), "image_size": S,
              "n_f1": int(torch.isfinite(per_image["render"]["f1_r1"]).sum()),
              "no_control_edges": [p for p, e in zip(prompts, control.sum((1, 2, 3))) if e == 0],
              "per_image": {k: {m: [None if not math.isfinite(float(x)) else float(x) for x in v[m]] for m in v}
                            for k, v in per_image.items()},
              "prompts": prompts,
              "control_edge_pixels": float(control.sum((1, 2, 3)).mean()), "canny": pipe.controlnet.canny,
              "controlnet_train": cn_doc.get("train"), "rows": rows, "paired_differences": diffs,
              "seconds": round(time.time() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    write_grid(out.with_suffix(".png"), control, images, prompts, args.grid)
    print(json.dumps({k: {m: v[m] for m in ("f1_r1", "score")} for k, v in rows.items()}, indent=1))
    return result


def _pm(cell, digits: int = 3) -> str:
    m, se = cell
    return f"{m:.{digits}f} ± {se:.{digits}f}"


READING_MARK = "## Reading"


def write_markdown(result: dict, path: Path) -> None:
    """The tables of ``result``; a hand-written "## Reading" section already in ``path`` is kept."""
    kept = ""
    if path.exists() and READING_MARK in path.read_text():
        kept = path.read_text()[path.read_text().index(READING_MARK):]
    r, tr = result["rows"], result.get("controlnet_train") or {}
    lines = [
        "# A Canny ControlNet on the toy model (issue 12, item 2)", "",
        "`raphael_ref/controlnet.py` (spec `controlnet.zero_join`, errata E79) trained on the toy run `runs/default_v2` "
        "(step 800, EMA weights, frozen) and measured on held-out synthetic scenes. Training:", "",
        "```",
        f"OMP_NUM_THREADS=1 python tools/train_controlnet.py --base {tr.get('base', 'runs/default_v2')} "
        f"--out runs/default_v2_controlnet --steps {tr.get('steps')} --batch-size {tr.get('batch_size')} "
        f"--lr {tr.get('lr')} --warmup {tr.get('warmup')} --save-every 50 --log-every 10 --threads 1",
        "```", "",
        f"({tr.get('steps')} steps of batch {tr.get('batch_size')} = {(tr.get('steps') or 0) * (tr.get('batch_size') or 0)} "
        f"synthetic scenes (training seed {tr.get('seed')}), caption dropout {tr.get('caption_dropout')}, AdamW; "
        f"{tr.get('parameters', 0):,} trainable parameters next to the {tr.get('frozen_unet_parameters', 0):,} frozen ones.) "
        "Measurement:", "",
        "```", result["command"], "```", "",
        f"{result['n']} prompts of the evaluation set (its own seed, never a training seed; categories "
        f"{', '.join(result['args']['categories'])}, {result['args']['n_per_category']} each), one image per prompt and "
        f"setting from the same noise, DDIM {result['args']['steps']} steps, guidance {result['args']['guidance']}, "
        f"{result['image_size']} x {result['image_size']} px. The control is the Canny map of the prompt's own rendered "
        f"scene (text and edges agree; {result['control_edge_pixels']:.1f} edge pixels per image on average). Edge F1: "
        "control edges against the Canny edges of the generated image, a match within 1 px (r = 1) or exact (r = 0). "
        f"F1 is over the {result.get('n_f1', result['n'])} prompts whose control has edges (left out, F1 undefined: "
        f"{'; '.join(result.get('no_control_edges') or []) or 'none'}). "
        "Prompt-following: the project's detector and GenEval-style verdict (as tools/evaluate.py), over all prompts. ± one standard error "
        f"over images (binomial for the verdicts). {result['seconds']:.0f} s on one CPU thread (shared machine).", "",
        "| setting | edge F1 (r = 1) | edge F1 (r = 0) | prompt-following | edge px / image |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"without": "without ControlNet (base U-Net)", "with": "with ControlNet (scale 1, CFG on both branches)",
             "edges only": "ControlNet, empty prompt, no guidance", "render": "reference: the rendered scene",
             "shuffled render": "reference: another prompt's render"}
    for k, v in r.items():
        lines.append(f"| {names.get(k, k)} | {_pm(v['f1_r1'])} | {_pm(v['f1_r0'])} | {_pm(v['score'], 2)} | "
                     f"{v['edge_pixels']:.1f} |")
    lines += ["", "Paired differences (same prompt, same noise; mean ± SE of the per-image differences):", "",
              "| difference | edge F1 (r = 1) | edge F1 (r = 0) | prompt-following |", "|---|---:|---:|---:|"]
    for k, v in result["paired_differences"].items():
        lines.append(f"| {k} | {_pm(v['f1_r1'])} | {_pm(v['f1_r0'])} | {_pm(v['score'], 2)} |")
    cats = result["args"]["categories"]
    lines += ["", "Per category (edge F1 r = 1 / prompt-following):", "",
              "| setting | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for k in ("without", "with", "edges only"):
        bc = r[k]["by_category"]
        lines.append(f"| {k} | " + " | ".join(f"{bc[c]['f1_r1'][0]:.2f} / {bc[c]['score'][0]:.2f}" for c in cats) + " |")
    lines += ["", f"![control edges, without, with, edges only]({path.with_suffix('.png').name})", "",
              f"Columns: control edges | without | with ControlNet | edges only (empty prompt); first "
              f"{result['args']['grid']} prompts. Raw numbers: `{path.with_suffix('.json').name}`.", ""]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def write_grid(path: Path, control, images, prompts, n: int, zoom: int = 4) -> None:
    """Rows: prompts; columns: control edges | without | with | edges only."""
    from PIL import Image, ImageDraw

    cols = [("control edges", control.expand(-1, 3, -1, -1) * 2 - 1), ("without", images["without"]),
            ("with ControlNet", images["with"]), ("edges only", images["edges only"])]
    S = control.shape[-1]
    cell = S * zoom + 4
    label_w = 260
    n = min(n, len(prompts))
    img = Image.new("RGB", (label_w + len(cols) * cell, 16 + n * cell), (40, 40, 40))
    d = ImageDraw.Draw(img)
    for j, (name, _) in enumerate(cols):
        d.text((label_w + j * cell + 2, 2), name, fill=(255, 255, 255))
    for i in range(n):
        d.text((4, 16 + i * cell + cell // 2 - 5), prompts[i][:42], fill=(255, 255, 255))
        for j, (_, imgs) in enumerate(cols):
            a = to_uint8(imgs[i:i + 1])[0].permute(1, 2, 0).contiguous().numpy()  # (S, S, 3) uint8
            img.paste(Image.fromarray(a).resize((S * zoom, S * zoom), Image.NEAREST), (label_w + j * cell, 16 + i * cell))
    img.save(path)


if __name__ == "__main__":
    main()
