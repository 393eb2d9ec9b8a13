"""Configuration dataclasses and the preset registry (``toy``, ``toy-binding``, ``small``, ``paper``).

Every value of the paper's Table 2 (App. 7.1) lives in exactly one field here;
``spec/hyperparameters.md`` maps each table row to its field, and a test checks the ``paper``
preset against that table.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

PREDICTIONS = ("eps", "v")  # model.prediction: what the U-Net's last layer outputs (erratum E88)

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
    # heads per transformer block: None = width // head_dim (the default); an int fixes the head count at every
    # width instead (Stable Diffusion 1.x: 8 heads; weights converted by tools/convert_sd.py, erratum E76)
    num_heads: int | None = None
    norm_groups: int = 32
    # eps of the GroupNorm before each transformer's proj_in (Stable Diffusion: 1e-6; E76); ResBlocks keep 1e-5
    transformer_norm_eps: float = 1e-5
    dropout: float = 0.0
    # --- text conditioning (Sec. 2) ---
    n_y: int = 77  # Table 2: n_y (text tokens)
    d_y: int = 1024  # Table 2: d_y (text token width)
    text_encoder: str = "ViT-g-14"  # Table 2: "OpenCLIP-g/14" text tower
    text_encoder_weights: str | None = None  # local file; never downloaded
    text_layer: str = "last"
    # not in the paper (E85): each later object phrase of a prompt ("... and a blue square at the top") takes the
    # states of the phrase encoded alone (text_encoder.encode_phrases_apart), in training and sampling alike; CLIP
    # towers only. False: the whole prompt, as the paper's E_theta.
    text_phrases_apart: bool = False
    # text_encoder = "t5+clip" (eDiff-I, seed 003; E78): the CLIP tower beside the T5 folder of text_encoder_weights
    # (an open_clip name, 'toy-clip', a JSON file or folder) and its local weights; n_y = T5 length + CLIP's 77,
    # d_y = T5 width + CLIP width. Read only with "t5+clip" (null otherwise).
    text_encoder_clip: str | None = None
    text_encoder_clip_weights: str | None = None
    # --- MoE (Sec. 3.1, App. 7.3) ---
    use_space_moe: bool = True
    use_time_moe: bool = True
    n_space_experts: int = 6  # Table 2
    n_time_experts: int = 4  # Table 2
    # "learned": the paper's time gate G' (App. 7.3); "intervals": expert floor(t n_t / T), a fixed function
    # of t with no gate, as eDiff-I's denoisers split by noise level (seed 003; the Fig. 6 control, E69)
    time_router: str = "learned"
    time_router_T: int = 1000  # T of the "intervals" router: must equal diffusion.T
    # Expert FFN hidden width = expert_mult * block width. The paper gives neither widths nor
    # expert sizes, only the total (3B, abstract): with Stable Diffusion 1.x widths (320, 640,
    # 1280, 1280) a hidden width of 9x brings the U-Net to 2.99B (spec/errata.md).
    expert_mult: int = 9
    # expert form: "gelu" (Table 2: GELU(x W1 + b1) W2 + b2) or "geglu" ((a * GELU(g)) W2 + b2, [a, g] = x W1 + b1:
    # Stable Diffusion's FFN, so that its weights can be copied into the experts; raphael_ref.experts, E76)
    expert_act: str = "gelu"
    gate_hidden_mult: int = 1  # gate FFN hidden width = gate_hidden_mult * input width
    mask_alpha: float = 0.2  # Table 2: alpha of the threshold eta_i = alpha * max_j M[j, i]
    gate_noise_std: float | None = None  # None: the gates' module default (spec/errata.md)
    gate_grad: str = "straight_through"
    count_padding: bool = True  # n_y = 77 slots in the space-MoE mean (spec/errata.md)
    attend_padding: bool = True  # cross-attention attends all 77 slots, as Stable Diffusion does
    # "none" (the paper: image tokens carry no position embedding, as in Stable Diffusion) or "sincos": a fixed
    # 2D sine-cosine embedding added after each transformer's proj_in (unet_parts.sincos_position_embedding; E72)
    pos_embed: str = "none"
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
    codec_factor: int = 2  # codec="space_to_depth": f x f pixel patches -> 3 f^2 channels (in_channels = 3 f^2)
    # --- super-resolution stage (not in RAPHAEL: seed 004's Imagen cascade; raphael_ref/sr.py, erratum E80) ---
    # channels of the low-resolution conditioning image concatenated to x_t at the input (0: none, the base model);
    # > 0 also adds an embedding of the noise-augmentation level s to the time embedding (the sr section says how)
    cond_channels: int = 0
    # --- what the network outputs (not in RAPHAEL, erratum E88) ---
    # "eps": D_theta predicts the noise (Sec. 2, the paper); "v": the network outputs Salimans & Ho's velocity
    # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 and the U-Net returns the eps it implies
    # (raphael_ref.diffusion.eps_from_v), so losses and samplers read eps either way
    prediction: str = "eps"


@dataclass
class TrainConfig:
    lr: float = 1e-4  # Table 2
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Table 2
    weight_decay: float = 0.0  # Table 2
    warmup_steps: int = 20000  # Table 2
    # after the warm-up: "none" (constant, Table 2) or, not in the paper (erratum E86), "linear" / "cosine" decay
    # of the lr towards 0 at train.steps, starting at the fraction lr_decay_start of the run (after the warm-up)
    lr_decay: str = "none"
    lr_decay_start: float = 0.0
    # which noise levels a step draws (not in the paper, erratum E90): 1 = t uniform over 0..T-1 (the paper's DDPM
    # loss); s > 1 draws t = floor(T s u / (1 + (s - 1) u)), u ~ U[0, 1) (SD3's time shift on t / T), more high-noise
    # steps (where a sample's layout is decided), s < 1 fewer (raphael_ref/diffusion/timestep_shift.py)
    t_shift: float = 1.0
    batch_size: int = 2000  # Table 2 (global batch)
    # micro-steps per optimizer step (gradient accumulation): each rank runs batch_size / (world x grad_accum)
    # samples per forward/backward; batch_size stays the global batch of one optimizer step
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    focal_alpha: float = 0.5  # Table 2: alpha in Focal Loss
    focal_gamma: float = 2.0  # Table 2: gamma in Focal Loss
    caption_dropout: float = 0.1
    # coefficient of the load-balancing loss of the gates (Switch Transformer's n sum_i f_i P_i, averaged over
    # the MoE layers; raphael_ref.balance): 0 = off, the paper has none (erratum E73); Switch uses 0.01
    balance_loss: float = 0.0
    # coefficient of the token-attention loss (TokenCompose's token loss on the cross-attention maps against the
    # synthetic scenes' object masks; raphael_ref.token_attention): 0 = off, the paper has none (erratum E82)
    token_loss: float = 0.0
    # which words of each object's phrase the token loss supervises: "color", "shape", "position"
    token_words: tuple[str, ...] = ("color", "shape", "position")
    # the synthetic source's scene mix (raphael_ref.data.synthetic.sample_scene; not in the paper, erratum E83):
    # the share of count scenes ("two red circles ..."), and whether the objects of the other scenes all have
    # distinct shapes (True) or only distinct (shape, colour) pairs (False: "a red circle ... and a blue circle ...")
    scene_count_prob: float = 0.2
    scene_distinct_shapes: bool = False
    # weight of L_denoise per noise level: "none" (the paper) or "v" (the v-prediction loss written for the
    # eps network, normalised to mean 1; raphael_ref.objective.denoise_weights, erratum E70)
    loss_weight: str = "none"
    # "v" only: cap of 1/abar before normalising (None: uncapped), so the low noise levels keep weight (E71)
    loss_weight_max: float | None = None
    multiscale: bool = True  # Table 2: "Enable multi-scale training"
    aesthetic_min: float = 4.7  # Sec. 4 "Dataset"
    steps: int = 1_000_000
    seed: int = 0  # rank r of a world of size W draws from seed * W + r (DiT)
    # random draws of training: "rank" (one stream per rank, seeded seed * W + r, as DiT) or "sample" (one stream
    # per sample, seeded by (seed, the sample's position in the global data stream): t, noise, the VAE posterior,
    # caption dropout and gate noise do not depend on the world size or grad_accum, so a run resumed on another
    # number of ranks goes on as the uninterrupted one; costs B small CPU draws per step; docs/training.md)
    rng: str = "rank"
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
    # torch.compile the U-Net (whole model, no graph break: tests/test_compile.py); its input value checks are
    # skipped and the MoEs run their sync-free forms inside the compiled code (docs/training.md, "torch.compile")
    compile: bool = False
    log_every: int = 100  # steps per JSONL line (each line holds the mean over its window)
    tensorboard: bool = False  # rank 0 also writes the log's scalars to <run>/tb/ (needs: pip install tensorboard)
    ckpt_every: int = 5000  # steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 3  # newest checkpoints kept on disk; 0 keeps all
    # "full": rank 0 gathers and writes every tensor (model.safetensors, optimizer.safetensors, ...); "sharded":
    # every rank writes its own shards with torch.distributed.checkpoint (for FSDP2; any world size resumes),
    # plus the gathered ema.safetensors for sampling (raphael_ref.training.save_sharded_checkpoint)
    checkpoint_format: str = "full"
    # a non-finite loss or gradient norm (a diverging run, errata E66): "stop" (exit 3, nothing written after
    # it) or "skip" (that optimizer step is skipped; the run stops after nonfinite_max_skips in a row)
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10


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
class SRConfig:
    """A super-resolution stage of a cascade (seed 004, Imagen; raphael_ref/sr.py, tools/train_sr.py; erratum E80).

    Read only when ``model.cond_channels`` > 0. Augmentation levels s are integers in [0, T]: s = 0 is the clean
    low-res image, s >= 1 noises it as the diffusion's (0-based) timestep s - 1 does (abar = alphas_cumprod_prev[s]).
    """

    lowres_size: int = 0  # side in pixels of the low-res conditioning image (0: not an SR stage)
    upsample: str = "bilinear"  # low-res image -> high-res grid: "bilinear" (align_corners=False) or "nearest"
    aug_max: int = 300  # training: s ~ U{0, ..., aug_max} per sample (Imagen: uniform over the levels)
    aug_sample: int = 50  # sampling: the fixed level s (Imagen: fixed, chosen by a sweep)
    # training pairs: "render" (the renderer at lowres_size), "downsample" (the high-res render, area-averaged to
    # lowres_size, as Imagen's pairs), "mix" (each sample one of the two with probability 1/2)
    lowres_source: str = "mix"


@dataclass
class SampleConfig:
    """Sample grids written while training: EMA weights, fixed prompts, fixed seed."""

    every: int = 5000  # steps between grids (one is always written at the end); 0: only at the end
    sampler: str = "ddim"
    steps: int = 50  # sampler steps
    guidance: float = 4.5  # classifier-free guidance weight; Sec. 4.2 / Fig. 6b: best for the full model
    # DDIM: abar after the last step. True: 1 (DDIM's alpha_0 = 1; the last step returns x0_hat); False:
    # abar_0, as Stable Diffusion's scheduler config (spec/errata.md, E65)
    set_alpha_to_one: bool = True
    seed: int = 0
    prompts: tuple[str, ...] = NATURAL_PROMPTS


@dataclass
class RaphaelConfig:
    name: str = "paper"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sr: SRConfig = field(default_factory=SRConfig)  # only for model.cond_channels > 0 (raphael_ref/sr.py)

    # ---- derived ----
    @property
    def n_transformer_blocks(self) -> int:
        m = self.model
        return sum(m.transformer_down) + m.transformer_mid + sum(m.transformer_up)

    def validate(self) -> "RaphaelConfig":
        """Raise ValueError naming the field for any value a run cannot use.

        Types first (every field against its annotation: values set in code skip the coercion of
        ``apply_overrides``), then values: finite numbers where infinity means nothing,
        probabilities in [0, 1], sizes >= 1, choices among the known ones, and the couplings
        between fields. Files named by the config (weights, data) are checked where they are read.
        """

        def bad(field_name: str, msg: str) -> None:
            raise ValueError(f"config field {field_name}: {msg}")

        # ---- types
        for section, section_type in _hints(RaphaelConfig).items():
            obj = getattr(self, section)
            if not dataclasses.is_dataclass(section_type):
                problem = _type_problem(section_type, obj)
                if problem:
                    bad(section, problem)
                continue
            if not isinstance(obj, section_type):
                bad(section, f"must be a {section_type.__name__} section, got {obj!r}")
            for name, hint in _hints(section_type).items():
                problem = _type_problem(hint, getattr(obj, name))
                if problem:
                    bad(f"{section}.{name}", problem)

        m, d, t, s = self.model, self.diffusion, self.train, self.sample
        levels = len(m.channel_mult)

        def at_least(field_name: str, value: int, lo: int) -> None:
            if value < lo:
                bad(field_name, f"must be >= {lo}, got {value}")

        def finite_at_least(field_name: str, value: float, lo: float, why: str = "") -> None:
            if not (math.isfinite(value) and value >= lo):
                bad(field_name, f"must be a finite number >= {lo}{why}, got {value}")

        def unit(field_name: str, value: float, closed: bool = True) -> None:  # NaN fails both comparisons
            if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
                bad(field_name, f"must lie in [0, 1{']' if closed else ')'}, got {value}")

        def choice(field_name: str, value: str, choices: Sequence[str]) -> None:
            if value not in choices:
                bad(field_name, f"must be one of {list(choices)}, got {value!r}")

        def text(field_name: str, value: str | None, what: str) -> None:  # None passed the type check: optional
            if value is not None and not value.strip():
                bad(field_name, f"must be {what}, got an empty string")

        if not self.name.strip() or any(c in self.name for c in "/\\\0"):
            bad("name", f"must be a non-empty name without path separators (it names the run folder), got {self.name!r}")

        # ---- diffusion
        from raphael_ref.diffusion.schedule import KNOWN_KINDS

        if not 1 <= d.T <= MAX_T:
            bad("diffusion.T", f"must lie in [1, {MAX_T}] (the paper uses 1000; each schedule table holds T "
                "float64 entries), got {d.T}")
        choice("diffusion.schedule", d.schedule, KNOWN_KINDS)
        if d.zero_terminal_snr and d.T < 2:
            bad("diffusion.zero_terminal_snr", f"needs diffusion.T >= 2 (it pins the first and the last step), got T = {d.T}")

        # ---- model: sizes
        for name in ("in_channels", "sample_size", "model_channels", "num_res_blocks", "head_dim", "norm_groups",
                     "n_y", "d_y", "n_space_experts", "n_time_experts", "expert_mult", "gate_hidden_mult",
                     "edge_layers", "edge_width"):
            at_least(f"model.{name}", getattr(m, name), 1)
        if not levels or any(mult < 1 for mult in m.channel_mult):
            bad("model.channel_mult", f"must be a non-empty list of integers >= 1 (one per level), got {m.channel_mult}")
        if len(m.transformer_down) != levels:
            bad("model.transformer_down", f"needs one entry per level ({levels}), got {m.transformer_down}")
        if len(m.transformer_up) != levels:
            bad("model.transformer_up", f"needs one entry per level ({levels}), got {m.transformer_up}")
        if any(not 0 <= n <= m.num_res_blocks for n in m.transformer_down):
            bad("model.transformer_down", f"each entry in [0, num_res_blocks={m.num_res_blocks}], got {m.transformer_down}")
        if any(not 0 <= n <= m.num_res_blocks + 1 for n in m.transformer_up):
            bad("model.transformer_up", f"each entry in [0, num_res_blocks+1={m.num_res_blocks + 1}], got {m.transformer_up}")
        if m.transformer_mid not in (0, 1):
            bad("model.transformer_mid", f"must be 0 or 1, got {m.transformer_mid}")
        if m.num_heads is not None:
            at_least("model.num_heads", m.num_heads, 1)
        for i, mult in enumerate(m.channel_mult):
            width = m.model_channels * mult
            if m.num_heads is not None:
                if width % m.num_heads:
                    bad("model.num_heads", f"level {i} width {width} is not a multiple of num_heads {m.num_heads}")
            elif width % m.head_dim:
                bad("model.head_dim", f"level {i} width {width} is not a multiple of head_dim {m.head_dim}")
            if width % m.norm_groups:
                bad("model.norm_groups", f"level {i} width {width} is not a multiple of norm_groups {m.norm_groups}")
        if m.sample_size % (2 ** (levels - 1)):
            bad("model.sample_size", f"must be divisible by 2**(levels-1) = {2 ** (levels - 1)}, got {m.sample_size}")
        unit("model.dropout", m.dropout, closed=False)
        # ---- model: text, MoE, edge, codec
        text("model.text_encoder", m.text_encoder, "'tiny', an open_clip model name (e.g. 'ViT-g-14') or a JSON file")
        if not _known_text_encoder(m.text_encoder):
            bad("model.text_encoder", f"{m.text_encoder!r} is not 'tiny', 'tiny-distinct', 't5', 't5+clip', a .json file, a folder or "
                "an open_clip model config name (open_clip.list_models(), e.g. 'ViT-g-14')")
        text("model.text_encoder_weights", m.text_encoder_weights, "a local file or null")
        if m.text_encoder in ("t5", "t5+clip") and not m.text_encoder_weights:
            bad("model.text_encoder_weights", f"model.text_encoder={m.text_encoder!r} reads a local T5 folder (config.json, "
                "model.safetensors, tokenizer.json); set model.text_encoder_weights=DIR")
        text("model.text_encoder_clip", m.text_encoder_clip, "a CLIP text tower name or null")
        text("model.text_encoder_clip_weights", m.text_encoder_clip_weights, "a local file or null")
        if m.text_encoder == "t5+clip":
            if not m.text_encoder_clip:
                bad("model.text_encoder_clip", "model.text_encoder='t5+clip' needs the CLIP text tower beside T5: an "
                    "open_clip name (e.g. 'ViT-L-14', with model.text_encoder_clip_weights=FILE), 'toy-clip', a JSON file "
                    "or a folder")
            elif m.text_encoder_clip in ("t5", "t5+clip") or not _known_text_encoder(m.text_encoder_clip):
                bad("model.text_encoder_clip", f"{m.text_encoder_clip!r} is not a CLIP text tower ('tiny', 'toy-clip', "
                    "a .json file, a folder or an open_clip model config name)")
        else:
            for name in ("text_encoder_clip", "text_encoder_clip_weights"):
                if getattr(m, name) is not None:
                    bad(f"model.{name}", f"is read only with model.text_encoder='t5+clip' (it is {m.text_encoder!r}); "
                        "set model.text_encoder_clip and model.text_encoder_clip_weights to null")
        if m.text_encoder == "t5" and m.text_layer != "last":
            bad("model.text_layer", "the T5 encoder offers 'last' only (its output after the final layer norm); set "
                "model.text_layer=last (the toy preset reads its CLIP tower's penultimate layer)")
        choice("model.text_layer", m.text_layer, ("last", "penultimate"))
        if not isinstance(m.text_phrases_apart, bool):
            bad("model.text_phrases_apart", f"must be true or false, got {m.text_phrases_apart!r}")
        elif m.text_phrases_apart and m.text_encoder in ("t5", "t5+clip"):
            bad("model.text_phrases_apart", f"works with a CLIP text tower only (its BPE places the phrases), not "
                f"{m.text_encoder!r}; set model.text_phrases_apart=false")
        unit("model.mask_alpha", m.mask_alpha)
        if m.gate_noise_std is not None:
            finite_at_least("model.gate_noise_std", m.gate_noise_std, 0.0, " (or null: the gates' default)")
        choice("model.gate_grad", m.gate_grad, ("none", "switch", "straight_through"))
        if not m.attend_padding and m.count_padding:
            bad("model.count_padding", "must be false when model.attend_padding is false: padding tokens that the "
                "cross-attention ignores have an all-zero map column, and their threshold mask would cover the "
                "whole image (spec/errata.md, padding keys)")
        choice("model.moe_impl", m.moe_impl, ("dense", "gather"))
        choice("model.expert_act", m.expert_act, ("gelu", "geglu"))
        if not (math.isfinite(m.transformer_norm_eps) and m.transformer_norm_eps > 0):
            bad("model.transformer_norm_eps", f"must be a finite number > 0, got {m.transformer_norm_eps}")
        choice("model.time_router", m.time_router, ("learned", "intervals"))
        choice("model.pos_embed", m.pos_embed, ("none", "sincos"))
        choice("model.prediction", m.prediction, PREDICTIONS)
        choice("train.loss_weight", t.loss_weight, ("none", "v"))
        if t.loss_weight_max is not None:
            finite_at_least("train.loss_weight_max", t.loss_weight_max, 1.0, " (or null: uncapped)")
            if t.loss_weight != "v":
                bad("train.loss_weight_max", f"caps the \"v\" weighting and needs train.loss_weight=\"v\", got "
                    f"train.loss_weight={t.loss_weight!r}; set it to null")
        at_least("model.time_router_T", m.time_router_T, 1)
        if m.time_router == "intervals" and m.time_router_T != d.T:
            bad("model.time_router_T", f"the intervals router splits [0, T) and must use the diffusion's T = {d.T}, "
                f"got {m.time_router_T}")
        if not 0 <= m.edge_t_cutoff <= d.T:
            bad("model.edge_t_cutoff", f"must lie in [0, T={d.T}], got {m.edge_t_cutoff}")
        choice("model.codec", m.codec, ("vae", "identity", "space_to_depth"))
        if m.codec == "identity" and m.in_channels != 3:
            bad("model.in_channels", f"the identity codec (pixel space) needs 3 channels, got {m.in_channels}")
        if m.codec == "space_to_depth":
            if isinstance(m.codec_factor, bool) or not isinstance(m.codec_factor, int) or not 1 <= m.codec_factor <= 16:
                bad("model.codec_factor", f"must be an int in [1, 16], got {m.codec_factor!r}")
            if m.in_channels != 3 * m.codec_factor ** 2:
                bad("model.in_channels", f"the space_to_depth codec with factor {m.codec_factor} needs "
                    f"3 * {m.codec_factor}^2 = {3 * m.codec_factor ** 2} channels, got {m.in_channels}")
        text("model.vae_path", m.vae_path, "a local AutoencoderKL folder or null")
        # ---- model: a super-resolution stage (raphael_ref/sr.py, erratum E80)
        r = self.sr
        at_least("model.cond_channels", m.cond_channels, 0)
        choice("sr.upsample", r.upsample, ("bilinear", "nearest"))
        choice("sr.lowres_source", r.lowres_source, ("render", "downsample", "mix"))
        for name, v in (("sr.aug_max", r.aug_max), ("sr.aug_sample", r.aug_sample)):
            if v < 0 or (m.cond_channels > 0 and v > d.T):  # the range against T matters for SR stages only
                bad(name, f"must lie in [0, T={d.T}] (0: no augmentation; s: the diffusion's timestep s - 1), got {v}")
        if m.cond_channels > 0:
            if m.codec != "identity" or m.cond_channels != 3:
                bad("model.cond_channels", f"an SR stage conditions on the RGB low-res image in pixel space: needs "
                    f"model.codec='identity' and model.cond_channels=3, got codec {m.codec!r}, {m.cond_channels}")
            if r.lowres_size < 1:
                bad("model.cond_channels", "an SR stage needs sr.lowres_size (the low-res side in pixels), got 0")
            if not 16 <= r.lowres_size < m.sample_size:
                bad("sr.lowres_size", f"must lie in [16, model.sample_size={m.sample_size}) (the renderer's minimum; "
                    f"smaller than the high-res side), got {r.lowres_size}")
        elif r.lowres_size != 0:
            bad("sr.lowres_size", f"is for SR stages (model.cond_channels > 0); got {r.lowres_size} with "
                "model.cond_channels=0: set it to 0 or model.cond_channels=3")

        # ---- train
        if not (math.isfinite(t.lr) and t.lr > 0):
            bad("train.lr", f"must be a finite number > 0, got {t.lr}")
        if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
            bad("train.adam_betas", f"must be two numbers in [0, 1), got {t.adam_betas}")
        finite_at_least("train.weight_decay", t.weight_decay, 0.0)
        finite_at_least("train.grad_clip", t.grad_clip, 0.0, " (0 switches clipping off)")
        unit("train.ema_decay", t.ema_decay, closed=False)
        choice("train.lr_decay", t.lr_decay, ("none", "linear", "cosine"))
        if not (math.isfinite(t.lr_decay_start) and 0.0 <= t.lr_decay_start < 1.0):
            bad("train.lr_decay_start", f"is the fraction of train.steps where the decay starts, in [0, 1); got "
                f"{t.lr_decay_start}")
        if t.lr_decay == "none" and t.lr_decay_start != 0.0:
            bad("train.lr_decay_start", f"places a decay, but train.lr_decay='none'; set train.lr_decay=linear or "
                f"cosine, or leave train.lr_decay_start at 0 (got {t.lr_decay_start})")
        elif t.lr_decay != "none" and t.steps >= 1 and max(t.warmup_steps, round(t.lr_decay_start * t.steps)) >= t.steps:
            bad("train.lr_decay", f"{t.lr_decay!r} would start at step {max(t.warmup_steps, round(t.lr_decay_start * t.steps))}"
                f" (after the warm-up of {t.warmup_steps} and at train.lr_decay_start={t.lr_decay_start} of "
                f"train.steps={t.steps}), so it never happens; lower train.warmup_steps or train.lr_decay_start")
        from raphael_ref.diffusion.timestep_shift import check_shift

        try:
            check_shift(t.t_shift)
        except ValueError as e:
            bad("train.t_shift", f"{e} (> 1: more high-noise steps)")
        unit("train.focal_alpha", t.focal_alpha)
        finite_at_least("train.focal_gamma", t.focal_gamma, 0.0)
        unit("train.caption_dropout", t.caption_dropout)  # 1.0: no text at all (an unconditional control model)
        finite_at_least("train.balance_loss", t.balance_loss, 0.0, " (0 switches the balancing loss off)")
        gated = m.use_space_moe or (m.use_time_moe and m.time_router == "learned")
        if t.balance_loss > 0 and not gated:
            bad("train.balance_loss", f"balances the gates of the MoE layers, but the model has none (model.use_space_moe"
                f"=false and no learned time gate); set it to 0, got {t.balance_loss}")
        finite_at_least("train.token_loss", t.token_loss, 0.0, " (0 switches the token-attention loss off)")
        if t.token_loss > 0 and t.source != "synthetic":
            bad("train.token_loss", f"supervises the cross-attention maps with the object masks of the synthetic set "
                f"and needs train.source='synthetic', got train.source={t.source!r}; set it to 0 (or train from "
                f"--preset toy, which has no token loss)")
        words = tuple(t.token_words) if isinstance(t.token_words, (list, tuple)) else ()
        if not words or len(set(words)) != len(words) or any(w not in ("color", "shape", "position") for w in words):
            bad("train.token_words", f"must be distinct names from ('color', 'shape', 'position'), got {t.token_words!r}")
        unit("train.scene_count_prob", t.scene_count_prob)
        count_default = TrainConfig.scene_count_prob  # data.synthetic.COUNT_SCENE_PROB, the mix of every earlier run
        if t.source != "synthetic" and (t.scene_count_prob != count_default or t.scene_distinct_shapes):
            bad("train.scene_count_prob" if t.scene_count_prob != count_default else "train.scene_distinct_shapes",
                f"sets the scene mix of the synthetic set and needs train.source='synthetic', got train.source="
                f"{t.source!r}; leave train.scene_count_prob at {count_default} and train.scene_distinct_shapes false")
        if not math.isfinite(t.aesthetic_min):
            bad("train.aesthetic_min", f"must be a finite number, got {t.aesthetic_min}")
        at_least("train.batch_size", t.batch_size, 1)
        at_least("train.grad_accum", t.grad_accum, 1)  # batch_size / (world x grad_accum): checked by tools/train.py
        for name in ("warmup_steps", "steps", "num_workers", "keep_ckpts"):
            at_least(f"train.{name}", getattr(t, name), 0)
        for name in ("log_every", "ckpt_every"):
            at_least(f"train.{name}", getattr(t, name), 1)
        for name, seed in (("train.seed", t.seed), ("sample.seed", s.seed)):
            if not 0 <= seed < MAX_SEED:
                bad(name, f"must lie in [0, 2**32) (rank r of W draws from seed * W + r, a 64-bit torch seed), got {seed}")
        text("train.source", t.source, "'synthetic', a folder or glob of tar shards, or an image folder")
        if t.bucket_factor is not None and not (math.isfinite(t.bucket_factor) and t.bucket_factor > 0):
            bad("train.bucket_factor", f"must be a finite number > 0 or null (the paper's sizes), got {t.bucket_factor}")
        choice("train.edge_detector", t.edge_detector, ("canny", "hed"))
        text("train.hed_weights", t.hed_weights, "the converted HED safetensors (tools/convert_hed.py) or null")
        choice("train.mixed_precision", t.mixed_precision, ("bf16", "no"))
        choice("train.nonfinite", t.nonfinite, ("stop", "skip"))
        choice("train.rng", t.rng, ("rank", "sample"))
        if t.rng == "sample" and m.dropout > 0:
            bad("train.rng", f"'sample' gives every random draw of a sample its own stream, but dropout "
                f"(model.dropout={m.dropout}) draws from the global RNG of each rank; set model.dropout=0 or train.rng='rank'")
        if t.rng == "sample" and t.compile:
            bad("train.rng", "'sample' draws the gate noise row by row in Python, which torch.compile cannot trace without "
                "graph breaks; use train.rng='rank' with train.compile=true")
        choice("train.checkpoint_format", t.checkpoint_format, ("full", "sharded"))
        at_least("train.nonfinite_max_skips", t.nonfinite_max_skips, 1)

        # ---- sample
        at_least("sample.every", s.every, 0)  # 0: only at the end
        choice("sample.sampler", s.sampler, ("ddim", "ddpm"))
        if not 1 <= s.steps <= d.T:
            bad("sample.steps", f"must lie in [1, T={d.T}], got {s.steps}")
        if not isinstance(s.set_alpha_to_one, bool):
            bad("sample.set_alpha_to_one", f"must be true or false, got {s.set_alpha_to_one!r}")
        finite_at_least("sample.guidance", s.guidance, 0.0)
        if not s.prompts:
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


MAX_T = 100_000  # diffusion.T: the paper uses 1000; every schedule table is T float64 entries in memory
MAX_SEED = 2**32  # seeds in [0, 2**32): seed * world + rank stays a valid 64-bit torch seed


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a config dataclass (they are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def _optional_base(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


_SCALAR_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _scalar_problem(kind: Any, value: Any) -> str | None:
    if kind not in _SCALAR_NAMES:
        raise TypeError(f"config: no type check for the annotation {kind!r}; extend _scalar_problem")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 2**1023:
            return f"expected a number in float range, got an integer of {value.bit_length()} bits"
    else:
        ok = isinstance(value, str)
    return None if ok else f"expected {_SCALAR_NAMES[kind]}, got {value!r}"


def _type_problem(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the field annotation ``hint``, or None when it does."""
    hint, optional = _optional_base(hint)
    if value is None:
        return None if optional else f"expected {_SCALAR_NAMES.get(hint, 'a list')}, got null"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return f"expected a list, got {value!r}"
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            return f"expected a list of {len(kinds)} values, got {value!r}"
        for kind, v in zip(kinds, value):
            problem = _scalar_problem(kind, v)
            if problem:
                return f"{problem} in {value!r}"
        return None
    return _scalar_problem(hint, value)


def _known_text_encoder(name: str) -> bool:
    """'tiny', 'tiny-distinct', a .json file or folder (checked when read), or an open_clip bundled config name."""
    if name in ("tiny", "tiny-distinct", "toy-clip", "t5", "t5+clip") or name.endswith(".json"):
        return True
    try:
        if Path(name).is_dir():
            return True
        spec = importlib.util.find_spec("open_clip")
        if spec is None or spec.origin is None:
            return True  # open_clip absent: build_text_encoder says what is missing
        return (Path(spec.origin).parent / "model_configs" / f"{name}.json").is_file()
    except (OSError, ValueError):  # a name the file system cannot hold (too long, NUL): not a file or config
        return False


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Convert a JSON/CLI value to the field's annotated type ``hint``; ``X | None`` also takes None/"null".

    Strings given for non-string fields are parsed as JSON (numbers, true/false, lists, NaN, Infinity);
    whether the value is in range is ``RaphaelConfig.validate``'s business.
    """
    base, optional = _optional_base(hint)
    if optional and (value is None or value == "null"):
        return None
    if isinstance(value, str) and base is not str:
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"config field {field_name}: cannot parse {value!r} (a JSON value, e.g. 1e-4, true, "
                             f"[1, 2])") from None
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {field_name}: expected a list, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise ValueError(f"config field {field_name}: expected a list of {len(kinds)} values, got {value!r}")
        return tuple(_coerce_scalar(field_name, kind, v) for kind, v in zip(kinds, value))
    return _coerce_scalar(field_name, base, value)


def _coerce_scalar(field_name: str, kind: Any, value: Any) -> Any:
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    problem = _scalar_problem(kind, value) if kind in _SCALAR_NAMES else None
    if problem:
        raise ValueError(f"config field {field_name}: {problem}")
    return float(value) if kind is float else value


def apply_overrides(cfg: RaphaelConfig, overrides: Mapping[str, Any]) -> RaphaelConfig:
    """Set dotted fields (``{"model.n_space_experts": 4}``); unknown fields are errors naming them."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"config overrides must be a mapping of dotted fields to values, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ValueError(f"unknown config field {key!r}: fields are dotted strings, e.g. 'train.lr'")
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
        setattr(obj, leaf, _coerce(key, _hints(type(obj))[leaf], value))
    return cfg


# ---------------------------------------------------------------- presets

def paper() -> RaphaelConfig:
    """Table 2 (App. 7.1): the 3B model. Widths chosen so the U-Net lands at ~3.0B parameters.

    I_edge from HED as Sec. 3.2 prints (erratum E63): the run needs ``train.hed_weights`` (a local
    file made by ``bash tools/fetch_hed_weights.sh``) and stops at start without it;
    ``--set train.edge_detector=canny`` trains with Canny instead.
    """
    cfg = RaphaelConfig(name="paper")
    cfg.train.edge_detector = "hed"
    return cfg.validate()


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
    """Pixel space 24 x 24, tiny widths, every RAPHAEL component on; trains on 2 CPU cores. The network predicts v
    (E88: black backgrounds; ``--set model.prediction=eps`` for the paper's eps).

    All 16 transformer blocks with space-MoE (6 experts), time-MoE (4 experts) and edge-supervised
    learning, as the paper's model. E_theta is ``toy-clip``: the ``tiny`` text-tower shape pretrained
    contrastively on the synthetic scenes (raphael_ref/toy_clip.py, shipped with the package), frozen,
    as the paper's pretrained OpenCLIP is (erratum E67); the random ``tiny`` tower stays for tests
    and as the untrained-encoder control. Sizing and what the default run reaches, measured:
    docs/training.md ("The toy run") and docs/evaluation.md.
    """
    cfg = RaphaelConfig(name="toy")
    m = cfg.model
    m.in_channels, m.sample_size, m.codec = 3, 24, "identity"
    m.model_channels, m.channel_mult, m.head_dim, m.norm_groups = 32, (1, 2, 2, 2), 32, 8
    m.num_res_blocks = 2
    # the tower's penultimate layer (then ln_final), as Stable Diffusion 2 reads OpenCLIP (E38): per-token states
    # that bind each object's words to its own phrase better than the last layer's (E81, measured over 3 seeds)
    m.d_y, m.text_encoder, m.text_layer = 32, "toy-clip", "penultimate"
    m.expert_mult, m.edge_width = 2, 8
    m.checkpoint = False
    # what lets the 10-minute toy read position words (measured, E72): queries that know their place (a fixed
    # 2D sin-cos embedding: an option, not in the paper) and attention over the caption's own tokens only
    # (the 72 padding slots of a short caption are copies of one sentence summary that soak up the attention)
    m.pos_embed, m.attend_padding, m.count_padding = "sincos", False, False
    # not the paper's output: the network predicts v and returns the eps it implies (E88). Its x_0 at high noise is
    # the network's own output, not an eps error times 1/sqrt(abar_t) (up to 14.6): the residual noise that the
    # eps toy left on its backgrounds (RMS 28-41 of 255) is gone (measured: docs/results/toy_v_prediction.md)
    m.prediction = "v"
    t = cfg.train
    t.lr, t.warmup_steps, t.batch_size, t.ema_decay, t.steps, t.multiscale = 1e-3, 50, 16, 0.99, 800, False
    # not the paper's loss: the v-prediction weighting of the eps loss (E70), capped at 5 so that the low noise
    # levels keep their share (E71); both measured better at this budget
    t.loss_weight, t.loss_weight_max = "v", 5.0
    t.log_every, t.ckpt_every = 10, 400
    s = cfg.sample
    s.every, s.steps, s.guidance, s.prompts = 0, 20, 7.5, SYNTHETIC_PROMPTS
    return cfg.validate()


def toy_binding() -> RaphaelConfig:
    """The default run (``python tools/train.py``, erratum E89): the toy preset plus two options, neither in the
    paper, that make the 10-minute run bind each shape to its named place (erratum E87): later object phrases of a
    caption encoded on their own (E85; the causal tower's second phrase otherwise carries the first object) and
    TokenCompose's loss on the position words' cross-attention maps (E82; synthetic data only), weighted 0.05. The
    network predicts v as the toy's does (E88). The same run as ``--preset toy --set model.text_phrases_apart=true
    --set train.token_loss=0.05 --set 'train.token_words=["position"]'``. Measured over five training seeds
    (docs/evaluation.md, section 4): position 0.61, colours 0.89, single objects 0.94, overall 0.608, black or
    near-black backgrounds. The eps variant of E87 (position 0.61, noisy backgrounds) is
    ``--set model.prediction=eps --set train.token_loss=0.02``. Fig. 6's ablations run on ``toy``, the paper's
    losses only (``tools/ablate.py --preset toy``).
    """
    cfg = toy()
    cfg.name = "toy-binding"
    cfg.model.text_phrases_apart = True
    # 0.05, not E87's 0.02: with the v output the position-word loss needs the larger weight (0.02: position 0.41;
    # 0.05: 0.59, three seeds each; 0.08 measured no better: docs/results/toy_v_prediction.md, sections 7, 8)
    cfg.train.token_loss, cfg.train.token_words = 0.05, ("position",)
    return cfg.validate()


PRESETS = {"toy": toy, "toy-binding": toy_binding, "small": small, "paper": paper}


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
