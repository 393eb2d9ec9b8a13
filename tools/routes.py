#!/usr/bin/env python
"""Diffusion-path analysis of a RAPHAEL checkpoint (Sec. 3.1, Fig. 4 / 10; App. 7.3, Fig. 9).

    python tools/routes.py runs/toy --out runs/toy/routes                       # colours, shapes, positions
    python tools/routes.py runs/toy --out routes --per-concept 50 --compare-init  # and the random init's score
    python tools/routes.py ckpt/ --out routes --words adjectives.txt \\
        --template "a {} painting of a lake" --template "a photo of a {} city at night"

For every concept prompt (synthetic captions naming a colour, shape or position once; or each word
of --words in each --template) one image is sampled with classifier-free guidance while the routes
are recorded (``sampling.sample(collect_paths=True)``). The path of the concept word's token (its
space expert in each transformer block, at sampler step --feature-step) is the feature vector; an
XGBoost classifier (CPU build; --classifier naive_bayes is the fallback) is scored by stratified
--folds-fold cross-validation, per concept kind. See ``raphael_ref.evaluation.routes`` for what the
accuracy can and cannot show (eval-mode gates are deterministic functions of the text).

Writes to --out:
    routes.json          settings, per kind: classifier accuracy (mean, std, folds, chance), the
                         per-concept expert frequencies, step invariance of the routes; time-expert
                         usage per block and step, and its segments
    routes.md            the accuracy table and the time-expert segments
    time_experts.png     Fig. 9: share of samples per time expert against the sampler step, per block
    time_experts_init.png  the same for the random initialisation (--compare-init), with its segments in routes.md
    paths_<kind>.png     Fig. 4 / 10: per concept, expert frequency per block, and the modal routes
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

from raphael_ref.checkpoint import load_model  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule  # noqa: E402
from raphael_ref.evaluation import plots  # noqa: E402
from raphael_ref.evaluation import routes as R  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (routes.json, routes.md, PNGs)")
    p.add_argument("--kinds", nargs="+", choices=list(R.CONCEPT_KINDS), default=list(R.CONCEPT_KINDS),
                   help="synthetic concept kinds (ignored with --words)")
    p.add_argument("--per-concept", type=int, default=30, help="distinct prompts per concept (synthetic kinds)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per synthetic caption, 1..max")
    p.add_argument("--words", default=None, help="a file with one word per line (real checkpoints)")
    p.add_argument("--template", action="append", default=[],
                   help="prompt template with one {} for the word (repeatable; needs --words)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=10,
                   help="DDIM steps of the path collection (eval-mode space routes do not depend on the step)")
    p.add_argument("--fig9-steps", type=int, default=50, help="DDIM steps of the time-expert figure (Fig. 9)")
    p.add_argument("--fig9-prompts", type=int, default=8, help="prompts sampled for the time-expert figure")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance weight")
    p.add_argument("--feature-step", type=int, default=0, help="sampler step whose routes are the features")
    p.add_argument("--seed", type=int, default=0, help="noise seed and CV fold seed")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (paper: 5)")
    p.add_argument("--classifier", choices=("auto", "xgboost", "naive_bayes"), default="auto",
                   help="auto: xgboost when installed, else naive_bayes (the fallback)")
    p.add_argument("--compare-init", action="store_true",
                   help="also score the run's random initialisation (same seed as tools/train.py)")
    p.add_argument("--batch-size", type=int, default=64)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="weights", action="store_const", const="ema", help="EMA weights (default when present)")
    w.add_argument("--raw", dest="weights", action="store_const", const="raw", help="the raw (non-EMA) weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.weights = args.weights or "auto"
    if args.template and not args.words:
        p.error("--template needs --words FILE")
    if args.words and not args.template:
        args.template = ["a photo of a {}"]
    for name in ("per_concept", "steps", "fig9_steps", "fig9_prompts", "batch_size", "max_objects") + (("threads",) if args.threads is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.folds < 2:
        p.error("--folds must be >= 2")
    if args.words and len(args.template) < args.folds:
        p.error(f"--words: each word gets one path per template (eval-mode gates are deterministic), and "
                f"{args.folds}-fold CV needs >= {args.folds} per word: give >= {args.folds} --template")
    if args.classifier == "auto":
        args.classifier = R.available_classifier()
    check_user_errors(p, args)
    return args


def check_user_errors(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`error:` lines (exit code 2) for what the user can fix, before anything long runs: the checkpoint, its
    weights and space-MoE, numbers out of range (steps <= T of the checkpoint), --words, an unwritable --out."""
    from raphael_ref import training as T
    from raphael_ref.config import RaphaelConfig

    if not (math.isfinite(args.guidance) and args.guidance >= 0.0):
        p.error(f"--guidance must be a finite number >= 0 (1 = no guidance), got {args.guidance}")
    if args.words and not Path(args.words).is_file():
        p.error(f"--words {args.words} is not a file (one word per line)")
    try:
        ckpt = T.resolve_checkpoint(args.checkpoint)
        if args.weights == "ema" and not (ckpt / "ema.safetensors").exists():
            raise FileNotFoundError(f"--ema: {ckpt} has no ema.safetensors (use --raw)")
        cfg = RaphaelConfig.from_json(ckpt / "config.json")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if not cfg.model.use_space_moe:
        p.error(f"{ckpt} was trained without space-MoE (model.use_space_moe = false): no paths")
    T_ = cfg.diffusion.T
    if args.sampler == "ddim":
        for name in ("steps", "fig9_steps"):
            if getattr(args, name) > T_:
                p.error(f"--{name.replace('_', '-')} must lie in [1, T = {T_}] for {ckpt}, got {getattr(args, name)}")
    n_steps = args.steps if args.sampler == "ddim" else T_
    if not 0 <= args.feature_step < n_steps:
        p.error(f"--feature-step must lie in [0, {n_steps}) ({n_steps} sampler steps), got {args.feature_step}")
    from raphael_ref.training import writable_dir

    try:
        writable_dir(args.out)
    except ValueError as e:
        p.error(str(e))


def load_weights(path: Path, choice: str, device: torch.device):
    """(model, cfg, checkpoint folder, weights file name) of a run or checkpoint folder."""
    from raphael_ref import training as T

    ckpt = T.resolve_checkpoint(path)
    has_ema = (ckpt / "ema.safetensors").exists()
    if choice == "ema" and not has_ema:
        raise FileNotFoundError(f"--ema: {ckpt} has no ema.safetensors (use --raw)")
    name = "ema.safetensors" if (choice == "ema" or (choice == "auto" and has_ema)) else "model.safetensors"
    model, cfg = load_model(ckpt, weights_name=name, map_location="cpu")
    return model.to(device).eval(), cfg, ckpt, name


def time_segments(usage: torch.Tensor) -> list[list[list[int]]]:
    """Per block, runs of consecutive steps with the same majority time expert: [[expert, first, last], ...]."""
    out = []
    for k in range(usage.shape[0]):
        if torch.isnan(usage[k]).all():
            out.append([])
            continue
        major = usage[k].argmax(dim=1).tolist()  # (S,)
        runs: list[list[int]] = []
        for s, e in enumerate(major):
            if runs and runs[-1][0] == e:
                runs[-1][2] = s
            else:
                runs.append([e, s, s])
        out.append(runs)
    return out


def analyse(model, cfg, encoder, schedule, groups: dict[str, list[R.ConceptPrompt]], args, log=print) -> dict:
    """Collect the paths of every group and classify them; returns the per-kind results."""
    results = {}
    for kind, prompts in groups.items():
        t0 = time.time()
        paths = R.collect_concept_paths(model, schedule, encoder, prompts, steps=args.steps, guidance=args.guidance,
                                        sampler=args.sampler, seed=args.seed, batch_size=args.batch_size)
        feats, blocks = R.path_features(paths.space, args.feature_step)  # (N, K')
        labels = [p.concept for p in prompts]
        concepts = sorted(set(labels), key=labels.index)
        cv = R.path_classifier_cv(feats, labels, folds=args.folds, seed=args.seed, classifier=args.classifier)
        y = torch.tensor([concepts.index(c) for c in labels])
        freq = R.space_expert_frequency(feats, y, len(concepts), cfg.model.n_space_experts)  # (C, K', k)
        distinct = len({tuple(f) for f in feats.tolist()})
        results[kind] = {"concepts": concepts, "n_prompts": len(prompts), "blocks": blocks, "classifier": cv,
                         "distinct_paths": distinct, "step_invariance": R.route_step_invariance(paths.space),
                         "frequency": freq.tolist(), "_freq": freq}
        log(f"{kind:>10}: {len(prompts)} prompts, {len(concepts)} concepts, {distinct} distinct paths; "
            f"{cv['classifier']} {args.folds}-fold accuracy {cv['accuracy_mean']:.3f} +- {cv['accuracy_std']:.3f} "
            f"(chance {cv['chance']:.3f}); routes equal at every step for {results[kind]['step_invariance']:.0%} "
            f"of (block, token) pairs; {time.time() - t0:.1f}s")
    return {"kinds": results}


def time_routes(model, encoder, schedule, groups: dict[str, list[R.ConceptPrompt]], args) -> R.ConceptPaths:
    """Fig. 9: the routes of --fig9-prompts prompts (taken in turn from every group) over --fig9-steps DDIM steps."""
    pools = list(groups.values())
    picked = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)][:args.fig9_prompts]
    return R.collect_concept_paths(model, schedule, encoder, picked, steps=args.fig9_steps, guidance=args.guidance,
                                   sampler=args.sampler, seed=args.seed, batch_size=args.batch_size)


def markdown(result: dict, header: list[str]) -> str:
    lines = [*header, "", "| concepts | prompts | distinct paths | classifier | accuracy (mean +- std over folds) | "
             "chance | random init |", "|---|---:|---:|---|---:|---:|---:|"]
    for kind, r in result["kinds"].items():
        cv = r["classifier"]
        init = r.get("random_init")
        init_s = f"{init['accuracy_mean']:.3f} +- {init['accuracy_std']:.3f}" if init else ""
        lines.append(f"| {kind} ({', '.join(r['concepts'])}) | {r['n_prompts']} | {r['distinct_paths']} | "
                     f"{cv['classifier']}, {cv['folds']}-fold | {cv['accuracy_mean']:.3f} +- {cv['accuracy_std']:.3f} | "
                     f"{cv['chance']:.3f} | {init_s} |")
    lines += ["", f"Time-expert segments per block (majority expert: DDIM steps first..last of {len(result['timesteps'])}, "
              "step 0 = noisiest):", ""]
    if not result["time_segments"]:
        lines.append("- no time-MoE in this checkpoint")
    for k, runs in enumerate(result["time_segments"]):
        desc = ", ".join(f"e{e}: {a}..{b}" for e, a, b in runs) if runs else "no time-MoE"
        lines.append(f"- block {k}: {desc}")
    init = result.get("time_segments_init")
    if init:
        lines += ["", "The same for the random initialisation (`--compare-init`; an untrained time gate is a random "
                  "smooth function of t, so contiguous runs alone are no evidence of training):", ""]
        for k, runs in enumerate(init):
            lines.append(f"- block {k}: " + (", ".join(f"e{e}: {a}..{b}" for e, a, b in runs) if runs else "no time-MoE"))
        lines += ["", "| | trained | random init |", "|---|---:|---:|"]
        for label, fn in (("blocks using more than one expert", lambda seg: sum(len({r[0] for r in b}) > 1 for b in seg)),
                          ("segments per block (mean)", lambda seg: sum(len(b) for b in seg) / max(1, len(seg))),
                          ("experts used per block (mean)", lambda seg: sum(len({r[0] for r in b}) for b in seg)
                           / max(1, len(seg)))):
            a, b = fn(result["time_segments"]), fn(init)
            lines.append(f"| {label} | {a:.3g} | {b:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from raphael_ref import training as T

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, ckpt, weights = load_weights(Path(args.checkpoint), args.weights, device)
    encoder = T.build_text_encoder(cfg, device)
    d = cfg.diffusion
    schedule = NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)
    if args.words:
        words = Path(args.words).read_text().splitlines()
        groups = {"words": R.template_prompts(words, args.template)}
    else:
        groups = {k: R.concept_prompts(k, args.per_concept, max_objects=args.max_objects) for k in args.kinds}
    print(f"checkpoint {ckpt} ({weights}), preset {cfg.name}, {cfg.n_transformer_blocks} blocks, "
          f"{args.sampler} {args.steps} steps, guidance {args.guidance}, features at step {args.feature_step}, "
          f"classifier {args.classifier}, device {device}", flush=True)
    result = analyse(model, cfg, encoder, schedule, groups, args)
    init = None
    if args.compare_init:
        from raphael_ref.models import build_unet

        torch.manual_seed(cfg.train.seed)  # tools/train.py draws the initial weights right after this seed
        init = build_unet(cfg).to(device).eval()
        print("random initialisation (same seed as training):", flush=True)
        init_res = analyse(init, cfg, encoder, schedule, groups, args, log=lambda s: print("  init", s))
        for kind, r in init_res["kinds"].items():
            result["kinds"][kind]["random_init"] = r["classifier"]
    files, usage, result["timesteps"], result["time_segments"] = [], None, torch.zeros(0, dtype=torch.long), []
    if cfg.model.use_time_moe:
        t0 = time.time()
        fig9 = time_routes(model, encoder, schedule, groups, args)
        result["timesteps"] = fig9.timesteps
        usage = R.time_expert_usage(fig9.time, cfg.model.n_time_experts)  # (K, S, n_t)
        result["time_segments"] = time_segments(usage)
        files.append(plots.time_expert_plot(usage, fig9.timesteps.tolist(), out / "time_experts.png"))
        if init is not None:  # the same figure for the random initialisation
            usage0 = R.time_expert_usage(time_routes(init, encoder, schedule, groups, args).time, cfg.model.n_time_experts)
            result["time_segments_init"] = time_segments(usage0)
            files.append(plots.time_expert_plot(usage0, fig9.timesteps.tolist(), out / "time_experts_init.png",
                                                title="Time-expert routes of the random initialisation"))
        print(f"time routes: {fig9.time.shape[2]} prompts x {fig9.time.shape[0]} steps in {time.time() - t0:.1f}s",
              flush=True)
    for kind, r in result["kinds"].items():
        files.append(plots.concept_paths_plot(r.pop("_freq"), r["concepts"], out / f"paths_{kind}.png",
                                              title=f"Space-expert paths of {kind} words (cf. RAPHAEL Fig. 4 / 10)"))
    settings = {k: v for k, v in vars(args).items()}
    report = {"checkpoint": str(ckpt), "weights": weights, "preset": cfg.name, "settings": settings,
              "kinds": result["kinds"], "timesteps": result["timesteps"].tolist(),
              "time_usage": None if usage is None else [[[None if v != v else v for v in row] for row in blk]
                                                        for blk in usage.tolist()],
              "time_segments": result["time_segments"], "time_segments_init": result.get("time_segments_init"),
              "figures": [str(f.relative_to(out)) for f in files]}
    (out / "routes.json").write_text(json.dumps(report, indent=1) + "\n")
    header = [f"# Diffusion paths of `{ckpt}` ({weights})", "",
              f"{args.sampler}, {args.steps} steps (Fig. 9: {args.fig9_steps} steps, {args.fig9_prompts} prompts), "
              f"guidance {args.guidance}; features: the concept token's space "
              f"expert per block at step {args.feature_step}; stratified {args.folds}-fold CV, seed {args.seed}. "
              f"Eval-mode gates are deterministic functions of the text: paths do not depend on noise or step."]
    (out / "routes.md").write_text(markdown(result, header))
    print((out / "routes.md").read_text())
    return report


if __name__ == "__main__":
    main()
