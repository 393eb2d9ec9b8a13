#!/usr/bin/env python
"""Train a Canny ControlNet on a trained RAPHAEL run (RAPHAEL Fig. 21; Zhang et al. 2023; raphael_ref/controlnet.py).

    python tools/train_controlnet.py --base runs/toy --out runs/toy-controlnet --steps 300 --batch-size 16
    python tools/train_controlnet.py --base runs/toy --out runs/toy-controlnet --steps 600 --resume   # go on
    python tools/sample.py runs/toy --controlnet runs/toy-controlnet/controlnet.safetensors \\
        --control scene.png --prompt "a red circle on the left"

``--base``: a run folder of tools/train.py (its latest checkpoint) or a checkpoint folder; its EMA weights
(``--raw``: the raw ones) are the frozen U-Net, run in eval mode (deterministic routes, as it samples). The
ControlNet starts as a copy of its encoder half (``RaphaelControlNet.from_unet``) with zero convolutions at 0;
only the ControlNet trains (AdamW, constant learning rate after a linear warm-up). Data: the training images
(``--data``: "synthetic", the default, or any ``data.loader`` source) and, as control maps, their Canny edges
(``edge_gt.CannyEdgeDetector``, the settings stored with the ControlNet). Loss: the base's L_denoise
(``ddpm.loss_eps`` with the base's ``train.loss_weight``) of the frozen U-Net joined with the ControlNet; the
U-Net's edge loss is not used (its edge heads are frozen and nothing of the ControlNet is supervised by them).
Captions are dropped with ``--caption-dropout`` (default 0.5 as ControlNet, so the control alone must carry
the layout on half the batches).

Run folder (``--out``)::

    config.json                 the base's config
    controlnet_train.json       the command's settings and the base checkpoint (path, weights, SHA-256)
    log.jsonl                   {"step", "loss", "lr", "sec_per_step", "join_norm"} per log line
    checkpoints/step_NNNNNNN/   controlnet.safetensors (+ .json), optimizer.safetensors (+ .json), rng.safetensors,
                                state.json; written to a .tmp folder and renamed (atomic); "latest" names the last
    controlnet.safetensors      the final ControlNet (+ controlnet.json), only the ControlNet's weights
    loss.png, samples/final.png the loss curve; control edges | generated images of held-out synthetic scenes

``--resume`` continues the run in ``--out`` from its latest checkpoint with the settings stored there (only
``--steps`` may grow): same data order, noise and RNG streams, so a resumed run equals an uninterrupted one.

Exit codes: 0 done; 2 a user error (``error: ...``, before any training); 3 a non-finite loss (nothing written
after it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raphael_ref import training as T  # noqa: E402
from raphael_ref.checkpoint import load_model, load_tensors, save_tensors  # noqa: E402
from raphael_ref.controlnet import (CANNY_DEFAULTS, RaphaelControlNet, canny_control, load_controlnet,  # noqa: E402
                                    save_controlnet)
from raphael_ref.data.loader import make_train_loader  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule, loss_eps, q_sample  # noqa: E402
from raphael_ref.objective import denoise_weights  # noqa: E402

EXIT_USAGE, EXIT_DIVERGED = 2, 3
SETTINGS = "controlnet_train.json"
# settings a resumed run takes from the stored ones (the command line's are ignored, except --steps)
FIXED = ("base", "raw", "data", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "caption_dropout", "seed",
         "canny")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="the trained run (tools/train.py --out folder) or a checkpoint folder")
    p.add_argument("--raw", action="store_true", help="use the raw weights as the frozen U-Net (default: EMA)")
    p.add_argument("--data", default="synthetic", help="training images: 'synthetic' (default) or a data.loader source")
    p.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>-controlnet)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--caption-dropout", type=float, default=0.5,
                   help="fraction of empty captions (default 0.5, as ControlNet: the edges must carry the layout)")
    p.add_argument("--canny-low", type=float, default=CANNY_DEFAULTS["low_contrast"])
    p.add_argument("--canny-high", type=float, default=CANNY_DEFAULTS["high_contrast"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest; default 2)")
    p.add_argument("--no-samples", action="store_true", help="skip the final sample grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def save_checkpoint(run_dir: Path, step: int, net: RaphaelControlNet, opt: torch.optim.Optimizer,
                    gen: torch.Generator, base: dict, keep: int) -> Path:
    """checkpoints/step_NNNNNNN: written in a .tmp folder, then renamed; ``latest`` replaced atomically."""
    ckpts = run_dir / T.CKPT_DIR
    final = ckpts / f"step_{step:07d}"
    tmp = ckpts / f"step_{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_controlnet(net, tmp / "controlnet.safetensors", base=base)
    names = {id(p): n for n, p in net.named_parameters()}
    sd = opt.state_dict()
    named = {"state": {names[id(p)]: sd["state"][i] for i, p in enumerate(opt.param_groups[0]["params"])
                       if i in sd["state"]},
             "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}
    tensors, meta = T.optimizer_state_to_tensors(named)
    save_tensors(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
    save_tensors({"generator": gen.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    T.publish_checkpoint(tmp, final, keep)  # rename, point ``latest`` at it, prune (training.save_checkpoint's)
    return final


def load_optimizer(path: Path, net: RaphaelControlNet, opt: torch.optim.Optimizer) -> None:
    tensors = load_tensors(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    named = T.optimizer_state_from_tensors(tensors, meta)
    order = [n for n, _ in net.named_parameters()]
    sd = {"state": {i: named["state"][n] for i, n in enumerate(order) if n in named["state"]},
          "param_groups": [{**g, "params": list(range(len(order)))} for g in named["param_groups"]]}
    opt.load_state_dict(sd)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # ---- everything a user can get wrong, before the run folder is touched
    try:
        out = Path(args.out) if args.out else None
        resume_from = None
        if args.resume:
            if out is None or not (out / SETTINGS).exists():
                raise ValueError(f"--resume needs --out, a run folder of this tool (with {SETTINGS}); got {args.out}")
            stored = json.loads((out / SETTINGS).read_text())
            for k in FIXED:
                setattr(args, k, stored[k])
            resume_from = T.latest_checkpoint(out)
            if resume_from is None:
                raise ValueError(f"{out} has no checkpoint to resume from (checkpoints/step_*)")
        elif out is not None and any((out / n).exists() for n in (SETTINGS, "log.jsonl", "controlnet.safetensors")):
            raise ValueError(f"{out} holds another run; --out never overwrites a run: choose another --out, or "
                             f"pass --resume to continue it")
        if args.base is None:
            raise ValueError("--base is required: the tools/train.py run (or checkpoint folder) to control")
        for name, v, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                            ("--log-every", args.log_every, 1), ("--save-every", args.save_every, 1),
                            ("--warmup", args.warmup, 0), ("--keep", args.keep, 1)):
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}; got {v}")
        if not (args.lr > 0 and math.isfinite(args.lr)):
            raise ValueError(f"--lr must be a finite number > 0; got {args.lr}")
        if not 0.0 <= args.caption_dropout <= 1.0:
            raise ValueError(f"--caption-dropout must lie in [0, 1]; got {args.caption_dropout}")
        canny = args.canny if args.resume else {**CANNY_DEFAULTS, "low_contrast": args.canny_low,
                                                  "high_contrast": args.canny_high}
        canny_control(torch.zeros(1, 3, 8, 8), canny)  # bad thresholds: ValueError now
        ckpt = T.resolve_checkpoint(args.base)
        weights = "model.safetensors" if args.raw or not (ckpt / "ema.safetensors").exists() else "ema.safetensors"
        unet, cfg = load_model(ckpt, weights_name=weights, map_location=device)
        encoder = T.build_text_encoder(cfg, device)
        codec = T.build_codec(cfg, device)
        factor = codec.downsample_factor
        image_size = cfg.model.sample_size * factor
        if resume_from is not None:
            net = load_controlnet(resume_from / "controlnet.safetensors", unet=unet)
            start = json.loads((resume_from / "state.json").read_text())["step"]
            if args.steps <= start:
                raise ValueError(f"the run is at step {start} already; pass --steps > {start} to go on")
        else:
            torch.manual_seed(args.seed)  # the conditioning network's initial weights: a function of --seed
            net = RaphaelControlNet.from_unet(unet, factor=factor, canny=canny)
            start = 0
        loader = make_train_loader(args.data, image_size=image_size, batch_size=args.batch_size, seed=args.seed,
                                   caption_dropout=args.caption_dropout, min_aesthetic=None, max_pwatermark=None,
                                   start_step=start)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T, cfg.diffusion.zero_terminal_snr)
    tc = cfg.train
    from raphael_ref.lora import base_weights_info

    base = {"run": str(args.base), **base_weights_info(ckpt, weights)}
    # ---- the frozen U-Net; the ControlNet trains
    unet.requires_grad_(False).eval()
    net.to(device).train().requires_grad_(True)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tc.adam_betas, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if resume_from is not None:
        load_optimizer(resume_from, net, opt)
        rng = load_tensors(resume_from / "rng.safetensors")
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])

    run_dir = T.make_run_dir(out, f"{cfg.name}-controlnet")
    settings = {"base": str(args.base), "raw": args.raw, "data": args.data, "batch_size": args.batch_size,
                "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                "caption_dropout": args.caption_dropout, "seed": args.seed, "canny": canny, "steps": args.steps,
                "base_checkpoint": base, "factor": factor,
                "parameters": sum(p.numel() for p in params), "frozen_unet_parameters": sum(p.numel() for p in unet.parameters())}
    if resume_from is None:
        cfg.to_json(run_dir / "config.json")
    T._atomic_text(run_dir / SETTINGS, json.dumps(settings, indent=2) + "\n")
    T.truncate_log(run_dir / "log.jsonl", start)
    print(f"run folder: {run_dir}" + (f" (resumed at step {start} from {resume_from.name})" if start else ""), flush=True)
    print(f"frozen U-Net {ckpt}/{weights}: {settings['frozen_unet_parameters']:,} parameters; ControlNet "
          f"{settings['parameters']:,} trainable; control: Canny {canny}", flush=True)
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    # ---- the loop
    data = iter(loader)
    log = T.JsonlLog(run_dir / "log.jsonl")
    window, n_window, busy = 0.0, 0, 0.0
    steps = range(start, args.steps)
    if not args.no_progress:
        from tqdm import tqdm

        steps = tqdm(steps, initial=start, total=args.steps, desc="controlnet", dynamic_ncols=True, file=sys.stderr)
    try:
        for step in steps:
            t0 = time.perf_counter()
            lr = T.warmup_lr(step, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = next(data)
            with torch.no_grad():
                if "latent" in batch:  # pre-extracted latents: decode for the edges
                    x0 = batch["latent"].to(device)
                    images = codec.decode(x0).clamp(-1, 1)
                else:
                    images = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
                    x0 = codec.encode(images, generator=gen)  # (B, C, h, w)
                control = canny_control(images, canny)  # (B, 1, H, W) in {0, 1}
                text = encoder(batch["caption"])
            B = x0.shape[0]
            t = torch.randint(0, schedule.T, (B,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            x_t = q_sample(x0, t, noise, schedule)
            res = net(x_t, t, text.hidden, text.valid, text.pooled_index, control)
            eps, _ = unet(x_t, t, text.hidden, text.valid, text.pooled_index, control_residuals=res)
            w = denoise_weights(schedule, t, tc.loss_weight, tc.loss_weight_max)  # (B,) float64
            loss = (loss_eps(eps.float(), noise.float(), reduction="none") * w.float()).mean()  # (B,) -> scalar
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                return fail(f"the loss is not finite at step {step + 1} ({value}); nothing was written after it: try a "
                            f"lower --lr", EXIT_DIVERGED)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            window += value
            n_window += 1
            busy += time.perf_counter() - t0
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                with torch.no_grad():
                    join = math.sqrt(sum(float(p.double().pow(2).sum()) for p in net.join_parameters()))
                record = {"step": done, "loss": window / n_window, "lr": lr, "sec_per_step": round(busy / n_window, 4),
                          "join_norm": join}
                log.write(record)
                msg = f"step {done}/{args.steps}  loss {record['loss']:.4f}  |Z| {join:.3e}  {busy / n_window:.2f} s/step"
                if args.no_progress:
                    print(msg, flush=True)
                else:
                    steps.set_postfix_str(f"loss {record['loss']:.4f} |Z| {join:.2e}")
                window, n_window, busy = 0.0, 0, 0.0
            if done % args.save_every == 0 or done == args.steps:
                save_checkpoint(run_dir, done, net, opt, gen, base, args.keep)
    finally:
        log.close()
        if not args.no_progress:
            steps.close()

    if any(not torch.equal(v, before[k]) for k, v in unet.state_dict().items()):
        return fail("internal error: a U-Net weight changed while training the ControlNet (it must stay frozen)", 1)
    net.eval()
    path = save_controlnet(net, run_dir / "controlnet.safetensors", base=base,
                           extra={"train": {k: v for k, v in settings.items() if k != "base_checkpoint"}, "run": str(run_dir)})
    print(f"saved {path} (+ {path.with_suffix('.json').name})", flush=True)
    late = []
    try:
        T.plot_loss_curve(T.read_log(run_dir / "log.jsonl"), run_dir / "loss.png")
    except Exception as e:  # cosmetic
        late.append(f"loss curve not drawn ({type(e).__name__}: {e})")
    if not args.no_samples:
        try:
            sample_grid(unet, net, cfg, encoder, codec, schedule, image_size, run_dir / "samples" / "final.png")
        except Exception as e:  # cosmetic: the ControlNet is written
            late.append(f"sample grid not drawn ({type(e).__name__}: {e})")
    for m in late:
        print(f"warning: {m}", file=sys.stderr, flush=True)
    print(f"done: {args.steps} steps; run folder {run_dir}", flush=True)
    return 0


@torch.no_grad()
def sample_grid(unet, net, cfg, encoder, codec, schedule, image_size: int, path: Path, n: int = 8) -> None:
    """Held-out synthetic scenes (the evaluation set's seed): row 1 their Canny edges, row 2 the ControlNet's images."""
    from raphael_ref.controlnet import ControlledUNet
    from raphael_ref.data.synthetic import render
    from raphael_ref.evaluation.prompts import evaluation_prompts
    from raphael_ref.sampling import sample

    specs = evaluation_prompts(["single_object", "position"], n_per_category=n // 2, image_size=image_size)
    specs = [s for cat in specs.values() for s in cat][:n]
    images = torch.stack([render(s.scene) for s in specs]).float() / 127.5 - 1.0  # (n, 3, S, S) uint8 -> [-1, 1]
    control = canny_control(images, net.canny)
    c, u = encoder([s.prompt for s in specs]), encoder([""])
    sc = cfg.sample
    model = ControlledUNet(unet, net, control.to(next(unet.parameters()).device))
    h = image_size // codec.downsample_factor
    x, _ = sample(model, schedule, (c.hidden, c.valid, c.pooled_index), (u.hidden, u.valid, u.pooled_index),
                  shape=(len(specs), cfg.model.in_channels, h, h), steps=sc.steps, guidance=sc.guidance,
                  generator=torch.Generator().manual_seed(sc.seed), set_alpha_to_one=sc.set_alpha_to_one)
    out = codec.decode(x.float()).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "prompts.txt").write_text("\n".join(s.prompt for s in specs) + "\n")
    T.save_image_grid(torch.cat([control.cpu().expand(-1, 3, -1, -1) * 2 - 1, out]), path, nrow=len(specs))


if __name__ == "__main__":
    sys.exit(main())
