"""Configuration dataclasses and the preset registry (``toy``, ``small``, ``paper``).

Every value of the paper's Table 2 (App. 7.1) lives in exactly one field here;
``spec/hyperparameters.md`` maps each table row to its field, and a test checks the ``paper``
preset against that table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class DiffusionConfig:
    T: int = 1000  # Table 2: T
    schedule: str = "scaled_linear"  # not stated in the paper: the latent-diffusion default (spec/errata.md)
    zero_terminal_snr: bool = False


@dataclass
class ModelConfig:
    # --- U-Net (App. 7.3, Fig. 8a; Stable Diffusion 1.x layout) ---
    in_channels: int = 4  # latent channels (3 for the pixel-space toy preset)
    sample_size: int = 64  # latent height = width used to build/size-check (any multiple of 2**(levels-1) works)
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per down level; up levels get num_res_blocks + 1
    # Transformer blocks per level (down levels, middle, up levels). SD 1.x: 2 per level on the
    # three first down levels, 1 in the middle, 3 per level on the three last up levels = 16.
    transformer_down: tuple[int, ...] = (2, 2, 2, 0)
    transformer_mid: int = 1
    transformer_up: tuple[int, ...] = (0, 3, 3, 3)  # up levels listed from the deepest
    head_dim: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    # --- text conditioning (Sec. 2) ---
    n_y: int = 77  # Table 2: n_y (text tokens)
    d_y: int = 1024  # Table 2: d_y (text token width)
    text_encoder: str = "ViT-g-14"  # Table 2: "OpenCLIP-g/14" text tower
    text_encoder_weights: str | None = None  # local file; never downloaded
    text_layer: str = "last"
    # --- MoE (Sec. 3.1, App. 7.3) ---
    use_space_moe: bool = True
    use_time_moe: bool = True
    n_space_experts: int = 6  # Table 2
    n_time_experts: int = 4  # Table 2
    # Expert FFN hidden width = expert_mult * block width. The paper gives neither widths nor
    # expert sizes, only the total (3B, abstract): with Stable Diffusion 1.x widths (320, 640,
    # 1280, 1280) a hidden width of 9x brings the U-Net to 2.99B (spec/errata.md).
    expert_mult: int = 9
    gate_hidden_mult: int = 1  # gate FFN hidden width = gate_hidden_mult * input width
    mask_alpha: float = 0.2  # Table 2: alpha of the threshold eta_i = alpha * max_j M[j, i]
    gate_noise_std: float | None = None  # None: the gates' module default (spec/errata.md)
    gate_grad: str = "straight_through"
    count_padding: bool = True  # n_y = 77 slots in the space-MoE mean (spec/errata.md)
    attend_padding: bool = True  # cross-attention attends all 77 slots, as Stable Diffusion does
    # space-MoE fast form: "dense" (every expert on every position: no host sync, cost bounded by
    # the number of experts as Sec. 4.2 states) or "gather" (only covered positions; faster on CPU)
    moe_impl: str = "dense"
    # --- edge-supervised learning (Sec. 3.2) ---
    use_edge: bool = True
    edge_layers: int = 5  # N conv layers of P_theta
    edge_width: int = 32
    edge_t_cutoff: int = 500  # Table 2: T_c (edge loss only for t < T_c, 0-based)
    # --- memory ---
    checkpoint: bool = True  # Table 2: "Use checkpoint: True" (activation checkpointing per block)
    # --- image codec (Sec. 4 "Implementations": a pre-trained VAE, as in latent diffusion) ---
    codec: str = "vae"  # "vae": a diffusers AutoencoderKL read from vae_path; "identity": pixel space (toy)
    vae_path: str | None = None  # local AutoencoderKL folder (config.json + safetensors); never downloaded


@dataclass
class TrainConfig:
    lr: float = 1e-4  # Table 2
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Table 2
    weight_decay: float = 0.0  # Table 2
    warmup_steps: int = 20000  # Table 2
    batch_size: int = 2000  # Table 2 (global batch)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    focal_alpha: float = 0.5  # Table 2: alpha in Focal Loss
    focal_gamma: float = 2.0  # Table 2: gamma in Focal Loss
    caption_dropout: float = 0.1
    multiscale: bool = True  # Table 2: "Enable multi-scale training"
    aesthetic_min: float = 4.7  # Sec. 4 "Dataset"
    steps: int = 1_000_000
    seed: int = 0  # rank r of a world of size W draws from seed * W + r (DiT)
    # --- the run (tools/train.py): data, frozen parts, logging, checkpoints ---
    source: str = "synthetic"  # "synthetic", a folder/glob of tar shards, or an image folder (data.loader)
    num_workers: int = 0  # DataLoader worker processes per rank
    # multi-scale buckets: None = the paper's pixel sizes (Sec. 4); f = each side / f, rounded to what the
    # U-Net and codec accept (data.buckets.scaled_buckets; errata E45)
    bucket_factor: float | None = None
    edge_detector: str = "canny"  # I_edge (Sec. 3.2): "hed" as printed (needs hed_weights) or "canny" (offline)
    hed_weights: str | None = None  # converted HED safetensors (tools/convert_hed.py)
    mixed_precision: str = "bf16"  # autocast dtype on CUDA: "bf16" or "no"; the CPU always runs float32
    fsdp: bool = False  # shard with FSDP2 (fully_shard per transformer block + root) instead of DDP
    log_every: int = 100  # steps per JSONL line (each line holds the mean over its window)
    ckpt_every: int = 5000  # steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 3  # newest checkpoints kept on disk; 0 keeps all


# Prompts of the sample grids written while training: the synthetic data's caption template
# (raphael_ref.data.synthetic), so a toy run's grid can be checked by eye: colour, shape, place.
SYNTHETIC_PROMPTS: tuple[str, ...] = (
    "a red circle on the left",
    "a blue square on the right",
    "a green triangle at the top",
    "a yellow circle in the center",
    "a white square at the bottom",
    "a purple triangle on the left and a red square on the right",
    "two blue circles at the top and at the bottom",
    "a green square in the center and a yellow triangle at the top",
)
NATURAL_PROMPTS: tuple[str, ...] = (
    "a red apple on a wooden table",
    "a lighthouse on a cliff at sunset, oil painting",
    "two cats sleeping on a blue sofa",
    "a bowl of ramen, studio photograph",
    "a castle on a hill in the style of a Japanese comic",
    "an astronaut riding a horse on the moon",
    "a watercolor of purple hydrangeas",
    "a cyberpunk street at night in the rain",
)


@dataclass
class SampleConfig:
    """Sample grids written while training: EMA weights, fixed prompts, fixed seed."""

    every: int = 5000  # steps between grids (one is always written at the end); 0: only at the end
    sampler: str = "ddim"
    steps: int = 50  # sampler steps
    guidance: float = 4.5  # classifier-free guidance weight; Sec. 4.2 / Fig. 6b: best for the full model
    seed: int = 0
    prompts: tuple[str, ...] = NATURAL_PROMPTS


@dataclass
class RaphaelConfig:
    name: str = "paper"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    # ---- derived ----
    @property
    def n_transformer_blocks(self) -> int:
        m = self.model
        return sum(m.transformer_down) + m.transformer_mid + sum(m.transformer_up)

    def validate(self) -> "RaphaelConfig":
        """Raise ValueError naming the field for any inconsistent value."""
        m, d, t, s = self.model, self.diffusion, self.train, self.sample
        levels = len(m.channel_mult)

        def bad(field_name: str, msg: str) -> None:
            raise ValueError(f"config field {field_name}: {msg}")

        if d.T < 1:
            bad("diffusion.T", f"must be >= 1, got {d.T}")
        if len(m.transformer_down) != levels:
            bad("model.transformer_down", f"needs one entry per level ({levels}), got {m.transformer_down}")
        if len(m.transformer_up) != levels:
            bad("model.transformer_up", f"needs one entry per level ({levels}), got {m.transformer_up}")
        if any(n > m.num_res_blocks for n in m.transformer_down):
            bad("model.transformer_down", f"at most num_res_blocks={m.num_res_blocks} per level, got {m.transformer_down}")
        if any(n > m.num_res_blocks + 1 for n in m.transformer_up):
            bad("model.transformer_up", f"at most num_res_blocks+1={m.num_res_blocks + 1} per level, got {m.transformer_up}")
        if m.transformer_mid not in (0, 1):
            bad("model.transformer_mid", f"must be 0 or 1, got {m.transformer_mid}")
        for i, mult in enumerate(m.channel_mult):
            width = m.model_channels * mult
            if width % m.head_dim:
                bad("model.head_dim", f"level {i} width {width} is not a multiple of head_dim {m.head_dim}")
            if width % m.norm_groups:
                bad("model.norm_groups", f"level {i} width {width} is not a multiple of norm_groups {m.norm_groups}")
        if m.sample_size % (2 ** (levels - 1)):
            bad("model.sample_size", f"must be divisible by 2**(levels-1) = {2 ** (levels - 1)}, got {m.sample_size}")
        if not 0.0 <= m.mask_alpha <= 1.0:
            bad("model.mask_alpha", f"must lie in [0, 1], got {m.mask_alpha}")
        if m.n_space_experts < 1:
            bad("model.n_space_experts", f"must be >= 1, got {m.n_space_experts}")
        if m.n_time_experts < 1:
            bad("model.n_time_experts", f"must be >= 1, got {m.n_time_experts}")
        if not 0 <= m.edge_t_cutoff <= d.T:
            bad("model.edge_t_cutoff", f"must lie in [0, T={d.T}], got {m.edge_t_cutoff}")
        if m.edge_layers < 1:
            bad("model.edge_layers", f"must be >= 1, got {m.edge_layers}")
        if m.gate_grad not in ("none", "switch", "straight_through"):
            bad("model.gate_grad", f"must be 'none', 'switch' or 'straight_through', got {m.gate_grad!r}")
        if not m.attend_padding and m.count_padding:
            bad("model.count_padding", "must be false when model.attend_padding is false: padding tokens that the "
                "cross-attention ignores have an all-zero map column, and their threshold mask would cover the "
                "whole image (spec/errata.md, padding keys)")
        if m.moe_impl not in ("dense", "gather"):
            bad("model.moe_impl", f"must be 'dense' or 'gather', got {m.moe_impl!r}")
        if m.text_layer not in ("last", "penultimate"):
            bad("model.text_layer", f"must be 'last' or 'penultimate', got {m.text_layer!r}")
        if t.lr <= 0:
            bad("train.lr", f"must be > 0, got {t.lr}")
        if not 0.0 <= t.caption_dropout <= 1.0:  # 1.0: no text at all (an unconditional control model)
            bad("train.caption_dropout", f"must lie in [0, 1], got {t.caption_dropout}")
        if t.batch_size < 1:
            bad("train.batch_size", f"must be >= 1, got {t.batch_size}")
        if m.codec not in ("vae", "identity"):
            bad("model.codec", f"must be 'vae' or 'identity', got {m.codec!r}")
        if m.codec == "identity" and m.in_channels != 3:
            bad("model.in_channels", f"the identity codec (pixel space) needs 3 channels, got {m.in_channels}")
        if not all(0.0 <= b < 1.0 for b in t.adam_betas) or len(t.adam_betas) != 2:
            bad("train.adam_betas", f"must be two numbers in [0, 1), got {t.adam_betas}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(t, name) < 0:
                bad(f"train.{name}", f"must be >= 0 (0 switches it off), got {getattr(t, name)}")
        if not 0.0 <= t.ema_decay < 1.0:
            bad("train.ema_decay", f"must lie in [0, 1), got {t.ema_decay}")
        for name in ("warmup_steps", "steps", "num_workers", "keep_ckpts", "seed"):
            if getattr(t, name) < 0:
                bad(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
        for name in ("log_every", "ckpt_every"):
            if getattr(t, name) < 1:
                bad(f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
        if t.bucket_factor is not None and not t.bucket_factor > 0:
            bad("train.bucket_factor", f"must be > 0 or null (the paper's sizes), got {t.bucket_factor}")
        if t.edge_detector not in ("canny", "hed"):
            bad("train.edge_detector", f"must be 'canny' or 'hed', got {t.edge_detector!r}")
        if t.mixed_precision not in ("bf16", "no"):
            bad("train.mixed_precision", f"must be 'bf16' or 'no', got {t.mixed_precision!r}")
        if s.every < 0:
            bad("sample.every", f"must be >= 0 (0: only at the end), got {s.every}")
        if s.sampler not in ("ddim", "ddpm"):
            bad("sample.sampler", f"must be 'ddim' or 'ddpm', got {s.sampler!r}")
        if not 1 <= s.steps <= d.T:
            bad("sample.steps", f"must lie in [1, T={d.T}], got {s.steps}")
        if s.guidance < 0:
            bad("sample.guidance", f"must be >= 0, got {s.guidance}")
        if not s.prompts or not all(isinstance(p, str) for p in s.prompts):
            bad("sample.prompts", f"must be a non-empty list of strings, got {s.prompts!r}")
        return self

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RaphaelConfig":
        cfg = cls()
        apply_overrides(cfg, _flatten(d))
        return cfg.validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "RaphaelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(field_name: str, current: Any, value: Any, optional: bool = False) -> Any:
    """Convert a JSON/CLI value to the type of the field's current value (``None`` only for optional fields)."""
    if optional and (value is None or value == "null"):
        return None
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if current is None:
                return value
            raise ValueError(f"config field {field_name}: cannot parse {value!r}") from None
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {field_name}: expected a list, got {value!r}")
        kinds = {type(v) for v in current}
        if kinds and not all(type(v) in kinds or (float in kinds and type(v) is int) for v in value):
            raise ValueError(f"config field {field_name}: expected a list of {sorted(k.__name__ for k in kinds)}, "
                             f"got {value!r}")
        return tuple(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ValueError(f"config field {field_name}: expected a string, got {value!r}")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config field {field_name}: expected true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"config field {field_name}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"config field {field_name}: expected a number, got {value!r}")
        return float(value)
    return value


def apply_overrides(cfg: RaphaelConfig, overrides: dict[str, Any]) -> RaphaelConfig:
    """Set dotted fields (``{"model.n_space_experts": 4}``); unknown fields are errors naming them."""
    for key, value in overrides.items():
        parts = key.split(".")
        obj: Any = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"unknown config field {key!r}")
            obj = getattr(obj, p)
        leaf = parts[-1]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            known = sorted(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else []
            raise ValueError(f"unknown config field {key!r}; fields here: {known}")
        current = getattr(obj, leaf)
        if dataclasses.is_dataclass(current):
            raise ValueError(f"config field {key!r} is a section; set its fields, e.g. {key}.<name>")
        declared = next(f.type for f in dataclasses.fields(obj) if f.name == leaf)
        optional = "None" in str(declared)  # annotations are strings here (``from __future__ import annotations``)
        setattr(obj, leaf, _coerce(key, current, value, optional))
    return cfg


# ---------------------------------------------------------------- presets

def paper() -> RaphaelConfig:
    """Table 2 (App. 7.1): the 3B model. Widths chosen so the U-Net lands at ~3.0B parameters."""
    return RaphaelConfig(name="paper").validate()


def small() -> RaphaelConfig:
    """One GPU: latent 32x32, width 128, the full 16-block layout with 6 + 4 experts."""
    cfg = RaphaelConfig(name="small")
    m = cfg.model
    m.model_channels, m.sample_size, m.head_dim, m.d_y, m.norm_groups = 128, 32, 32, 1024, 32
    m.expert_mult = 4
    cfg.train.warmup_steps, cfg.train.batch_size = 2000, 64
    cfg.train.multiscale = False  # the paper's 9 buckets do not scale down to 256 px without collapsing (E27)
    return cfg.validate()


def toy() -> RaphaelConfig:
    """Pixel space 24x24, tiny widths, all 16 transformer blocks kept; trains on 2 CPU cores.

    ``python tools/train.py`` runs 3000 steps of 16 images (48,000 images) at lr 1e-3 after 50
    warm-up steps, EMA 0.99 (a horizon of ~100 steps), with sample grids (20 DDIM steps) and
    checkpoints every 1000 steps: about 53 minutes of one idle core (1.06 s per step, measured).
    head_dim 32: one head at the finest level (the CPU attention kernels run ~15% faster than with
    two heads of 16).

    Sizing, measured (docs/training.md, docs/evaluation.md): a step at 24 x 24 px and batch 16 costs
    what one at 32 x 32 px and batch 8 does (self-attention over 1024 positions is a third of the
    32 px step), so 24 px sees twice the images per second; objects are 7 px and the detector is
    exact from 16 px. The first version (32 px, 600 steps of 8) drew colour blobs. At 1000 steps
    the samples are clean shapes that ignore the text (the predicted noise changes by < 5% with
    the prompt); between 1000 and 3000 steps the U-Net starts to read it, and at 3000 steps
    colours follow the prompt clearly more often than for the same model trained with no text.
    """
    cfg = RaphaelConfig(name="toy")
    m = cfg.model
    m.in_channels, m.sample_size, m.codec = 3, 24, "identity"
    m.model_channels, m.channel_mult, m.head_dim, m.norm_groups = 32, (1, 2, 2, 2), 32, 8
    m.num_res_blocks = 2
    m.d_y, m.text_encoder, m.text_layer = 32, "tiny", "last"
    m.expert_mult, m.edge_width = 2, 8
    m.checkpoint = False
    t = cfg.train
    t.lr, t.warmup_steps, t.batch_size, t.ema_decay, t.steps, t.multiscale = 1e-3, 50, 16, 0.99, 3000, False
    t.log_every, t.ckpt_every = 10, 1000
    s = cfg.sample
    s.every, s.steps, s.guidance, s.prompts = 1000, 20, 3.0, SYNTHETIC_PROMPTS
    return cfg.validate()


PRESETS = {"toy": toy, "small": small, "paper": paper}


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> RaphaelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg.validate()


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["model.d_y=32", "train.lr=1e-3"]`` -> ``{"model.d_y": "32", "train.lr": "1e-3"}`` (values parsed later)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.field=value (e.g. train.lr=1e-3)")
        out[key.strip()] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file of fields, nested (``{"train": {"lr": 1e-3}}``) or dotted (``{"train.lr": 1e-3}``),
    flattened to dotted keys. A ``config.json`` written by :meth:`RaphaelConfig.to_json` is such a file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib
        data = tomllib.loads(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON ({e}); use .json or .toml") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold an object of fields, got {type(data).__name__}")
    return _flatten(data)


def load_config(preset: str = "toy", files: Sequence[str | Path] = (), overrides: Sequence[str] | dict[str, Any] = (),
                base: RaphaelConfig | None = None) -> RaphaelConfig:
    """The config of a run: ``base`` (or the preset), then each file, then ``key=value`` overrides; validated.

    Every unknown or ill-typed field raises ``ValueError`` naming it.
    """
    cfg = copy.deepcopy(base) if base is not None else get_preset(preset)
    for f in files:
        apply_overrides(cfg, read_config_file(f))
    apply_overrides(cfg, overrides if isinstance(overrides, dict) else parse_assignments(overrides))
    return cfg.validate()
