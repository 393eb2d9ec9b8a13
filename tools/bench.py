#!/usr/bin/env python
"""Speed benchmarks of raphael_ref (speed and memory goals live here, never in timed tests).

    python tools/bench.py space-moe                      # literal vs fast space-MoE, paper sizes, CPU
    python tools/bench.py space-moe --positions 256 --repeats 5 --threads 2 --out bench_out/smoe.json
    python tools/bench.py block                          # MoE block vs dense block, CPU float32
    python tools/bench.py block --device cuda            # bf16, 64x64 latents, width 1280, 40 valid tokens
    python tools/bench.py params --preset paper          # parameter count per component
    python tools/bench.py gpu --out docs/results/bench_gpu.json  # the GPU suite (one H100/H200, < 8 min)
    python tools/bench.py gpu --device cpu --tiny --no-compile   # the same code at tiny sizes (tests/test_bench.py)

``gpu`` measures, in one process, each figure with the device name, torch version and dtype: (a) the
training step of the ``small`` and ``paper`` presets (bf16 autocast, activation checkpointing, the largest
power-of-two batch that fits, peak memory, tokens/s, MFU against the datasheet and against a bf16 matrix
product measured in the same run); the toy default run's step; (b) the forward of the MoE U-Net against
the same U-Net with dense FFNs of equal width (Fig. 6c: the paper's +24%); (c) 50-step DDIM + CFG at
64x64 latents against diffusers' UNet2DConditionModel in the Stable Diffusion 1.5 layout (random weights,
one sampler loop, the same SDPA backends); (d) compiled against eager for (a) and (c). Sections past
``--budget-s`` are recorded as skipped and a failing section as its error; the JSON is rewritten after
every section, so a run cut short keeps what it measured.

Timing subcommands report the median of --repeats calls after --warmup untimed calls
(space-moe: CPU float32 under torch.no_grad(); block: CPU float32 or CUDA bf16). It prints a small table, and with --out writes a JSON record (sizes,
times, ratios, errors, torch version, threads).

Adding a subcommand: write ``add_<name>_args(parser)`` and ``run_<name>(args) -> dict`` and add
one ``Command`` to ``COMMANDS``; the shared options (--repeats, --warmup, --threads, --seed,
--out) and the JSON metadata come for free.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


# ---------------------------------------------------------------------------------------------
# shared helpers


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (a scale-free error for whole tensors)."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------
# space-moe: literal (loop over the n_y tokens) vs regrouped fast forms (dense, gather)

SMOE_REL_TOL = 1e-6  # float32: the fast forms regroup a sum of n_y terms; ~ sqrt(n_y) u = 5e-7 at n_y = 77


def add_space_moe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-y", type=int, default=77, help="text tokens n_y (Table 2: 77)")
    p.add_argument("--experts", type=int, default=6, help="space experts k (Table 2: 6)")
    p.add_argument("--positions", type=int, default=1024, help="image tokens n_x (1024 = a 32x32 latent)")
    p.add_argument("--dim", type=int, default=256, help="token width d")
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden width (4 d)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--alpha", type=float, default=0.2, help="mask threshold alpha (Table 2: 0.2)")


def space_moe_inputs(args: argparse.Namespace, gen: torch.Generator):
    """Realistic inputs: M = softmax over n_y of N(0, 1) logits, Mhat_i = M_{*,i} >= alpha max_j M_{j,i}."""
    from raphael_ref.experts import ExpertBank

    B, n_x, n_y, d = args.batch, args.positions, args.n_y, args.dim
    h = torch.randn(B, n_x, d, generator=gen)  # (B, n_x, d)
    M = torch.randn(B, n_x, n_y, generator=gen).softmax(dim=-1)  # (B, n_x, n_y)  rows sum to 1 over text tokens
    masks = M >= args.alpha * M.amax(dim=1, keepdim=True)  # (B, n_x, n_y)  eta_i = alpha max_j M_{j,i}
    routes = torch.randint(0, args.experts, (B, n_y), generator=gen)  # (B, n_y)  uniform over experts
    weights = torch.ones(B, n_y)  # (B, n_y)  forward value of the default straight-through gate
    bank = ExpertBank(args.experts, d, args.hidden, generator=gen)
    return h, masks, routes, weights, bank


def run_space_moe(args: argparse.Namespace) -> dict:
    from raphael_ref.space_moe import space_moe, space_moe_literal

    gen = torch.Generator().manual_seed(args.seed)
    h, masks, routes, weights, bank = space_moe_inputs(args, gen)
    forms = {
        "literal": lambda: space_moe_literal(h, masks, routes, weights, bank),
        "dense": lambda: space_moe(h, masks, routes, weights, bank, impl="dense"),
        "gather": lambda: space_moe(h, masks, routes, weights, bank, impl="gather"),
    }
    with torch.no_grad():
        outs = {name: fn() for name, fn in forms.items()}
        errors = {name: max_rel_error(out, outs["literal"]) for name, out in outs.items() if name != "literal"}
        # Where the float32 differences come from: each form against the literal form in float64.
        ref64 = space_moe_literal(h.double(), masks, routes, weights.double(), copy.deepcopy(bank).double())
        errors64 = {name: max_rel_error(out, ref64) for name, out in outs.items()}
        times = {name: median_seconds(fn, args.repeats, args.warmup) for name, fn in forms.items()}
    ratios = {name: times["literal"] / times[name] for name in errors}
    covered = (masks.float() @ torch.nn.functional.one_hot(routes, args.experts).float()).gt(0)  # (B, n_x, k)

    print(f"space-MoE  B={args.batch} n_x={args.positions} n_y={args.n_y} k={args.experts} d={args.dim} "
          f"hidden={args.hidden}  float32 CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"mask density {masks.float().mean().item():.3f}; expert-position pairs run by gather: "
          f"{covered.float().mean().item():.3f} of n_x k")
    print_table([(n, f"{times[n] * 1e3:.1f}", "1.0" if n == "literal" else f"{ratios[n]:.1f}",
                  "-" if n == "literal" else f"{errors[n]:.2e}", f"{errors64[n]:.2e}") for n in forms],
                ("form", "ms", "speed-up", "rel err vs literal", "rel err vs float64"))
    ok = all(e <= SMOE_REL_TOL for e in errors.values())
    print(f"fast == literal within {SMOE_REL_TOL:g} relative: {'yes' if ok else 'NO'}")
    return {
        "sizes": {"batch": args.batch, "positions": args.positions, "n_y": args.n_y, "experts": args.experts,
                  "dim": args.dim, "hidden": args.hidden, "alpha": args.alpha},
        "dtype": "float32", "device": "cpu",
        "mask_density": masks.float().mean().item(),
        "gather_fraction": covered.float().mean().item(),
        "times_s": times, "speedup_vs_literal": ratios,
        "max_rel_error": errors, "max_rel_error_vs_float64_literal": errors64, "rel_tol": SMOE_REL_TOL, "equal_within_tol": ok,
    }


# ---------------------------------------------------------------------------------------------
# block: one transformer block with MoE (k space + n_t time experts) vs the same block with dense FFNs


def add_block_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 autocast on CUDA)")
    p.add_argument("--latent", type=int, default=None, help="latent side (image tokens = side^2); default 16 CPU, 64 CUDA")
    p.add_argument("--width", type=int, default=None, help="block width; default 320 CPU, 1280 CUDA (the paper preset's deepest width)")
    p.add_argument("--batch", type=int, default=None, help="batch size; default 1 CPU, 2 CUDA")
    p.add_argument("--valid-tokens", type=int, default=40, help="valid text tokens of the 77 (Fig. 6c uses 40)")
    p.add_argument("--expert-mult", type=int, default=None, help="expert hidden width / width (default: the paper preset's)")
    p.add_argument("--impl", default="dense", choices=["dense", "gather"], help="space-MoE fast form")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")


def run_block(args: argparse.Namespace) -> dict:
    import contextlib

    from raphael_ref.config import get_preset
    from raphael_ref.models import TransformerBlock

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    latent = args.latent or (64 if cuda else 16)
    width = args.width or (1280 if cuda else 320)
    B = args.batch or (2 if cuda else 1)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    paper = get_preset("paper").model
    mult = args.expert_mult or paper.expert_mult
    gen = torch.Generator().manual_seed(args.seed)
    n_y, d_y, d_t = paper.n_y, paper.d_y, 4 * paper.model_channels
    y = torch.randn(B, n_y, d_y, generator=gen).to(args.device)
    valid = (torch.arange(n_y)[None] < args.valid_tokens).expand(B, n_y).to(args.device)
    pooled = torch.full((B,), args.valid_tokens - 1, dtype=torch.long, device=args.device)
    temb = torch.randn(B, d_t, generator=gen).to(args.device)
    x = torch.randn(B, latent * latent, width, generator=gen).to(args.device)
    blocks = {}
    for name, moe in (("moe", True), ("dense", False)):
        cfg = get_preset("paper", {"model.use_space_moe": moe, "model.use_time_moe": moe, "model.expert_mult": mult,
                                   "model.moe_impl": args.impl}).model
        torch.manual_seed(args.seed)
        blocks[name] = TransformerBlock(width, d_y, d_t, cfg).to(args.device).eval()
    amp = (torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
           if dtype == "bfloat16" else contextlib.nullcontext())

    def call(block):
        def fn():
            with amp:
                if args.backward:
                    xx = x.detach().requires_grad_(True)
                    out, _ = block(xx, (latent, latent), y, valid, pooled, temb)
                    out.float().sum().backward()
                else:
                    with torch.no_grad():
                        block(x, (latent, latent), y, valid, pooled, temb)
            if cuda:
                torch.cuda.synchronize()
        return fn

    times = {name: median_seconds(call(b), args.repeats, args.warmup) for name, b in blocks.items()}
    ratio = times["moe"] / times["dense"]
    params = {name: sum(p.numel() for p in b.parameters()) for name, b in blocks.items()}
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"transformer block  B={B} tokens={latent}x{latent} width={width} expert hidden={mult}x "
          f"valid text tokens={args.valid_tokens}/{n_y}  {dtype} on {device_name}, "
          f"{'fwd+bwd' if args.backward else 'forward'}, median of {args.repeats}")
    print_table([(n, f"{times[n] * 1e3:.1f}", f"{params[n] / 1e6:.1f}M") for n in blocks], ("block", "ms", "params"))
    print(f"MoE block / dense block time ratio: {ratio:.2f}  (6 space + 4 time experts vs one dense FFN each)")
    return {
        "sizes": {"batch": B, "latent": latent, "width": width, "expert_mult": mult, "valid_tokens": args.valid_tokens,
                  "n_y": n_y, "d_y": d_y, "space_experts": paper.n_space_experts, "time_experts": paper.n_time_experts},
        "dtype": dtype, "device": args.device, "device_name": device_name, "impl": args.impl,
        "mode": "fwd+bwd" if args.backward else "forward",
        "times_s": times, "moe_over_dense": ratio, "params": params,
    }


# ---------------------------------------------------------------------------------------------
# params: parameter count per component of a preset (built on the meta device: no memory)


def add_params_args(p: argparse.ArgumentParser) -> None:
    from raphael_ref.config import PRESETS

    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--no-text", action="store_true", help="skip counting the text tower")


def run_params(args: argparse.Namespace) -> dict:
    from raphael_ref.config import get_preset
    from raphael_ref.models import build_on_meta, count_parameters, format_count

    cfg = get_preset(args.preset)
    counts = count_parameters(build_on_meta(cfg.model))
    text = None
    if not args.no_text:
        from raphael_ref.text_encoder import TextEncoder

        text = TextEncoder.from_config(cfg.model.text_encoder, device="meta").num_parameters()
    rows = [(k, f"{v:,}", format_count(v), f"{100 * v / counts['total']:.1f}%") for k, v in counts.items()]
    print(f"preset {cfg.name}: U-Net parameters per component (meta device)")
    print_table(rows, ("component", "parameters", "", "share"))
    if text is not None:
        print(f"text tower {cfg.model.text_encoder} (frozen, not in the U-Net total): {text:,} ({format_count(text)})")
    return {"preset": cfg.name, "unet": counts, "text_tower": text}


# ---------------------------------------------------------------------------------------------
# train-step: one full training step (forward, L_denoise + L_edge, backward, AdamW) of toy variants

# name -> overrides of the toy preset: the choices measured when sizing the 10-minute toy (E68).
_S2D = {"model.codec": "space_to_depth", "model.codec_factor": 3, "model.in_channels": 27, "model.sample_size": 8}
TRAIN_STEP_VARIANTS: dict[str, dict] = {
    "toy: 24px pixels, dense, b16": {},
    # the previous toy's attention (E72): no position embedding, all 77 slots attended and counted
    "toy, padding attended, no pos-embed": {"model.pos_embed": "none", "model.attend_padding": True,
                                            "model.count_padding": True},
    "24px pixels, gather, b16": {"model.moe_impl": "gather"},
    # the token-attention loss on the position words (E82; an option, off in the preset)
    "toy + token loss (position words)": {"train.token_loss": 0.02, "train.token_words": ["position"]},
    # what tools/train.py does when the padding is neither attended nor counted: the step keeps the batch's
    # caption slots only (TextEncoding.trimmed), here the 10 valid ones of the 77
    "toy, text cut to its 10 valid slots": {"bench.text_slots": 10},
    # smaller batches at the default's text cut: what a step of 8 or 12 costs against 16 (more steps in 10 minutes)
    "toy, text cut, b12": {"bench.text_slots": 10, "train.batch_size": 12},
    "toy, text cut, b8": {"bench.text_slots": 10, "train.batch_size": 8},
    "24px pixels, dense, b32": {"train.batch_size": 32},
    "24px s2d f3 (8x8x27), width 32, gather, b32": {**_S2D, "model.moe_impl": "gather", "train.batch_size": 32},
    "24px s2d f3 (8x8x27), width 64, gather, b32": {**_S2D, "model.moe_impl": "gather", "train.batch_size": 32,
                                                    "model.model_channels": 64, "model.norm_groups": 16},
}


def add_train_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                   help=f"subset of the variants (default: all): {list(TRAIN_STEP_VARIANTS)}")
    p.add_argument("--clock", choices=["process", "wall"], default="process",
                   help="process CPU time (default: robust to other load on the machine) or wall time")


def run_train_step(args: argparse.Namespace) -> dict:
    from raphael_ref.config import get_preset
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.data.synthetic import SyntheticShapes
    from raphael_ref.models import build_unet
    from raphael_ref.objective import training_losses
    from raphael_ref.token_attention import TokenTargets, token_targets

    names = args.variants or list(TRAIN_STEP_VARIANTS)
    unknown = [n for n in names if n not in TRAIN_STEP_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(TRAIN_STEP_VARIANTS)}")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    rows, times = [], {}
    for name in names:
        overrides = dict(TRAIN_STEP_VARIANTS[name])
        slots = overrides.pop("bench.text_slots", None)  # not a config field: the text slots the step keeps
        cfg = get_preset("toy", overrides)
        m = cfg.model
        f = m.codec_factor if m.codec == "space_to_depth" else 1
        B, S, C = cfg.train.batch_size, m.sample_size, m.in_channels
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        model = build_unet(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as tools/train.py on the CPU
        sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
        x0 = torch.randn(B, C, S, S, generator=gen)
        n_y = slots or m.n_y
        y = torch.randn(B, n_y, m.d_y, generator=gen)
        valid = (torch.arange(n_y)[None] < 10).expand(B, n_y)
        pooled = torch.full((B,), 9)
        edge = torch.rand(B, 1, S * f, S * f, generator=gen)
        targets = None
        if cfg.train.token_loss > 0:  # the pairs of B synthetic captions (those of the 10 valid slots), built once
            ds = SyntheticShapes(seed=args.seed, image_size=S * f)
            scenes = [ds.scene(i) for i in range(B)]
            tt = token_targets(scenes, [sc.caption for sc in scenes], n_y, cfg.train.token_words)
            keep = tt.token < 10
            targets = TokenTargets(tt.sample[keep], tt.token[keep], tt.mask[keep])

        def step():
            t = torch.randint(0, cfg.diffusion.T, (B,), generator=gen)
            out = training_losses(model, sched, x0, t, torch.randn(x0.shape, generator=gen), y, valid, pooled, edge,
                                  token_loss=cfg.train.token_loss, token_targets=targets)
            opt.zero_grad(set_to_none=True)
            out["total"].mean().backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        ts = []
        for _ in range(args.repeats):
            t0 = clock()
            step()
            ts.append(clock() - t0)
        sec = statistics.median(ts)
        times[name] = {"s_per_step": sec, "images_per_s": B / sec, "batch": B}
        rows.append((name, f"{sec:.3f}", f"{B / sec:.1f}"))
    base = times[names[0]]["images_per_s"]
    rows = [(*r, f"{times[n]['images_per_s'] / base:.2f}") for r, n in zip(rows, names)]
    print(f"toy training step, {args.clock} time, median of {args.repeats}, {torch.get_num_threads()} thread(s)")
    print_table(rows, ("variant", "s/step", "images/s", f"images/s vs {names[0]!r}"))
    return {"clock": args.clock, "variants": {n: TRAIN_STEP_VARIANTS[n] for n in names}, "times": times}


# ---------------------------------------------------------------------------------------------
# gpu: the one-command GPU suite (issue 11, item 6). Every section runs in this one process, is wrapped
# so that a failure is recorded (not fatal), and the JSON is rewritten after each section, so a run cut
# short by a time limit still leaves every figure measured until then.

# Dense bf16 tensor-core peak of the datasheets (no sparsity), FLOP/s: the denominator of MFU. The suite
# also measures a large bf16 matrix product in the same process and reports MFU against that ceiling.
DATASHEET_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

# Stable Diffusion 1.5's UNet2DConditionModel layout (its published config): 860M parameters at 64x64
# latents, CLIP ViT-L/14 context (77 x 768), 8 heads per attention layer. Built with random weights.
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# --tiny: the same code paths at sizes a CPU runs in seconds (tests/test_bench.py)
TINY_RAPHAEL = {"model.sample_size": 8, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
                "model.d_y": 32, "model.expert_mult": 2, "model.edge_width": 4}
TINY_SD_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 4,
}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
VALID_TOKENS = 20  # real caption tokens of the random context (of n_y = 77); the rest is padding


DEFAULT_MAX_BATCH = {"small": 512, "paper": 64}  # (a) batch caps of the training step per preset


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (the suite) or cpu (with --tiny: a check that it runs)")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU test); figures meaningless")
    p.add_argument("--train-presets", nargs="*", default=["small", "paper"], help="(a) presets of the training step")
    p.add_argument("--max-batch", type=int, nargs="*", default=None,
                   help="(a) largest batch tried per train preset (doubling from 1 until out of memory or this); one "
                        f"cap or one per --train-presets entry (default: {DEFAULT_MAX_BATCH}, else 512)")
    p.add_argument("--infer-preset", default="paper", help="(b) preset of the MoE vs dense-FFN forward")
    p.add_argument("--infer-batch", type=int, default=4, help="(b) batch of the forward (2 prompts with CFG)")
    p.add_argument("--sample-preset", default="paper", help="(c) RAPHAEL preset of the sampling comparison")
    p.add_argument("--sample-batch", type=int, default=4, help="(c) images per sampling call (2x in the CFG batch)")
    p.add_argument("--sample-steps", type=int, default=50, help="(c) DDIM steps")
    p.add_argument("--latent", type=int, default=None, help="(b, c) latent side (default 64; --tiny: 8)")
    p.add_argument("--sdpa", default=None,
                   help="comma list of SDPA backends both models may use, in {%s} (default: flash,efficient on CUDA, "
                        "every backend on CPU)" % ",".join(SDPA_BACKENDS))
    p.add_argument("--compile-train-presets", nargs="*", default=["small", "paper"],
                   help="(d) presets whose training step is also timed compiled (torch.compile of the U-Net)")
    p.add_argument("--no-compile", action="store_true", help="skip (d): compiled vs eager")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget: a section that starts after it is skipped (recorded as skipped)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def _sdpa_context(spec: str | None, device: torch.device):
    """(factory of a context that restricts scaled_dot_product_attention to the named backends, the names):
    both models of a comparison run under the same one."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = spec.split(",") if spec else (["flash", "efficient"] if device.type == "cuda" else list(SDPA_BACKENDS))
    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    bad = [n for n in names if n not in table]
    if bad:
        raise SystemExit(f"--sdpa: unknown backends {bad}; choose from {list(SDPA_BACKENDS)}")
    if set(names) == set(SDPA_BACKENDS):
        return contextlib.nullcontext, names
    return (lambda: sdpa_kernel([table[n] for n in names])), names


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _model_cfg(args, preset: str, overrides: dict | None = None):
    from raphael_ref.config import get_preset

    over = {**(TINY_RAPHAEL if args.tiny else {}), **(overrides or {})}
    return get_preset("toy" if args.tiny else preset, over).model


def _build_unet(m, device: torch.device):
    from raphael_ref.models import RaphaelUNet

    with torch.device(device):  # built in place: no 12 GB float32 copy of the paper preset on the host
        return RaphaelUNet(m)  # a "v" U-Net (E88) holds the default schedule: its cost does not depend on it


def _cond(m, B: int, device: torch.device, gen: torch.Generator):
    """Random text context (B, n_y, d_y) with VALID_TOKENS real tokens; pooled index = the last real one."""
    n_valid = min(VALID_TOKENS, m.n_y)
    y = torch.randn(B, m.n_y, m.d_y, generator=gen).to(device)
    valid = (torch.arange(m.n_y)[None] < n_valid).expand(B, m.n_y).contiguous().to(device)
    pooled = torch.full((B,), n_valid - 1, dtype=torch.long, device=device)
    return y, valid, pooled


def _set_moe_impl(model, impl: str) -> None:
    for mod in model.modules():
        c = getattr(mod, "cfg", None)
        if c is not None and hasattr(c, "moe_impl"):
            c.moe_impl = impl


def _matmul_ceiling(device: torch.device, tiny: bool) -> dict:
    n = 256 if tiny else 8192
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
    b = torch.randn(n, n, generator=g).to(device, torch.bfloat16)

    def fn():
        a @ b
        _sync(device)

    sec = median_seconds(fn, 10, 3)
    return {"n": n, "dtype": "bfloat16", "seconds": sec, "flops_per_s": 2 * n**3 / sec}


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class _TrainBench:
    """One preset's training step: bf16 autocast forward + L_denoise + L_edge, backward, AdamW step."""

    def __init__(self, args, preset: str, device: torch.device, checkpoint: bool | None = True):
        from raphael_ref.config import get_preset
        from raphael_ref.diffusion import NoiseSchedule

        # checkpoint=True: Table 2's activation checkpointing; None: the preset's own setting
        self.m = _model_cfg(args, preset, None if checkpoint is None else {"model.checkpoint": checkpoint})
        d = get_preset("toy" if args.tiny else preset).diffusion
        self.device, self.seed = device, args.seed
        torch.manual_seed(args.seed)
        self.model = _build_unet(self.m, device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.sched = NoiseSchedule.make(d.schedule, d.T)
        self.sched_T = d.T
        self.batch = None

    def make_step(self, B: int):
        from raphael_ref.objective import training_losses

        m, dev = self.m, self.device
        gen = torch.Generator().manual_seed(self.seed)
        S = m.sample_size
        x0 = torch.randn(B, m.in_channels, S, S, generator=gen).to(dev)
        noise = torch.randn(B, m.in_channels, S, S, generator=gen).to(dev)
        t = torch.randint(0, self.sched_T, (B,), generator=gen).to(dev)
        y, valid, pooled = _cond(m, B, dev, gen)
        edge = torch.rand(B, 1, S, S, generator=gen).to(dev)
        model, opt, sched = self.model, self.opt, self.sched

        def step(optimizer: bool = True):
            with _autocast(dev):
                loss = training_losses(model, sched, x0, t, noise, y, valid, pooled, edge)["total"].mean()
            loss.backward()
            if optimizer:
                opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)

        return step

    def largest_batch(self, cap: int) -> tuple[int, list[int]]:
        """Doubling from 1: the largest batch whose step runs, and the batches that ran out of memory."""
        best, oom, B = None, [], 1
        while B <= cap:
            try:
                self.make_step(B)()
                best = B
            except Exception as err:  # noqa: BLE001 - only out-of-memory ends the search
                if not _is_oom(err):
                    raise
                oom.append(B)
            self.opt.zero_grad(set_to_none=True)  # outside the except: its traceback no longer holds the tensors
            _free(self.device)
            if oom:
                break
            B *= 2
        if best is None:
            raise RuntimeError(f"batch 1 of preset {self.m} does not fit in memory")
        return best, oom

    def flops_per_sample(self) -> int:
        """Model FLOPs of one sample's forward + backward (FlopCounterMode; without the recomputation of
        activation checkpointing, the usual convention of MFU)."""
        self.model.gradient_checkpointing = False
        try:
            return _count_flops(lambda: self.make_step(1)(optimizer=False))
        finally:
            self.model.gradient_checkpointing = self.m.checkpoint

    def time(self, B: int, repeats: int, warmup: int) -> dict:
        step = self.make_step(B)
        _peak_reset(self.device)
        sec = median_seconds(step, repeats, warmup)
        return {"batch": B, "s_per_step": sec, "peak_mem_gib": _peak_gib(self.device)}


def _train_record(tb: _TrainBench, timing: dict, flops_1: int, peaks: dict) -> dict:
    B, sec = timing["batch"], timing["s_per_step"]
    tokens = B * tb.m.sample_size**2  # latent positions of the batch (the first level's image tokens)
    flops = flops_1 * B
    rec = {**timing, "params": tb.params, "latent": tb.m.sample_size, "tokens_per_s": tokens / sec,
           "images_per_s": B / sec, "model_flops_per_step": flops, "achieved_flops_per_s": flops / sec}
    for name, peak in peaks.items():
        rec[f"mfu_vs_{name}"] = flops / sec / peak if peak else None
    return rec


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (a rise between two points = recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _EpsWrapper(torch.nn.Module):
    """diffusers' UNet2DConditionModel behind RAPHAEL's call signature, so one sampler loop drives both."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y, y_valid=None, pooled_index=None, return_masks=False):
        return self.unet(x, t, encoder_hidden_states=y).sample, []


def run_gpu(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu: torch sees no CUDA device (run it on a GPU machine, or --device cpu --tiny to check it)")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("gpu --device cpu needs --tiny (the full sizes are for a GPU)")
    from raphael_ref.config import PRESETS

    bad = sorted({*args.train_presets, *args.compile_train_presets, args.infer_preset, args.sample_preset} - set(PRESETS))
    if bad:
        raise SystemExit(f"gpu: unknown preset(s) {bad}; choose from {sorted(PRESETS)}")
    if args.train_presets and args.max_batch and len(args.max_batch) not in (1, len(args.train_presets)):
        raise SystemExit("--max-batch: give one cap, or one per --train-presets entry")
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    sdpa_ctx, sdpa_names = _sdpa_context(args.sdpa, device)
    latent = args.latent or (8 if args.tiny else 64)
    rec: dict = {"device_name": name, "torch": torch.__version__, "dtype": "bfloat16 autocast (float32 weights, AdamW)",
                 "sdpa_backends": sdpa_names, "tiny": args.tiny, "budget_s": args.budget_s, "sections": {},
                 "notes": ["text tower not included: every model reads random text tokens (B, 77, d_y), 20 of them real",
                           "MFU = model FLOPs (FlopCounterMode, fwd+bwd, no checkpoint recomputation) / time / peak"]}
    if device.type == "cuda":
        rec["cuda"] = torch.version.cuda
        rec["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30

    def write():
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rec, indent=2, default=str) + "\n")

    def section(key: str, fn):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            rec["sections"][key] = {"skipped": f"time budget: {elapsed:.0f} s elapsed of --budget-s {args.budget_s:.0f}"}
            print(f"[{key}] skipped (budget)")
            write()
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
            out["section_wall_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - a failed section is recorded; the others still run
            import traceback

            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{key}] FAILED: {type(err).__name__}: {err}")
        rec["sections"][key] = out
        _free(device)
        write()
        return out

    # 0. the device's own ceiling, measured in this process
    ceiling = section("matmul_ceiling", lambda: _matmul_ceiling(device, args.tiny)) or {}
    peaks = {"datasheet_bf16": next((v for k, v in DATASHEET_BF16_FLOPS.items() if k in name), None)
             if device.type == "cuda" else None,
             "measured_matmul": ceiling.get("flops_per_s")}
    rec["peak_flops"] = peaks

    # (a) training step per preset, eager, largest power-of-two batch that fits; (d) compiled at that batch
    caps = args.max_batch or [DEFAULT_MAX_BATCH.get(p, 512) for p in args.train_presets]
    caps = caps * len(args.train_presets) if len(caps) == 1 else caps
    train_batches: dict[str, int] = {}

    def train_section(preset: str, cap: int):
        def fn():
            tb = _TrainBench(args, preset, device)
            B, oom = tb.largest_batch(2 if args.tiny else cap)
            train_batches[preset] = B
            flops_1 = tb.flops_per_sample()
            timing = tb.time(B, args.repeats, args.warmup)
            out = _train_record(tb, timing, flops_1, peaks)
            out.update({"mode": "eager", "activation_checkpointing": True, "batch_cap": cap, "oom_at": oom})
            print(f"[train {preset}] B={B} {out['s_per_step'] * 1e3:.1f} ms/step  {out['tokens_per_s']:.0f} tokens/s  "
                  f"MFU(datasheet)={out.get('mfu_vs_datasheet_bf16')}  peak {out['peak_mem_gib']} GiB")
            del tb
            return out
        return fn

    for preset, cap in zip(args.train_presets, caps):
        with sdpa_ctx():
            section(f"train_{preset}", train_section(preset, cap))

    # the toy default run's step (tools/train.py with no option: batch 16, bf16 autocast on CUDA), model only
    def toy_step():
        from raphael_ref.config import get_preset

        steps, B = get_preset("toy").train.steps, get_preset("toy").train.batch_size
        tb = _TrainBench(args, "toy", device, checkpoint=None)
        timing = tb.time(B, max(args.repeats, 10), max(args.warmup, 3))
        out = {**timing, "params": tb.params, "steps_of_default_run": steps,
               "model_time_of_default_run_s": steps * timing["s_per_step"],
               "note": "forward, loss, backward and AdamW only: data rendering, Canny and the text tower not included"}
        print(f"[toy step] B={B} {timing['s_per_step'] * 1e3:.1f} ms/step: {steps} steps = "
              f"{out['model_time_of_default_run_s']:.0f} s of model time")
        return out

    with sdpa_ctx():
        section("toy_default_step", toy_step)

    # (b) inference forward: the MoE U-Net (both fast space-MoE forms) vs the same U-Net with dense FFNs
    def infer():
        B = args.infer_batch
        out = {"preset": args.infer_preset, "batch": B, "latent": latent}
        gen = torch.Generator().manual_seed(args.seed)
        times, params, mem = {}, {}, {}
        for label, over in (("moe", {}), ("dense_ffn", {"model.use_space_moe": False, "model.use_time_moe": False})):
            m = _model_cfg(args, args.infer_preset, over)
            torch.manual_seed(args.seed)
            model = _build_unet(m, device).eval()
            params[label] = sum(p.numel() for p in model.parameters())
            x = torch.randn(B, m.in_channels, latent, latent, generator=gen).to(device)
            t = torch.randint(0, 1000, (B,), generator=gen).to(device)
            y, valid, pooled = _cond(m, B, device, gen)
            for impl in (("dense", "gather") if label == "moe" else ("-",)):
                if impl != "-":
                    _set_moe_impl(model, impl)

                def fwd():
                    with torch.no_grad(), _autocast(device):
                        model(x, t, y, valid, pooled)
                    _sync(device)

                key = label if impl == "-" else f"{label}_{impl}"
                _peak_reset(device)
                times[key] = median_seconds(fwd, args.repeats, args.warmup)
                mem[key] = _peak_gib(device)
            del model
            _free(device)
        out.update({"times_s": times, "params": params, "peak_mem_gib": mem,
                    "moe_over_dense": {k: times[k] / times["dense_ffn"] for k in times if k != "dense_ffn"},
                    "goal_moe_over_dense_max": 1.15, "paper_moe_over_dense": 1.24})
        print("[infer] " + "  ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in times.items())
              + "  ratios " + str({k: round(v, 3) for k, v in out["moe_over_dense"].items()}))
        return out

    with sdpa_ctx():
        section("infer_moe_vs_dense", infer)

    # (c) 50-step DDIM + CFG through one sampler loop: RAPHAEL vs SD 1.5's UNet2DConditionModel; (d) compiled
    def sampling(compiled: bool):
        def fn():
            from diffusers import UNet2DConditionModel

            from raphael_ref.config import get_preset
            from raphael_ref.diffusion import NoiseSchedule
            from raphael_ref.sampling import sample

            B, steps = args.sample_batch, args.sample_steps
            d = get_preset("toy" if args.tiny else args.sample_preset).diffusion
            sched = NoiseSchedule.make(d.schedule, d.T)
            m = _model_cfg(args, args.sample_preset)
            torch.manual_seed(args.seed)
            raphael = _build_unet(m, device).eval()
            sd_cfg = {**(TINY_SD_CONFIG if args.tiny else SD15_UNET_CONFIG), "sample_size": latent}
            with torch.device(device):
                sd = _EpsWrapper(UNet2DConditionModel(**sd_cfg)).eval()
            gen = torch.Generator().manual_seed(args.seed)
            conds = {"raphael": (_cond(m, B, device, gen), _cond(m, 1, device, gen)),
                     "sd15": tuple((torch.randn(b, 77, sd_cfg["cross_attention_dim"], generator=gen).to(device),
                                    torch.ones(b, 77, dtype=torch.bool, device=device),
                                    torch.full((b,), 76, device=device)) for b in (B, 1))}
            models = {"raphael": raphael, "sd15": sd}
            out = {"batch_images": B, "cfg_batch": 2 * B, "steps": steps, "latent": latent, "guidance": 7.5,
                   "raphael_preset": args.sample_preset, "sd_config": "SD 1.5 UNet2DConditionModel" if not args.tiny else
                   "tiny", "params": {k: sum(p.numel() for p in v.parameters()) for k, v in models.items()},
                   "compiled": compiled, "times_s": {}, "peak_mem_gib": {}, "compile_s": {}}
            for key, model in models.items():
                channels = m.in_channels if key == "raphael" else sd_cfg["in_channels"]
                run_model = torch.compile(model) if compiled else model
                cond, uncond = conds[key]

                def call():
                    with torch.no_grad(), _autocast(device):
                        sample(run_model, sched, cond, uncond, shape=(B, channels, latent, latent), steps=steps,
                               guidance=7.5, generator=torch.Generator().manual_seed(0))
                    _sync(device)

                if compiled:  # the first call compiles: its time is reported apart
                    t0 = time.perf_counter()
                    call()
                    out["compile_s"][key] = time.perf_counter() - t0
                graphs = _compiled_graphs()
                _peak_reset(device)
                out["times_s"][key] = median_seconds(call, max(1, min(args.repeats, 3)), 0 if compiled else 1)
                out["peak_mem_gib"][key] = _peak_gib(device)
                if compiled:  # a recompilation inside the timed calls would make the figure meaningless: say so
                    out.setdefault("graphs_compiled_while_timing", {})[key] = _compiled_graphs() - graphs
            out["raphael_over_sd15"] = out["times_s"]["raphael"] / out["times_s"]["sd15"]
            out["images_per_s"] = {k: B / v for k, v in out["times_s"].items()}
            print(f"[sample{' compiled' if compiled else ''}] " + "  ".join(f"{k}: {v:.2f} s" for k, v in
                  out["times_s"].items()) + f"  RAPHAEL / SD1.5 = {out['raphael_over_sd15']:.2f}")
            del raphael, sd, models
            return out
        return fn

    with sdpa_ctx():
        eager = section("sample_ddim50_cfg", sampling(False))
    if not args.no_compile:
        with sdpa_ctx():
            comp = section("sample_ddim50_cfg_compiled", sampling(True))
        if eager and comp and "times_s" in eager and "times_s" in comp:
            rec["sections"]["sample_ddim50_cfg_compiled"]["speedup_vs_eager"] = {
                k: eager["times_s"][k] / comp["times_s"][k] for k in comp["times_s"]}

        def train_compiled(preset: str):
            def fn():
                if preset not in train_batches:
                    raise RuntimeError(f"no eager batch for {preset} (its eager section failed or was skipped)")
                tb = _TrainBench(args, preset, device)
                B = train_batches[preset]
                flops_1 = tb.flops_per_sample()  # eager count: the same model FLOPs
                tb.model.compile()  # in place, as tools/train.py's train.compile
                t0 = time.perf_counter()
                tb.make_step(B)()
                compile_s = time.perf_counter() - t0
                graphs = _compiled_graphs()
                out = _train_record(tb, tb.time(B, args.repeats, args.warmup), flops_1, peaks)
                out["graphs_compiled_while_timing"] = _compiled_graphs() - graphs
                eager_s = rec["sections"].get(f"train_{preset}", {}).get("s_per_step")
                out.update({"mode": "compiled", "compile_s": compile_s,
                            "speedup_vs_eager": eager_s / out["s_per_step"] if eager_s else None})
                print(f"[train {preset} compiled] B={B} {out['s_per_step'] * 1e3:.1f} ms/step "
                      f"(compile {compile_s:.0f} s) speed-up vs eager {out['speedup_vs_eager']}")
                del tb
                return out
            return fn

        for preset in args.compile_train_presets:
            if preset in args.train_presets:
                with sdpa_ctx():
                    section(f"train_{preset}_compiled", train_compiled(preset))
    rec["wall_s"] = time.perf_counter() - t_start
    write()
    failed = [k for k, v in rec["sections"].items() if "error" in v]
    rec["failed_sections"] = failed
    return rec


# ---------------------------------------------------------------------------------------------
# registry and CLI


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]  # returns the JSON record; key "equal_within_tol" False -> exit 1


COMMANDS: list[Command] = [
    Command("space-moe", "space-MoE: literal loop over tokens vs regrouped dense/gather forms",
            add_space_moe_args, run_space_moe),
    Command("block", "one transformer block: MoE (6 space + 4 time experts) vs dense FFNs",
            add_block_args, run_block),
    Command("params", "parameter count per component of a preset (meta device)", add_params_args, run_params),
    Command("train-step", "one toy training step (fwd, loss, bwd, AdamW): the variants behind the fast toy preset",
            add_train_step_args, run_train_step),
    Command("gpu", "the GPU suite: training step/MFU of small and paper, MoE vs dense forward, DDIM+CFG vs SD 1.5, "
            "compiled vs eager", add_gpu_args, run_gpu),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repeats", type=int, default=3, help="timed calls per form (median reported)")
    common.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--seed", type=int, default=0, help="seed of the input generator")
    common.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, parents=[common])
        cmd.add_args(p)
        p.set_defaults(_command=cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = args._command.run(args)
    record = {
        "command": args.command,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        **record,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if record.get("equal_within_tol", True) and not record.get("failed_sections") else 1


if __name__ == "__main__":
    raise SystemExit(main())
