#!/usr/bin/env python
"""Sample images from a RAPHAEL checkpoint written by tools/train.py (classifier-free guidance, Sec. 2).

    python tools/sample.py runs/2025-toy --prompt "a red circle on the left" --out out/
    python tools/sample.py runs/x/checkpoints/step_0000400 --prompts-file prompts.txt --out out/ \\
        --sampler ddim --steps 25 --guidance 3 --seed 1 --batch-size 8 --save-paths --save-masks
    python tools/sample.py runs/2025-toy --prompt "a red circle" --out out/ --sampler dpmpp_2m --steps 10 \\
        --negative-prompt "a blue square"

A thin command line over ``raphael_ref.RaphaelPipeline`` (raphael_ref/pipeline.py). Samplers: the
project's ``ddim`` and ``ddpm``, and diffusers' ``dpmpp_2m``, ``unipc``, ``euler``, ``heun`` (raphael_ref/
schedulers.py; needs ``pip install "raphael_ref[samplers]"``).

Writes ``NNN_<prompt>.png`` per prompt, ``grid.png`` and ``prompts.txt``; with ``--save-paths`` the
diffusion paths (Sec. 3.1, Fig. 4/9) as ``NNN_<prompt>.paths.json`` plus a PNG (space expert per
text token and block; time expert per step and block); with ``--save-masks`` the space-MoE masks
Mhat_i of each text token (Sec. 3.1) at the last sampling step, averaged over the 16 blocks, laid
over the image (``NNN_<prompt>.masks.png``). EMA weights unless ``--raw``. On the CPU a seed and
batch size give the same bytes on every run (noise is drawn on the CPU from the seed).

User errors (a missing checkpoint or prompt file, --steps outside 1..T, --eta outside [0, 1] or with another
sampler than ddim, a negative or non-finite --guidance, an --out that takes no files, a VAE run or a diffusers
sampler without diffusers) are one ``error:`` line and exit code 2, found before the model is loaded. A prompt
longer than the text context warns once (errata E41).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from raphael_ref import training as T  # noqa: E402
from raphael_ref.config import RaphaelConfig  # noqa: E402
from raphael_ref.pipeline import SAMPLERS, RaphaelPipeline, check_sampler  # noqa: E402
from raphael_ref.text_encoder import PromptTruncatedWarning  # noqa: E402

# distinct colours for expert ids 0..11 (ids beyond wrap around)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 215, 0)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the run's sample.sampler; "
                   "ddim and ddpm are the project's own, the others diffusers' schedulers (raphael_ref/schedulers.py)")
    p.add_argument("--negative-prompt", default=None, help="the prompt guidance steers away from, for every prompt "
                   "(default: the empty prompt, the caption training drops)")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="LoRA adapter of tools/finetune_lora.py (adapter.safetensors, its .json beside it), merged")
    p.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength s: W + s (alpha / r) B A (default 1)")
    p.add_argument("--upscale", default=None, metavar="RUN",
                   help="an SR stage of tools/train_sr.py (run or checkpoint folder): base + SR in one call (the Imagen "
                        "cascade, raphael_ref/sr.py); writes the SR images and NNN_<prompt>.base.png")
    p.add_argument("--sr-steps", type=int, default=None, help="SR sampler steps (default: the SR run's sample.steps)")
    p.add_argument("--sr-guidance", type=float, default=None, help="SR guidance (default: the SR run's sample.guidance)")
    p.add_argument("--aug-level", type=int, default=None,
                   help="noise-augmentation level s of the low-res image, 0..T (default: the SR run's sr.aug_sample)")
    p.add_argument("--controlnet", default=None, metavar="FILE",
                   help="ControlNet of tools/train_controlnet.py (controlnet.safetensors, its .json beside it); needs --control")
    p.add_argument("--control", default=None, metavar="IMAGE",
                   help="control image for --controlnet, at the run's image size: Canny edges are taken of it (one for all prompts)")
    p.add_argument("--control-type", choices=("image", "edges"), default="image",
                   help="'image' (default): run Canny on --control; 'edges': --control already is an edge map (white = edge)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale s (default 1; 0: off)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps, 1..T (default: the run's sample.steps); "
                   "ddpm always runs all T steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (0: deterministic DDIM)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight >= 0 (default: the "
                   "run's sample.guidance; 1 = no guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--save-paths", action="store_true", help="write the diffusion paths (JSON + PNG)")
    p.add_argument("--save-masks", action="store_true", help="write per-token space-MoE mask overlays (PNG)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def token_strings(ids: torch.Tensor, encoder=None, positions: torch.Tensor | None = None) -> list[str]:
    """Token ids -> readable token strings (``<start_of_text>``, ``red``, ...): CLIP BPE, or with ``encoder``
    a T5 encoder's own tokenizer; for T5 + CLIP (E78) the ``positions`` before the CLIP block are T5's."""
    from raphael_ref.text_encoder import clip_tokenizer

    clip = clip_tokenizer()
    t5 = getattr(encoder, "t5", None) if encoder is not None and hasattr(encoder, "clip") else None
    t5 = encoder if t5 is None and type(encoder).__name__ == "T5TextEncoder" else t5
    n_t5 = (t5.n_y if t5 is not encoder else len(ids)) if t5 is not None else 0
    pos = range(len(ids)) if positions is None else [int(p) for p in positions]
    out = []
    for p in pos:
        i = int(ids[p])
        text = t5.tokenizer.convert_ids_to_tokens(i) if p < n_t5 else clip.decode([i])
        out.append(str(text).strip() or "_")
    return out


# ------------------------------------------------------------------------------ figures


def paths_figure(tokens: list[str], space: torch.Tensor, time_routes: torch.Tensor, timesteps: torch.Tensor,
                 n_space: int, n_time: int, same_every_step: bool):
    """PNG of one prompt's paths: space expert per (token, block), time expert per (step, block)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    K = space.shape[0]
    cell, label_w, gap, head = 14, 120, 40, 34
    S = time_routes.shape[0]
    w_left = label_w + K * cell
    W = w_left + gap + 44 + K * cell + 20
    H = head + max(len(tokens), S) * cell + 60
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    title = "space expert per text token and block" + (" (same at every step)" if same_every_step else " (first step)")
    d.text((4, 4), title, fill=(0, 0, 0), font=font)
    d.text((w_left + gap, 4), "time expert per step and block", fill=(0, 0, 0), font=font)
    d.text((label_w, 18), "block 0 .. %d" % (K - 1), fill=(90, 90, 90), font=font)
    for i, tok in enumerate(tokens):
        y = head + i * cell
        d.text((4, y + 1), tok[:18], fill=(0, 0, 0), font=font)
        for k in range(K):
            e = int(space[k, i])
            d.rectangle([label_w + k * cell, y, label_w + (k + 1) * cell - 2, y + cell - 2],
                        fill=PALETTE[e % len(PALETTE)] if e >= 0 else (230, 230, 230))
    x0 = w_left + gap
    for s in range(S):
        y = head + s * cell
        d.text((x0, y + 1), f"t={int(timesteps[s])}", fill=(0, 0, 0), font=font)
        for k in range(K):
            e = int(time_routes[s, k])
            d.rectangle([x0 + 44 + k * cell, y, x0 + 44 + (k + 1) * cell - 2, y + cell - 2],
                        fill=PALETTE[e % len(PALETTE)] if e >= 0 else (230, 230, 230))
    y = H - 40
    d.text((4, y), "expert:", fill=(0, 0, 0), font=font)
    for e in range(max(n_space, n_time)):
        d.rectangle([52 + e * 40, y, 52 + e * 40 + 12, y + 12], fill=PALETTE[e % len(PALETTE)])
        d.text((52 + e * 40 + 16, y), str(e), fill=(0, 0, 0), font=font)
    return img


def masks_figure(image: torch.Tensor, tokens: list[str], masks: list[torch.Tensor], tile: int = 96):
    """PNG: the image, then for each token the mean over blocks of its mask Mhat_i laid over the image in red.

    image (3, H, W) in [-1, 1]; masks: per block (n_x, n_y) bool of this sample (last sampling step).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    _, H, W = image.shape
    cover = torch.zeros(len(tokens), H, W)  # (n_tokens, H, W): fraction of blocks whose mask covers the pixel
    for m in masks:
        n_x = m.shape[0]
        h = int(round(math.sqrt(n_x * H / W)))
        w = n_x // h
        grid = m[:, : len(tokens)].T.reshape(len(tokens), 1, h, w).float()  # (n_tokens, 1, h, w)
        cover += F.interpolate(grid, size=(H, W), mode="nearest")[:, 0]
    cover /= len(masks)
    base = T.to_uint8(image[None])[0].float() / 255  # (H, W, 3) in [0, 1]
    gray = base.mean(-1, keepdim=True).expand(-1, -1, 3)  # (H, W, 3)
    red = torch.tensor([1.0, 0.0, 0.0])
    tiles = [("image", base)]
    for i, tok in enumerate(tokens):
        a = cover[i][..., None] * 0.7  # (H, W, 1)
        tiles.append((tok, gray * 0.6 * (1 - a) + red * a))
    label_h = 14
    img = Image.new("RGB", (len(tiles) * (tile + 4) + 4, tile + label_h + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, (name, pix) in enumerate(tiles):
        arr = (pix.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        x = 4 + j * (tile + 4)
        img.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (x, label_h + 4))
        d.text((x, 2), name[:16], fill=(0, 0, 0), font=font)
    return img


# ------------------------------------------------------------------------------ main


def check_sampling_numbers(steps: int, eta: float, guidance: float, T_: int) -> None:
    """ValueError naming the flag when --steps is not in [1, T], --eta not in [0, 1] or --guidance not finite >= 0."""
    if not 1 <= steps <= T_:
        raise ValueError(f"--steps must lie in [1, T = {T_}] (one model call per distinct timestep), got {steps}")
    if not 0.0 <= eta <= 1.0:  # NaN fails too
        raise ValueError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if not (math.isfinite(guidance) and guidance >= 0.0):
        raise ValueError(f"--guidance must be a finite number >= 0 (1 = no guidance), got {guidance}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # user errors: an `error:` line and exit code 2, before anything long runs
        prompts = read_prompts(args)
        ckpt = T.resolve_checkpoint(args.checkpoint)
        weights = "model.safetensors" if args.raw else "ema.safetensors"
        if not (ckpt / weights).exists():
            raise ValueError(f"{ckpt} has no {weights}" + ("" if args.raw else "; pass --raw for the raw weights"))
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        cfg = RaphaelConfig.from_json(ckpt / "config.json")
        sc = cfg.sample
        sampler = args.sampler or sc.sampler
        steps = sc.steps if args.steps is None else args.steps  # --steps 0 is an error, not "the default"
        guidance = sc.guidance if args.guidance is None else args.guidance
        check_sampling_numbers(steps, args.eta, guidance, cfg.diffusion.T)
        check_sampler(sampler, args.eta)  # eta with another sampler than ddim; diffusers missing
        out = T.writable_dir(args.out)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # a missing diffusers or VAE folder, missing text-tower weights or a damaged file (CheckpointError,
        # a ValueError) are reported here
        pipe = RaphaelPipeline.from_pretrained(ckpt, weights="raw" if args.raw else "ema", device=device)
        if args.lora is not None:  # a LoRA adapter of tools/finetune_lora.py, merged (issue 12)
            if not math.isfinite(args.lora_scale):
                raise ValueError(f"--lora-scale must be finite, got {args.lora_scale}")
            pipe.load_lora(args.lora, args.lora_scale, base_checkpoint=ckpt)
        if args.upscale is not None:  # the cascade's SR stage (raphael_ref/sr.py, E80): wrong sizes are named here
            from raphael_ref.sr import SRStage

            stage = SRStage.from_run(args.upscale, weights="raw" if args.raw else "ema", device=device)
            if args.sr_steps is not None or args.sr_guidance is not None:
                check_sampling_numbers(stage.config.sample.steps if args.sr_steps is None else args.sr_steps, 0.0,
                                       stage.config.sample.guidance if args.sr_guidance is None else args.sr_guidance,
                                       stage.schedule.T)
            if args.aug_level is not None and not 0 <= args.aug_level <= stage.schedule.T:
                raise ValueError(f"--aug-level must lie in [0, T = {stage.schedule.T}], got {args.aug_level}")
            pipe.attach_sr(stage, steps=args.sr_steps, guidance=args.sr_guidance, aug_level=args.aug_level)
        control = None
        if args.controlnet is not None or args.control is not None:  # a Canny ControlNet (issue 12, E79)
            if args.controlnet is None or args.control is None:
                raise ValueError("--controlnet FILE and --control IMAGE go together (the ControlNet and its control image)")
            if not math.isfinite(args.control_scale):
                raise ValueError(f"--control-scale must be finite, got {args.control_scale}")
            from raphael_ref.controlnet import read_control_image

            pipe.load_controlnet(args.controlnet, args.control_scale)
            control = pipe.control_map(read_control_image(args.control, args.control_type, pipe.controlnet.canny), 1)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    T_ = pipe.schedule.T
    all_ids = pipe.text_encoder.tokenize(prompts)  # (N, n_y); warns once per prompt longer than the context (E41)
    n_steps = T_ if sampler == "ddpm" else steps
    print(f"{ckpt} ({'raw' if args.raw else 'EMA'} weights), {sampler} {n_steps} steps, guidance {guidance}, "
          f"seed {args.seed}, {len(prompts)} prompt(s) -> {out}", flush=True)

    generator = torch.Generator().manual_seed(args.seed)  # one stream, batches drawn in order
    all_images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        with warnings.catch_warnings():  # already warned above, with the prompt's index in the whole list
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            result = pipe(batch, args.negative_prompt, num_inference_steps=None if sampler == "ddpm" else steps,
                          guidance_scale=guidance, sampler=sampler, eta=args.eta, generator=generator,
                          return_paths=args.save_paths or args.save_masks, return_masks=args.save_masks,
                          output_type="pt", control_image=control)
        images, paths = result.images, result.paths  # (b, 3, H, W) in [-1, 1]
        all_images.append(images)
        ids = all_ids[start:start + args.batch_size]  # (b, n_y)
        for j, prompt in enumerate(batch):
            stem = f"{start + j:03d}_{slug(prompt)}"
            T.save_image_grid(images[j:j + 1], out / f"{stem}.png", nrow=1, min_tile=1, pad=0)
            if result.lowres is not None:  # --upscale: the base image the SR stage was conditioned on
                T.save_image_grid(result.lowres[j:j + 1], out / f"{stem}.base.png", nrow=1, min_tile=1, pad=0)
            if paths is None:
                continue
            pos = paths.valid[j].nonzero().flatten()  # the valid tokens (for T5 + CLIP two runs of positions, E78)
            tokens = token_strings(ids[j], pipe.text_encoder, pos)
            space = paths.space_routes[:, :, j, pos]  # (S, K, n_valid)
            time_r = paths.time_routes[:, :, j]  # (S, K)
            same = bool((space == space[:1]).all())
            if args.save_paths:
                record = {"prompt": prompt, "tokens": tokens, "timesteps": paths.timesteps.tolist(),
                          "space_routes": space.tolist(), "time_routes": time_r.tolist(),
                          "space_routes_same_every_step": same, "sampler": sampler, "guidance": guidance,
                          "seed": args.seed, "weights": "raw" if args.raw else "ema"}
                if args.negative_prompt is not None:
                    record["negative_prompt"] = args.negative_prompt
                if args.lora is not None:
                    record["lora"], record["lora_scale"] = args.lora, args.lora_scale
                if args.controlnet is not None:
                    record["controlnet"], record["control"], record["control_scale"] = (args.controlnet, args.control,
                                                                                       args.control_scale)
                (out / f"{stem}.paths.json").write_text(json.dumps(record) + "\n")
                paths_figure(tokens, space[0], time_r, paths.timesteps, cfg.model.n_space_experts,
                             cfg.model.n_time_experts, same).save(out / f"{stem}.paths.png", format="PNG")
            if args.save_masks:
                last = [m[j] for m in result.masks]  # per block (n_x, n_y) bool at the last model call
                masks_figure(images[j], tokens, last).save(out / f"{stem}.masks.png", format="PNG")
        print(f"  {min(start + args.batch_size, len(prompts))}/{len(prompts)}", flush=True)
    T.save_image_grid(torch.cat(all_images), out / "grid.png", nrow=min(8, len(prompts)))
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {len(prompts)} image(s) and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
