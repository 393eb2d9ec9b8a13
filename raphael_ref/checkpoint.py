"""Model checkpoints: weights in safetensors plus the config as JSON. Never unpickles.

    save_model(dir, model, cfg)     -> dir/model.safetensors, dir/config.json (written atomically)
    load_model(dir)                  -> (RaphaelUNet, RaphaelConfig), every key and shape checked

Every tensor file written here (and by ``training.save_checkpoint``) carries its own SHA-256 in its
safetensors metadata (``"sha256"``: the digest of the whole file with those 64 hex digits written as
zeros), checked on load: safetensors itself has no checksum, so a flipped byte in a tensor would
load silently. A damaged or truncated file raises :class:`CheckpointError` naming the file; files
without the field (written before it existed, or by other tools) load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raphael_ref.config import RaphaelConfig
from raphael_ref.models import RaphaelUNet, schedule_for
from raphael_ref.statedict import state_dict_mismatches

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DIGEST_KEY = "sha256"  # safetensors metadata field holding the file's own SHA-256
_PLACEHOLDER = "0" * 64


class CheckpointError(ValueError):
    """A checkpoint file is damaged: truncated, unreadable, or its bytes differ from its recorded SHA-256."""


def _header(path: Path) -> tuple[int, bytes]:
    """(header length n, header bytes) of a safetensors file: 8-byte little-endian n, then n bytes of JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({len(head)} bytes): not a safetensors file")
        n = struct.unpack("<Q", head)[0]
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or damaged: its header claims {n} bytes, the file has {size}")
        return n, f.read(n)


def _digest(path: Path, patch: tuple[int, bytes] | None = None) -> str:
    """SHA-256 of the file's bytes, with ``patch = (offset, bytes)`` read in place of the bytes there."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if patch is not None:
            at, replacement = patch
            h.update(f.read(at))
            h.update(replacement)
            f.seek(len(replacement), os.SEEK_CUR)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _digest_field(header: bytes) -> int | None:
    """Offset (in the file) of the 64 hex digits of the metadata's sha256 field, or None when it has none."""
    try:
        meta = json.loads(header).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError("its safetensors header is not valid JSON") from None
    value = meta.get(DIGEST_KEY)
    if not isinstance(value, str):
        return None
    i = header.find(f'"{DIGEST_KEY}":"{value}"'.encode())
    if i < 0 or len(value) != 64:
        raise CheckpointError(f"its {DIGEST_KEY} field is malformed")
    return 8 + i + len(DIGEST_KEY) + 4


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``save_file`` plus the file's SHA-256 in its metadata (see the module docstring); not atomic by itself."""
    path = Path(path)
    save_file(tensors, str(path), metadata={**(metadata or {}), DIGEST_KEY: _PLACEHOLDER})
    _, header = _header(path)
    at = _digest_field(header)
    digest = _digest(path)  # the field still holds the zeros
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())
    return path


def verify_tensors(path: str | Path) -> bool:
    """Check ``path`` against its recorded SHA-256: True when checked, False when it records none.

    Raises :class:`CheckpointError` naming the file when it is truncated, unreadable or changed.
    """
    path = Path(path)
    try:
        n, header = _header(path)
        at = _digest_field(header)
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path} is damaged: {msg}") from None
    if at is None:
        return False
    recorded = header[at - 8: at - 8 + 64].decode("ascii", "replace")
    actual = _digest(path, patch=(at, _PLACEHOLDER.encode()))
    if actual != recorded:
        raise CheckpointError(f"{path} is damaged: its SHA-256 is {actual[:16]}..., the checkpoint recorded "
                              f"{recorded[:16]}... when it was written (a truncated copy or changed bytes)")
    return True


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``load_file`` after :func:`verify_tensors`; any read error is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    verify_tensors(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # SafetensorError, OSError, ...: the file cannot be read as written
        raise CheckpointError(f"{path} is damaged: cannot be read as safetensors ({type(e).__name__}: {e})") from None


def intact_neighbour(directory: str | Path, weights_name: str = WEIGHTS) -> Path | None:
    """The last (by name) other checkpoint folder beside ``directory`` whose ``weights_name`` verifies."""
    directory = Path(directory)
    for other in sorted(directory.parent.iterdir(), reverse=True) if directory.parent.is_dir() else []:
        if other == directory or not other.is_dir() or other.name.endswith(".tmp") or not (other / weights_name).is_file():
            continue
        try:
            verify_tensors(other / weights_name)
            load_file(str(other / weights_name))
        except Exception:
            continue
        return other
    return None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one, never half


def save_model(directory: str | Path, model: torch.nn.Module, cfg: RaphaelConfig, *, weights_name: str = WEIGHTS) -> Path:
    """Write ``model``'s state dict (contiguous CPU tensors) and ``cfg`` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / weights_name, lambda p: save_tensors(state, p, metadata={"format": "raphael_ref", "preset": cfg.name}))
    _atomic_write(directory / CONFIG, lambda p: cfg.to_json(p))
    return directory


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming every missing key, unexpected key and shape mismatch."""
    missing, unexpected, mismatched = state_dict_mismatches({k: v.shape for k, v in expected.items()}, given)
    wrong = [f"{k}: model {e} vs file {g}" for k, e, g in mismatched]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not match the model built from its config:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise ValueError("\n".join(lines))


def load_model(directory: str | Path, *, weights_name: str = WEIGHTS, map_location: str | torch.device = "cpu",
               cfg: RaphaelConfig | None = None) -> tuple[RaphaelUNet, RaphaelConfig]:
    """Build the U-Net from ``directory/config.json`` (or ``cfg``) and load ``directory/<weights_name>``.

    A damaged weights file or config raises :class:`CheckpointError` naming it (and an intact checkpoint
    folder beside it, if there is one).
    """
    directory = Path(directory)
    weights = directory / weights_name
    if cfg is None:
        if not (directory / CONFIG).exists():
            raise FileNotFoundError(f"no {CONFIG} in {directory}: is this a raphael_ref checkpoint directory?")
        try:
            cfg = RaphaelConfig.from_json(directory / CONFIG)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not JSON: damaged (a bad field is a ValueError)
            raise CheckpointError(_damaged(directory / CONFIG, f"not valid JSON ({e})", weights_name)) from None
    if not weights.exists():
        raise FileNotFoundError(f"no weights file {weights}; expected {weights_name} written by save_model")
    schedule = schedule_for(cfg)  # built off the meta device: its float64 tables are real (E88; None for eps)
    with torch.device("meta"):
        model = RaphaelUNet(cfg.model, schedule=schedule)
    try:
        state = load_tensors(weights, device=map_location)
    except CheckpointError as e:
        raise CheckpointError(_damaged(weights, str(e), weights_name)) from None
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, assign=True)
    return model, cfg


def _damaged(path: Path, msg: str, weights_name: str) -> str:
    """The message for a damaged checkpoint file: what is wrong, and an intact checkpoint beside it, if any."""
    msg = msg if msg.startswith(str(path)) else f"{path}: {msg}"
    other = intact_neighbour(path.parent, weights_name)
    return msg + (f"; an intact checkpoint beside it: {other}" if other is not None else
                  "; no intact checkpoint found beside it: write it again (or copy it again)")
