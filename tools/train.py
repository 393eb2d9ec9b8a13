#!/usr/bin/env python
"""Train RAPHAEL (Xue et al., 2023): L = L_denoise + 1[t < T_c] L_edge (Sec. 2, 3.2) with AdamW (Table 2).

    python tools/train.py                                  # toy-binding preset, synthetic data, CPU, 10-20 minutes
    python tools/train.py --set train.steps=2000 --out runs/toy2
    python tools/train.py --out runs/toy2 --resume --set train.steps=4000   # go on from the latest checkpoint
    python tools/train.py --preset small --config my_run.toml --set train.source=/data/shards
    python tools/train.py --init runs/sd21_init --config runs/sd21_init/config.json --out runs/ft   # start from weights
    torchrun --standalone --nproc_per_node=8 tools/train.py --preset paper --config paper_local.toml --fsdp

One process trains on one device; under ``torchrun`` every rank trains with DDP (or FSDP2 with
``--fsdp`` / ``train.fsdp``), on CUDA with NCCL or on CPU with gloo. ``train.grad_accum=K`` runs K
micro-steps of batch_size / (world x K) per rank for each optimizer step (gradient accumulation; the
global batch stays ``train.batch_size``). The run folder layout is in
``raphael_ref/training.py``. Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint
is written and the process exits with code 130. See docs/training.md.

Exit codes: 0 done; 2 a user error (``error: ...``, found before any training); 3 the run diverged
(a non-finite loss or gradient norm, ``train.nonfinite``; nothing was written after it, the newest
checkpoint is finite); 4 a sample grid (or a final plot) failed, after a checkpoint of that
step was written; 130 stopped by SIGINT / SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from raphael_ref import training as T  # noqa: E402
from raphael_ref.checkpoint import check_state_dict  # noqa: E402
from raphael_ref.config import PRESETS, load_config  # noqa: E402
from raphael_ref.data.buckets import BUCKETS, scaled_buckets  # noqa: E402
from raphael_ref.data.loader import make_train_loader  # noqa: E402
from raphael_ref.diffusion import NoiseSchedule, shifted_timesteps  # noqa: E402
from raphael_ref.gates import per_sample_noise, sample_stream_seed  # noqa: E402
from raphael_ref.models import RaphaelUNet, SpatialTransformer, count_parameters, format_count, schedule_for  # noqa: E402
from raphael_ref.monitoring import (  # noqa: E402
    ExpertUsage, TensorBoardLog, check_tensorboard, collapse_warning, plot_expert_usage)
from raphael_ref.objective import training_losses  # noqa: E402
from raphael_ref.token_attention import token_targets  # noqa: E402

EXIT_USAGE = 2  # a user error, reported before any training
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm (train.nonfinite)
EXIT_AFTER_TRAINING = 4  # a sample grid or a final plot (loss, expert usage) failed; its checkpoint is written
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a run stopped by Ctrl-C

# The preset of `python tools/train.py` with no --preset: the toy (every RAPHAEL component, 24 px, CPU) plus two
# binding options that are not the paper's (E87, E89; measured: docs/results/toy_v_prediction.md, sections 7 and 8).
DEFAULT_PRESET = "toy-binding"

# Config fields a resumed run may change (everything else must match the checkpoint's config): the
# run's length, cadences, optimiser settings, data and sample grids (train.*, sample.*), and model
# fields that change neither the weights nor what the network computes (memory, kernels, where
# frozen weights live on this machine).
RESUME_MAY_CHANGE = ("train.", "sample.", "model.checkpoint", "model.moe_impl", "model.text_encoder_weights",
                     "model.text_encoder_clip_weights", "model.vae_path")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"config preset (default: {DEFAULT_PRESET}, the toy with the binding options; "
                        f"toy: the paper's losses only; a resumed run keeps its checkpoint's)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="JSON/TOML file of fields, nested or dotted, applied over the preset (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="one field, e.g. --set train.steps=200 --set model.sample_size=16 (repeatable; last wins)")
    p.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>-<preset>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="go on from a checkpoint: its folder, or (no value) the latest one in --out")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start a new run from the weights of a checkpoint folder (e.g. tools/convert_sd.py's output): "
                        "its model.safetensors into the model and the EMA, a fresh optimizer, step 0; the run's model.* "
                        "fields must equal the checkpoint's (take them with --config CKPT/config.json)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (same as train.fsdp=true)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ distributed


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK in the environment) joins the process group."""
    want_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else (device_arg or "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, rank: int):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
              f"(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def say(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


def fail(rank: int, msg: str, code: int = EXIT_USAGE) -> int:
    """Print ``error: msg`` on rank 0 (stderr) and return ``code`` (every rank); 2 unless told."""
    if rank == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


class Diverged(Exception):
    """A non-finite loss or gradient norm (or non-finite weights at a checkpoint); ``step`` is where it was seen."""

    def __init__(self, step: int, detail: str = ""):
        super().__init__(step, detail)
        self.step, self.detail = step, detail


def locked_differences(ckpt_cfg, cfg) -> list[str]:
    """``field (checkpoint X, now Y)`` for each field outside RESUME_MAY_CHANGE that differs."""
    a, b = T.flat_config(ckpt_cfg), T.flat_config(cfg)
    return [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(RESUME_MAY_CHANGE)]


def init_differences(init_cfg, cfg) -> list[str]:
    """``field (checkpoint X, now Y)`` for each model.* field that changes the weights or what the network
    computes (``--init``: the run's U-Net must be the checkpoint's)."""
    a, b = T.flat_config(init_cfg), T.flat_config(cfg)
    free = tuple(f for f in RESUME_MAY_CHANGE if f.startswith("model."))
    return [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k.startswith("model.") and not k.startswith(free) and a.get(k) != b.get(k)]


def _listed(items: list[str], n: int = 8) -> str:
    return "; ".join(items[:n]) + (f"; ... and {len(items) - n} more" if len(items) > n else "")


def check_run_folder(out: str | None, resume_from: Path | None) -> str | None:
    """Why ``--out`` cannot take this run (it holds another run), or None. Nothing is written."""
    if out is None:
        return None  # a fresh runs/<time>-<preset>
    run_dir = Path(out)
    if resume_from is not None and resume_from.resolve().parent.parent == run_dir.resolve():
        return None  # continuing this folder's own run
    if run_dir.exists() and not run_dir.is_dir():
        return f"--out {run_dir} is a file, not a folder"
    if T.latest_checkpoint(run_dir) is not None:
        return f"{run_dir} already holds checkpoints; pass --resume to continue that run, or another --out"
    held = [n for n in ("config.json", "log.jsonl") if (run_dir / n).exists()]
    if held:
        return (f"{run_dir} holds another run ({', '.join(held)}) but no checkpoint to resume; --out never "
                f"overwrites a run: choose another --out (or delete {run_dir} to start over)")
    return None


def micro_batch_problem(batch_size: int, world: int, accum: int) -> str | None:
    """Why the global ``batch_size`` cannot split into ``world`` ranks x ``accum`` micro-steps of equal size, or None.

    Each rank runs batch_size / (world x accum) samples per forward/backward (its micro-batch). The
    message names train.grad_accum and suggests the accumulations and the batch sizes that fit.
    """
    unit = world * accum
    if batch_size % unit == 0:
        return None
    per_rank = batch_size // world if batch_size % world == 0 else None
    fits = [k for k in range(1, per_rank + 1) if per_rank % k == 0] if per_rank is not None else []
    lo, hi = batch_size // unit * unit, (batch_size // unit + 1) * unit
    sizes = " or ".join(f"train.batch_size={b}" for b in (lo, hi) if b > 0)
    return (f"config field train.grad_accum: the global batch train.batch_size={batch_size} must split into "
            f"{world} rank(s) x train.grad_accum={accum} = {unit} equal micro-batches (each rank runs batch_size / "
            f"(world x grad_accum) samples per forward/backward); "
            + (f"with {world} rank(s) use train.grad_accum in [{', '.join(map(str, fits[:12]))}"
               f"{', ...' if len(fits) > 12 else ''}] (the divisors of "
               f"{per_rank} = batch_size / world), or " if fits else "")
            + f"set {sizes}")


def micro_slices(batch: int, accum: int) -> list[slice]:
    """The ``accum`` equal, consecutive slices of a per-rank batch of ``batch`` samples (one per micro-step)."""
    if accum < 1 or batch % accum:
        raise ValueError(f"a per-rank batch of {batch} samples does not split into train.grad_accum={accum} "
                         f"equal micro-batches")
    size = batch // accum
    return [slice(k * size, (k + 1) * size) for k in range(accum)]


def sample_positions(step: int, batch: int, rank: int, world: int) -> list[int]:
    """Global data-stream positions of the ``batch`` samples rank ``rank`` of ``world`` trains on at ``step``.

    q = (step B + j) W + rank for j < B (B = batch per rank): the synthetic loader's own positions
    (data.loader.synthetic_indices), so a sample keeps its position, and with train.rng = "sample" its random
    draws, whatever the world size: step k covers positions [k B W, (k + 1) B W) for every W.
    """
    return [(step * batch + j) * world + rank for j in range(batch)]


class SampleDraws:
    """train.rng = "sample": the random draws of one step, each sample from its own stream.

    Sample q's stream is a CPU generator seeded by sample_stream_seed(seed, q); it draws, in this order, the
    caption-dropout coin, the VAE posterior noise (a sampled VAE only), t and the noise; its gate noise comes
    from per_sample_noise (streams seeded by (that seed, draw index)).
    """

    def __init__(self, seed: int, positions: list[int]):
        self.seeds = [sample_stream_seed(seed, q) for q in positions]
        self.gens = [torch.Generator().manual_seed(s) for s in self.seeds]

    def drop_captions(self, captions: list[str], p: float) -> list[str]:
        coins = [float(torch.rand((), generator=g)) for g in self.gens]  # one coin per sample, even at p = 0 or 1
        return ["" if u < p else c for u, c in zip(coins, captions)]

    def timesteps(self, T: int, shift: float = 1.0) -> torch.Tensor:
        if shift == 1.0:  # uniform: the draws of every run before train.t_shift existed
            return torch.stack([torch.randint(0, T, (), generator=g) for g in self.gens])  # (B,)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.gens])  # (B,) in [0, 1)
        return shifted_timesteps(u, T, shift)  # (B,) E90

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens])  # (B, *shape)


def draw_timesteps(gen: torch.Generator, B: int, T: int, shift: float = 1.0) -> torch.Tensor:
    """(B,) training timesteps from the run's generator (train.rng = "rank"): uniform over 0..T-1 for shift 1
    (torch.randint, the draws of every run before train.t_shift existed), else E90's shifted draw of float64
    u ~ U[0, 1)."""
    if shift == 1.0:
        return torch.randint(0, T, (B,), generator=gen)
    return shifted_timesteps(torch.rand(B, generator=gen, dtype=torch.float64), T, shift)


def add_grad_norm(grad_window: torch.Tensor, norm: torch.Tensor) -> None:
    """Adds one applied step's gradient norm (before clipping) to the log window's (sum, max), on the device."""
    norm = norm.detach().to(grad_window.dtype)
    grad_window[0] += norm
    grad_window[1] = torch.maximum(grad_window[1], norm)


def grad_sync(net: torch.nn.Module, sync: bool):
    """Context of one micro-step (forward and backward): ``sync=False`` keeps the gradients local (accumulated
    on each rank, no communication: DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``); the
    last micro-step of an optimizer step syncs, reducing the sum of all of them. One process: nothing to do."""
    if sync:
        return nullcontext()
    if hasattr(net, "no_sync"):  # DistributedDataParallel
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2 (torch.distributed.fsdp.FSDPModule)
        return _fsdp_no_sync(net)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)  # recurses into every fully_shard unit
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """The global gradient norm (clipped to ``clip`` when > 0), a 0-d tensor on the device: no host sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    elif hasattr(torch.nn.utils, "get_total_norm"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:  # torch < 2.6: an infinite bound scales by 1
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    t_start = time.perf_counter()  # the command's wall time, reported on the last line
    # ---- config: preset (or the checkpoint's config when resuming) + files + --set
    resume_from, ck, init_from, init_state = None, None, None, None
    try:
        if args.init is not None and args.resume is not None:
            raise ValueError("--init starts a new run from a checkpoint's weights and --resume continues a run; "
                             "pass one of them")
        if args.resume is not None:
            if args.resume == "latest":
                if args.out is None:
                    raise ValueError("--resume without a checkpoint needs --out RUN_DIR (the run to continue)")
                resume_from = T.latest_checkpoint(args.out)
                if resume_from is None:
                    raise ValueError(f"--resume: {args.out} has no checkpoint in {args.out}/{T.CKPT_DIR}")
            else:
                resume_from = T.resolve_checkpoint(args.resume)
            # every file's SHA-256 checked: a damaged one is named here (sharded: each rank checks its share)
            ck = T.load_checkpoint(resume_from, part=(rank, world))
            base = ck["cfg"]
            if args.preset is not None and args.preset != base.name:
                diff = locked_differences(base, load_config(args.preset, args.config, args.set))
                raise ValueError(f"--preset {args.preset}: the checkpoint {resume_from} was trained from preset "
                                 f"{base.name!r} and a resumed run keeps its model"
                                 f"{': ' + _listed(diff) if diff else ''}; drop --preset to resume, or start a "
                                 f"new run in another --out")
            cfg = load_config(base=base, files=args.config, overrides=args.set)
            diff = locked_differences(base, cfg)
            if diff:
                raise ValueError(f"--resume: {len(diff)} field(s) differ from the checkpoint's config and cannot "
                                 f"change on resume: {_listed(diff)}. A resumed run may change "
                                 f"{', '.join(f + '*' if f.endswith('.') else f for f in RESUME_MAY_CHANGE)}; "
                                 f"start a new run in another --out for a different model")
        else:
            cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.set)
        if args.init is not None:  # the weights of another checkpoint, at step 0 (e.g. a converted SD U-Net)
            from raphael_ref.checkpoint import load_tensors
            from raphael_ref.config import RaphaelConfig

            init_from = T.resolve_checkpoint(args.init)
            diff = init_differences(RaphaelConfig.from_json(init_from / "config.json"), cfg)
            if diff:
                raise ValueError(f"--init {init_from}: the run's model differs from the checkpoint's in {len(diff)} "
                                 f"field(s): {_listed(diff)}; take the checkpoint's config with --config "
                                 f"{init_from / 'config.json'}")
            if not (init_from / "model.safetensors").is_file():
                raise ValueError(f"--init {init_from}: no model.safetensors there (a checkpoint folder of "
                                 f"tools/train.py, tools/convert_sd.py or checkpoint.save_model holds one)")
            init_state = load_tensors(init_from / "model.safetensors")  # SHA-256 checked: a damaged file is named
        if args.fsdp:
            cfg.train.fsdp = True
        if cfg.train.checkpoint_format == "sharded" and T.sharded_support_problem() is not None:
            raise ValueError(T.sharded_support_problem())
        if cfg.train.batch_size % world:
            raise ValueError(f"config field train.batch_size: the global batch {cfg.train.batch_size} must be "
                             f"divisible by the world size {world}")
        problem = micro_batch_problem(cfg.train.batch_size, world, cfg.train.grad_accum)
        if problem is not None:
            raise ValueError(problem)
        if cfg.train.tensorboard:
            check_tensorboard()  # a missing package stops the run here, with the pip command
        # the edge detector first: missing HED weights stop the run before its folder exists (E63)
        edge_detector = T.build_edge_detector(cfg, device) if cfg.model.use_edge else None
    except (ValueError, FileNotFoundError) as e:
        return fail(rank, str(e))
    tc, mc = cfg.train, cfg.model

    # ---- run folder (rank 0 looks and decides its name): never another run's folder
    if resume_from is not None and args.out is None:
        args.out = str(resume_from.parent.parent)
    problem = broadcast_object(check_run_folder(args.out, resume_from) if rank == 0 else None, rank)
    if problem is not None:
        return fail(rank, problem)
    run_dir = Path(broadcast_object(str(T.make_run_dir(args.out, cfg.name)) if rank == 0 else None, rank))

    # ---- seeds: one model init for all ranks, then per-rank streams seed * world + rank (DiT)
    torch.manual_seed(tc.seed)
    model = RaphaelUNet(mc, schedule=schedule_for(cfg))  # the schedule only for model.prediction = "v" (E88)
    if init_state is not None:  # --init: the checkpoint's weights, checked key by key, in the model and the EMA
        try:
            check_state_dict(model.state_dict(), init_state, str(init_from / "model.safetensors"))
        except ValueError as e:
            return fail(rank, str(e))
        model.load_state_dict(init_state)
        del init_state
        say(rank, f"initialised from {init_from / 'model.safetensors'} (step 0, fresh optimizer)")
    ema = T.make_ema(model)  # an exact copy; updated after every step, used for the sample grids
    if ck is not None:  # a hand-edited config.json beside the weights: name the keys, not a 100-line RuntimeError
        try:
            given = T.sharded_shapes(resume_from) if ck["format"] == "sharded" else ck
            for name in ("model", "ema"):
                where = T.SHARDS if ck["format"] == "sharded" and name == "model" else f"{name}.safetensors"
                check_state_dict(model.state_dict(), given[name], str(resume_from / where))
        except ValueError as e:
            return fail(rank, str(e))
    rank_seed = tc.seed * world + rank
    torch.manual_seed(rank_seed)  # the model's own draws (gate noise; dropout)
    gen = torch.Generator().manual_seed(rank_seed)  # t, noise and the VAE posterior, drawn on the CPU

    # ---- model on device, wrapped for data parallelism
    model.to(device)
    ema.to(device)
    if tc.compile:  # in place (nn.Module.compile): state-dict keys, DDP / FSDP wrapping and the EMA are unchanged
        # the whole U-Net, one graph without a break (tests/test_compile.py); under FSDP2 one compiled region per
        # transformer block, its all-gather hooks left outside (as torchtitan does). The EMA (sample grids) stays eager.
        sharded = tc.fsdp and world > 1
        for net in [m for m in model.modules() if isinstance(m, SpatialTransformer)] if sharded else [model]:
            net.compile()
    if tc.fsdp and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        # the blocks return views (pooled maps in BlockAux) that nothing modifies in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for net in (model, ema):  # one unit per transformer block, then the root (ResBlocks, embeddings)
            for block in [m for m in net.modules() if isinstance(m, SpatialTransformer)]:
                fully_shard(block, mesh=mesh)
            fully_shard(net, mesh=mesh)
        net_for_loss = model
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # experts are stacked parameters (experts.ExpertBank): an expert no token or sample was routed to
        # gets a zero slice of its bank's gradient, so every parameter takes part in every step
        net_for_loss = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net_for_loss = model
    model.train()
    # torch's fused AdamW kernel where it has one (CPU, CUDA) and the parameters are plain tensors (not FSDP2's
    # DTensors): the same update rule as the per-parameter loop, one kernel per step (toy, CPU: 6 ms against 30)
    fused = device.type in ("cpu", "cuda") and not (tc.fsdp and world > 1)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay,
                            fused=fused or None)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # ---- frozen parts: text encoder, image codec, edge detector; the noise schedule
    try:
        encoder = T.build_text_encoder(cfg, device)
        codec = T.build_codec(cfg, device)
    except (ValueError, FileNotFoundError) as e:
        return fail(rank, str(e))
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T, cfg.diffusion.zero_terminal_snr)
    image_size = mc.sample_size * codec.downsample_factor
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tc.mixed_precision == "bf16"
           else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- resume: weights, EMA, optimizer, RNG streams, data position, log window
    step, skipped_steps = 0, 0
    # sums of (loss, denoise, edge) over the log window and its step count, kept on the device (read at log lines)
    window = torch.zeros(4, dtype=torch.float64, device=device)
    # route counts per block and expert over the log window (raphael_ref.monitoring), on the device
    usage = ExpertUsage.for_config(cfg, device)
    balance = tc.balance_loss > 0  # the optional load-balancing loss (E73): its sum over the window
    balance_window = torch.zeros((), dtype=torch.float64, device=device)
    token = tc.token_loss > 0  # the optional token-attention loss (E82): its sum over the window
    token_window = torch.zeros((), dtype=torch.float64, device=device)
    # the global gradient norm before clipping over the log window: (sum, max) of the steps applied
    grad_window = torch.zeros(2, dtype=torch.float64, device=device)
    token_at = 5 + int(balance)  # its index in the per-step stats
    if resume_from is not None:
        if ck["format"] == "sharded":  # collective: each rank reads its part of every tensor (DCP reshards)
            T.load_sharded_state(resume_from, model, ema, opt, ck["optimizer_meta"])
        else:
            set_model_state_dict(model, ck["model"], options=StateDictOptions(full_state_dict=True))
            set_model_state_dict(ema, ck["ema"], options=StateDictOptions(full_state_dict=True))
            set_optimizer_state_dict(model, opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True))
        st = ck["state"]
        step = int(st["step"])
        window = torch.tensor(st["window"], dtype=torch.float64, device=device)
        skipped_steps = int(st.get("skipped_steps", 0))
        usage.load_window_state(st.get("expert_usage"), rank)  # absent in older checkpoints: a fresh window
        balance_window.fill_(float(st.get("balance_window", 0.0)))
        token_window.fill_(float(st.get("token_window", 0.0)))
        grad_window = torch.tensor(st.get("grad_norm_window", [0.0, 0.0]), dtype=torch.float64, device=device)
        rng_states = ck["rng"] if st["world_size"] == world else None
        if rng_states is None and tc.rng == "sample":
            say(rank, f"note: checkpoint written with {st['world_size']} ranks, resuming with {world}: train.rng = "
                      f"'sample' keys every draw to the sample, so the run goes on with the uninterrupted run's draws")
        elif rng_states is None:
            say(rank, f"note: checkpoint written with {st['world_size']} ranks, resuming with {world}: RNG streams "
                      f"reseeded from (seed, rank, step); the run goes on but is not bit-identical to an uninterrupted one")
        del ck

    buckets = None  # the paper's bucket sizes (Sec. 4), or scaled to what the codec and the U-Net accept
    if tc.multiscale and tc.bucket_factor is not None:
        try:
            buckets = scaled_buckets(BUCKETS, tc.bucket_factor, codec.downsample_factor * 2 ** (len(mc.channel_mult) - 1))
        except ValueError as e:
            return fail(rank, f"config field train.bucket_factor: {e}")
    try:
        loader = make_train_loader(tc.source, image_size=image_size, batch_size=tc.batch_size // world, rank=rank,
                                   world_size=world, seed=tc.seed, multiscale=tc.multiscale, buckets=buckets,
                                   caption_dropout=tc.caption_dropout if tc.rng == "rank" else 0.0,  # "sample": per sample below
                                   num_workers=tc.num_workers, start_step=step, count_prob=tc.scene_count_prob,
                                   distinct_shapes=tc.scene_distinct_shapes)
    except (ValueError, FileNotFoundError) as e:
        return fail(rank, str(e))
    data = iter(loader)  # (draws from the loader's own generator, not from the RNG streams restored below)
    if resume_from is not None:
        if rng_states is not None:
            torch.set_rng_state(rng_states[f"rank{rank}.torch"])
            gen.set_state(rng_states[f"rank{rank}.gen"])
            if device.type == "cuda" and f"rank{rank}.cuda" in rng_states:
                torch.cuda.set_rng_state(rng_states[f"rank{rank}.cuda"])
        else:
            torch.manual_seed(rank_seed + 1_000_003 * step)
            gen.manual_seed(rank_seed + 1_000_003 * step)

    if rank == 0:  # the first writes into the run folder: every user error is behind us
        T.truncate_log(run_dir / "log.jsonl", step)  # drop lines of steps after the checkpoint
        cfg.to_json(run_dir / "config.json")
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "samples" / "prompts.txt").write_text("\n".join(cfg.sample.prompts) + "\n")

    counts = count_parameters(model)
    say(rank, f"run folder: {run_dir}")
    say(rank, f"preset {cfg.name}: U-Net {format_count(counts['total'])} parameters "
              f"({format_count(counts['space_experts'])} space experts, {format_count(counts['time_experts'])} "
              f"time experts), {cfg.n_transformer_blocks} transformer blocks")
    say(rank, f"device {device} x {world} rank(s), {'FSDP2' if tc.fsdp and world > 1 else 'DDP' if world > 1 else 'single process'}"
              f"{', bf16 autocast' if not isinstance(amp, nullcontext) else ', float32'}; "
              f"global batch {tc.batch_size}"
              + (f" = {world} rank(s) x {tc.grad_accum} micro-steps x micro-batch {tc.batch_size // (world * tc.grad_accum)}"
                 if tc.grad_accum > 1 else "")
              + f", steps {step} -> {tc.steps}")
    say(rank, f"data: {tc.source} at {image_size}px{f' (multi-scale buckets {buckets or BUCKETS})' if tc.multiscale else ''}; "
              f"text encoder {mc.text_encoder} ({'weights ' + mc.text_encoder_weights if mc.text_encoder_weights else 'shipped pretrained weights, raphael_ref/assets/toy_clip' if mc.text_encoder == 'toy-clip' else 'random, seed 0'}{', later object phrases encoded apart (E85)' if mc.text_phrases_apart else ''}); "
              f"codec {mc.codec}")
    say(rank, f"edge ground truth I_edge: {edge_detector.describe() if edge_detector else 'off (model.use_edge = false)'}")
    if resume_from is not None:
        say(rank, f"resumed from {resume_from} at step {step}")
    if step >= tc.steps:
        say(rank, f"nothing to do: step {step} >= train.steps {tc.steps}")
        return 0

    # ---- helpers that touch every rank (collectives) and write on rank 0
    log = T.JsonlLog(run_dir / "log.jsonl") if rank == 0 else None
    tb = TensorBoardLog(run_dir / "tb", purge_step=step + 1 if resume_from is not None else None) \
        if rank == 0 and tc.tensorboard else None
    late_errors: list[str] = []  # failures after the final checkpoint (exit 4)

    def save_checkpoint(final: bool = False) -> None:
        """Write a checkpoint; raises Diverged (nothing written) when the weights are not finite."""
        sharded = tc.checkpoint_format == "sharded"  # every rank writes its shards (T.save_sharded_checkpoint)
        if not sharded:  # rank 0 gathers everything
            model_sd = get_model_state_dict(model, options=full)
            ema_sd = get_model_state_dict(ema, options=full)
            opt_sd = get_optimizer_state_dict(model, opt, options=full)
        mine = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
        if device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state()
        states = [mine]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, mine)
        usage_state = usage.window_state()  # collective: the window's route counts of all ranks
        verdict = None  # rank 0's ("nonfinite" | "plot", message), shared with every rank
        rng = {f"rank{r}.{k}": v for r, s in enumerate(states) for k, v in s.items()} if rank == 0 else None
        state = {"step": step, "data_start_step": step, "world_size": world, "window": window.tolist(),
                 "seed": tc.seed, "skipped_steps": skipped_steps, "expert_usage": usage_state,
                 "balance_window": float(balance_window), "token_window": float(token_window),
                 "grad_norm_window": grad_window.tolist()} if rank == 0 else None
        if sharded:  # collective; a NonFiniteError is raised on every rank
            try:
                path = T.save_sharded_checkpoint(run_dir, step, model=model, ema=ema, optimizer=opt, cfg=cfg,
                                                 state=state, rng=rng, keep=tc.keep_ckpts)
            except T.NonFiniteError as e:
                verdict = ("nonfinite", str(e))
        if rank == 0 and verdict is None:
            try:
                if not sharded:
                    path = T.save_checkpoint(run_dir, step, model_state=model_sd, ema_state=ema_sd,
                                             optimizer_state=opt_sd, cfg=cfg, state=state, rng=rng, keep=tc.keep_ckpts)
            except T.NonFiniteError as e:
                verdict = ("nonfinite", str(e))
            else:
                (bar.write if bar is not None else lambda m: print(m, flush=True))(f"saved {path}")
                records, failed = T.read_log(run_dir / "log.jsonl"), []
                for what, draw, png in (("loss curve", T.plot_loss_curve, "loss.png"),
                                        ("expert usage plot", plot_expert_usage, "expert_usage.png")):
                    try:
                        draw(records, run_dir / png)
                    except Exception as e:  # a cosmetic failure: the checkpoint is written
                        failed.append(f"{what} {run_dir / png} not drawn ({type(e).__name__}: {e})")
                if failed:
                    verdict = ("plot", "; ".join(failed))
        verdict = broadcast_object(verdict, rank)
        barrier()
        if verdict is not None and verdict[0] == "nonfinite":
            raise Diverged(step, verdict[1])
        if verdict is not None:
            if final:
                late_errors.append(verdict[1])
            elif rank == 0:
                print(f"warning: {verdict[1]}", file=sys.stderr, flush=True)

    def sample_grid() -> str | None:
        """Draw the sample grid of this step; returns what went wrong (the same on every rank), or None."""
        err = None
        if rank == 0 or (tc.fsdp and world > 1):  # FSDP: every rank takes part in the sharded forward
            sc = cfg.sample
            try:
                with amp:
                    images, _ = T.generate_images(ema, schedule, encoder, codec, list(sc.prompts), sampler=sc.sampler,
                                                  steps=sc.steps, guidance=sc.guidance,
                                                  set_alpha_to_one=sc.set_alpha_to_one,
                                                  generator=torch.Generator().manual_seed(sc.seed),
                                                  size=(mc.sample_size, mc.sample_size))
                if rank == 0:
                    T.save_image_grid(images, run_dir / "samples" / f"step_{step:07d}.png")
            except Exception as e:
                err = f"sample grid of step {step} failed ({type(e).__name__}: {e})"
        err = broadcast_object(err, rank)
        barrier()
        return err

    # ---- divergence guard (train.nonfinite; errata E66). "stop": a flag kept on the device records the
    # first step whose loss or gradient norm was not finite; it is read (a host sync) only at log lines
    # and before every checkpoint or sample grid, and the EMA never takes a step from such weights.
    # "skip": each step's flag is read at once (one host sync per step, as torch.amp.GradScaler does)
    # and the optimizer step and EMA update are skipped.
    skip_mode = tc.nonfinite == "skip"
    nonfinite_at = torch.full((), -1, dtype=torch.long, device=device)  # -1: every step so far was finite
    skipped_window, skipped_in_row = 0, 0

    def check_finite() -> None:
        if not skip_mode:
            at = int(nonfinite_at)
            if at >= 0:
                raise Diverged(at)

    # ---- the loop
    stop = StopFlag()
    bar = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)
    busy, busy_steps = 0.0, 0  # time in training steps since the last log line (not sampling, not saving)
    first_step = step  # this invocation's first step (a resumed run starts later)
    one = torch.ones(1, dtype=torch.float64, device=device)
    accum = tc.grad_accum  # micro-steps per optimizer step; train() checked that they split the batch
    # a U-Net that neither attends to nor counts padding tokens (the toy presets) gives the same losses on the
    # caption's own tokens alone: the step keeps the batch's first max(pooled_index) + 1 of the n_y slots
    # (TextEncoding.trimmed; ~10% of the toy's CPU step). Not with train.rng = "sample": a sample's gate-noise draws
    # would then depend on the longest caption of its rank's batch, and the run on the number of ranks.
    trim_text = not mc.attend_padding and not mc.count_padding and tc.rng == "rank"
    try:
        while step < tc.steps:
            t_step = time.perf_counter()
            batch = next(data)
            lr = T.scheduled_lr(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_decay, tc.lr_decay_start)
            for g in opt.param_groups:
                g["lr"] = lr
            captions = batch["caption"]
            draws = None  # train.rng = "rank": this rank's stream gen; "sample": one stream per sample
            if tc.rng == "sample":
                draws = SampleDraws(tc.seed, sample_positions(step, len(captions), rank, world))
                captions = draws.drop_captions(captions, tc.caption_dropout)
            with torch.no_grad():
                if "latent" in batch:  # pre-extracted latents (data.loader); images only for the edge maps
                    x0 = batch["latent"].to(device)  # (B, C, h, w)
                    images = codec.decode(x0).clamp(-1, 1) if edge_detector is not None else None
                else:
                    images = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
                    x0 = codec.encode(images, generator=gen if draws is None else draws.gens)  # (B, C, h, w)
                text = encoder(captions)  # hidden (B, n_y, d_y), valid (B, n_y), pooled_index (B,)
                if trim_text:  # the padding slots after the batch's longest caption change nothing: cut them
                    text = text.trimmed()  # n_y -> max(pooled_index) + 1
                # token-attention loss (E82): each object's colour / shape / position tokens and its pixel mask
                targets = token_targets(batch["scene"], captions, text.hidden.shape[1], tc.token_words) if token else None
                edges = edge_detector(images) if edge_detector is not None else None  # (B, 1, H, W) in [0, 1]
            B = x0.shape[0]
            if draws is None:
                t = draw_timesteps(gen, B, schedule.T, tc.t_shift).to(device)  # (B,)
                noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, h, w)
            else:
                t = draws.timesteps(schedule.T, tc.t_shift).to(device)  # (B,)
                noise = draws.noise(tuple(x0.shape[1:])).to(device)  # (B, C, h, w)
            # gradient accumulation (train.grad_accum = K): the per-rank batch, its frozen features, t and noise
            # are made exactly as for K = 1 and cut into K consecutive micro-batches of B / K, so K micro-steps
            # see the samples and draws of one step of B (only the model's own draws, gate noise and dropout,
            # come per micro-batch) and the data stream and RNG streams advance once per optimizer step. Each
            # micro-loss is divided by K: the summed gradient is that of the batch mean; the ranks reduce it
            # once, in the last micro-step's backward (grad_sync).
            opt.zero_grad(set_to_none=True)
            sums = None  # (total, denoise, edge[, balance][, token]) summed over the micro-batches, float64 on the device
            for k, mb in enumerate(micro_slices(B, accum)):
                with grad_sync(net_for_loss, k == accum - 1):
                    with amp, (nullcontext() if draws is None else per_sample_noise(draws.seeds[mb])):
                        mb_targets = None if targets is None else targets.select(mb)
                        out = training_losses(net_for_loss, schedule, x0[mb], t[mb], noise[mb], text.hidden[mb],
                                              text.valid[mb], text.pooled_index[mb], None if edges is None else edges[mb],
                                              focal_alpha=tc.focal_alpha, focal_gamma=tc.focal_gamma,
                                              loss_weight=tc.loss_weight, loss_weight_max=tc.loss_weight_max,
                                              balance_loss=tc.balance_loss, token_loss=tc.token_loss,
                                              token_targets=None if mb_targets is None else mb_targets.to(device))
                    if token and accum > 1:
                        # the token loss is a mean over (object, word) pairs, and micro-batches hold unequal numbers
                        # of pairs: weigh each micro-batch's mean by its share of the batch's pairs, so that the K
                        # micro-losses / K sum to the batch's mean, as the denoising loss does (host counts, no sync)
                        w = mb_targets.sample.numel() * accum / max(targets.sample.numel(), 1)
                        out["total"] = out["total"] + tc.token_loss * (w - 1) * out["token"]
                        out["token"] = w * out["token"]
                    usage.update(out["aux"], text.valid[mb], count_step=k == accum - 1)  # no host sync
                    (out["total"] if accum == 1 else out["total"] / accum).backward()
                micro = torch.stack([out["total"].detach(), out["denoise"].detach(), out["edge"].detach()]
                                    + ([out["balance"].detach()] if balance else [])
                                    + ([out["token"].detach()] if token else [])).double()
                sums = micro if sums is None else sums + micro  # a non-finite micro-loss makes the sum non-finite
                del out  # the micro-step's routes and losses; its graph is freed by backward
            mean = sums if accum == 1 else sums / accum  # the mean over the micro-batches = the batch mean
            norm = grad_norm(model, tc.grad_clip)  # (), after DDP / FSDP reduced the gradients: one value for all ranks

            # losses of all ranks, whether any rank saw a non-finite loss (in any micro-step) or gradient, and
            # (several ranks) whether any was asked to stop; all on the device
            losses = mean[:3]
            bad_here = ~(torch.isfinite(losses).all() & torch.isfinite(norm))
            stats = torch.cat([losses, bad_here.double().reshape(1),
                               torch.full((1,), float(stop.requested), dtype=torch.float64, device=device)]
                              + ([mean[3:]] if balance or token else []))
            if world > 1:
                dist.all_reduce(stats)
                stats[:3] /= world
                stats[5:] /= world
                stopping = bool(stats[4] > 0)  # every rank stops at the same step: one host sync per step
            else:
                stopping = stop.requested
            bad = stats[3] > 0  # (), bool on the device, the same on every rank
            if skip_mode:
                if bool(bad):
                    skipped_window, skipped_in_row, skipped_steps = skipped_window + 1, skipped_in_row + 1, skipped_steps + 1
                    opt.zero_grad(set_to_none=True)
                else:
                    skipped_in_row = 0
                    opt.step()
                    T.update_ema(ema, model, tc.ema_decay)
                    window += torch.cat([stats[:3], one])
                    add_grad_norm(grad_window, norm)
                    if balance:
                        balance_window += stats[5]
                    if token:
                        token_window += stats[token_at]
            else:
                opt.step()  # non-finite gradients make the weights non-finite: the run stops at the next check
                nonfinite_at = torch.where(bad & (nonfinite_at < 0), step + 1, nonfinite_at)
                T.update_ema(ema, model, tc.ema_decay, skip=nonfinite_at >= 0)
                window += torch.cat([stats[:3], one])
                add_grad_norm(grad_window, norm)
                if balance:
                    balance_window += stats[5]
                if token:
                    token_window += stats[token_at]
            step += 1
            busy, busy_steps = busy + time.perf_counter() - t_step, busy_steps + 1
            if bar is not None:
                bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                w, g = torch.cat([window, grad_window]).cpu().split([4, 2])  # the log line's host sync
                n = int(w[3])
                mean = (w[:3] / n).tolist() if n else [math.nan] * 3
                dt = busy / max(1, busy_steps)
                record = {"step": step, "loss": mean[0], "denoise": mean[1], "edge": mean[2], "lr": lr,
                          "grad_norm": float(g[0]) / n if n else math.nan, "grad_norm_max": float(g[1]) if n else math.nan,
                          "sec_per_step": round(dt, 4), "images_per_sec": round(tc.batch_size / dt, 2)}
                if skip_mode:
                    record["skipped"] = skipped_window
                if balance:
                    record["balance"] = float(balance_window) / n if n else math.nan
                if token:
                    record["token"] = float(token_window) / n if n else math.nan
                record["expert_usage"] = usage.summary()  # collective under DDP / FSDP: every rank
                if log is not None:
                    log.write(record)
                    if tb is not None:
                        tb.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
                    else:
                        # the weighted extra terms, so that the printed terms add up to the loss
                        extra = "".join(f"  {k} {tc_w * record[k]:.4f}" for k, tc_w in
                                        (("balance", tc.balance_loss), ("token", tc.token_loss)) if k in record)
                        print(f"step {step}/{tc.steps}  loss {mean[0]:.4f}  denoise {mean[1]:.4f}  edge {mean[2]:.4f}"
                              f"{extra}  lr {lr:.2e}  {dt:.2f} s/step" + (f"  skipped {skipped_window}" if skipped_window else ""),
                              flush=True)
                window.zero_()
                balance_window.zero_()
                token_window.zero_()
                grad_window.zero_()
                usage.reset()
                busy, busy_steps, skipped_window = 0.0, 0, 0
                check_finite()
                collapsed = collapse_warning(record["expert_usage"], step) if rank == 0 else None
                if collapsed is not None:  # after check_finite: the routes of a diverged window mean nothing
                    (bar.write if bar is not None else print)(f"warning: {collapsed}", file=sys.stderr)
            if skip_mode and skipped_in_row >= tc.nonfinite_max_skips:
                raise Diverged(step, f"a non-finite loss or gradient norm in {skipped_in_row} steps in a row, all "
                                     f"skipped (train.nonfinite=skip, train.nonfinite_max_skips={tc.nonfinite_max_skips})")
            final = step == tc.steps
            ckpt_due = step % tc.ckpt_every == 0 or final or stopping
            grid_due = bool(cfg.sample.every and step % cfg.sample.every == 0) or final
            if ckpt_due or grid_due:
                check_finite()  # never a checkpoint or sample grid from non-finite weights
            if ckpt_due:  # before the grid: a failing grid loses nothing
                save_checkpoint(final=final)
            if grid_due:
                err = sample_grid()
                if err is not None:
                    if not ckpt_due:
                        save_checkpoint()
                    where = T.latest_checkpoint(run_dir)
                    return fail(rank, f"{err}; the checkpoint {where} is written and intact"
                                      + ("" if final else f"; fix the sample.* settings and resume with: python "
                                                          f"tools/train.py --out {run_dir} --resume"),
                                EXIT_AFTER_TRAINING)
            if stopping:
                say(rank, f"stopped at step {step}; resume with: python tools/train.py --out {run_dir} --resume")
                return EXIT_INTERRUPTED
    except Diverged as d:
        last = T.latest_checkpoint(run_dir)
        where = (f"the last finite checkpoint is {last}: resume from it with a lower learning rate, e.g. python "
                 f"tools/train.py --out {run_dir} --resume --set train.lr={tc.lr / 10:g}" if last is not None else
                 "no checkpoint was written: start again with a lower train.lr")
        what = d.detail or "a non-finite loss or gradient norm (train.nonfinite=stop)"
        return fail(rank, f"the run diverged at step {d.step}: {what}; nothing was written after it; {where}",
                    EXIT_DIVERGED)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    if late_errors:
        return fail(rank, "; ".join(late_errors) + f"; the final checkpoint {T.latest_checkpoint(run_dir)} is written "
                    f"and intact", EXIT_AFTER_TRAINING)
    wall = time.perf_counter() - t_start
    say(rank, f"done: {step} steps; run folder {run_dir}; this command: {step - first_step} steps in "
              f"{int(wall // 60)} min {wall % 60:.0f} s of wall time, setup and sample grids included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
