#!/usr/bin/env python
"""Evaluate a RAPHAEL checkpoint on the synthetic compositional benchmark (and optionally FID/KID, CLIP score).

    python tools/evaluate.py runs/toy --out runs/toy/eval                  # latest checkpoint, EMA weights
    python tools/evaluate.py runs/toy/checkpoints/step_0001500 --out eval --steps 50 --guidance 3 --seeds 0 1
    python tools/evaluate.py runs/toy --out eval_uncond --unconditional     # empty prompts: the floor
    python tools/evaluate.py runs/toy --out eval --fid --inception-weights weights-inception-2015-12-05-6726825d.pth
    python tools/evaluate.py runs/toy --out eval --clip ~/clip/ViT-B-32-dir   # open_clip folder (local)
    python tools/evaluate.py --reference matched --out eval_gt                # ground-truth renders: 1.0
    python tools/evaluate.py --reference shuffled --out eval_shuffled         # perfect scenes, wrong prompts

``--reference`` scores renders instead of a model: ``matched`` draws each prompt's own scene (the
ceiling, 1.0 by the detector test), ``shuffled`` draws the scene of another prompt of the set (a
perfect painter that ignores the text). The gap between the two is what the metric can see of
alignment alone; a model trained without text should score near ``shuffled``.

For every prompt of the fixed evaluation set (``raphael_ref.evaluation.prompts``; categories
single_object, two_objects, counting, colors, position, color_attribution) and every seed, draws
``--per-prompt`` images with ``raphael_ref.sampling.sample`` (classifier-free guidance against the
empty prompt), reads the objects back with the programmatic detector and scores each image
GenEval-style (one binary verdict). Noise for (seed, prompt) comes from its own generator, so an
image does not depend on the other prompts, categories or batch sizes.

Writes to --out:
    results.json        settings, accuracy per category ("summary"), residual background noise ("background"),
                        why the two-object binding prompts pass or fail ("binding": bound / swapped /
                        one_shape / other, prompts.binding_outcome), which named shapes the two-object prompts
                        draw, by caption order ("shape_order", prompts.named_shapes_drawn), "fid_kid" /
                        "clip_score" when asked,
                        every image's verdict and detections ("records")
    results.md          the table (accuracy, correct / n per category; FID/KID/CLIP when asked)
    grids/<cat>.png     per category: ground-truth render, then the images (green: correct, red: not)
    images/<cat>/...    every generated image (PNG)
    attention/...       per-token masks and pooled-token maps of the first prompts (--attention N)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raphael_ref.checkpoint import load_model  # noqa: E402
from raphael_ref.data.synthetic import render  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule  # noqa: E402
from raphael_ref.evaluation import attention_views as AV  # noqa: E402
from raphael_ref.evaluation import metrics as M  # noqa: E402
from raphael_ref.evaluation.detector import DetectedObject, background_rms, detect_batch, to_uint8  # noqa: E402
from raphael_ref.excite import Excite  # noqa: E402
from raphael_ref.text_encoder import encode_phrases_apart  # noqa: E402
from raphael_ref.evaluation.prompts import (  # noqa: E402
    ALL_CATEGORIES, BINDING_CATEGORIES, CATEGORIES, DIAGNOSTIC_CATEGORIES, EVAL_SEED, HELDOUT_PAIRS, PromptSpec, binding_lines,
    binding_outcome, binding_summary, evaluation_prompts, score, shape_order_lines, shape_order_summary)

GenerateFn = Callable[[PromptSpec, int, int], torch.Tensor]  # (spec, seed, n) -> uint8 (n, 3, S, S)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a run folder (its latest checkpoint) or a checkpoint folder (not with --reference)")
    p.add_argument("--reference", choices=("matched", "shuffled"), default=None,
                   help="score ground-truth renders instead of a model: each prompt's own scene, or another prompt's")
    p.add_argument("--image-size", type=int, default=32, help="render size of --reference (pixels)")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, grids/, images/)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "dpmpp_2m", "unipc", "euler", "heun"), default="ddim",
                   help="ddim/ddpm: the project's samplers; the others: diffusers' schedulers (raphael_ref/schedulers.py; "
                        "no attention views, pass --attention 0)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (ddpm always runs all T)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance weight (Fig. 6b)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image set per seed")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt and seed")
    p.add_argument("--prompts-per-category", type=int, default=24)
    p.add_argument("--categories", nargs="+", choices=ALL_CATEGORIES, default=list(CATEGORIES),
                   help=f"default: the GenEval-style {list(CATEGORIES)}; diagnostic (never in 'overall'): "
                        f"{list(DIAGNOSTIC_CATEGORIES)}")
    p.add_argument("--max-count", type=int, default=3, help="largest count in counting prompts (<= training max_objects)")
    p.add_argument("--prompt-seed", type=int, default=EVAL_SEED,
                   help=f"seed of the prompt set (default {EVAL_SEED}: the benchmark); another seed draws prompts off "
                        "the benchmark, e.g. to tune a sampling option before measuring it")
    p.add_argument("--holdout-pairs", action="store_true",
                   help=f"only prompts naming a held-out (colour, shape) pair {HELDOUT_PAIRS} (train without them)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="weights", action="store_const", const="ema", help="EMA weights (default when present)")
    w.add_argument("--raw", dest="weights", action="store_const", const="raw", help="the raw (non-EMA) weights")
    p.add_argument("--unconditional", action="store_true",
                   help="generate from the empty prompt (no guidance) and score against the prompts: the chance floor")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fid", action="store_true", help="FID/KID of all images against ground-truth renders of their prompts")
    p.add_argument("--inception-weights", default=None, help=f"local {M.INCEPTION_FILE} (needed by --fid)")
    p.add_argument("--fid-extractor", default=M.INCEPTION_EXTRACTOR,
                   help=f"torch-fidelity feature extractor; {M.TINY_EXTRACTOR!r} is a random stand-in for smoke tests")
    p.add_argument("--clip", default=None, help="CLIP score with this open_clip folder or model name (local weights)")
    p.add_argument("--clip-weights", default=None, help="local checkpoint file when --clip is a model name")
    p.add_argument("--toy-clip", action="store_true",
                   help="the toy axes of Fig. 6b with the shipped toy CLIP (raphael_ref/toy_clip.py): toy CLIP score, "
                        "Frechet distance in its image-feature space (torch-fidelity, registered extractor) and pixel-FD, "
                        "each against ground-truth renders of the prompts")
    p.add_argument("--attention", type=int, default=1, help="attention views for the first N prompts per category")
    p.add_argument("--attention-step", type=int, default=None, help="sampler step of the views (default: middle)")
    p.add_argument("--attention-block", type=int, default=None,
                   help="transformer block of the views, 0..15 in forward order (default: first finest-grid block)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown per category grid")
    p.add_argument("--excite-scale", type=float, default=0.0,
                   help="Attend-and-Excite at sampling time (raphael_ref/excite.py, E84; not in RAPHAEL): the step size "
                        "alpha of the latent update at the first step; 0 (default): off")
    p.add_argument("--excite-steps", type=int, default=10, help="the first N sampler steps get the update (ddim/ddpm)")
    p.add_argument("--phrases-apart", action="store_true",
                   help="diagnostic, not RAPHAEL's E_theta: the token states of each object phrase after the first "
                        "replaced by the phrase encoded on its own (text_encoder.encode_phrases_apart)")
    p.add_argument("--excite-words", nargs="+", choices=("color", "shape", "position"), default=["shape"],
                   help="which words of each object's phrase are the subject tokens (default: the shape words)")
    args = p.parse_args(argv)
    args.weights = args.weights or "auto"
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if len(set(args.excite_words)) != len(args.excite_words):
        p.error(f"--excite-words: name each word kind once, got {args.excite_words}")
    if not args.excite_scale and (args.excite_steps != 10 or args.excite_words != ["shape"]):
        p.error("--excite-steps / --excite-words set without --excite-scale (0: Attend-and-Excite is off)")
    if args.excite_scale:
        if not (math.isfinite(args.excite_scale) and args.excite_scale > 0):
            p.error(f"--excite-scale must be a finite number > 0 (0: off), got {args.excite_scale}")
        if args.sampler not in ("ddim", "ddpm"):
            p.error(f"--excite-scale needs --sampler ddim or ddpm (our sampling loop), got {args.sampler}")
        if args.excite_steps < 1:
            p.error(f"--excite-steps must be >= 1, got {args.excite_steps}")
        if args.unconditional or args.reference is not None:
            p.error("--excite-scale needs a checkpoint and prompts (not --unconditional or --reference)")
    if args.phrases_apart and (args.unconditional or args.reference is not None):
        p.error("--phrases-apart needs a checkpoint and prompts (not --unconditional or --reference)")
    if args.sampler not in ("ddim", "ddpm") and args.attention:
        p.error(f"--sampler {args.sampler}: the attention views need ddim or ddpm; pass --attention 0")
    if args.sampler not in ("ddim", "ddpm"):
        from raphael_ref.pipeline import check_sampler

        try:
            check_sampler(args.sampler, args.eta)
        except (ValueError, ImportError) as e:
            p.error(str(e))
    if (args.checkpoint is None) == (args.reference is None):
        p.error("give a checkpoint folder or --reference matched|shuffled (exactly one)")
    if args.reference is not None:
        args.attention = 0  # renders have no attention
    for name in ("steps", "per_prompt", "prompts_per_category"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.fid and args.fid_extractor == M.INCEPTION_EXTRACTOR and args.inception_weights is None:
        p.error(f"--fid needs --inception-weights PATH (a local {M.INCEPTION_FILE}; nothing is downloaded)")
    check_user_errors(p, args)
    return args


def check_user_errors(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`error:` lines (exit code 2) for what the user can fix, before anything long runs: the checkpoint and
    its weights, numbers out of range (--steps <= T of the checkpoint), an --out that takes no files."""
    if not 0.0 <= args.eta <= 1.0:  # NaN fails too
        p.error(f"--eta must lie in [0, 1] (0: deterministic DDIM), got {args.eta}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0.0):
        p.error(f"--guidance must be a finite number >= 0 (1 = no guidance), got {args.guidance}")
    if args.checkpoint is not None:
        from raphael_ref import training as T
        from raphael_ref.config import RaphaelConfig

        try:
            ckpt = T.resolve_checkpoint(args.checkpoint)
            weights_file(ckpt, args.weights)
            cfg = RaphaelConfig.from_json(ckpt / "config.json")
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        n_steps = args.steps if args.sampler != "ddpm" else cfg.diffusion.T
        if args.sampler != "ddpm" and args.steps > cfg.diffusion.T:
            p.error(f"--steps must lie in [1, T = {cfg.diffusion.T}] for {ckpt}, got {args.steps}")
        if args.attention and args.attention_step is not None and not 0 <= args.attention_step < n_steps:
            p.error(f"--attention-step must lie in [0, {n_steps}) ({n_steps} sampler steps), got {args.attention_step}")
        if (args.excite_scale or args.phrases_apart) and cfg.model.text_encoder in ("t5", "t5+clip"):
            p.error(f"--excite-scale and --phrases-apart find the words of a prompt in CLIP's BPE tokens; {ckpt} reads "
                    f"its prompts with {cfg.model.text_encoder!r}")
        if args.attention_block is not None and not 0 <= args.attention_block < cfg.n_transformer_blocks:
            p.error(f"--attention-block must lie in [0, {cfg.n_transformer_blocks}), got {args.attention_block}")
    from raphael_ref.training import writable_dir

    try:
        writable_dir(args.out)
    except ValueError as e:
        p.error(str(e))


# ------------------------------------------------------------------------------ the model side


def weights_file(ckpt_dir: Path, choice: str) -> str:
    """``ema.safetensors`` or ``model.safetensors`` of a checkpoint folder, per --ema / --raw / auto."""
    has_ema = (ckpt_dir / "ema.safetensors").exists()
    if choice == "ema" and not has_ema:
        raise FileNotFoundError(f"--ema: {ckpt_dir} has no ema.safetensors (use --raw for model.safetensors)")
    if choice == "ema" or (choice == "auto" and has_ema):
        return "ema.safetensors"
    return "model.safetensors"


def image_seed(seed: int, spec: PromptSpec) -> int:
    """The noise seed of (seed, prompt): independent of which other prompts are evaluated."""
    return zlib.crc32(f"{seed}/{spec.uid}/{spec.prompt}".encode())


class ModelGenerator:
    """Images of a checkpoint for a prompt spec, with attention recorded on request."""

    def __init__(self, ckpt: Path, args: argparse.Namespace, device: torch.device):
        from raphael_ref import training as T

        self.ckpt = T.resolve_checkpoint(ckpt)
        self.weights = weights_file(self.ckpt, args.weights)
        self.model, self.cfg = load_model(self.ckpt, weights_name=self.weights, map_location="cpu")
        self.model = self.model.to(device).eval()
        self.encoder = T.build_text_encoder(self.cfg, device)
        self.codec = T.build_codec(self.cfg, device)
        d = self.cfg.diffusion
        self.schedule = NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)
        self.size = self.cfg.model.sample_size
        self.image_size = self.size * self.codec.downsample_factor
        self.args = args
        self.empty = self.encoder([""])

    def __call__(self, spec: PromptSpec, seed: int, n: int, record_step: int | None = None):
        a = self.args
        # the sampling-time options (E84, E85); callers that build their own Namespace (tools/ablate.py) may omit them
        excite_scale, phrases_apart = getattr(a, "excite_scale", 0.0), getattr(a, "phrases_apart", False)
        if phrases_apart and not a.unconditional:
            enc = encode_phrases_apart(self.encoder, [spec.prompt] * n)
        else:
            enc = self.encoder([""] * n if a.unconditional else [spec.prompt] * n)
        cond = (enc.hidden, enc.valid, enc.pooled_index)
        uncond = None if a.unconditional else (self.empty.hidden, self.empty.valid, self.empty.pooled_index)
        kw = dict(shape=(n, self.cfg.model.in_channels, self.size, self.size), steps=a.steps,
                  guidance=1.0 if a.unconditional else a.guidance, sampler=a.sampler, eta=a.eta,
                  generator=torch.Generator().manual_seed(image_seed(seed, spec)),
                  set_alpha_to_one=self.cfg.sample.set_alpha_to_one)
        if excite_scale:  # Attend-and-Excite (E84) on the words of each object of the prompt's scene
            kw["excite"] = Excite(excite_subjects(spec, enc.hidden.shape[1], a.excite_words) * n,
                                  scale=excite_scale, steps=a.excite_steps)
        if record_step is None and a.sampler not in ("ddim", "ddpm"):  # diffusers' schedulers
            from raphael_ref.schedulers import sample_with_scheduler

            kw.pop("eta")
            x, _ = sample_with_scheduler(self.model, self.schedule, cond, uncond, scheduler=kw.pop("sampler"), **kw)
            rec = None
        elif record_step is None:
            from raphael_ref.sampling import sample

            x, _ = sample(self.model, self.schedule, cond, uncond, **kw)
            rec = None
        else:
            x, rec = AV.collect_attention(self.model, self.schedule, cond, uncond, record_steps=[record_step], **kw)
        images = to_uint8(self.codec.decode(x.float()).cpu())  # (n, 3, S, S)
        return (images, rec, enc) if record_step is not None else images


def excite_subjects(spec: PromptSpec, n_y: int, words: Sequence[str]) -> list[tuple[int, ...]]:
    """The token indices of the chosen words of each object of the prompt (``token_targets`` on its scene), as the
    one subject list of an Attend-and-Excite update (E84)."""
    from raphael_ref.token_attention import token_targets

    t = token_targets([spec.scene], [spec.prompt], n_y, words)
    return [tuple(int(j) for j in t.token.tolist())]


class RenderGenerator:
    """--reference: ground-truth renders of the prompt's own scene ("matched") or of the scene of another
    prompt of the evaluation set ("shuffled", drawn per (seed, prompt, image) from a fixed generator)."""

    def __init__(self, mode: str, image_size: int, pool: Sequence[PromptSpec]):
        self.mode, self.image_size, self.pool = mode, image_size, list(pool)

    def __call__(self, spec: PromptSpec, seed: int, n: int) -> torch.Tensor:
        if self.mode == "matched":
            return render(spec.scene).expand(n, -1, -1, -1).clone()  # (n, 3, S, S) uint8
        others = [s for s in self.pool if s.prompt != spec.prompt]
        g = torch.Generator().manual_seed(image_seed(seed, spec))
        picks = torch.randint(0, len(others), (n,), generator=g).tolist()
        return torch.stack([render(others[i].scene) for i in picks])


# ------------------------------------------------------------------------------ scoring and reports


def evaluate_specs(specs: dict[str, list[PromptSpec]], generate: GenerateFn, seeds: Sequence[int], per_prompt: int,
                   out: Path, log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Generate, detect, score. Returns the per-image records and the images per category."""
    records, by_cat = [], {}
    for cat, cat_specs in specs.items():
        imgs_cat = []
        t0 = time.time()
        for spec in cat_specs:
            for seed in seeds:
                images = generate(spec, seed, per_prompt)  # (n, 3, S, S) uint8
                M.save_images(images, out / "images" / cat, prefix=f"{spec.uid}_s{seed}_")
                for j, objs in enumerate(detect_batch(images)):
                    records.append(_record(spec, seed, j, objs, background_rms(images[j], objs)))
                imgs_cat.append(images)
        by_cat[cat] = torch.cat(imgs_cat)
        acc = _accuracy([r for r in records if r["category"] == cat])
        log(f"{cat:>18}: accuracy {acc['accuracy']:.3f} ({acc['correct']}/{acc['n']}) in {time.time() - t0:.1f}s")
    return records, by_cat


def record_image_path(spec: PromptSpec, seed: int, j: int) -> str:
    """Where ``evaluate_specs`` saves image j of ``spec`` at ``seed``, relative to the evaluation folder."""
    return f"images/{spec.category}/{spec.uid}_s{seed}_{j:06d}.png"


def _record(spec: PromptSpec, seed: int, j: int, objs: Sequence[DetectedObject], bg_rms: float) -> dict:
    rec = {"uid": spec.uid, "category": spec.category, "prompt": spec.prompt, "seed": seed, "sample": j,
           "image": record_image_path(spec, seed, j), "correct": score(spec, objs),
           "detected": [[o.shape, o.color, o.position] for o in objs], "background_rms": bg_rms}
    if spec.category in BINDING_CATEGORIES:
        rec["binding"] = binding_outcome(spec, objs)
    return rec


# our threshold for a "clean" background (of 255, ~3% of full scale; the renders give 0): a chosen value, not a
# measured one, so the mean RMS is reported beside the fraction under it
CLEAN_BACKGROUND_RMS = 8.0


def background_summary(records: Sequence[dict]) -> dict:
    """Residual background noise over the images (detector.background_rms): mean +- se over the images where
    it is defined, and the fraction of all images whose background is clean (RMS < CLEAN_BACKGROUND_RMS; an
    image whose shapes leave no background counts as not clean). The ground-truth renders give 0 and 1."""
    rms = [r["background_rms"] for r in records]
    v = torch.tensor([x for x in rms if math.isfinite(x)], dtype=torch.float64)
    n, n_all = int(v.numel()), len(rms)
    mean = float(v.mean()) if n else float("nan")
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    clean = float((v < CLEAN_BACKGROUND_RMS).sum()) / n_all if n_all else float("nan")
    return {"rms_mean": mean, "rms_se": se, "clean_fraction": clean, "n": n, "n_undefined": n_all - n}


def _accuracy(recs: Sequence[dict]) -> dict:
    n = len(recs)
    correct = sum(r["correct"] for r in recs)
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
            "n_prompts": len({r["uid"] for r in recs})}


def summarize(records: Sequence[dict], categories: Sequence[str]) -> dict:
    """Accuracy per category and overall (GenEval: the mean of the category accuracies; diagnostic
    categories such as ``single_position`` are reported but left out of it)."""
    cats = {c: _accuracy([r for r in records if r["category"] == c]) for c in categories}
    main = [v["accuracy"] for c, v in cats.items() if c not in DIAGNOSTIC_CATEGORIES]
    overall = sum(main) / len(main) if main else float("nan")
    return {"categories": cats, "overall": overall}


def markdown_table(summary: dict, header: Sequence[str], extra: dict | None = None) -> str:
    lines = [*header, "", "| category | accuracy | correct / n | prompts |", "|---|---:|---:|---:|"]
    for cat, v in summary["categories"].items():
        lines.append(f"| {cat} | {v['accuracy']:.3f} | {v['correct']} / {v['n']} | {v['n_prompts']} |")
    diag = [c for c in summary["categories"] if c in DIAGNOSTIC_CATEGORIES]
    if len(diag) < len(summary["categories"]):  # no overall line when only diagnostic categories were asked
        lines.append(f"| **overall** (mean of categories{', without ' + ', '.join(diag) if diag else ''}) | "
                     f"**{summary['overall']:.3f}** | | |")
    for k, v in (extra or {}).items():
        lines.append("")
        lines.append(f"**{k}**: " + ", ".join(f"{a} = {b:.4g}" if isinstance(b, float) else f"{a} = {b}"
                                               for a, b in v.items()))
    return "\n".join(lines) + "\n"


def write_grid(path: Path, specs: Sequence[PromptSpec], images: torch.Tensor, records: Sequence[dict],
               per_row: int, min_tile: int = 128) -> None:
    """Rows: the prompt, its ground-truth render, then its images with a green (correct) / red border."""
    from PIL import Image, ImageDraw

    S = images.shape[-1]
    scale = max(1, -(-min_tile // S))  # nearest upsampling to at least min_tile pixels
    tile = S * scale
    pad, text_h = 4, 12
    n_cols = 1 + per_row
    width = max(n_cols * (tile + 2 * pad), 6 * max(len(s.prompt) for s in specs) + 2 * pad)  # 6 px per character
    canvas = Image.new("RGB", (width, len(specs) * (tile + 2 * pad + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, spec in enumerate(specs):
        y = r * (tile + 2 * pad + text_h)
        draw.text((pad, y), spec.prompt, fill=(0, 0, 0))
        tiles = [(render(spec.scene), None)]
        recs = [rec for rec in records if rec["uid"] == spec.uid][:per_row]
        start = r * per_row
        tiles += [(images[start + k], rec["correct"]) for k, rec in enumerate(recs)]
        for c, (img, ok) in enumerate(tiles):
            x = c * (tile + 2 * pad)
            color = (200, 200, 200) if ok is None else ((0, 170, 0) if ok else (220, 0, 0))
            draw.rectangle([x, y + text_h, x + tile + 2 * pad - 1, y + text_h + tile + 2 * pad - 1], fill=color)
            arr = img.permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            canvas.paste(Image.fromarray(arr.numpy()), (x + pad, y + text_h + pad))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image_size = args.image_size
    if args.reference is None:
        gen = ModelGenerator(Path(args.checkpoint), args, device)
        image_size = gen.image_size
        print(f"checkpoint {gen.ckpt} ({gen.weights}), preset {gen.cfg.name}, {args.sampler} {args.steps} steps, "
              f"guidance {args.guidance}{' (unconditional)' if args.unconditional else ''}, seeds {args.seeds}, "
              f"{args.per_prompt} images per prompt, device {device}", flush=True)
    specs = evaluation_prompts(args.categories, args.prompts_per_category, image_size=image_size,
                               max_count=args.max_count, holdout_pairs=HELDOUT_PAIRS if args.holdout_pairs else None,
                               seed=args.prompt_seed)
    if args.reference is not None:
        gen = RenderGenerator(args.reference, image_size, [s for c in specs.values() for s in c])
        print(f"reference renders ({args.reference}), {image_size} px, seeds {args.seeds}, "
              f"{args.per_prompt} images per prompt", flush=True)

    # attention views: the first prompts of each category are generated with hooks on (same images)
    att_step = AV.middle_step(args.steps if args.sampler == "ddim" else gen.cfg.diffusion.T) \
        if args.attention_step is None else args.attention_step
    wanted = {s.uid for c in specs.values() for s in c[:args.attention]}
    views: list[str] = []

    def generate(spec: PromptSpec, seed: int, n: int) -> torch.Tensor:
        if spec.uid not in wanted or seed != args.seeds[0]:
            return gen(spec, seed, n)
        images, rec, enc = gen(spec, seed, n, record_step=att_step)
        block = AV.default_view_block(rec) if args.attention_block is None else args.attention_block
        paths = AV.write_attention_views(out / "attention", images[:1], rec, enc.ids[:1].cpu(), enc.valid[:1].cpu(),
                                         step=att_step, block=block, names=[spec.uid])
        views.extend(str(p.relative_to(out)) for p in paths)
        return images

    records, by_cat = evaluate_specs(specs, generate, args.seeds, args.per_prompt, out)
    summary = summarize(records, args.categories)
    extra: dict[str, dict] = {"background": background_summary(records)}
    binding = binding_summary(records)
    if binding:
        extra["binding"] = binding
    order = shape_order_summary(records, {s.uid: s for c in specs.values() for s in c})
    if order:
        extra["shape_order"] = order
    all_images = torch.cat(list(by_cat.values()))
    if args.fid:
        if args.fid_extractor == M.TINY_EXTRACTOR:
            M.register_tiny_feature_extractor()
        spec_of = {s.uid: s for c in specs.values() for s in c}
        reference = torch.stack([render(spec_of[r["uid"]].scene) for r in records])  # (N, 3, S, S)
        extra["fid_kid"] = M.fid_kid(all_images, reference, device=device, inception_weights=args.inception_weights,
                                     feature_extractor=args.fid_extractor)
    if args.clip:
        scorer = M.load_clip(args.clip, args.clip_weights, device=device)
        texts = [r["prompt"] for r in records]
        clip = M.clip_score(all_images, texts, scorer)  # (N,) in records' order
        extra["clip_score"] = {"mean": float(clip.mean()), "n": int(clip.numel())}
        for r, v in zip(records, clip.tolist()):
            r["clip_score"] = v
    if args.toy_clip:
        extra["toy_clip"] = toy_clip_axes(all_images, records, specs, device)
    for cat, cat_specs in specs.items():
        shown = cat_specs[:args.grid_prompts]
        per_row = min(args.per_prompt, 8)
        # images of the first seed, per_prompt per spec, in evaluation order
        imgs, recs = [], []
        for spec in shown:
            recs += [r for r in records if r["uid"] == spec.uid and r["seed"] == args.seeds[0]][:per_row]
            k = cat_specs.index(spec) * len(args.seeds) * args.per_prompt
            imgs.append(by_cat[cat][k:k + per_row])
        write_grid(out / "grids" / f"{cat}.png", shown, torch.cat(imgs), recs, per_row)
    ref = args.reference is not None
    result = {"checkpoint": None if ref else str(gen.ckpt), "weights": None if ref else gen.weights,
              "preset": None if ref else gen.cfg.name, "reference": args.reference, "settings": dict(vars(args)),
              "summary": summary, **extra, "attention_views": views, "records": records}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"ground-truth renders ({args.reference}: "
             + ("each prompt's own scene)" if args.reference == "matched" else "the scene of another prompt)")
             if ref else f"`{gen.ckpt}` ({gen.weights})")
    header = [f"# Compositional evaluation of {title}", "",
              ("" if ref else f"{args.sampler}, {args.steps} steps, guidance {args.guidance}"
               f"{', unconditional (empty prompts)' if args.unconditional else ''}"
               + (", later object phrases encoded apart (diagnostic)" if args.phrases_apart else "")
               + (f", Attend-and-Excite (E84) scale {args.excite_scale:g} on the first {args.excite_steps} steps "
                  f"({'/'.join(args.excite_words)} words)" if args.excite_scale else "")
               + ", ") + f"seeds {args.seeds}, "
              f"{args.per_prompt} images per prompt and seed, {args.prompts_per_category} prompts per category"
              f"{', held-out colour-shape pairs' if args.holdout_pairs else ''}"
              f"{f', prompt seed {args.prompt_seed} (not the benchmark set)' if args.prompt_seed != EVAL_SEED else ''}"
              f". Detector-scored, GenEval-style "
              f"(one binary verdict per image)."]
    labels = {"background": f"background noise (RMS of RGB 0-255 outside the detected shapes; clean: < "
                            f"{CLEAN_BACKGROUND_RMS:g}; renders: 0)", "fid_kid": "FID/KID vs ground-truth renders",
              "clip_score": "CLIP score",
              "binding": "two-object binding (prompts.binding_outcome)",
              "shape_order": "named shapes drawn, by caption order (prompts.named_shapes_drawn)",
              "toy_clip": "toy CLIP axes (Fig. 6b at toy scale)"}
    shown = {labels[k]: (binding_lines(v) if k == "binding" else shape_order_lines(v) if k == "shape_order" else v)
             for k, v in extra.items()}
    (out / "results.md").write_text(markdown_table(summary, header, shown))
    print((out / "results.md").read_text())
    return result


def toy_clip_axes(images: torch.Tensor, records: list[dict], specs: dict, device) -> dict:
    """Toy CLIP score (mean, standard error), FD in the toy CLIP's image-feature space and pixel-FD.

    References are the ground-truth renders of each record's prompt; the toy CLIP is the shipped
    pretrained tiny CLIP whose text tower is the toy preset's E_theta (raphael_ref/toy_clip.py).
    """
    from raphael_ref import toy_clip as TC
    from raphael_ref.evaluation.ablation import pixel_fd

    spec_of = {s.uid: s for c in specs.values() for s in c}
    reference = torch.stack([render(spec_of[r["uid"]].scene) for r in records])  # (N, 3, S, S) uint8
    scorer = M.load_clip(TC.TOY_CLIP_DIR, device=device)
    clip = M.clip_score(images, [r["prompt"] for r in records], scorer)  # (N,)
    ref_clip = M.clip_score(reference, [r["prompt"] for r in records], scorer)
    for r, v in zip(records, clip.tolist()):
        r["toy_clip_score"] = v
    fd = M.fid_kid(images, reference, device=device, feature_extractor=TC.register_toy_clip_extractor(), kid=False)
    n = int(clip.numel())
    return {"clip_score": float(clip.mean()), "clip_score_se": float(clip.std() / math.sqrt(n)) if n > 1 else None,
            "clip_score_of_references": float(ref_clip.mean()), "fd_toy_clip": fd["fid"],
            "pixel_fd": float(pixel_fd(images, reference)), "n": n}


if __name__ == "__main__":
    main()
