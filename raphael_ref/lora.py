"""LoRA adapters for the RAPHAEL U-Net, through ``peft`` (RAPHAEL Sec. 4.1 / App. 7.8; Hu et al. 2021).

The paper fine-tunes RAPHAEL with LoRA on 28-32 images of a new concept (Sec. 4.1, App. 7.8, Fig. 19-20)
and prints no formula; we use LoRA as Hu et al. (2021) define it. A targeted linear layer
``y = x W^T + b`` (``W`` (d_out, d_in)) becomes

    y = x W^T + b + s (alpha / r) (x A^T) B^T,        i.e.  W' = W + s (alpha / r) B A

with ``A`` (r, d_in) drawn at random (peft: Kaiming-uniform), ``B`` (d_out, r) zero-initialised (so an
untrained adapter leaves the model unchanged), rank ``r``, ``alpha`` (default ``r``: scaling 1) and a
sampling-time strength ``s`` (``lora_scale``, default 1). Only ``A`` and ``B`` train; ``W`` and ``b`` are
frozen. :func:`lora_linear_literal` is the literal form of this equation (spec id ``lora.update``).

The adapters are peft's own (``peft.LoraConfig`` + ``peft.inject_adapter_in_model``): the targeted
``nn.Linear`` modules are replaced in place by ``peft.tuners.lora.Linear`` wrappers, so the model stays a
:class:`~raphael_ref.models.RaphaelUNet` (``model.cfg``, ``transformer_blocks()``, the sampler and the
training objective work unchanged) and its forward keeps its positional arguments. Its state-dict keys of
the wrapped layers gain ``.base_layer`` (``to_q.weight`` -> ``to_q.base_layer.weight``): save base weights
only after :func:`merge_and_unload` (or keep saving only the adapter, :func:`save_lora`).

Targets (``targets=``; every name is an ``nn.Linear`` of each transformer block, ``models.py``):

    "attention"  (default) self_attn.qkv, self_attn.out (self-attention: W^qkv, W^o),
                 to_q, to_k, to_v, to_out (cross-attention: W_x^qry, W_y^key, W_y^val, W^o)
    "cross_attention"      to_q, to_k, to_v, to_out only (what most Stable Diffusion LoRAs adapt)
    "attention+proj"       "attention" plus each SpatialTransformer's proj_in, proj_out
    or a list of these layer names.

The experts are not a target. ``experts.ExpertBank`` stores the k experts of a space- or time-MoE (and
the one-expert dense FFN of the ablations) as stacked parameter banks ``w1`` (k, d, h), ``w2`` (k, h, d),
not as ``nn.Linear`` modules, and the block applies them through ``expert_ffn`` / ``space_moe`` /
``time_moe``, reading ``bank.w1[k]`` directly. peft's ``target_parameters`` (``lora.ParamWrapper``, made
for such 3-D MoE banks) adds its delta only while the wrapped module's own ``forward`` runs (a
parametrisation registered for that call), and the U-Net never calls ``ExpertBank.forward``: the
adapter would be silently inactive (tests/test_lora.py::test_expert_banks_are_not_a_peft_target shows
it). Putting LoRA on the experts would need the block to call its banks through ``forward`` or a
hand-written adapter, which the issue rules out; ``targets="experts"`` raises and says so.

Adapter files (:func:`save_lora`): ``NAME.safetensors`` holds only the adapter weights (peft's
``get_peft_model_state_dict`` keys, e.g. ``down.1.attn.block.to_q.lora_A.weight``; SHA-256 in the
metadata as every checkpoint file here, ``checkpoint.save_tensors``) and ``NAME.json`` beside it the
LoRA config (r, alpha, dropout, targets, peft's target regex) and the base run the adapter belongs to.
:func:`apply_lora` is the one call a sampler needs::

    model = apply_lora(model, "runs/lora/adapter.safetensors", scale=0.8, merge=True)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "TARGET_SETS", "LAYER_NAMES", "ADAPTER", "lora_linear_literal", "lora_delta_weight", "lora_config", "add_lora",
    "lora_layers", "lora_parameters", "has_lora", "lora_state_dict", "save_lora", "read_lora_config", "load_lora",
    "apply_lora", "set_lora_scale", "merge_lora", "unmerge_lora", "merge_and_unload", "remove_lora",
    "freeze_base", "check_base_frozen", "base_weights_info", "adapter_json_path", "trainable_summary",
]

ADAPTER = "default"  # peft's adapter name; one adapter per model here
FORMAT = "raphael_ref.lora"
FORMAT_VERSION = 1

# module names (relative to a TransformerBlock, or to a SpatialTransformer for proj_in / proj_out)
_BLOCK_LAYERS = ("self_attn.qkv", "self_attn.out", "to_q", "to_k", "to_v", "to_out")
_PROJ_LAYERS = ("proj_in", "proj_out")
LAYER_NAMES = _BLOCK_LAYERS + _PROJ_LAYERS
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "attention": _BLOCK_LAYERS,
    "cross_attention": ("to_q", "to_k", "to_v", "to_out"),
    "attention+proj": _BLOCK_LAYERS + _PROJ_LAYERS,
}
_EXPERTS_WHY = (
    "LoRA on the experts is not supported: experts.ExpertBank stores the experts as stacked parameter banks "
    "(w1 (k, d, h), w2 (k, h, d)), not nn.Linear modules, and the U-Net applies them through expert_ffn / "
    "space_moe / time_moe rather than ExpertBank.forward, so peft's target_parameters wrapper (which adds its "
    "delta only inside the wrapped module's forward) would be silently inactive; see raphael_ref/lora.py"
)


def _peft():
    """The peft module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the test extra
        raise ImportError("LoRA needs the peft package: pip install 'raphael_ref[lora]' (or pip install 'peft>=0.10')"
                          ) from e
    return peft


# ------------------------------------------------------------------------------ the equation (lora.update)


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, alpha: float, r: int, scale: float = 1.0) -> torch.Tensor:
    """Delta W = s (alpha / r) B A: (d_out, d_in) from A (r, d_in), B (d_out, r) (Hu et al. 2021, Eq. 3)."""
    _check_factors(A, B, r)
    return (scale * alpha / r) * (B @ A)  # (d_out, d_in)


def lora_linear_literal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                        B: torch.Tensor, alpha: float, r: int, scale: float = 1.0) -> torch.Tensor:
    """Literal LoRA linear layer: y = x W^T + b + s (alpha / r) (x A^T) B^T.

    x (..., d_in); weight W (d_out, d_in); bias b (d_out,) or None; A (r, d_in); B (d_out, r). Plain torch
    in the inputs' dtype, the low-rank path in peft's order (A first, then B, then the scaling).
    """
    _check_factors(A, B, r)
    if weight.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"weight must be (d_out, d_in) = {(B.shape[0], A.shape[1])} to match B A; got {tuple(weight.shape)}")
    base = x @ weight.T + (bias if bias is not None else 0)  # (..., d_out)
    return base + ((x @ A.T) @ B.T) * (scale * alpha / r)  # (..., d_out)


def _check_factors(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    _check_rank(r)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ValueError(f"LoRA factors must be A (r, d_in), B (d_out, r) with r = {r}; got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")


def _check_rank(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1; got {r!r}")
    return r


# ------------------------------------------------------------------------------ config and injection


def _target_layers(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets in ("experts", "space_experts", "time_experts"):
            raise ValueError(f"targets={targets!r}: {_EXPERTS_WHY}")
        if targets not in TARGET_SETS:
            raise ValueError(f"unknown LoRA target set {targets!r}; choose one of {sorted(TARGET_SETS)} or a list of "
                             f"layer names from {list(LAYER_NAMES)}")
        return TARGET_SETS[targets]
    layers = tuple(targets)
    if any("expert" in str(n) for n in layers):
        raise ValueError(f"targets {list(layers)}: {_EXPERTS_WHY}")
    bad = [n for n in layers if n not in LAYER_NAMES]
    if bad or not layers:
        raise ValueError(f"LoRA targets must be a non-empty list of layer names from {list(LAYER_NAMES)}; got "
                         f"{list(layers)} (unknown: {bad})")
    return layers


def _target_regex(layers: Sequence[str]) -> str:
    """peft ``target_modules`` regex (``re.fullmatch`` against each module's full name)."""
    parts = []
    block = [n for n in layers if n in _BLOCK_LAYERS]
    proj = [n for n in layers if n in _PROJ_LAYERS]
    if block:
        parts.append(r"(.*\.)?block\.(" + "|".join(re.escape(n) for n in block) + ")")
    if proj:  # a SpatialTransformer is "down.N.attn", "up.N.attn" or "mid_attn"
        parts.append(r"(.*\.)?(attn|mid_attn)\.(" + "|".join(re.escape(n) for n in proj) + ")")
    return "|".join(f"(?:{p})" for p in parts)


def lora_config(r: int = 4, alpha: float | None = None, dropout: float = 0.0,
                targets: str | Sequence[str] = "attention"):
    """peft ``LoraConfig`` for the U-Net: rank ``r`` >= 1, ``alpha`` (default ``r``), dropout on the LoRA input."""
    LoraConfig = _peft().LoraConfig

    _check_rank(r)
    alpha = float(r if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0; got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"LoRA dropout must lie in [0, 1); got {dropout!r}")
    layers = _target_layers(targets)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=_target_regex(layers),
                      bias="none", init_lora_weights=True)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) of every wrapped module, in module order."""
    _peft()
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every lora_A / lora_B weight)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on the adapter parameters (peft's injection already does this; idempotent)."""
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)


def check_base_frozen(model: nn.Module) -> None:
    """Raise RuntimeError unless exactly the adapter parameters require gradients."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    base = [n for n in trainable if ".lora_A." not in n and ".lora_B." not in n]
    if base:
        raise RuntimeError(f"LoRA fine-tuning must train only the adapters, but {len(base)} base parameters require "
                           f"gradients: {base[:5]}{' ...' if len(base) > 5 else ''}")
    if not trainable:
        raise RuntimeError("no adapter parameter requires gradients: add_lora / load_lora first")


def add_lora(model: nn.Module, r: int = 4, alpha: float | None = None, dropout: float = 0.0,
             targets: str | Sequence[str] = "attention", *, seed: int | None = None) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in peft LoRA layers, in place; returns ``model``.

    A ~ Kaiming-uniform (peft's default, drawn from torch's global RNG, or from ``seed`` without touching it),
    B = 0: the adapted model computes exactly what the base computes until B trains. Every base parameter is
    frozen (requires_grad False); the adapters train. A model may carry one adapter (:func:`remove_lora`).
    """
    inject_adapter_in_model = _peft().inject_adapter_in_model

    cfg = lora_config(r, alpha, dropout, targets)
    if has_lora(model):
        raise ValueError("the model already carries a LoRA adapter; remove_lora(model) or merge_and_unload(model) first")
    if seed is None:
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    if not has_lora(model):  # pragma: no cover - peft raises first when nothing matches
        raise ValueError(f"no module of the model matches the LoRA targets {targets!r}")
    model._raphael_lora = {"r": r, "alpha": float(r if alpha is None else alpha), "dropout": float(dropout),
                           "targets": targets if isinstance(targets, str) else list(targets)}
    freeze_base(model)
    return model


# ------------------------------------------------------------------------------ scale, merge, unload


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the strength s of every adapter layer: scaling = s alpha / r (peft ``set_scale``)."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"lora_scale must be finite; got {scale!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA adapter")
    if any(m.merged for _, m in layers):
        raise ValueError("cannot change lora_scale while the adapter is merged: unmerge_lora(model) first")
    for _, m in layers:
        m.set_scale(ADAPTER, scale)
    model._raphael_lora_scale = scale


def merge_lora(model: nn.Module) -> None:
    """W <- W + s (alpha / r) B A in every adapted layer (peft ``merge``); the forward then skips the LoRA path."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA adapter to merge")
    for _, m in layers:
        m.merge(adapter_names=[ADAPTER])


def unmerge_lora(model: nn.Module) -> None:
    """W <- W - s (alpha / r) B A (peft ``unmerge``): the base weights back, up to one float rounding each."""
    for _, m in lora_layers(model):
        if m.merged:
            m.unmerge()


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    for name, m in lora_layers(model):
        if merge and not m.merged:
            m.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    for attr in ("peft_config", "_raphael_lora", "_raphael_lora_scale"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapter into the base weights and put the plain ``nn.Linear`` layers back, in place: the model's
    state dict has the base model's keys again (``checkpoint.save_model`` writes a normal checkpoint).
    Parameters keep their requires_grad (False after add_lora)."""
    return _unwrap(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapter (unmerging first if merged), in place: the base model as it was (up to the unmerge rounding)."""
    unmerge_lora(model)
    return _unwrap(model, merge=False)


# ------------------------------------------------------------------------------ files


def adapter_json_path(path: str | Path) -> Path:
    """``NAME.json`` beside ``NAME.safetensors``."""
    return Path(path).with_suffix(".json")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (peft ``get_peft_model_state_dict``), contiguous CPU copies."""
    get_peft_model_state_dict = _peft().get_peft_model_state_dict

    if not has_lora(model):
        raise ValueError("the model carries no LoRA adapter")
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def base_weights_info(checkpoint_dir: str | Path, weights_name: str = "ema.safetensors") -> dict[str, Any]:
    """Where a base model came from: {"checkpoint", "weights", "sha256"} (the digest its file records, if any)."""
    from safetensors import safe_open

    path = Path(checkpoint_dir) / weights_name
    sha = None
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            sha = (f.metadata() or {}).get("sha256")
    return {"checkpoint": str(checkpoint_dir), "weights": weights_name, "sha256": sha}


def save_lora(model: nn.Module, path: str | Path, *, base: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter weights to ``path`` (safetensors, SHA-256 recorded) and its config to ``path.json``.

    ``base``: the base run the adapter belongs to (:func:`base_weights_info`, plus e.g. {"run": ...});
    ``extra``: more JSON fields (training settings). Returns ``path``.
    """
    peft = _peft()

    from raphael_ref.checkpoint import save_tensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA adapter file must end in .safetensors; got {path}")
    info = getattr(model, "_raphael_lora", None)
    if info is None or not has_lora(model):
        raise ValueError("the model carries no LoRA adapter made by add_lora / load_lora")
    if any(m.merged for _, m in lora_layers(model)):
        warnings.warn("saving the adapter of a merged model: the adapter weights are saved, the merged base is not")
    state = lora_state_dict(model)
    peft_cfg = model.peft_config[ADAPTER]
    doc = {"format": FORMAT, "version": FORMAT_VERSION, **info, "target_modules": peft_cfg.target_modules,
           "peft_version": peft.__version__, "n_tensors": len(state),
           "n_parameters": int(sum(v.numel() for v in state.values())),
           "base": base or {}, **(extra or {})}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        doc["model"] = cfg.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(state, tmp, metadata={"format": FORMAT, "r": str(info["r"]), "alpha": str(info["alpha"])})
    tmp.replace(path)
    adapter_json_path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_lora_config(path: str | Path) -> dict[str, Any]:
    """The JSON beside an adapter file; FileNotFoundError / ValueError naming the file when absent or not ours."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no LoRA adapter file {path} (written by tools/finetune_lora.py / lora.save_lora)")
    js = adapter_json_path(path)
    if not js.exists():
        raise FileNotFoundError(f"no LoRA config {js} beside the adapter {path}: the adapter's rank, alpha and "
                                f"targets are read from it (lora.save_lora writes both files)")
    try:
        doc = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{js} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{js} is not a raphael_ref LoRA config (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    return doc


def load_lora(model: nn.Module, path: str | Path, *, scale: float = 1.0,
              base_checkpoint: str | Path | None = None, base_weights: str = "ema.safetensors") -> nn.Module:
    """Put the adapter of ``path`` on ``model`` (in place; returns it) with strength ``scale``.

    The model must be the architecture the adapter was trained on: a missing, extra or differently shaped
    adapter tensor raises ValueError listing them (and leaves the model without adapter). With
    ``base_checkpoint``, a base whose weights file differs from the one the adapter was trained on (by
    its recorded SHA-256) gives a warning: it runs, but is not the pair that was trained.
    """
    from raphael_ref.checkpoint import load_tensors
    from raphael_ref.statedict import state_dict_mismatches

    path = Path(path)
    doc = read_lora_config(path)
    state = load_tensors(path)  # SHA-256 checked: a damaged file raises CheckpointError naming it
    targets = doc.get("targets", "attention")
    add_lora(model, r=int(doc["r"]), alpha=float(doc["alpha"]), dropout=float(doc.get("dropout", 0.0)),
             targets=targets)
    set_peft_model_state_dict = _peft().set_peft_model_state_dict

    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    missing, unexpected, mismatched = state_dict_mismatches(expected, state)
    if missing or unexpected or mismatched:
        remove_lora(model)
        lines = [f"LoRA adapter {path} does not fit this model (trained for another architecture?):"]
        wrong = [f"{k}: model {tuple(e)} vs file {tuple(g)}" for k, e, g in mismatched]
        for title, items in (("shape mismatches", wrong), ("adapter tensors the model lacks", unexpected),
                             ("adapter tensors missing from the file", missing)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):  # pragma: no cover - caught by the check above
        remove_lora(model)
        raise ValueError(f"LoRA adapter {path}: unexpected keys {result.unexpected_keys[:8]}")
    set_lora_scale(model, scale)
    if base_checkpoint is not None:
        want = (doc.get("base") or {}).get("sha256")
        have = base_weights_info(base_checkpoint, base_weights)["sha256"]
        if want and have and want != have:
            warnings.warn(f"LoRA adapter {path} was trained on base weights {want[:12]}... "
                          f"({(doc.get('base') or {}).get('checkpoint')}), not on {base_checkpoint}/{base_weights} "
                          f"({have[:12]}...): the adapter is applied anyway")
    return model


def apply_lora(model: nn.Module, path: str | Path | None, scale: float = 1.0, *, merge: bool = True,
               base_checkpoint: str | Path | None = None, base_weights: str = "ema.safetensors") -> nn.Module:
    """The sampler's hook: ``model = apply_lora(model, args.lora, args.lora_scale)``. ``path`` None: ``model``
    unchanged. ``merge`` (default): the adapter is merged into the weights, so sampling costs what the base costs."""
    if path is None:
        return model
    load_lora(model, path, scale=scale, base_checkpoint=base_checkpoint, base_weights=base_weights)
    if merge:
        merge_lora(model)
    return model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """{"adapter": n adapter parameters, "base": n base parameters, "trainable": n requiring grad}."""
    adapter = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return {"adapter": adapter, "base": total - adapter,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
