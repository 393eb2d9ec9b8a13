#!/usr/bin/env python
"""RAPHAEL ablations (Sec. 4.2, Fig. 6a/6b): train every variant with one budget and seed, evaluate
each over the guidance weights, write the table and the trade-off plots.

    python tools/ablate.py --out runs/ablation --budget toy                  # 4 module variants + sweeps
    python tools/ablate.py --out runs/ablation --budget toy --dry-run        # print the commands only
    python tools/ablate.py --out runs/ablation --budget toy --no-sweeps --variants full no_space_moe
    python tools/ablate.py --out runs/abl_small --preset small --set model.vae_path=/models/sd-vae \\
        --budget full --inception-weights weights-inception-2015-12-05-6726825d.pth   # on a GPU
    for s in 0 1 2; do python tools/ablate.py --out runs/abl_s$s --budget toy --train-seed $s --no-sweeps; done
    python tools/ablate.py --out runs/abl_seeds --combine runs/abl_s0 runs/abl_s1 runs/abl_s2   # mean ± se
    python tools/ablate.py --out runs/sweep_s0 --budget toy --variants --alphas 0.1 0.3 --t-cs 250 750  # sweeps only
    python tools/ablate.py --out runs/sweeps --combine runs/sweep_s0 runs/sweep_s1 --base-table runs/abl_seeds/seeds.json

Variants (``raphael_ref.evaluation.ablation``): full, no_space_moe, no_time_moe, no_edge (Fig. 6b),
and the sweeps alpha in --alphas and T_c in --t-cs (Fig. 6a); a sweep point equal to the base
config reuses the full run. Each run is ``tools/train.py --preset P [--config F] [--set ...]
<variant overrides> --set train.steps=N --set train.seed=S --out DIR/<run>`` (a subprocess). The
runner is resumable: a trained run is skipped, a run with an older checkpoint is resumed
(``--resume``), an evaluation whose result.json matches the settings is reused. Ctrl-C stops it;
run the same command again to go on.

Evaluation of a run at guidance weight g (``tools/evaluate.py``'s generator and scorer): the fixed
compositional prompt set (--prompts-per-category per category, --seeds, --per-prompt images each,
DDIM --sampler-steps). Alignment = the detector's overall accuracy (mean over categories).
Fidelity = FID with --inception-weights, else pixel-FD (a Frechet distance of colour histograms and
4 x 4 pooled pixels against ground-truth renders; not FID, see ``ablation.py``).

Writes to --out:
    <run>/...                        the training run folders (tools/train.py layout), train.log
    <run>/eval/g<w>/result.json      one evaluation (summary, fidelity, settings); images/ beside it
    ablation.json                    settings, plan, every (variant, guidance) row, timings, the bootstrap (fd_bootstrap)
    ablation.md                      variant x guidance tables (alignment / fidelity), the paper's orderings; at
                                     the toy CLIP's 24 px: its axes, and FD(full) - FD(variant) in its features
                                     with a paired bootstrap se over the images (``fd_bootstrap``)
    tradeoff.png                     Fig. 6b: alignment vs fidelity, one curve per module variant
    sweeps.png                       Fig. 6a: alignment and fidelity vs alpha and T_c (when swept)
With --combine STUDY...: seeds.md / seeds.json, the studies of several --train-seed values in one table
(mean ± standard error over seeds) and the paired full - variant differences (``combine_seeds``), and
seeds_g<w>.png (each seed's value per module variant and metric, with the mean ± se) and, when the
studies swept alpha / T_c, seeds_sweeps_g<w>.png (Fig. 6a: each seed's curve and the mean ± se); with two or
more guidance weights, seeds_tradeoff.png (Fig. 6b: each variant's mean curve over guidance, ± se both ways).
Sweep-only studies (--variants with no name) have no full model of their own: --base-table SEEDS_JSON takes its
per-seed values from the module study's combined table, and every sweep point is paired with it (``with_base_model``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from raphael_ref import training as T  # noqa: E402
from raphael_ref.config import PRESETS, RaphaelConfig, load_config  # noqa: E402
from raphael_ref.evaluation import ablation as A  # noqa: E402
from raphael_ref.evaluation.prompts import CATEGORIES  # noqa: E402

TRAIN = ROOT / "tools" / "train.py"
TOY_CLIP_SIZE = 24  # image side of the shipped toy CLIP (raphael_ref/toy_clip.py): its axes need 24 px images
EVALUATE = ROOT / "tools" / "evaluate.py"
EXIT_INTERRUPTED = 130

# Budgets: training steps (None: the preset's train.steps), evaluation prompts, seeds, images per
# prompt and sampler steps. Images per (variant, guidance) = 6 categories x prompts x seeds x per_prompt.
# Measured on the 2-core CPU of the development machine (toy preset, 16 blocks, one thread per run):
# training 1.05 s/step at 32 x 32 px and batch 8 (7.6 images/s), 1.06 s/step at 24 x 24 px and batch
# 16 (15 images/s: self-attention over 1024 positions is a third of the 32 px step); sampling ~0.03 s
# (24 px) to 0.05-0.09 s (32 px) per image and U-Net evaluation (CFG doubles it; batching does not help
# on the CPU). Cost of a study ~ runs x (steps x s/step + guidance weights x images x 2 x sampler_steps
# x s/evaluation) / --jobs.
BUDGETS: dict[str, dict] = {
    # end-to-end check of the pipeline (toy preset, 8 runs: ~15-25 min on the CPU; numbers meaningless)
    "smoke": {"steps": 20, "prompts_per_category": 1, "seeds": [0], "per_prompt": 2, "sampler_steps": 10},
    # the toy-scale study on a 2-core CPU (--jobs 2 --threads 1): the toy preset as it is (24 x 24 px,
    # toy-clip, 800 steps of 16 = the 10-minute default run); 96 images per point, 20 DDIM steps (the
    # preset's). Measured: ~15-17 min of training per run with two jobs on the 2 cores (~1.15 s/step),
    # ~95 s per guidance weight to evaluate. Resumable; --train-seed repeats it with other seeds (E60).
    "toy": {"steps": None, "prompts_per_category": 4, "seeds": [0], "per_prompt": 4, "sampler_steps": 20},
    # a GPU study: the preset's own training length, the full evaluation set (24 prompts per category)
    "full": {"steps": None, "prompts_per_category": 24, "seeds": [0, 1], "per_prompt": 4, "sampler_steps": 50},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder (one run folder per variant, reports)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy",
                   help="default: toy, the paper's losses only (the Fig. 6 studies of docs/results/ were run on it; "
                        "tools/train.py's own default is toy-binding, which adds two binding options, E87)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="passed to tools/train.py")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", nargs="+",
                   help="base config fields for every variant (passed to tools/train.py before the variant's own)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="toy", help="defaults for the options below")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run")
    p.add_argument("--train-seed", type=int, default=0, help="train.seed of every run")
    p.add_argument("--variants", nargs="*", default=[v.name for v in A.MODULE_VARIANTS],
                   choices=[v.name for v in A.MODULE_VARIANTS],
                   help="module variants (Fig. 6b); the flag alone (none) for a sweep-only study, e.g. --variants --alphas "
                        "0.1 0.3 --t-cs 250 750 (a sweep point equal to the base config still needs the full run)")
    p.add_argument("--alphas", type=float, nargs="*", default=list(A.DEFAULT_ALPHAS),
                   help="alpha sweep (Fig. 6a); the flag alone: no alpha point")
    p.add_argument("--t-cs", type=int, nargs="*", default=list(A.DEFAULT_T_CS),
                   help="T_c sweep (Fig. 6a); the flag alone: no T_c point")
    p.add_argument("--no-sweeps", action="store_true", help="skip the alpha and T_c sweeps")
    p.add_argument("--guidance", type=float, nargs="+", default=list(A.GUIDANCE_WEIGHTS),
                   help="classifier-free guidance weights (Sec. 4.2)")
    p.add_argument("--sweep-guidance", type=float, nargs="+", default=None,
                   help="guidance weights of the sweep points (Fig. 6a; default: --guidance); e.g. 3 4.5 to halve "
                        "the cost of a CPU study")
    p.add_argument("--prompts-per-category", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="evaluation seeds")
    p.add_argument("--per-prompt", type=int, default=None, help="images per prompt and seed")
    p.add_argument("--sampler-steps", type=int, default=None, help="DDIM steps of the evaluation")
    p.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    p.add_argument("--inception-weights", default=None, help="local Inception weights: fidelity = FID, not pixel-FD")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the training runs (OMP_NUM_THREADS) and of the evaluation; default: "
                        "inherited. Use 1 on a CPU shared with other jobs: multi-threaded steps can stall there")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained and evaluated at once (each in its own process, --threads each); e.g. 2 on a "
                        "2-core CPU with --threads 1, or one per GPU with CUDA_VISIBLE_DEVICES set per job by you")
    p.add_argument("--combine", nargs="+", default=None, metavar="STUDY",
                   help="combine finished studies of the same settings and different --train-seed into --out/seeds.md "
                        "(mean ± standard error over seeds, paired full - variant differences); the studies may "
                        "differ in which variants, sweep points and guidance weights they ran; trains nothing")
    p.add_argument("--base-table", default=None, metavar="SEEDS_JSON",
                   help="with --combine of sweep-only studies (--variants with no name): the full model's per-seed "
                        "values come from this combined table of another study (its seeds.json; same preset, budget "
                        "and evaluation), so every sweep point is paired with the full model of its seed")
    p.add_argument("--only-run", default=None, help=argparse.SUPPRESS)  # internal: one run of a --jobs study
    p.add_argument("--dry-run", action="store_true", help="print the training commands and the plan; run nothing")
    p.add_argument("--train-only", action="store_true", help="train (or resume) every run, evaluate nothing")
    args = p.parse_args(argv)
    budget = BUDGETS[args.budget]
    args.set = [s for group in args.set for s in group]
    for name in ("steps", "prompts_per_category", "seeds", "per_prompt", "sampler_steps"):
        if getattr(args, name) is None:
            setattr(args, name, budget[name])
    for name in ("prompts_per_category", "per_prompt", "sampler_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if any(g < 0 for g in args.guidance) or len(set(args.guidance)) != len(args.guidance):
        p.error(f"--guidance: weights must be distinct and >= 0; got {args.guidance}")
    if args.base_table is not None and not args.combine:
        p.error("--base-table goes with --combine (it completes sweep-only studies when combining them)")
    if args.base_table is not None and not Path(args.base_table).is_file():
        p.error(f"--base-table: {args.base_table} is not a file (a seeds.json written by --combine)")
    if not args.combine and not args.variants and (args.no_sweeps or not (args.alphas or args.t_cs)):
        p.error("nothing to run: --variants lists no module variant and there is no sweep point")
    if args.sweep_guidance is None:
        args.sweep_guidance = list(args.guidance)
    if any(g < 0 for g in args.sweep_guidance) or len(set(args.sweep_guidance)) != len(args.sweep_guidance):
        p.error(f"--sweep-guidance: weights must be distinct and >= 0; got {args.sweep_guidance}")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        p.error(f"--inception-weights: {args.inception_weights} is not a file")
    return args


# ------------------------------------------------------------------------------ planning


def base_config(args) -> RaphaelConfig:
    cfg = load_config(args.preset, args.config, args.set)
    if args.steps is not None:
        cfg.train.steps = args.steps
    cfg.train.seed = args.train_seed
    return cfg


def plan_of(args, cfg: RaphaelConfig) -> list[A.Variant]:
    return A.ablation_plan(cfg.model.mask_alpha, cfg.model.edge_t_cutoff, modules=args.variants,
                           alphas=() if args.no_sweeps else args.alphas, t_cs=() if args.no_sweeps else args.t_cs)


def run_sets(args, cfg: RaphaelConfig, variant: A.Variant) -> list[str]:
    """Every --set of a run: the study's base fields, the variant's, then the budget (last wins)."""
    budget = [f"train.steps={cfg.train.steps}", f"train.seed={args.train_seed}", "sample.every=0"]
    return [*args.set, *variant.set_args, *budget]


def train_command(args, cfg: RaphaelConfig, variant: A.Variant, resume: bool) -> list[str]:
    cmd = [sys.executable, str(TRAIN), "--preset", args.preset]
    for f in args.config:
        cmd += ["--config", f]
    for s in run_sets(args, cfg, variant):
        cmd += ["--set", s]
    cmd += ["--out", str(Path(args.out) / variant.run)]
    if resume:
        cmd.append("--resume")
    if args.device:
        cmd += ["--device", args.device]
    return cmd


def run_state(run_dir: Path) -> tuple[int, Path | None]:
    """(step of the latest checkpoint, its folder) of a run folder; (0, None) when it has none."""
    ckpt = T.latest_checkpoint(run_dir)
    if ckpt is None:
        return 0, None
    return int(json.loads((ckpt / "state.json").read_text())["step"]), ckpt


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: run {y!r}, study {x!r}")
    return out


# Fields that do not change the trained weights: the budget (train.steps, compared by step), the log and
# checkpoint cadence, and the sample grids written while training.
BOOKKEEPING = ("train.steps:", "train.log_every:", "train.ckpt_every:", "train.keep_ckpts:", "sample.")


def check_run_config(args, cfg: RaphaelConfig, variant: A.Variant, ckpt: Path) -> None:
    """A run folder made with other settings is an error, never silently reused (BOOKKEEPING fields aside)."""
    want = json.loads(load_config(args.preset, args.config, run_sets(args, cfg, variant)).to_json())
    # through RaphaelConfig: a run written before a config field existed reads it as its default (that field's
    # value when the run was trained), not as a difference
    have = json.loads(RaphaelConfig.from_json(ckpt / "config.json").to_json())
    diffs = [d for d in _differences(want, have) if not d.startswith(BOOKKEEPING)]
    if diffs:
        raise SystemExit(f"error: {ckpt.parent.parent} was trained with other settings than this study asks for "
                         f"({'; '.join(diffs[:6])}). Use another --out, or delete that run folder.")


# ------------------------------------------------------------------------------ training


def train_run(args, cfg: RaphaelConfig, variant: A.Variant, log=print) -> dict:
    """Train (or resume, or skip) one run; returns {"steps", "seconds", "status"}."""
    run_dir = Path(args.out) / variant.run
    step, ckpt = run_state(run_dir)
    timing_file = run_dir / "ablate_train.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"seconds": 0.0}
    if ckpt is not None:
        check_run_config(args, cfg, variant, ckpt)
    if step >= cfg.train.steps:
        log(f"[train] {variant.run}: trained ({step} steps), skipped")
        return {"steps": step, "seconds": timing["seconds"], "status": "skipped"}
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_lock(run_dir)  # held until this function returns: one trainer per run folder
    if ckpt is None and (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()  # a run killed before its first checkpoint starts over
    cmd = train_command(args, cfg, variant, resume=ckpt is not None)
    log(f"[train] {variant.run}: {'resuming at step ' + str(step) if ckpt else 'training'} -> {cfg.train.steps} steps")
    log("        " + shlex.join(cmd))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    with open(run_dir / "train.log", "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = timing["seconds"] + time.time() - t0
    timing_file.write_text(json.dumps({"seconds": seconds}) + "\n")
    if proc.returncode == EXIT_INTERRUPTED:
        raise SystemExit(f"[train] {variant.run} interrupted; run the same command again to go on")
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise SystemExit(f"[train] {variant.run} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    step, _ = run_state(run_dir)
    log(f"[train] {variant.run}: {step} steps in {seconds:.0f}s")
    lock.close()
    return {"steps": step, "seconds": seconds, "status": "trained"}


def run_lock(run_dir: Path):
    """An exclusive advisory lock on ``run_dir/ablate.lock`` (released when the returned file is closed, or the
    process ends). A second study training the same run folder at the same time stops here, before it touches
    the folder (it would otherwise restart the run over the first one's files)."""
    import fcntl

    f = open(run_dir / "ablate.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(f"error: another process is training {run_dir} (it holds {run_dir / 'ablate.lock'}); "
                         f"wait for it to finish, or stop it, then run this command again") from None
    return f


# ------------------------------------------------------------------------------ evaluation


def load_evaluate_module():
    """tools/evaluate.py as a module (its generator and scorer)."""
    spec = importlib.util.spec_from_file_location("raphael_evaluate_tool", EVALUATE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def eval_settings(args, ckpt: Path) -> dict:
    return {"checkpoint": ckpt.name, "sampler": "ddim", "sampler_steps": args.sampler_steps,
            "prompts_per_category": args.prompts_per_category, "seeds": list(args.seeds),
            "per_prompt": args.per_prompt, "categories": list(args.categories),
            "fidelity": "FID" if args.inception_weights else "pixel-FD", "toy_clip_axes": True}


def guidance_of(args, v: A.Variant) -> list[float]:
    """The guidance weights of a variant: --guidance for module variants, --sweep-guidance for sweep points."""
    return list(args.guidance) if v.group == "module" else list(args.sweep_guidance)


def run_guidance(args, plan: list[A.Variant], run: str) -> list[float]:
    """Every guidance weight a training run is evaluated at: the union over the variants it serves."""
    return sorted({g for v in plan if v.run == run for g in guidance_of(args, v)})


def evaluate_run(args, run: str, device: torch.device, E, log=print, guidance: list[float] | None = None) -> dict[float, dict]:
    """Evaluate one run at each guidance weight (default --guidance), reusing results with the same settings."""
    guidance = list(args.guidance) if guidance is None else guidance
    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation import metrics as M
    from raphael_ref.evaluation.prompts import evaluation_prompts

    ckpt = T.resolve_checkpoint(Path(args.out) / run)
    settings = eval_settings(args, ckpt)
    results: dict[float, dict] = {}
    todo = []
    for g in guidance:
        path = Path(args.out) / run / "eval" / f"g{g:g}" / "result.json"
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None and old.get("settings") == settings:
            results[g] = old
        else:
            todo.append(g)
    if not todo:
        log(f"[eval] {run}: all {len(guidance)} guidance weights evaluated, reused")
        return results
    ns = argparse.Namespace(weights="auto", unconditional=False, steps=args.sampler_steps, guidance=todo[0],
                            sampler="ddim", eta=0.0)
    gen = E.ModelGenerator(ckpt, ns, device)
    specs = evaluation_prompts(args.categories, args.prompts_per_category, image_size=gen.image_size)
    spec_of = {s.uid: s for c in specs.values() for s in c}
    for g in todo:
        t0 = time.time()
        out = Path(args.out) / run / "eval" / f"g{g:g}"
        gen.args.guidance = g
        if (out / "images").is_dir():
            shutil.rmtree(out / "images")  # images of an evaluation with other settings
        records, by_cat = E.evaluate_specs(specs, gen, args.seeds, args.per_prompt, out, log=lambda s: None)
        summary = E.summarize(records, args.categories)
        images = torch.cat(list(by_cat.values()))  # (N, 3, S, S) uint8, in the records' order
        reference = torch.stack([render(spec_of[r["uid"]].scene) for r in records])  # (N, 3, S, S)
        if args.inception_weights:
            fidelity = M.fid_kid(images, reference, inception_weights=args.inception_weights, kid=False,
                                 device=device)["fid"]
        else:
            fidelity = A.pixel_fd(images, reference)
        res = {"settings": settings, "guidance": g, "summary": summary, "fidelity": fidelity,
               "fidelity_name": settings["fidelity"], "n_images": int(images.shape[0]), "seconds": time.time() - t0}
        if images.shape[-1] == TOY_CLIP_SIZE:  # Fig. 6b's own axes at toy scale: toy CLIP score, FD in its features
            res["toy_clip"] = E.toy_clip_axes(images, records, specs, device)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
        results[g] = res
        log(f"[eval] {run} g={g:g}: alignment {summary['overall']:.3f}, {settings['fidelity']} {fidelity:.4g} "
            f"({res['n_images']} images, {res['seconds']:.0f}s)")
    return results


# ------------------------------------------------------------------------------ parallel runs


def run_jobs(args, argv, runs: list[str], log=print) -> None:
    """Train and evaluate the runs ``args.jobs`` at a time, each in a child ``ablate.py --only-run RUN``
    (same arguments; output in <run>/ablate.log). A failed child stops the study with its log's tail."""
    from concurrent.futures import ThreadPoolExecutor

    base = list(sys.argv[1:] if argv is None else argv)
    if "--jobs" in base:  # children run one job each
        i = base.index("--jobs")
        del base[i:i + 2]
    base = [a for a in base if not a.startswith("--jobs=")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)

    def one(run: str) -> tuple[str, int]:
        (Path(args.out) / run).mkdir(parents=True, exist_ok=True)
        log(f"[jobs] {run}: started (log {Path(args.out) / run / 'ablate.log'})")
        with open(Path(args.out) / run / "ablate.log", "a") as f:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *base, "--only-run", run],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        log(f"[jobs] {run}: {'done' if rc == 0 else f'exit {rc}'}")
        return run, rc

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(one, runs))
    failed = [(run, rc) for run, rc in done if rc != 0]
    if failed:
        lines = []
        for run, rc in failed:
            tail = (Path(args.out) / run / "ablate.log").read_text().splitlines()[-8:]
            lines += [f"{run} (exit {rc}):", *("    " + t for t in tail)]
        stopped = any(rc == EXIT_INTERRUPTED or rc == -2 for _, rc in failed)
        raise SystemExit(("interrupted; run the same command again to go on\n" if stopped else
                          "[jobs] runs failed:\n") + "\n".join(lines))


# ------------------------------------------------------------------------------ reports


def write_reports(args, cfg: RaphaelConfig, plan: list[A.Variant], rows: list[dict], timings: dict) -> list[Path]:
    from raphael_ref.evaluation import plots

    out = Path(args.out)
    fidelity_name = "FID" if args.inception_weights else "pixel-FD"
    n_images = len(args.categories) * args.prompts_per_category * len(args.seeds) * args.per_prompt
    header = [f"# Ablation study (RAPHAEL Sec. 4.2, Fig. 6): preset {args.preset}, budget {args.budget}", "",
              f"Every run: {cfg.train.steps} training steps, train.seed {args.train_seed}, batch {cfg.train.batch_size}"
              f"{', extra --set ' + ' '.join(args.set) if args.set else ''}. Evaluation: DDIM {args.sampler_steps} "
              f"steps, {args.prompts_per_category} prompts per category x {len(args.categories)} categories, seeds "
              f"{args.seeds}, {args.per_prompt} images each = {n_images} images per point. Alignment: detector "
              f"accuracy (mean over categories). Fidelity: "
              + ("FID (Inception-v3, local weights) against ground-truth renders." if args.inception_weights else
                 "pixel-FD, a Frechet distance of colour histograms + 4x4 pooled pixels against ground-truth "
                 "renders (NOT FID; comparable only within this study).")]
    all_g = sorted(set(args.guidance) | set(args.sweep_guidance))
    report = A.markdown_report(rows, plan, all_g, header, fidelity_name)
    clip_rows = A.toy_clip_rows(rows)
    boot = []
    if clip_rows:
        report += "\n" + A.toy_clip_table(clip_rows, plan, all_g)
        boot = fd_bootstrap(args, plan)
        if boot:
            report += "\n" + fd_bootstrap_table(boot, plan, sorted(args.guidance))
    (out / "ablation.md").write_text(report)
    plan_json = [{"name": v.name, "group": v.group, "value": v.value, "run": v.run,
                  "overrides": {k: x for k, x in v.overrides}} for v in plan]
    settings = {k: v for k, v in vars(args).items()}
    (out / "ablation.json").write_text(json.dumps({"settings": settings, "base_config": cfg.to_dict(),
                                                   "plan": plan_json, "rows": rows, "timings": timings,
                                                   "orderings": A.paper_orderings(rows),
                                                   "fd_bootstrap": boot}, indent=1) + "\n")
    files = [out / "ablation.md", out / "ablation.json"]
    module_rows = [r for r in rows if r["group"] == "module"]
    if module_rows:
        files.append(plots.tradeoff_plot(module_rows, out / "tradeoff.png", fidelity_name=fidelity_name,
                                         variants=[v.name for v in plan if v.group == "module"]))
        clip_module_rows = [r for r in clip_rows if r["group"] == "module"]
        if clip_module_rows:  # Fig. 6b as printed: FD against CLIP score, here the toy CLIP's
            files.append(plots.tradeoff_plot(clip_module_rows, out / "tradeoff_toy_clip.png",
                                             fidelity_name="FD in toy-CLIP image features",
                                             alignment_name="toy CLIP score",
                                             variants=[v.name for v in plan if v.group == "module"]))
    sweep_rows = [r for r in rows if r["group"] in ("alpha", "t_c")]
    if sweep_rows:
        files.append(plots.sweep_plot(sweep_rows, out / "sweeps.png", fidelity_name=fidelity_name))
    return files


def _eval_images(args, run: str, g: float, names: list[str]) -> torch.Tensor | None:
    """The saved evaluation images of ``run`` at guidance ``g`` in ``names``' order, uint8 (N, 3, S, S); None when
    one is missing (an evaluation from before the images were kept, or a folder cleaned since)."""
    import numpy as np
    from PIL import Image

    folder = Path(args.out) / run / "eval" / f"g{g:g}"
    if not all((folder / n).is_file() for n in names):
        return None
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / n).convert("RGB"))).permute(2, 0, 1)
                        for n in names])


def eval_record_order(args) -> list[tuple]:
    """(prompt spec, image path in its evaluation folder) of every evaluation image, in the order of the records of
    tools/evaluate.py's ``evaluate_specs`` (category, prompt, seed, image), its paths from ``record_image_path``."""
    from raphael_ref.evaluation.prompts import evaluation_prompts

    specs = evaluation_prompts(args.categories, args.prompts_per_category, image_size=TOY_CLIP_SIZE)
    E = load_evaluate_module()
    return [(s, E.record_image_path(s, seed, j)) for cat in args.categories for s in specs[cat]
            for seed in args.seeds for j in range(args.per_prompt)]


def fd_bootstrap(args, plan: list[A.Variant], n_boot: int = 300) -> list[dict]:
    """Per module variant and guidance weight: FD(full) - FD(variant) in toy-CLIP features with its paired bootstrap
    standard error over the evaluation images (``ablation.paired_bootstrap_fd``; the same prompts and noise for
    every variant, the ground-truth render of each prompt as its reference). A standard error for every Frechet
    distance cell of a one-seed study; it is sampling noise over images, not the spread over training seeds."""
    from raphael_ref import toy_clip as TC
    from raphael_ref.data.synthetic import render

    module = [v for v in plan if v.group == "module"]
    full = next((v for v in module if v.name == "full"), None)
    if full is None or len(module) < 2:
        return []
    order = eval_record_order(args)
    names = [n for _, n in order]
    clip = TC.load_toy_clip()
    reference = TC.image_embedding(clip, torch.stack([render(s.scene) for s, _ in order]))  # (N, d)
    out = []
    for g in sorted(args.guidance):
        full_images = _eval_images(args, full.run, g, names)
        if full_images is None:
            continue
        f_full = TC.image_embedding(clip, full_images)
        for v in module:
            images = None if v is full else _eval_images(args, v.run, g, names)
            if images is None:
                continue
            b = A.paired_bootstrap_fd(f_full, TC.image_embedding(clip, images), reference, n_boot=n_boot)
            out.append({"variant": v.name, "guidance": float(g), **b})
    return out


def fd_bootstrap_table(boot: list[dict], plan: list[A.Variant], guidance: list[float]) -> str:
    """Markdown: variant x guidance cells "FD(full) - FD(variant) +- bootstrap se" of :func:`fd_bootstrap`."""
    cell = {(r["variant"], r["guidance"]): r for r in boot}
    n, n_boot = boot[0]["n"], boot[0]["n_boot"]
    lines = ["## Fréchet distance in toy-CLIP features: full - variant, paired bootstrap over images", "",
             f"FD(full) - FD(variant) +- the standard deviation of {n_boot} paired resamples of the {n} evaluation "
             "indices (the same prompts, noise and reference renders for both): negative = full has the lower "
             "distance (the paper's direction). The se is sampling noise over images within this study, not the "
             "spread over training seeds (`--combine` gives that).", "",
             "| variant | " + " | ".join(f"g = {g:g}" for g in guidance) + " |", "|---|" + "---:|" * len(guidance)]
    for v in plan:
        cells = [f"{cell[v.name, float(g)]['diff']:+.2f} +- {cell[v.name, float(g)]['se']:.2f}"
                 if (v.name, float(g)) in cell else "" for g in guidance]
        if any(cells):
            lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine_main(args) -> dict:
    """--combine: one table over the studies of several training seeds (mean ± se, paired comparisons)."""
    studies = []
    for d in args.combine:
        f = Path(d) / "ablation.json"
        if not f.is_file():
            raise SystemExit(f"error: --combine {d}: no ablation.json there (run the study first)")
        studies.append(json.loads(f.read_text()))
    try:
        if args.base_table:
            base = json.loads(Path(args.base_table).read_text())
            if base.get("settings") is None:
                print(f"note: {args.base_table} records no settings (written before they were saved); check "
                      "yourself that its full model was trained and measured as these studies' sweep points")
            studies = [A.with_base_model(s, base) for s in studies]
        combined = A.combine_seeds(studies)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = studies[0]["settings"]
    figs = "Fig. 6a/6b" if any(r["group"] in ("alpha", "t_c") for r in combined["rows"]) else "Fig. 6b"
    header = [f"# Ablation study over {len(studies)} training seeds (RAPHAEL Sec. 4.2, {figs}): preset {s['preset']}, "
              f"budget {s['budget']}", "", f"Studies: {', '.join(str(d) for d in args.combine)}. Each point: "
              f"{s['prompts_per_category']} prompts x {len(s['categories'])} categories x seeds {s['seeds']} x "
              f"{s['per_prompt']} images, DDIM {s['sampler_steps']} steps; the same prompts and noise for every "
              "variant and seed."]
    if args.base_table:
        header.append(f"The full model (each sweep's base point, alpha {studies[0]['base_config']['model']['mask_alpha']:g}"
                      f" / T_c {studies[0]['base_config']['model']['edge_t_cutoff']}): the per-seed values of "
                      f"{args.base_table} (the same checkpoints and evaluation; these studies did not train it).")
    (out / "seeds.md").write_text(A.seeds_markdown(combined, header))
    (out / "seeds.json").write_text(json.dumps({"studies": [str(d) for d in args.combine], "base_table": args.base_table,
                                                **combined}, indent=1) + "\n")
    files = [out / "seeds.md", out / "seeds.json"]
    try:
        from raphael_ref.evaluation import plots

        modules = {**combined, "rows": [r for r in combined["rows"] if r["group"] == "module"]}
        # (with --base-table the studies trained no module variant: their full rows are the base table's)
        for g in sorted({r["guidance"] for r in modules["rows"] if not (args.base_table and r["variant"] == "full")}):
            files.append(plots.seeds_plot(modules, out / f"seeds_g{g:g}.png", guidance=g))
        for g in sorted({r["guidance"] for r in combined["rows"] if r["group"] in ("alpha", "t_c")}):
            files.append(plots.seeds_sweep_plot(combined, out / f"seeds_sweeps_g{g:g}.png", guidance=g))
        if len({r["guidance"] for r in modules["rows"]}) > 1:
            files.append(plots.seeds_tradeoff_plot(combined, out / "seeds_tradeoff.png"))
    except ImportError as e:  # matplotlib missing: the tables are written, the figure is not
        print(f"note: no seeds plot ({e})")
    print((out / "seeds.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return combined


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return combine_main(args)
    try:
        cfg = base_config(args)
        plan = plan_of(args, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    runs = list(dict.fromkeys(v.run for v in plan))  # each training run once, in plan order
    by_run = {v.run: v for v in plan if v.run == v.name}
    out = Path(args.out)
    print(f"study {out}: {len(plan)} variants, {len(runs)} training runs ({', '.join(runs)}), "
          f"{len(args.guidance)} guidance weights {args.guidance}"
          + (f" (sweep points: {args.sweep_guidance})" if args.sweep_guidance != list(args.guidance) else ""), flush=True)
    if args.dry_run:
        for run in runs:
            step, ckpt = run_state(out / run)
            state = ("trained" if step >= cfg.train.steps else f"resume at {step}") if ckpt else "new"
            print(f"# {run} ({state})")
            if step < cfg.train.steps:
                prefix = f"OMP_NUM_THREADS={args.threads} " if args.threads is not None else ""
                print(prefix + shlex.join(train_command(args, cfg, by_run[run], resume=ckpt is not None)))
        print(f"# then evaluate each run at guidance {args.guidance}: {args.prompts_per_category} prompts x "
              f"{len(args.categories)} categories x seeds {args.seeds} x {args.per_prompt} images, DDIM "
              f"{args.sampler_steps} steps")
        return {"plan": [v.name for v in plan], "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    if args.only_run is not None:  # a child of --jobs: train and evaluate this one run, no report
        if args.only_run not in runs:
            raise SystemExit(f"error: --only-run {args.only_run!r} is not a run of this study ({', '.join(runs)})")
        runs = [args.only_run]
    elif args.jobs > 1 and len(runs) > 1:
        run_jobs(args, argv, runs)  # every run trained (and evaluated) in a child; below reuses their results
    timings: dict[str, dict] = {}
    for run in runs:
        timings[run] = {"train": train_run(args, cfg, by_run[run])}
    if args.train_only:
        return {"plan": [v.name for v in plan], "runs": runs, "timings": timings}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    E = load_evaluate_module()
    results = {}
    for run in runs:
        results[run] = evaluate_run(args, run, device, E, guidance=run_guidance(args, plan, run))
        timings[run]["eval_seconds"] = {f"{g:g}": r.get("seconds") for g, r in results[run].items()}
    if args.only_run is not None:
        return {"runs": runs, "timings": timings}
    rows = [A.result_row(v, g, results[v.run][g]["summary"], results[v.run][g]["fidelity"],
                         results[v.run][g]["fidelity_name"], n_images=results[v.run][g]["n_images"],
                         toy_clip=results[v.run][g].get("toy_clip"))
            for v in plan for g in guidance_of(args, v)]
    files = write_reports(args, cfg, plan, rows, timings)
    print((out / "ablation.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return {"plan": [v.name for v in plan], "runs": runs, "rows": rows, "timings": timings}


if __name__ == "__main__":
    main()
