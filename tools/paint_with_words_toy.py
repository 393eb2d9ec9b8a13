#!/usr/bin/env python
"""Paint-with-words on the toy model (issue 13, item 4; errata E77): does the object follow the painted region
when the caption names the opposite side?

    OMP_NUM_THREADS=1 python tools/paint_with_words_toy.py --run runs/default_v2 --n 16 \
        --out docs/results/paint_with_words_toy

For each prompt "a <color> <shape> on the <side>" the phrase "<color> <shape>" is painted on the opposite half
of the image; per setting (weight, mode) n images are drawn (DDIM 20, guidance 7.5, seed 0) and read back with
the project's detector (raphael_ref.evaluation.detector). An image counts for "painted" when an object of the
prompt's colour and shape has its centroid in the painted half, for "caption" when one has it in the caption's
half (both can hold). Writes <out>.json and <out>.png (rows: settings; columns: images of each prompt).
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

from raphael_ref.evaluation.detector import detect_batch, to_uint8  # noqa: E402
from raphael_ref.pipeline import RaphaelPipeline  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
PROMPTS = [("red", "circle", "left"), ("blue", "square", "right")]


def half(side: str, s: int) -> torch.Tensor:
    r = torch.zeros(s, s)
    if side == "left":
        r[:, : s // 2] = 1
    elif side == "right":
        r[:, s // 2:] = 1
    elif side == "top":
        r[: s // 2] = 1
    else:
        r[s // 2:] = 1
    return r


def in_half(centroid, side: str, s: int) -> bool:
    x, y = centroid
    return {"left": x < s / 2, "right": x >= s / 2, "top": y < s / 2, "bottom": y >= s / 2}[side]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/default_v2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--settings", default="0:replace,2:replace,8:replace,32:replace,8:add")
    ap.add_argument("--out", default="docs/results/paint_with_words_toy")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = RaphaelPipeline.from_run(args.run)
    s = pipe.model.cfg.sample_size * pipe.codec.downsample_factor
    settings = [(float(w), m) for w, m in (x.split(":") for x in args.settings.split(","))]
    results, rows = [], []
    for w, mode in settings:
        row = []
        for color, shape, side in PROMPTS:
            prompt, painted = f"a {color} {shape} on the {side}", OPPOSITE[side]
            prompts = [prompt] * args.n
            spec = pipe.paint_with_words(prompts, [{f"{color} {shape}": half(painted, s)}] * args.n, weight=w,
                                         mode=mode)
            t0 = time.time()
            out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler="ddim",
                       generator=0, output_type="pt", paint=spec)
            imgs = to_uint8(out.images)
            n_p = n_c = n_any = n_named_p = n_named_c = 0
            for objs in detect_batch(imgs):
                tgt = [o for o in objs if o.color == color and o.shape == shape]
                n_any += bool(tgt)
                n_p += any(in_half(o.centroid, painted, s) for o in tgt)
                n_c += any(in_half(o.centroid, side, s) for o in tgt)
                n_named_p += any(o.position == painted for o in tgt)
                n_named_c += any(o.position == side for o in tgt)
            rec = {"weight": w, "mode": mode, "prompt": prompt, "painted": painted, "n": args.n,
                   "detected": n_any, "in_painted_half": n_p, "in_caption_half": n_c,
                   "at_painted_cell": n_named_p, "at_caption_cell": n_named_c, "seconds": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            results.append(rec)
            row.append(imgs)
        rows.append(torch.cat(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    write_grid(out.with_suffix(".png"), rows, settings, args.n, s)
    return {"results": results}


def write_grid(path: Path, rows, settings, n: int, s: int, per_prompt: int = 8, zoom: int = 3) -> None:
    from PIL import Image, ImageDraw

    label_w, cols = 90, per_prompt * len(PROMPTS)
    cell = s * zoom + 2
    img = Image.new("RGB", (label_w + cols * cell + 6, len(rows) * cell + 16), (40, 40, 40))
    d = ImageDraw.Draw(img)
    for j, (c, sh, side) in enumerate(PROMPTS):
        d.text((label_w + j * (per_prompt * cell + 6), 2), f"'{c} {sh} on the {side}', painted {OPPOSITE[side]}",
               fill=(255, 255, 255))
    for i, (row, (w, mode)) in enumerate(zip(rows, settings)):
        d.text((4, 16 + i * cell + cell // 2 - 5), f"w={w:g} {mode}", fill=(255, 255, 255))
        for j in range(len(PROMPTS)):
            for k in range(per_prompt):
                a = row[j * n + k].permute(1, 2, 0).numpy()
                tile = Image.fromarray(a).resize((s * zoom, s * zoom), Image.NEAREST)
                img.paste(tile, (label_w + j * (per_prompt * cell + 6) + k * cell, 16 + i * cell))
    img.save(path)


if __name__ == "__main__":
    main()
