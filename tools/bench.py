#!/usr/bin/env python
"""Speed benchmarks of raphael_ref (speed and memory goals live here, never in timed tests).

    python tools/bench.py space-moe                      # literal vs fast space-MoE, paper sizes, CPU
    python tools/bench.py space-moe --positions 256 --repeats 5 --threads 2 --out bench_out/smoe.json
    python tools/bench.py block                          # MoE block vs dense block, CPU float32
    python tools/bench.py block --device cuda            # bf16, 64x64 latents, width 1280, 40 valid tokens
    python tools/bench.py params --preset paper          # parameter count per component

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
    from raphael_ref.models import RaphaelUNet
    from raphael_ref.objective import training_losses

    names = args.variants or list(TRAIN_STEP_VARIANTS)
    unknown = [n for n in names if n not in TRAIN_STEP_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(TRAIN_STEP_VARIANTS)}")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    rows, times = [], {}
    for name in names:
        cfg = get_preset("toy", TRAIN_STEP_VARIANTS[name])
        m = cfg.model
        f = m.codec_factor if m.codec == "space_to_depth" else 1
        B, S, C = cfg.train.batch_size, m.sample_size, m.in_channels
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        model = RaphaelUNet(m).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
        x0 = torch.randn(B, C, S, S, generator=gen)
        y = torch.randn(B, m.n_y, m.d_y, generator=gen)
        valid = (torch.arange(m.n_y)[None] < 10).expand(B, m.n_y)
        pooled = torch.full((B,), 9)
        edge = torch.rand(B, 1, S * f, S * f, generator=gen)

        def step():
            t = torch.randint(0, cfg.diffusion.T, (B,), generator=gen)
            out = training_losses(model, sched, x0, t, torch.randn(x0.shape, generator=gen), y, valid, pooled, edge)
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
    return 0 if record.get("equal_within_tol", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
