#!/usr/bin/env python
"""The sampler table of docs/results/samplers_toy.md: detector score, toy-CLIP score, pixel-FD and FD in the
toy CLIP's image features of several samplers on one toy run, each against DDIM at 50 steps (issue 13 item 2).

    OMP_NUM_THREADS=1 nice -n 5 python tools/sampler_table.py runs/default_v2 --out runs/samplers_toy \\
        --samplers ddim:50 dpmpp_2m:10 dpmpp_2m:20 unipc:20 euler:20 --jobs 2

Step 1 runs ``tools/evaluate.py`` once per ``sampler:steps`` (its default six categories, 4 prompts per
category, 4 images per prompt, seed 0: 96 images, 16 per category; guidance 7.5; ``--toy-clip``), in up to
``--jobs`` processes of one thread each, skipping a sampler whose ``<out>/<sampler>_<steps>/results.json``
exists. Every image starts from the same noise under every sampler (tools/evaluate.py's per-image seed), so
differences against the first sampler (the reference, DDIM 50) are paired.

Step 2 reads the images back (lossless PNGs) and writes ``<out>/table.md`` and ``<out>/table.json``:

* detector accuracy: the mean over the six categories (GenEval's overall), standard error
  ``ablation.alignment_se`` (binomial per category); paired difference against the reference: the mean of the
  per-image differences (correct - correct under the reference), standard error of that mean;
* toy-CLIP score (``raphael_ref.toy_clip``): mean, standard error of the mean;
* pixel-FD (``evaluation.ablation.pixel_fd``) and FD in the toy CLIP's 64-d image embeddings
  (``metrics.frechet_distance`` of ``metrics.gaussian_statistics``; the features of the torch-fidelity extractor
  ``tools/evaluate.py --toy-clip`` registers), both against the ground-truth renders of each image's prompt;
  standard errors by bootstrap: ``--boot`` resamples of the 96 (image, render) pairs, one index draw shared by
  every sampler, so the paired FD difference gets its own bootstrap standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EVAL_ARGS = ["--guidance", "7.5", "--prompts-per-category", "4", "--per-prompt", "4", "--seeds", "0",
             "--attention", "0", "--threads", "1", "--toy-clip"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a tools/train.py run folder (its latest checkpoint, EMA weights)")
    p.add_argument("--out", required=True, help="folder of the evaluations and the table")
    p.add_argument("--samplers", nargs="+", default=["ddim:50", "dpmpp_2m:10", "dpmpp_2m:20"],
                   help="sampler:steps, the first is the reference of the paired columns")
    p.add_argument("--jobs", type=int, default=1, help="evaluations run at once (one thread each)")
    p.add_argument("--boot", type=int, default=200, help="bootstrap resamples for the FD standard errors")
    p.add_argument("--table-only", action="store_true", help="only step 2 (every evaluation must exist)")
    args = p.parse_args(argv)
    for s in args.samplers:
        name, _, steps = s.partition(":")
        if not name or not steps.isdigit():
            p.error(f"--samplers: expected sampler:steps (e.g. ddim:50), got {s!r}")
    if args.jobs < 1 or args.boot < 2:
        p.error("--jobs must be >= 1 and --boot >= 2")
    return args


def folder(out: Path, spec: str) -> Path:
    name, _, steps = spec.partition(":")
    return out / f"{name}_{steps}"


def run_evaluations(args: argparse.Namespace, out: Path) -> None:
    todo = [s for s in args.samplers if not (folder(out, s) / "results.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[str, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            spec = todo.pop(0)
            name, _, steps = spec.partition(":")
            dest = folder(out, spec)
            dest.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), args.run, "--out", str(dest),
                   "--sampler", name, "--steps", steps, *EVAL_ARGS]
            log = open(dest / "evaluate.log", "w")
            print(f"start {spec}: {' '.join(cmd)}", flush=True)
            running.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(2)
        for item in list(running):
            spec, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"done {spec}: exit {proc.returncode} after {time.time() - t0:.0f}s", flush=True)
                if proc.returncode:
                    raise SystemExit(f"tools/evaluate.py failed for {spec}; see {folder(out, spec) / 'evaluate.log'}")


def load(out: Path, spec: str):
    """records, generated images (N, 3, S, S) uint8 and the renders of their prompts, in records' order."""
    from PIL import Image

    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation.prompts import evaluation_prompts

    d = folder(out, spec)
    res = json.loads((d / "results.json").read_text())
    recs = res["records"]
    s = res["settings"]
    imgs = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(d / r["image"]).convert("RGB")))
                        .permute(2, 0, 1) for r in recs])
    specs = evaluation_prompts(s["categories"], s["prompts_per_category"], image_size=imgs.shape[-1],
                               max_count=s["max_count"], holdout_pairs=None)
    spec_of = {p.uid: p for c in specs.values() for p in c}
    refs = torch.stack([render(spec_of[r["uid"]].scene) for r in recs])
    return res, imgs, refs


def fd_of(feat_g: torch.Tensor, feat_r: torch.Tensor) -> float:
    from raphael_ref.evaluation.metrics import frechet_distance, gaussian_statistics

    return float(frechet_distance(*gaussian_statistics(feat_g), *gaussian_statistics(feat_r)))


def toy_clip_features(images: torch.Tensor) -> torch.Tensor:
    from raphael_ref import toy_clip as TC

    ext = TC._extractor_class()("raphael-toy-clip", ["embed"])
    return torch.cat([ext(images[i:i + 64])[0] for i in range(0, len(images), 64)]).double()  # (N, 64)


def build_table(args: argparse.Namespace, out: Path) -> dict:
    from raphael_ref.evaluation.ablation import alignment_se, pixel_features

    rows, data = [], {}
    for spec in args.samplers:
        res, imgs, refs = load(out, spec)
        data[spec] = dict(res=res, correct=torch.tensor([float(r["correct"]) for r in res["records"]]),
                          keys=[(r["uid"], r["seed"], r["sample"]) for r in res["records"]],
                          pix=pixel_features(imgs), pix_ref=pixel_features(refs),
                          clip=toy_clip_features(imgs), clip_ref=toy_clip_features(refs),
                          score=torch.tensor([r["toy_clip_score"] for r in res["records"]], dtype=torch.float64))
    ref = args.samplers[0]
    n = len(data[ref]["keys"])
    for spec in args.samplers:
        if data[spec]["keys"] != data[ref]["keys"]:
            raise SystemExit(f"{spec} and {ref} hold different images (prompts / seeds / counts); pairing needs the same")
    g = torch.Generator().manual_seed(0)
    boots = [torch.randint(0, n, (n,), generator=g) for _ in range(args.boot)]  # shared by every sampler

    def fds(d, kind, idx=None):
        f, fr = d[kind], d[kind + "_ref"]
        return fd_of(f, fr) if idx is None else fd_of(f[idx], fr[idx])

    boot_vals = {spec: {k: torch.tensor([fds(data[spec], k, i) for i in boots]) for k in ("pix", "clip")}
                 for spec in args.samplers}
    for spec in args.samplers:
        d = data[spec]
        res = d["res"]
        name, _, steps = spec.partition(":")
        diff = d["correct"] - data[ref]["correct"]
        row = {"sampler": name, "steps": int(steps), "n": n,
               "model_calls": 2 * int(steps) - 1 if name == "heun" else int(steps),
               "accuracy": res["summary"]["overall"], "accuracy_se": alignment_se(res["summary"]),
               "categories": {c: v["accuracy"] for c, v in res["summary"]["categories"].items()},
               "acc_diff": float(diff.mean()), "acc_diff_se": float(diff.std() / math.sqrt(n)),
               "clip_score": float(d["score"].mean()), "clip_score_se": float(d["score"].std() / math.sqrt(n)),
               "pixel_fd": fds(d, "pix"), "pixel_fd_se": float(boot_vals[spec]["pix"].std()),
               "clip_fd": fds(d, "clip"), "clip_fd_se": float(boot_vals[spec]["clip"].std()),
               "clip_fd_torch_fidelity": res["toy_clip"]["fd_toy_clip"],
               "pixel_fd_diff": fds(d, "pix") - fds(data[ref], "pix"),
               "pixel_fd_diff_se": float((boot_vals[spec]["pix"] - boot_vals[ref]["pix"]).std()),
               "clip_fd_diff": fds(d, "clip") - fds(data[ref], "clip"),
               "clip_fd_diff_se": float((boot_vals[spec]["clip"] - boot_vals[ref]["clip"]).std()),
               "agree_with_reference": int((diff == 0).sum())}
        rows.append(row)
    (out / "table.json").write_text(json.dumps({"reference": ref, "boot": args.boot, "rows": rows}, indent=2) + "\n")
    md = table_markdown(rows, ref)
    (out / "table.md").write_text(md)
    print(md)
    return {"rows": rows}


def table_markdown(rows: list[dict], ref: str) -> str:
    def pm(v, se, f="{:.3f}"):
        return f"{f.format(v)} ± {f.replace('+', '').format(se)}" if se is not None else f.format(v)

    lines = ["| sampler | steps | model calls | detector (overall) | diff. vs " + ref.replace(":", " ") +
             " | toy-CLIP score | pixel-FD | diff. | toy-CLIP FD | diff. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        first = i == 0
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['model_calls']} x 2 (CFG) | {pm(r['accuracy'], r['accuracy_se'])} | "
            f"{'(reference)' if first else pm(r['acc_diff'], r['acc_diff_se'], '{:+.3f}')} | "
            f"{pm(r['clip_score'], r['clip_score_se'], '{:.2f}')} | {pm(r['pixel_fd'], r['pixel_fd_se'], '{:.3f}')} | "
            f"{'' if first else pm(r['pixel_fd_diff'], r['pixel_fd_diff_se'], '{:+.3f}')} | "
            f"{pm(r['clip_fd'], r['clip_fd_se'], '{:.2f}')} | "
            f"{'' if first else pm(r['clip_fd_diff'], r['clip_fd_diff_se'], '{:+.2f}')} |")
    cats = list(rows[0]["categories"])
    lines += ["", "| sampler | steps | " + " | ".join(cats) + " | same verdict as the reference |",
              "|---|---:|" + "---:|" * (len(cats) + 1)]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | " + " | ".join(f"{r['categories'][c]:.3f}" for c in cats) +
                     f" | {r['agree_with_reference']}/{r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if not args.table_only:
        run_evaluations(args, out)
    build_table(args, out)


if __name__ == "__main__":
    main()
