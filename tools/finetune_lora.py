#!/usr/bin/env python
"""Fine-tune LoRA adapters on a trained RAPHAEL run (RAPHAEL Sec. 4.1 / App. 7.8; raphael_ref/lora.py).

    python tools/finetune_lora.py --base runs/toy --data my_concept/ --out runs/toy-lora --steps 400
    python tools/finetune_lora.py --base runs/toy --out runs/toy-lora-synth --steps 200     # synthetic scenes
    python tools/sample.py runs/toy --lora runs/toy-lora/adapter.safetensors --lora-scale 0.8 --prompt "..."

``--base``: a run folder of tools/train.py (its latest checkpoint) or a checkpoint folder; its EMA weights
(``--raw``: the raw ones) are the frozen base. ``--data``: a folder of images with same-stem ``.txt``
captions (``data.loader``; 28-32 images as in the paper), tar shards, or "synthetic" (default: the
synthetic renderer's scenes). Only the adapter's A and B train (AdamW, constant learning rate after a
linear warm-up); the loss is the base run's (``objective.training_losses``: L_denoise + L_edge with the
base's edge head and loss weighting). The base is checked frozen before the first step (only adapter
parameters require gradients and the optimizer holds nothing else) and unchanged after the last
(the fingerprint of every base tensor).

Run folder (``--out``; never another run's folder)::

    config.json          the base's config, train.* set to this fine-tune's values
    finetune.json        the command's settings and the base checkpoint (path, weights file, SHA-256)
    log.jsonl            {"step", "loss", "denoise", "edge", "lr", "sec_per_step", "lora_norm"} per log line
    loss.png             the loss curve (training.plot_loss_curve)
    adapter.safetensors  the adapter (EMA of A and B with --ema-decay > 0, else the last step's) + adapter.json
    adapter_raw.safetensors  the last step's adapter, only with --ema-decay > 0 (+ adapter_raw.json)
    samples/final.png    a sample grid of the base run's sample prompts (or --prompt), adapter at scale 1

Exit codes: 0 done; 2 a user error (``error: ...``, before any training); 3 a non-finite loss (nothing
written after it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raphael_ref import lora as L  # noqa: E402
from raphael_ref import training as T  # noqa: E402
from raphael_ref.checkpoint import load_model  # noqa: E402
from raphael_ref.data.loader import make_train_loader  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule  # noqa: E402
from raphael_ref.objective import training_losses  # noqa: E402

EXIT_USAGE, EXIT_DIVERGED = 2, 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the trained run (tools/train.py --out folder) or a checkpoint folder")
    p.add_argument("--raw", action="store_true", help="start from the raw weights (default: the EMA weights)")
    p.add_argument("--data", default="synthetic",
                   help="image folder with same-stem .txt captions, tar shards, or 'synthetic' (default)")
    p.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>-lora)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the adapter (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: r, i.e. scaling 1)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", default="attention",
                   help=f"one of {sorted(L.TARGET_SETS)} or a comma-separated list of {list(L.LAYER_NAMES)}")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the adapter weights (0, default: off; the saved adapter is the last step's)")
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="caption dropout for classifier-free guidance (default: the base run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--prompt", action="append", default=[], help="prompts of the final sample grid (repeatable)")
    p.add_argument("--no-samples", action="store_true", help="skip the final sample grid")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every non-adapter tensor of the model (names, shapes, bytes), in name order; the same with and
    without the adapter (peft's ``.base_layer`` in the wrapped layers' keys is left out)."""
    h = hashlib.sha256()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
             if ".lora_A." not in k and ".lora_B." not in k}
    for name in sorted(state):
        v = state[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _targets(arg: str):
    return arg if arg in L.TARGET_SETS or arg in ("experts",) else [s.strip() for s in arg.split(",") if s.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # ---- everything a user can get wrong, before the run folder exists
    try:
        for name, v, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1), ("--log-every", args.log_every, 1),
                            ("--warmup", args.warmup, 0)):
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}; got {v}")
        if not (args.lr > 0 and math.isfinite(args.lr)):
            raise ValueError(f"--lr must be a finite number > 0; got {args.lr}")
        if not 0.0 <= args.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must lie in [0, 1); got {args.ema_decay}")
        targets = _targets(args.targets)
        L.lora_config(args.rank, args.alpha, args.dropout, targets)  # rank < 1, unknown targets, experts: ValueError
        ckpt = T.resolve_checkpoint(args.base)
        weights = "model.safetensors" if args.raw or not (ckpt / "ema.safetensors").exists() else "ema.safetensors"
        model, cfg = load_model(ckpt, weights_name=weights, map_location=device)
        out = Path(args.out) if args.out else None
        if out is not None and any((out / n).exists() for n in ("log.jsonl", "adapter.safetensors", "config.json")):
            raise ValueError(f"{out} holds another run; --out never overwrites a run: choose another --out")
        edge_detector = T.build_edge_detector(cfg, device) if cfg.model.use_edge else None
        encoder = T.build_text_encoder(cfg, device)
        codec = T.build_codec(cfg, device)
        image_size = cfg.model.sample_size * codec.downsample_factor
        caption_dropout = cfg.train.caption_dropout if args.caption_dropout is None else args.caption_dropout
        loader = make_train_loader(args.data, image_size=image_size, batch_size=args.batch_size, seed=args.seed,
                                   caption_dropout=caption_dropout, min_aesthetic=None, max_pwatermark=None)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T, cfg.diffusion.zero_terminal_snr)
    tc = cfg.train

    # ---- the adapter; the base frozen
    torch.manual_seed(args.seed)
    model.requires_grad_(False)
    before = base_fingerprint(model)
    L.add_lora(model, r=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, seed=args.seed)
    L.check_base_frozen(model)
    params = L.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tc.adam_betas, weight_decay=args.weight_decay)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in params} and all(p.requires_grad for p in params), "optimizer must hold only the adapter"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if args.ema_decay > 0 else None

    # ---- run folder
    run_dir = T.make_run_dir(out, f"{cfg.name}-lora")
    cfg.train.steps, cfg.train.lr, cfg.train.batch_size, cfg.train.source = args.steps, args.lr, args.batch_size, args.data
    cfg.train.warmup_steps, cfg.train.seed, cfg.train.caption_dropout = args.warmup, args.seed, caption_dropout
    cfg.to_json(run_dir / "config.json")
    base = {"run": str(args.base), **L.base_weights_info(ckpt, weights)}
    counts = L.trainable_summary(model)
    settings = {"base": base, "rank": args.rank, "alpha": float(args.rank if args.alpha is None else args.alpha),
                "dropout": args.dropout, "targets": targets, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                "ema_decay": args.ema_decay, "data": args.data, "caption_dropout": caption_dropout, "seed": args.seed,
                "adapter_parameters": counts["adapter"], "base_parameters": counts["base"]}
    (run_dir / "finetune.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"run folder: {run_dir}", flush=True)
    print(f"base {ckpt}/{weights}: {counts['base']:,} frozen parameters; LoRA r={args.rank} on {targets}: "
          f"{counts['adapter']:,} trainable ({len(names)} tensors)", flush=True)

    # ---- the loop (tools/train.py's step, adapter only)
    gen = torch.Generator().manual_seed(args.seed)
    data = iter(loader)
    log = T.JsonlLog(run_dir / "log.jsonl")
    window, n_window, busy = torch.zeros(3, dtype=torch.float64), 0, 0.0
    model.train()
    try:
        for step in range(args.steps):
            t0 = time.perf_counter()
            lr = T.warmup_lr(step, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = next(data)
            with torch.no_grad():
                if "latent" in batch:  # pre-extracted latents (data.loader); images only for the edge maps
                    x0 = batch["latent"].to(device)  # (B, C, h, w)
                    images = codec.decode(x0).clamp(-1, 1) if edge_detector is not None else None
                else:
                    images = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
                    x0 = codec.encode(images, generator=gen)  # (B, C, h, w)
                text = encoder(batch["caption"])
                edges = edge_detector(images) if edge_detector is not None else None
            B = x0.shape[0]
            t = torch.randint(0, schedule.T, (B,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            out = training_losses(model, schedule, x0, t, noise, text.hidden, text.valid, text.pooled_index, edges,
                                  focal_alpha=tc.focal_alpha, focal_gamma=tc.focal_gamma, loss_weight=tc.loss_weight,
                                  loss_weight_max=tc.loss_weight_max)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            losses = torch.stack([out["total"].detach(), out["denoise"].detach(), out["edge"].detach()]).double().cpu()
            if not bool(torch.isfinite(losses).all()):
                return fail(f"the loss is not finite at step {step + 1} ({losses.tolist()}); nothing was written "
                            f"after it: try a lower --lr", EXIT_DIVERGED)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in ema:
                            ema[n].lerp_(p.detach(), 1.0 - args.ema_decay)
            window += losses
            n_window += 1
            busy += time.perf_counter() - t0
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                mean = (window / n_window).tolist()
                with torch.no_grad():
                    lora_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for n, p in model.named_parameters()
                                              if ".lora_B." in n))
                record = {"step": step + 1, "loss": mean[0], "denoise": mean[1], "edge": mean[2], "lr": lr,
                          "sec_per_step": round(busy / n_window, 4), "lora_B_norm": lora_norm}
                log.write(record)
                print(f"step {step + 1}/{args.steps}  loss {mean[0]:.4f}  denoise {mean[1]:.4f}  edge {mean[2]:.4f}  "
                      f"lr {lr:.2e}  |B| {lora_norm:.3e}  {busy / n_window:.2f} s/step", flush=True)
                window.zero_()
                n_window, busy = 0, 0.0
    finally:
        log.close()

    # ---- the base is untouched; save the adapter(s)
    if base_fingerprint(model) != before:
        return fail("internal error: a base weight changed during LoRA fine-tuning (only the adapter may train)", 1)
    model.eval()
    extra = {"finetune": {k: v for k, v in settings.items() if k != "base"}, "run": str(run_dir)}
    if ema is not None:
        L.save_lora(model, run_dir / "adapter_raw.safetensors", base=base, extra=extra)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ema:
                    p.copy_(ema[n])
    path = L.save_lora(model, run_dir / "adapter.safetensors", base=base, extra=extra)
    print(f"saved {path} (+ {L.adapter_json_path(path).name})", flush=True)
    late = []
    try:
        T.plot_loss_curve(T.read_log(run_dir / "log.jsonl"), run_dir / "loss.png")
    except Exception as e:  # cosmetic
        late.append(f"loss curve not drawn ({type(e).__name__}: {e})")
    if not args.no_samples:
        sc = cfg.sample
        prompts = args.prompt or list(sc.prompts)
        try:
            images, _ = T.generate_images(model, schedule, encoder, codec, prompts, sampler=sc.sampler, steps=sc.steps,
                                          guidance=sc.guidance, set_alpha_to_one=sc.set_alpha_to_one,
                                          generator=torch.Generator().manual_seed(sc.seed),
                                          size=(cfg.model.sample_size, cfg.model.sample_size))
            (run_dir / "samples").mkdir(exist_ok=True)
            (run_dir / "samples" / "prompts.txt").write_text("\n".join(prompts) + "\n")
            T.save_image_grid(images, run_dir / "samples" / "final.png")
        except Exception as e:  # cosmetic: the adapter is written
            late.append(f"sample grid not drawn ({type(e).__name__}: {e})")
    for m in late:
        print(f"warning: {m}", file=sys.stderr, flush=True)
    print(f"done: {args.steps} steps; run folder {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
