#!/usr/bin/env python
"""LoRA on ~28 images of a concept the toy model has never seen (issue 12, item 1; RAPHAEL Sec. 4.1 / App. 7.8,
Fig. 19-20): does RAPHAEL keep the prompt's other concepts while it learns the new one, better than a dense model?

    python tools/lora_toy.py --base raphael=runs/default_v2 --base dense=runs/dense_v2 \\
        --work runs/lora_toy --out docs/results/lora_toy --lora-seeds 0 1 2 --jobs 2

The new concept is the colour word "cyan" (``synthetic.NOVEL_COLORS``): the training generator never draws it, so
neither the U-Net nor the frozen toy text tower has seen the word or the colour. The fine-tune set is narrow on
purpose, like a subject photographed in one place: ``--n-images`` (28) scenes whose cyan object is always in the
*centre* (shape drawn at random), with a second object of a known colour elsewhere drawn with probability 1/2 and
every scene distinct (so at most three scenes, one per shape, hold the cyan object alone). Overfitting then has a measurable signature: the cyan object stays in the centre whatever the
prompt says, or old prompts start to draw cyan.

Each base (a tools/train.py run; EMA weights, frozen) gets the same LoRA (tools/finetune_lora.py: attention
projections, rank ``--rank``, ``--steps`` of batch ``--batch-size``, AdamW ``--lr``), once per ``--lora-seeds``
seed (adapter initialisation, batch order and noise). Every model (each base without LoRA, and each adapter
merged at scale 1) draws the same three prompt sets from the same noise (DDIM ``--sampler-steps``, guidance
``--guidance``), read by the project's detector with cyan added to its palette:

    concept   "a cyan <shape> <position>" for every shape x position (15 prompts x ``--per-prompt``):
              how often a cyan object appears; the full verdict (cyan, shape, position); and, on the 12
              off-centre prompts, a cyan object at the named position (the centre is all the set showed)
    combo     a cyan object off-centre and a known-colour object of another shape elsewhere, both named
              with colour, shape and position (``--n-combo`` prompts): the full verdict, and each half alone
    old       the evaluation set of tools/evaluate.py (six GenEval-style categories, ``--n-old`` prompts each)
              without the new word: the overall verdict, and the share of images that show a cyan object (leak)

Standard errors: over images within a model (binomial); over LoRA seeds (sd / sqrt(n_seeds)) for the mean of
the seeds; the paired difference RAPHAEL - dense per LoRA seed (same seed, same prompts, same noise) and its
mean ± se. Writes <out>.md, <out>.json and <out>.png; the fine-tunes and the concept set go under ``--work``
(reused when present, so an interrupted study resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raphael_ref.data.synthetic import COLORS, POSITIONS, SHAPES, make_scene, render  # noqa: E402
from raphael_ref.evaluation.detector import DetectorConfig, detect_batch, to_uint8  # noqa: E402
from raphael_ref.evaluation.prompts import CATEGORIES, PromptSpec, Requirement, evaluation_prompts, score  # noqa: E402

CONCEPT = "cyan"
CONCEPT_POSITION = "center"
CONCEPT_SEED = 28  # the concept set's own seed (never a training seed of the base runs' data)
COMBO_SEED = 2819
DETECTOR = DetectorConfig(extra_colors=(CONCEPT,))
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the concept set and the prompt sets
# ---------------------------------------------------------------------------------------------


def concept_scenes(n: int, image_size: int, seed: int = CONCEPT_SEED):
    """``n`` distinct scenes, each with one cyan object in the centre (random shape); with probability 1/2 a second
    object of a known colour, another shape, at another position (a repeat is drawn again, so at most three scenes
    are single-object). A pure function of (n, image_size, seed)."""
    if n < 1 or n > 3 + 3 * 2 * len(COLORS) * (len(POSITIONS) - 1):
        raise ValueError(f"--n-images must lie in [1, {3 + 6 * len(COLORS) * (len(POSITIONS) - 1)}]; got {n}")
    rng = np.random.default_rng([seed, image_size])
    colors, others = tuple(COLORS), [p for p in POSITIONS if p != CONCEPT_POSITION]
    scenes, seen = [], set()
    while len(scenes) < n:
        shape = SHAPES[rng.integers(len(SHAPES))]
        objects = [(shape, CONCEPT, CONCEPT_POSITION)]
        if rng.random() < 0.5:
            s2 = [s for s in SHAPES if s != shape][rng.integers(len(SHAPES) - 1)]
            objects.append((s2, colors[rng.integers(len(colors))], others[rng.integers(len(others))]))
        key = frozenset(objects)
        if key not in seen:
            seen.add(key)
            scenes.append(make_scene(objects, image_size))
    return scenes


def write_concept_set(folder: Path, scenes) -> None:
    """PNG images with same-stem .txt captions (the image-folder format of data.loader / tools/finetune_lora.py)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(scenes):
        Image.fromarray(render(sc).permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(sc.caption + "\n")


def concept_prompts(image_size: int) -> list[PromptSpec]:
    """"a cyan <shape> <position>" for every shape and position (15 prompts)."""
    specs = []
    for shape in SHAPES:
        for pos in POSITIONS:
            sc = make_scene([(shape, CONCEPT, pos)], image_size)
            specs.append(PromptSpec("concept", len(specs), sc.caption, sc, (Requirement(shape, CONCEPT, pos),)))
    return specs


def combo_prompts(n: int, image_size: int, seed: int = COMBO_SEED) -> list[PromptSpec]:
    """``n`` distinct prompts: a cyan object off-centre and a known-colour object of another shape elsewhere."""
    rng = np.random.default_rng(seed)
    colors, off = tuple(COLORS), [p for p in POSITIONS if p != CONCEPT_POSITION]
    specs, seen = [], set()
    while len(specs) < n:
        s1, s2 = (SHAPES[j] for j in rng.choice(len(SHAPES), 2, replace=False))
        p1 = off[rng.integers(len(off))]
        p2 = [p for p in POSITIONS if p != p1][rng.integers(len(POSITIONS) - 1)]
        c2 = colors[rng.integers(len(colors))]
        objects = [(s1, CONCEPT, p1), (s2, c2, p2)]
        if frozenset(objects) in seen:
            continue
        seen.add(frozenset(objects))
        sc = make_scene(objects, image_size)
        specs.append(PromptSpec("combo", len(specs), sc.caption, sc,
                                (Requirement(s1, CONCEPT, p1), Requirement(s2, c2, p2))))
    return specs


# ---------------------------------------------------------------------------------------------
# fine-tuning (tools/finetune_lora.py, one process per adapter)
# ---------------------------------------------------------------------------------------------


def finetune_command(base: str, data: Path, out: Path, seed: int, args) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "finetune_lora.py"), "--base", base, "--data", str(data),
            "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--rank", str(args.rank), "--targets", args.targets, "--seed", str(seed), "--threads", str(args.threads),
            "--log-every", "25", "--no-samples"]


def run_finetune(cmd: list[str], out: Path) -> Path:
    adapter = out / "adapter.safetensors"
    if adapter.exists():
        return adapter
    if out.exists():  # an interrupted fine-tune: start it again (finetune_lora never reuses a folder)
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc != 0 or not adapter.exists():
        raise RuntimeError(f"fine-tune failed (rc {rc}); see {log}")
    print(f"[finetune] {out} done in {time.time() - t0:.0f} s", flush=True)
    return adapter


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def draw(pipe, specs: list[PromptSpec], per_prompt: int, args, offset: int) -> torch.Tensor:
    """Images (N * per_prompt, 3, S, S) in [-1, 1]; the noise depends only on (args.seed, offset, batch start)."""
    prompts = [s.prompt for s in specs for _ in range(per_prompt)]
    outs = []
    for i in range(0, len(prompts), args.eval_batch):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + offset + i)
        res = pipe(prompts[i:i + args.eval_batch], num_inference_steps=args.sampler_steps, sampler="ddim",
                   guidance_scale=args.guidance, generator=gen, output_type="pt")
        outs.append(res.images)
    return torch.cat(outs)


def _has(objs, color=None, shape=None, position=None) -> bool:
    return any((color is None or o.color == color) and (shape is None or o.shape == shape)
               and (position is None or o.position == position) for o in objs)


def measure(images: dict[str, torch.Tensor], sets: dict[str, list[PromptSpec]], per_prompt: dict[str, int]) -> dict:
    """Per-image 0/1 outcomes of every measure (lists), from the detector with cyan in its palette."""
    out = {}
    for name, specs in sets.items():
        reps = [s for s in specs for _ in range(per_prompt[name])]
        dets = detect_batch(to_uint8(images[name].clamp(-1, 1)), DETECTOR)
        verdict = [float(score(s, d)) for s, d in zip(reps, dets)]
        cyan = [float(_has(d, CONCEPT)) for d in dets]
        m = {"verdict": verdict, "cyan_present": cyan}
        if name == "concept":
            m["cyan_shape"] = [float(_has(d, CONCEPT, s.requirements[0].shape)) for s, d in zip(reps, dets)]
            m["cyan_at_named_position_offcentre"] = [float(_has(d, CONCEPT, position=s.requirements[0].position))
                                                     for s, d in zip(reps, dets)
                                                     if s.requirements[0].position != CONCEPT_POSITION]
            m["cyan_in_centre_when_asked_elsewhere"] = [float(_has(d, CONCEPT, position=CONCEPT_POSITION))
                                                        for s, d in zip(reps, dets)
                                                        if s.requirements[0].position != CONCEPT_POSITION]
        elif name == "combo":
            m["cyan_half"] = [float(score(PromptSpec(s.category, s.index, s.prompt, s.scene, s.requirements[:1]), d))
                              for s, d in zip(reps, dets)]
            m["old_half"] = [float(score(PromptSpec(s.category, s.index, s.prompt, s.scene, s.requirements[1:]), d))
                             for s, d in zip(reps, dets)]
        elif name == "old":
            for c in sorted({s.category for s in specs}):
                m[f"verdict_{c}"] = [v for s, v in zip(reps, verdict) if s.category == c]
        out[name] = m
    return out


def mean_se(x) -> list[float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return [float("nan"), float("nan")]
    return [float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")]


def binom(x) -> list[float]:
    x = np.asarray(x, dtype=np.float64)
    p = float(x.mean())
    return [p, math.sqrt(p * (1 - p) / x.size)]


# rows of the tables: (set, measure, label)
MEASURES = (
    ("concept", "cyan_present", "concept prompts: a cyan object appears"),
    ("concept", "verdict", "concept prompts: cyan + shape + position all right"),
    ("concept", "cyan_at_named_position_offcentre", "concept prompts, off-centre: cyan object where asked"),
    ("concept", "cyan_in_centre_when_asked_elsewhere", "concept prompts, off-centre: cyan object in the centre anyway"),
    ("combo", "verdict", "combo prompts: both objects right"),
    ("combo", "cyan_half", "combo prompts: the cyan object right"),
    ("combo", "old_half", "combo prompts: the known-colour object right"),
    ("old", "verdict", "old prompts: overall verdict (6 categories)"),
    ("old", "verdict_colors", "old prompts: colours"),
    ("old", "verdict_position", "old prompts: position"),
    ("old", "cyan_present", "old prompts: a cyan object appears (leak)"),
)


def summarize(per_model: dict, bases: list[str], seeds: list[int]) -> dict:
    """Table cells: each base without LoRA (binomial se), each base with LoRA (mean over seeds ± se over seeds,
    and the pooled binomial se), and the paired RAPHAEL - dense difference per seed."""
    rows = {}
    for (s, m, _) in MEASURES:
        key = f"{s}/{m}"
        r = {}
        for b in bases:
            r[f"{b} base"] = binom(per_model[f"{b}/base"][s][m])
            per_seed = [float(np.mean(per_model[f"{b}/lora_s{q}"][s][m])) for q in seeds]
            pooled = [x for q in seeds for x in per_model[f"{b}/lora_s{q}"][s][m]]
            r[f"{b} + LoRA"] = {"per_seed": per_seed, "mean_se_over_seeds": mean_se(per_seed),
                                "pooled_binomial": binom(pooled)}
        if len(bases) == 2:
            a, b = bases
            d = [x - y for x, y in zip(r[f"{a} + LoRA"]["per_seed"], r[f"{b} + LoRA"]["per_seed"])]
            r["difference"] = {"per_seed": d, "mean_se": mean_se(d)}
        rows[key] = r
    return rows


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def _pm(c, digits=2) -> str:
    m, se = c
    return f"{m:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{m:.{digits}f}"


READING_MARK = "## Reading"


def _params(counts: dict) -> str:
    """"118,784 per base" when every base's adapter has the same size, else "raphael 1,234, dense 1,200"."""
    if counts and len(set(counts.values())) == 1:
        return f"{next(iter(counts.values())):,} per base"
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def write_markdown(result: dict, path: Path) -> None:
    kept = ""
    if path.exists() and READING_MARK in path.read_text():
        text = path.read_text()
        kept = text[text.index(READING_MARK):]
    a = result["args"]
    bases, seeds = list(result["bases"]), a["lora_seeds"]
    lines = [
        "# LoRA on 28 images of a new concept: RAPHAEL against a dense U-Net (issue 12, item 1)", "",
        "```", result["command"], "```", "",
        f"New concept: the colour word \"{CONCEPT}\", never drawn by the training generator (neither the U-Net nor the "
        f"frozen toy text tower has seen it). Fine-tune set: {a['n_images']} distinct scenes, the cyan object always "
        f"in the {CONCEPT_POSITION} (random shape), {result.get('n_two_object', '')} of them with a known-colour object elsewhere "
        f"(`{result['concept_set']}`, strip at the top of the figure). Bases (EMA weights, frozen): "
        + ", ".join(f"{b} = `{p}`" for b, p in result["bases"].items()) + ". "
        f"LoRA: tools/finetune_lora.py, targets `{a['targets']}`, rank {a['rank']}, {a['steps']} steps of batch "
        f"{a['batch_size']}, AdamW lr {a['lr']}, LoRA seeds {seeds} (adapter init, batch order, noise); "
        f"adapter parameters: {_params(result.get('adapter_parameters', {}))}. Sampling: DDIM {a['sampler_steps']}, "
        f"guidance {a['guidance']}, the same noise for every model; adapters merged at scale 1. Images per model: "
        f"concept {result['n_images_per_set']['concept']}, combo {result['n_images_per_set']['combo']}, "
        f"old {result['n_images_per_set']['old']}.", "",
        "Cells: without LoRA, the share ± binomial se over images; with LoRA, the mean over the LoRA seeds ± se over "
        "seeds (the pooled binomial se over all images of the seeds in brackets); last column, the paired difference "
        f"{bases[0]} - {bases[-1]} per seed, mean ± se over seeds (t95 at {len(seeds) - 1} df: "
        f"{ {1: 12.7, 2: 4.3, 3: 3.18, 4: 2.78}.get(len(seeds) - 1, 2.0) }).", "",
        "| measure | " + " | ".join(f"{b} base | {b} + LoRA" for b in bases)
        + (f" | {bases[0]} - {bases[-1]} (with LoRA) |" if len(bases) == 2 else " |"),
        "|---|" + "---:|---:|" * len(bases) + ("---:|" if len(bases) == 2 else ""),
    ]
    for (s, m, label) in MEASURES:
        r = result["rows"][f"{s}/{m}"]
        cells = []
        for b in bases:
            lo = r[f"{b} + LoRA"]
            cells += [_pm(r[f"{b} base"]), f"{_pm(lo['mean_se_over_seeds'])} ({lo['pooled_binomial'][1]:.2f})"]
        if len(bases) == 2:
            d = r["difference"]
            cells.append(f"{_pm(d['mean_se'])} ({', '.join(f'{x:+.2f}' for x in d['per_seed'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"![concept set; rows of prompts; columns per model]({path.with_suffix('.png').name})", "",
              "Top: the fine-tune set. Below, one row per prompt (concept, combo and old prompts), one column per "
              f"model (each base without and with its LoRA of seed {seeds[0]}), the same noise in a row. "
              f"Raw per-image outcomes: `{path.with_suffix('.json').name}`. {result['seconds']:.0f} s of wall time "
              "(fine-tunes included; shared 2-core machine).", ""]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def write_grid(path: Path, concept_imgs: torch.Tensor, columns: dict[str, dict[str, torch.Tensor]],
               sets: dict[str, list[PromptSpec]], per_prompt: dict[str, int], rows_per_set: int = 5,
               zoom: int = 4) -> None:
    from PIL import Image, ImageDraw

    S = concept_imgs.shape[-1]
    cell, label_w = S * zoom + 4, 300
    picks = [(name, i) for name in ("concept", "combo", "old")
             for i in np.linspace(0, len(sets[name]) - 1, min(rows_per_set, len(sets[name]))).astype(int).tolist()]
    strip_n = concept_imgs.shape[0]
    width = max(label_w + len(columns) * cell, strip_n * (S * 2 + 2) + 8)
    img = Image.new("RGB", (width, 16 + S * 2 + 20 + len(picks) * cell), (40, 40, 40))
    d = ImageDraw.Draw(img)
    d.text((4, 2), f"fine-tune set ({strip_n} images)", fill=(255, 255, 255))
    for k in range(strip_n):
        a = concept_imgs[k].permute(1, 2, 0).contiguous().numpy()
        img.paste(Image.fromarray(a).resize((S * 2, S * 2), Image.NEAREST), (4 + k * (S * 2 + 2), 14))
    top = 16 + S * 2 + 16
    for j, name in enumerate(columns):
        d.text((label_w + j * cell + 2, top - 12), name, fill=(255, 255, 255))
    for r, (set_name, i) in enumerate(picks):
        d.text((4, top + r * cell + cell // 2 - 5), sets[set_name][i].prompt[:46], fill=(255, 255, 255))
        for j, imgs in enumerate(columns.values()):
            a = to_uint8(imgs[set_name][i * per_prompt[set_name]:i * per_prompt[set_name] + 1].clamp(-1, 1))[0]
            img.paste(Image.fromarray(a.permute(1, 2, 0).contiguous().numpy()).resize((S * zoom, S * zoom), Image.NEAREST),
                      (label_w + j * cell, top + r * cell))
    img.save(path)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", required=True, metavar="NAME=RUN",
                   help="a base run (tools/train.py folder); repeat: the first is RAPHAEL, the last the dense control")
    p.add_argument("--work", default="runs/lora_toy", help="fine-tune folders and the concept set")
    p.add_argument("--out", default="docs/results/lora_toy", help="report stem: <out>.md, .json, .png")
    p.add_argument("--n-images", type=int, default=28)
    p.add_argument("--lora-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="attention")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per fine-tune process")
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes at once")
    p.add_argument("--per-prompt", type=int, default=4, help="images per concept prompt")
    p.add_argument("--n-combo", type=int, default=24)
    p.add_argument("--combo-per-prompt", type=int, default=2)
    p.add_argument("--n-old", type=int, default=8, help="old prompts per category (six categories)")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--eval-batch", type=int, default=48)
    p.add_argument("--finetune-only", action="store_true", help="fine-tune (or reuse) the adapters; measure nothing")
    p.add_argument("--markdown-only", action="store_true", help="rewrite <out>.md from <out>.json")
    args = p.parse_args(argv)
    bases = {}
    for item in args.base:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            p.error(f"--base takes NAME=RUN; got {item!r}")
        if name in bases:
            p.error(f"--base name {name!r} given twice")
        bases[name] = run
    args.bases = bases
    for name, v, lo in (("--n-images", args.n_images, 1), ("--steps", args.steps, 1), ("--per-prompt", args.per_prompt, 1),
                        ("--n-combo", args.n_combo, 1), ("--n-old", args.n_old, 1), ("--jobs", args.jobs, 1)):
        if v < lo:
            p.error(f"{name} must be >= {lo}; got {v}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        result = json.loads(out.with_suffix(".json").read_text())
        write_markdown(result, out.with_suffix(".md"))
        return result
    t_start = time.time()
    from raphael_ref.pipeline import RaphaelPipeline

    probe = RaphaelPipeline.from_run(next(iter(args.bases.values())))
    S = probe.model.cfg.sample_size * probe.codec.downsample_factor
    del probe
    work = Path(args.work)
    scenes = concept_scenes(args.n_images, S)
    concept_dir = work / "concept"
    write_concept_set(concept_dir, scenes)
    jobs = [(b, q, finetune_command(run, concept_dir, work / f"{b}_s{q}", q, args), work / f"{b}_s{q}")
            for b, run in args.bases.items() for q in args.lora_seeds]
    with ThreadPoolExecutor(args.jobs) as ex:
        adapters = dict(zip([(b, q) for b, q, _, _ in jobs], ex.map(lambda j: run_finetune(j[2], j[3]), jobs)))
    if args.finetune_only:
        return None
    sets = {"concept": concept_prompts(S), "combo": combo_prompts(args.n_combo, S),
            "old": [s for c in evaluation_prompts(CATEGORIES, args.n_old, image_size=S).values() for s in c]}
    per_prompt = {"concept": args.per_prompt, "combo": args.combo_per_prompt, "old": 1}
    per_model, grid_cols, adapter_params = {}, {}, {}
    for b, run in args.bases.items():
        for q in [None] + list(args.lora_seeds):
            pipe = RaphaelPipeline.from_run(run)
            name = f"{b}/base" if q is None else f"{b}/lora_s{q}"
            if q is not None:
                from safetensors.torch import load_file

                adapter_params[b] = sum(v.numel() for v in load_file(str(adapters[(b, q)])).values())
                pipe.load_lora(adapters[(b, q)], 1.0)
            t0 = time.time()
            imgs = {k: draw(pipe, v, per_prompt[k], args, offset=1000 * j) for j, (k, v) in enumerate(sets.items())}
            per_model[name] = measure(imgs, sets, per_prompt)
            if q is None or q == args.lora_seeds[0]:
                grid_cols[f"{b}" if q is None else f"{b} + LoRA"] = imgs
            print(f"[measure] {name}: {time.time() - t0:.0f} s; "
                  + ", ".join(f"{s}/{m} {np.mean(per_model[name][s][m]):.2f}" for s, m, _ in MEASURES[:5]), flush=True)
    bases = list(args.bases)
    command = "python tools/lora_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "args": {k: v for k, v in vars(args).items() if k != "bases"},
              "bases": args.bases, "concept": CONCEPT, "concept_set": str(concept_dir),
              "concept_captions": [s.caption for s in scenes],
              "n_two_object": sum(len(s.objects) == 2 for s in scenes), "adapter_parameters": adapter_params,
              "n_images_per_set": {k: len(v) * per_prompt[k] for k, v in sets.items()},
              "prompts": {k: [s.prompt for s in v] for k, v in sets.items()},
              "rows": summarize(per_model, bases, list(args.lora_seeds)), "per_image": per_model,
              "seconds": round(time.time() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    write_grid(out.with_suffix(".png"), torch.stack([render(s) for s in scenes]), grid_cols, sets, per_prompt)
    return result


if __name__ == "__main__":
    main()
