#!/usr/bin/env python
"""Train a text-conditioned super-resolution diffusion stage (seed 004's Imagen cascade on RAPHAEL's U-Net).

    python tools/train_sr.py --out runs/sr_toy                       # toy: 24 -> 48 px on the synthetic scenes
    python tools/train_sr.py --out runs/sr_toy --resume --set train.steps=600   # go on from the latest checkpoint
    python tools/train_sr.py --out runs/sr96 --set model.sample_size=96 --set train.batch_size=4
    python tools/sample.py runs/default_v2 --upscale runs/sr_toy --prompt "a red circle on the left" --out out/

The SR stage is ``RaphaelUNet`` with ``model.cond_channels = 3`` (raphael_ref/sr.py, erratum E80): its input is
the noisy high-res x_t concatenated with the low-res image upsampled to the high-res grid and noise-augmented
at a level s ~ U{0..sr.aug_max} (spec ``sr.noise_augmentation``); s is embedded and added to the time
embedding. The loss is the base model's (``objective.training_losses``: L_denoise + L_edge, the preset's
loss weighting), AdamW with linear warm-up (and the optional decay of E86), gradient clipping and an EMA, as tools/train.py.

Data: pairs rendered by the synthetic renderer (raphael_ref/data/synthetic.py) at both sizes; item i of the
stream is a pure function of (train.seed, i): its scene, whether its low-res image is the renderer's own
low-res render or the high-res render area-averaged (``sr.lowres_source``), and its caption dropout. A
resumed run therefore sees the same items as an uninterrupted one (and the same t, noise and s: the RNG
states are in the checkpoint).

Defaults (``SR_DEFAULTS``, over the ``toy`` preset, then ``--config`` files, then ``--set``): 48 px from 24 px,
no transformer blocks at the full-resolution level (Imagen's Efficient U-Net keeps attention off its
highest resolutions; measured 2.6x faster per step here), batch 8, 250 steps.

Run folder (``--out``; never another run's folder): config.json, log.jsonl ({"step", "loss", "denoise",
"edge", "lr", "sec_per_step"} per line), loss.png, checkpoints/step_*/ (model, EMA, optimizer, RNG; written
atomically, ``latest`` points at the newest), samples/final.png (held-out scenes: low-res | SR | ground truth).

Exit codes: 0 done; 2 a user error (``error: ...``, before any training); 3 a non-finite loss (nothing written
after it); 4 the final sample grid failed (the checkpoint is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from raphael_ref import sr as SR  # noqa: E402
from raphael_ref import training as T  # noqa: E402
from raphael_ref.checkpoint import check_state_dict  # noqa: E402
from raphael_ref.config import load_config  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule  # noqa: E402
from raphael_ref.models import RaphaelUNet, count_parameters, format_count, schedule_for  # noqa: E402

EXIT_USAGE, EXIT_DIVERGED, EXIT_AFTER_TRAINING = 2, 3, 4
SR_DEFAULTS = {
    "name": "toy-sr",
    "model.sample_size": 48,
    "model.cond_channels": 3,
    "sr.lowres_size": 24,
    "model.transformer_down": [0, 2, 2, 0],
    "model.transformer_up": [0, 3, 3, 0],
    "train.batch_size": 8,
    "train.steps": 250,
    "train.warmup_steps": 25,
    "train.log_every": 10,
    "train.ckpt_every": 100,
    "sample.steps": 20,
    "sample.guidance": 3.0,
}
# fields a resumed run may change (everything else must equal the checkpoint's config)
# ("train.lr" also covers train.lr_decay and train.lr_decay_start, E86: a longer resumed run decays to its new end)
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.lr",
                     "train.warmup_steps", "train.grad_clip", "sample.", "sr.aug_sample", "model.checkpoint")
HELDOUT_SEED = 987_654  # the final grid's scenes (and tools/sr_toy.py's): a stream training never draws
SAMPLE_IDS = (0, 1, 2, 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="JSON/TOML file of fields applied over the toy preset and SR_DEFAULTS (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="one field, e.g. --set train.steps=100 --set model.sample_size=96 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>-toy-sr)")
    p.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --out")
    p.add_argument("--no-samples", action="store_true", help="skip the final sample grid")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def item_source(seed: int, index: int, lowres_source: str) -> str:
    """Where item ``index``'s low-res image comes from: "render" or "downsample" ("mix": a coin of (seed, index))."""
    if lowres_source != "mix":
        return lowres_source
    return ("render", "downsample")[int(np.random.default_rng([seed, index, 1]).integers(2))]


def make_batch(cfg, start: int, B: int, seed: int | None = None):
    """Items start..start+B-1 of the stream: high-res (B, 3, H, H), low-res (B, 3, h, h) in [-1, 1], captions."""
    seed = cfg.train.seed if seed is None else seed
    H, h = cfg.model.sample_size, cfg.sr.lowres_size
    hrs, lrs, caps = [], [], []
    for i in range(start, start + B):
        hr, lr, cap = SR.sr_pair(i, H, h, seed=seed, source=item_source(seed, i, cfg.sr.lowres_source))
        drop = np.random.default_rng([seed, i, 2]).random() < cfg.train.caption_dropout
        hrs.append(hr)
        lrs.append(lr)
        caps.append("" if drop else cap)
    return torch.stack(hrs), torch.stack(lrs), caps


def heldout_batch(cfg, ids=SAMPLE_IDS, source: str = "downsample"):
    """Held-out pairs (seed HELDOUT_SEED), no caption dropout."""
    H, h = cfg.model.sample_size, cfg.sr.lowres_size
    items = [SR.sr_pair(i, H, h, seed=HELDOUT_SEED, source=source) for i in ids]
    return torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items]), [c for _, _, c in items]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck = None
    try:
        if args.resume:
            if args.out is None:
                raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
            resume_from = T.latest_checkpoint(args.out)
            if resume_from is None:
                raise ValueError(f"--resume: {args.out} has no checkpoint in {args.out}/{T.CKPT_DIR}")
            ck = T.load_checkpoint(resume_from)
            cfg = load_config(base=ck["cfg"], files=args.config, overrides=args.set)
            a, b = T.flat_config(ck["cfg"]), T.flat_config(cfg)
            diff = [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k) and not k.startswith(RESUME_MAY_CHANGE)]
            if diff:
                raise ValueError(f"--resume: field(s) that cannot change on resume differ from the checkpoint's: "
                                 f"{'; '.join(diff[:8])}")
        else:
            overrides = dict(SR_DEFAULTS)
            cfg = load_config("toy", overrides={k: v for k, v in overrides.items()}, files=())
            cfg = load_config(base=cfg, files=args.config, overrides=args.set)
            if args.out is not None:
                out = Path(args.out)
                if out.exists() and not out.is_dir():
                    raise ValueError(f"--out {out} is a file, not a folder")
                held = [n for n in ("config.json", "log.jsonl", T.CKPT_DIR) if (out / n).exists()]
                if held:
                    raise ValueError(f"{out} holds another run ({', '.join(held)}); --out never overwrites a run: "
                                     f"pass --resume to continue it, or choose another --out")
        m, tc = cfg.model, cfg.train
        if m.cond_channels <= 0:
            raise ValueError("config field model.cond_channels: an SR stage needs 3 (the low-res RGB image); got 0")
        if tc.batch_size < 1 or tc.grad_accum != 1:
            raise ValueError("tools/train_sr.py trains in one process without gradient accumulation: "
                             f"train.grad_accum must be 1 (got {tc.grad_accum})")
        edge_detector = T.build_edge_detector(cfg, device) if m.use_edge else None
        encoder = T.build_text_encoder(cfg, device)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))

    run_dir = T.make_run_dir(args.out, cfg.name)
    torch.manual_seed(tc.seed)
    model = RaphaelUNet(m, schedule=schedule_for(cfg))  # the schedule only for model.prediction = "v" (E88)
    ema = T.make_ema(model)
    gen = torch.Generator().manual_seed(tc.seed)  # t, noise, s and the augmentation noise, on the CPU
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = 0
    model.to(device)  # before the optimizer state is loaded: load_state_dict puts AdamW's state on the params' device
    ema.to(device)
    if ck is not None:
        try:
            for name in ("model", "ema"):
                check_state_dict(model.state_dict(), ck[name], str(ck["dir"] / f"{name}.safetensors"))
        except ValueError as e:
            return fail(str(e))
        set_model_state_dict(model, ck["model"], options=StateDictOptions(full_state_dict=True))
        set_model_state_dict(ema, ck["ema"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
        step = int(ck["state"]["step"])
        torch.set_rng_state(ck["rng"]["rank0.torch"])
        gen.set_state(ck["rng"]["rank0.gen"])
    model.train()
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T, cfg.diffusion.zero_terminal_snr)
    T.truncate_log(run_dir / "log.jsonl", step)
    cfg.to_json(run_dir / "config.json")
    n = count_parameters(model)["total"]
    print(f"run folder: {run_dir}", flush=True)
    print(f"SR stage {m.sample_size}px from {cfg.sr.lowres_size}px ({cfg.sr.upsample}, low-res from "
          f"{cfg.sr.lowres_source}); U-Net {format_count(n)} parameters, {cfg.n_transformer_blocks} transformer blocks; "
          f"augmentation s ~ U{{0..{cfg.sr.aug_max}}}, sampling s = {cfg.sr.aug_sample}; batch {tc.batch_size}, "
          f"steps {step} -> {tc.steps}; device {device}", flush=True)
    if step >= tc.steps:
        print(f"nothing to do: step {step} >= train.steps {tc.steps}", flush=True)
        return 0

    def save() -> None:
        rng = {"rank0.torch": torch.get_rng_state(), "rank0.gen": gen.get_state()}
        state = {"step": step, "data_start_step": step, "world_size": 1, "seed": tc.seed}
        path = T.save_checkpoint(run_dir, step, model_state=get_model_state_dict(model, options=full),
                                 ema_state=get_model_state_dict(ema, options=full),
                                 optimizer_state=get_optimizer_state_dict(model, opt, options=full), cfg=cfg,
                                 state=state, rng=rng, keep=tc.keep_ckpts)
        (bar.write if bar is not None else print)(f"saved {path}")

    log = T.JsonlLog(run_dir / "log.jsonl")
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)
    window, n_window, busy = torch.zeros(3, dtype=torch.float64), 0, 0.0
    B = tc.batch_size
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            lr = T.scheduled_lr(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_decay, tc.lr_decay_start)
            for g in opt.param_groups:
                g["lr"] = lr
            hr, lr_img, caps = make_batch(cfg, step * B, B)
            with torch.no_grad():
                x0, x_lr = hr.to(device), lr_img.to(device)
                text = encoder(caps)
                edges = edge_detector(x0) if edge_detector is not None else None  # edges of the high-res image
            t = torch.randint(0, schedule.T, (B,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            s = SR.sample_aug_levels(B, cfg.sr.aug_max, gen)
            aug_noise = torch.randn(x0.shape, generator=gen).to(device)
            out = SR.sr_training_losses(model, schedule, x0, x_lr, t, noise, s, aug_noise, text.hidden, text.valid,
                                        text.pooled_index, edges, upsample=cfg.sr.upsample, focal_alpha=tc.focal_alpha,
                                        focal_gamma=tc.focal_gamma, loss_weight=tc.loss_weight,
                                        loss_weight_max=tc.loss_weight_max)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            losses = torch.stack([out["total"].detach(), out["denoise"].detach(), out["edge"].detach()]).double().cpu()
            if not bool(torch.isfinite(losses).all()):
                last = T.latest_checkpoint(run_dir)
                return fail(f"the loss is not finite at step {step + 1} ({losses.tolist()}); nothing was written after "
                            f"it" + (f"; resume from {last} with a lower train.lr" if last else
                                     "; start again with a lower train.lr"), EXIT_DIVERGED)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            T.update_ema(ema, model, tc.ema_decay)
            step += 1
            window += losses
            n_window += 1
            busy += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                mean = (window / n_window).tolist()
                record = {"step": step, "loss": mean[0], "denoise": mean[1], "edge": mean[2], "lr": lr,
                          "sec_per_step": round(busy / n_window, 4)}
                log.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean[0]:.4f}", refresh=False)
                else:
                    print(f"step {step}/{tc.steps}  loss {mean[0]:.4f}  denoise {mean[1]:.4f}  edge {mean[2]:.4f}  "
                          f"lr {lr:.2e}  {busy / n_window:.2f} s/step", flush=True)
                window.zero_()
                n_window, busy = 0, 0.0
            if step % tc.ckpt_every == 0 or step == tc.steps:
                try:
                    save()
                except T.NonFiniteError as e:
                    return fail(str(e), EXIT_DIVERGED)
    finally:
        log.close()
        if bar is not None:
            bar.close()
    late = []
    try:
        T.plot_loss_curve(T.read_log(run_dir / "log.jsonl"), run_dir / "loss.png")
    except Exception as e:  # cosmetic
        late.append(f"loss curve not drawn ({type(e).__name__}: {e})")
    if not args.no_samples:
        try:
            hr, lr_img, caps = heldout_batch(cfg)
            stage = SR.SRStage(ema.eval(), encoder, schedule, cfg)
            up = stage(lr_img, caps, generator=torch.Generator().manual_seed(cfg.sample.seed))
            lr_big = SR.upsample_lowres(lr_img, m.sample_size, "nearest")
            T.save_image_grid(torch.cat([lr_big, up, hr]), run_dir / "samples" / "final.png", nrow=len(caps))
            (run_dir / "samples" / "prompts.txt").write_text("\n".join(caps) + "\n")
        except Exception as e:
            late.append(f"sample grid not drawn ({type(e).__name__}: {e})")
    if late:
        return fail("; ".join(late) + f"; the checkpoint {T.latest_checkpoint(run_dir)} is written", EXIT_AFTER_TRAINING)
    print(f"done: {step} steps; run folder {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
