"""Model checkpoints: weights in safetensors plus the config as JSON. Never unpickles.

    save_model(dir, model, cfg)     -> dir/model.safetensors, dir/config.json (written atomically)
    load_model(dir)                  -> (RaphaelUNet, RaphaelConfig), every key and shape checked
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raphael_ref.config import RaphaelConfig
from raphael_ref.models import RaphaelUNet
from raphael_ref.statedict import state_dict_mismatches

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one, never half


def save_model(directory: str | Path, model: torch.nn.Module, cfg: RaphaelConfig, *, weights_name: str = WEIGHTS) -> Path:
    """Write ``model``'s state dict (contiguous CPU tensors) and ``cfg`` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / weights_name, lambda p: save_file(state, str(p), metadata={"format": "raphael_ref", "preset": cfg.name}))
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
    """Build the U-Net from ``directory/config.json`` (or ``cfg``) and load ``directory/<weights_name>``."""
    directory = Path(directory)
    weights = directory / weights_name
    if cfg is None:
        if not (directory / CONFIG).exists():
            raise FileNotFoundError(f"no {CONFIG} in {directory}: is this a raphael_ref checkpoint directory?")
        cfg = RaphaelConfig.from_json(directory / CONFIG)
    if not weights.exists():
        raise FileNotFoundError(f"no weights file {weights}; expected {weights_name} written by save_model")
    with torch.device("meta"):
        model = RaphaelUNet(cfg.model)
    state = load_file(str(weights), device=str(map_location))
    check_state_dict(model.state_dict(), state, str(weights))
    model.load_state_dict(state, assign=True)
    return model, cfg
