"""One-call text-to-image: :class:`RaphaelPipeline` (prompts -> PIL images), as diffusers' pipelines.

    pipe = RaphaelPipeline.from_run("runs/toy")             # a tools/train.py run: latest checkpoint, EMA weights
    out = pipe(["a red circle on the left"], num_inference_steps=20, guidance_scale=7.5, sampler="dpmpp_2m",
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("circle.png")

A pipeline holds the U-Net, the frozen text encoder, the image codec, the noise schedule and the run's
config (whose ``sample`` section gives the defaults of a call). ``sampler="ddim"`` and ``"ddpm"`` run
the project's own samplers (``sampling.sample``, the literal reference); ``"dpmpp_2m"``, ``"unipc"``,
``"euler"`` and ``"heun"`` run diffusers' schedulers through ``raphael_ref.schedulers`` (needs the
``samplers`` extra). Guidance is classifier-free against ``negative_prompt`` (default: the empty prompt,
the caption training drops).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from raphael_ref.config import RaphaelConfig
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.sampling import DiffusionPaths

__all__ = ["SAMPLERS", "RaphaelPipeline", "RaphaelPipelineOutput", "check_sampler"]

OWN_SAMPLERS = ("ddim", "ddpm")  # sampling.sample
SAMPLERS = OWN_SAMPLERS + ("dpmpp_2m", "unipc", "euler", "heun")  # the rest: diffusers' schedulers
WEIGHTS = {"ema": "ema.safetensors", "raw": "model.safetensors"}


@dataclasses.dataclass
class RaphaelPipelineOutput:
    """What a pipeline call returns.

    images: one PIL RGB image per prompt (``output_type="pil"``), or a (B, 3, H, W) float tensor in
            [-1, 1] on the CPU (``output_type="pt"``; ``training.to_uint8`` maps it to bytes).
    paths:  the diffusion paths (``sampling.DiffusionPaths``) with ``return_paths=True``, else None.
    masks:  with ``return_masks=True``, the space-MoE masks of the last model call: a list over the
            transformer blocks of (B, n_x, n_y) bool tensors (token i of sample b covers position p
            where ``masks[k][b, p, i]``); else None.
    """

    images: list | torch.Tensor
    paths: DiffusionPaths | None = None
    masks: list[torch.Tensor] | None = None
    # with an SR stage attached (:meth:`RaphaelPipeline.attach_sr`): the base model's images, (B, 3, h, w) in [-1, 1]
    lowres: torch.Tensor | None = None


def check_sampler(sampler: str, eta: float = 0.0) -> None:
    """ValueError for an unknown sampler or an eta that the sampler does not take (eta is DDIM's);
    ImportError naming the ``samplers`` extra when a diffusers sampler is asked for without diffusers."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {list(SAMPLERS)}")
    if not (isinstance(eta, numbers.Real) and 0.0 <= float(eta) <= 1.0):  # NaN fails too
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM), got {eta!r}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta applies to sampler='ddim' only, got eta={eta} with sampler={sampler!r}")
    if sampler not in OWN_SAMPLERS:
        from raphael_ref.schedulers import require_diffusers

        require_diffusers()


def _weights_file(ckpt: Path, weights: str) -> Path:
    """The weights file of checkpoint folder ``ckpt``: "ema", "raw", or "auto" (EMA when present)."""
    if weights == "auto":
        weights = "ema" if (ckpt / WEIGHTS["ema"]).exists() else "raw"
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema', 'raw' or 'auto', got {weights!r}")
    path = ckpt / WEIGHTS[weights]
    if not path.exists():
        raise FileNotFoundError(f"{ckpt} has no {path.name}" + ("; pass weights='raw' for the raw weights"
                                                                 if weights == "ema" else ""))
    return path


class RaphaelPipeline:
    """RAPHAEL text-to-image sampling in one call.

    Build from objects (``RaphaelPipeline(model, text_encoder, codec, schedule, config)``; codec None:
    pixel space, schedule None: the config's), from a tools/train.py run folder (:meth:`from_run`) or
    from a checkpoint folder of config.json + safetensors (:meth:`from_pretrained`).
    """

    def __init__(self, model, text_encoder, codec=None, schedule: NoiseSchedule | None = None,
                 config: RaphaelConfig | None = None):
        from raphael_ref.codec import IdentityCodec

        self.model = model.eval()
        self.controlnet, self.control_scale = None, 1.0  # load_controlnet (issue 12)
        self.text_encoder = text_encoder
        self.config = config if config is not None else RaphaelConfig(model=model.cfg)
        self.codec = codec if codec is not None else IdentityCodec()
        d = self.config.diffusion
        self.schedule = schedule if schedule is not None else NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)
        self.sr, self.sr_options = None, {}  # an SR stage of the cascade (raphael_ref/sr.py), see attach_sr
        if text_encoder.d_y != model.cfg.d_y:
            raise ValueError(f"the text encoder gives tokens of width {text_encoder.d_y}, the U-Net reads "
                             f"model.d_y = {model.cfg.d_y}")
        if getattr(self.codec, "latent_channels", model.cfg.in_channels) != model.cfg.in_channels:
            raise ValueError(f"the codec has {self.codec.latent_channels} latent channels, the U-Net "
                             f"model.in_channels = {model.cfg.in_channels}")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, weights: str = "auto",
                        device: str | torch.device | None = None) -> "RaphaelPipeline":
        """A pipeline from a checkpoint folder (config.json + model.safetensors and/or ema.safetensors, as
        ``checkpoint.save_model`` and tools/train.py write them); the text encoder and codec are the ones
        the config names (``training.build_text_encoder`` / ``build_codec``: local files, never downloaded).
        ``weights``: "ema", "raw" or "auto" (EMA when the folder has it). ``device``: default CPU."""
        from raphael_ref import training
        from raphael_ref.checkpoint import load_model

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no config.json in {folder}: from_pretrained needs a checkpoint folder "
                                    f"(config.json + *.safetensors); for a tools/train.py run use from_run")
        path = _weights_file(folder, weights)
        cfg = RaphaelConfig.from_json(folder / "config.json")
        device = torch.device(device or "cpu")
        codec = training.build_codec(cfg, device)
        encoder = training.build_text_encoder(cfg, device)
        model, cfg = load_model(folder, weights_name=path.name)
        d = cfg.diffusion
        return cls(model.to(device), encoder, codec, NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr), cfg)

    @classmethod
    def from_run(cls, run: str | Path, *, weights: str = "ema",
                 device: str | torch.device | None = None, sr_run: str | Path | None = None) -> "RaphaelPipeline":
        """A pipeline from a tools/train.py run folder (its latest checkpoint, ``training.resolve_checkpoint``)
        or one of its checkpoint folders; EMA weights unless ``weights="raw"`` (as tools/sample.py). ``sr_run``: a
        tools/train_sr.py run whose SR stage upscales every image (:meth:`attach_sr`; the Imagen cascade, E80)."""
        from raphael_ref import training

        pipe = cls.from_pretrained(training.resolve_checkpoint(run), weights=weights, device=device)
        if sr_run is not None:
            from raphael_ref.sr import SRStage

            pipe.attach_sr(SRStage.from_run(sr_run, weights=weights, device=device))
        return pipe

    def attach_sr(self, stage, **options) -> "RaphaelPipeline":
        """Run ``stage`` (a ``raphael_ref.sr.SRStage``) on every image the pipeline draws, conditioned on the same
        prompts and negative prompts: base + SR in one call. ``options``: ``steps``, ``guidance``, ``aug_level``,
        ``sampler`` of the SR stage (default: its run's config). The base must draw images of the stage's
        ``sr.lowres_size``; returns self."""
        size = self.model.cfg.sample_size * self.codec.downsample_factor
        if size != stage.lowres_size:
            raise ValueError(f"the SR stage upscales {stage.lowres_size} px images, the base model draws {size} px: "
                             f"train the SR stage with --set sr.lowres_size={size}")
        unknown = set(options) - {"steps", "guidance", "aug_level", "sampler"}
        if unknown:
            raise ValueError(f"unknown SR option(s) {sorted(unknown)}; known: steps, guidance, aug_level, sampler")
        self.sr, self.sr_options = stage, {k: v for k, v in options.items() if v is not None}
        return self

    def load_lora(self, path: str | Path, scale: float = 1.0, *, merge: bool = True,
                  base_checkpoint: str | Path | None = None) -> "RaphaelPipeline":
        """Apply a LoRA adapter written by tools/finetune_lora.py (``raphael_ref.lora.apply_lora``: merged into
        the weights by default, so sampling costs what the base costs); returns self."""
        from raphael_ref.lora import apply_lora

        self.model = apply_lora(self.model, path, scale, merge=merge, base_checkpoint=base_checkpoint).eval()
        return self

    def load_controlnet(self, path: str | Path, scale: float = 1.0) -> "RaphaelPipeline":
        """Load a ControlNet written by tools/train_controlnet.py (``raphael_ref.controlnet.load_controlnet``: checked to
        fit this U-Net); ``scale`` is the default conditioning scale of calls with ``control_image``. Returns self."""
        from raphael_ref.controlnet import _check_scale, load_controlnet

        self.control_scale = _check_scale(scale)
        self.controlnet = load_controlnet(path, unet=self.model)
        return self

    def control_map(self, control_image, batch: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The control map (1 or batch, 1, H, W) in [0, 1] of ``control_image``: a PIL image or a list of them, or an RGB
        tensor (B, 3, H, W) in [-1, 1] (Canny is run on them, with the ControlNet's settings), or an edge map tensor
        (B, 1, H, W) in [0, 1] (used as it is). ValueError naming the problem (size, batch, NaN, range)."""
        from raphael_ref.controlnet import canny_control, check_control_map

        if self.controlnet is None:
            raise ValueError("control_image needs a ControlNet: pipe.load_controlnet(path) first "
                             "(tools/train_controlnet.py writes <run>/controlnet.safetensors)")
        images = [control_image] if hasattr(control_image, "convert") else control_image
        if isinstance(images, (list, tuple)):
            if not images or not all(hasattr(im, "convert") for im in images):
                raise ValueError("control_image must be a PIL image, a list of PIL images or a tensor")
            images = torch.stack([torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                                  .reshape(im.size[1], im.size[0], 3).permute(2, 0, 1) for im in images])
            images = images.float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"control_image must be a PIL image, a list of them or a tensor, got {type(images).__name__}")
        if images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point():
            if not bool(torch.isfinite(images).all()):
                raise ValueError("control_image contains NaN or inf")
            images = canny_control(images.clamp(-1, 1), self.controlnet.canny)  # (B, 1, H, W)
        h, w = self._check_size(height, width)
        check_control_map(images, batch, (h, w), self.codec.downsample_factor, name="control_image")
        return images

    def to(self, device: str | torch.device) -> "RaphaelPipeline":
        """Move the U-Net, the text encoder and the codec to ``device``; returns self."""
        sr = () if self.sr is None else (self.sr.model, self.sr.text_encoder)  # the cascade's SR stage (sr.py)
        for part in (self.model, self.text_encoder, self.codec, self.controlnet, *sr):
            if isinstance(part, torch.nn.Module):
                part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: the codec's factor times the U-Net's 2**(levels-1)."""
        return self.codec.downsample_factor * 2 ** (len(self.model.cfg.channel_mult) - 1)

    # ------------------------------------------------------------------ sampling

    def encode_prompts(self, prompts: Sequence[str], *, truncate: bool = True):
        """Text tokens of ``prompts`` (``TextEncoding``). A prompt longer than the context warns and is cut
        (``PromptTruncatedWarning``, errata E41) or, with ``truncate=False``, raises ValueError."""
        from raphael_ref.text_encoder import PromptTruncatedWarning

        if truncate:
            return self.text_encoder(list(prompts))
        with warnings.catch_warnings():
            warnings.simplefilter("error", PromptTruncatedWarning)
            try:
                return self.text_encoder(list(prompts))
            except PromptTruncatedWarning as w:
                raise ValueError(f"{w} (truncate=False)") from None

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(latent h, latent w) for an image of height x width pixels (None: the config's sample_size)."""
        f, m = self.codec.downsample_factor, self.size_multiple
        default = self.model.cfg.sample_size * f
        height, width = default if height is None else height, default if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < m or v % m:
                raise ValueError(f"{name} must be a positive multiple of {m} (the codec's factor {f} times the "
                                 f"U-Net's downsampling {m // f}), got {v!r}")
        return height // f, width // f

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, generator: torch.Generator | int | None = None,
                 height: int | None = None, width: int | None = None, eta: float = 0.0,
                 spacing: str | None = None, return_paths: bool = False, return_masks: bool = False,
                 output_type: str = "pil", truncate: bool = True,
                 progress: Callable | None = None, paint=None, control_image=None,
                 controlnet_conditioning_scale: float | None = None) -> RaphaelPipelineOutput:
        """Images for ``prompt`` (a string or a list): :class:`RaphaelPipelineOutput`.

        ``negative_prompt``: None (the empty prompt), one string for all prompts, or one per prompt.
        Defaults from the config's ``sample`` section: ``num_inference_steps`` (steps), ``guidance_scale``
        (the CFG scale s of ``cfg_combine``: 1 = no guidance, 0 = unconditional), ``sampler``. The project's
        DDPM always runs all T steps (``num_inference_steps`` None or T). ``generator``: a CPU
        torch.Generator or an int seed (noise is drawn on the CPU: a seed gives the same images on any
        device). ``height``/``width`` in pixels (default: the config's size). ``eta``: DDIM only.
        ``spacing``: timestep spacing (None: "leading" for DDIM/DDPM, "trailing" for the diffusers
        solvers; ``schedulers.DEFAULT_SPACINGS``). ``truncate=False`` makes an over-long prompt an error.
        ``paint``: eDiff-I's paint-with-words, a ``raphael_ref.paint.PaintWithWords`` for the prompts (build it
        with :meth:`paint_with_words`); applied to the conditional branch only (E77).
        ``control_image``: the ControlNet's control (:meth:`control_map`: a PIL image, RGB or edge tensor; one for all
        prompts or one per prompt), after :meth:`load_controlnet`; applied to both branches of CFG (E79).
        ``controlnet_conditioning_scale``: its strength s (default: the one given to :meth:`load_controlnet`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = self._negatives(negative_prompt, len(prompts))
        sc = self.config.sample
        sampler = sc.sampler if sampler is None else sampler
        check_sampler(sampler, eta)
        guidance = sc.guidance if guidance_scale is None else guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
            raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), got {guidance!r}")
        T = self.schedule.T
        if sampler == "ddpm":
            if num_inference_steps not in (None, T):
                raise ValueError(f"sampler='ddpm' (the project's ancestral DDPM) runs all T = {T} steps, got "
                                 f"num_inference_steps={num_inference_steps}; use 'ddim' or 'dpmpp_2m' for fewer")
            steps = None
        else:
            steps = sc.steps if num_inference_steps is None else num_inference_steps
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
                raise ValueError(f"num_inference_steps must be an int in [1, T = {T}], got {steps!r}")
            steps = int(steps)
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        h, w = self._check_size(height, width)
        if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(int(generator))

        model = self.model
        if control_image is not None:  # ControlNet (raphael_ref/controlnet.py, E79): U-Net + ControlNet + control map
            from raphael_ref.controlnet import ControlledUNet, _check_scale

            scale = self.control_scale if controlnet_conditioning_scale is None else _check_scale(controlnet_conditioning_scale)
            control = self.control_map(control_image, len(prompts), height, width).to(self.device)
            if control.shape[0] != len(prompts):
                control = control.expand(len(prompts), -1, -1, -1)
            model = ControlledUNet(self.model, self.controlnet, control, scale).eval()
        elif controlnet_conditioning_scale is not None:
            raise ValueError("controlnet_conditioning_scale was given without control_image")
        c = self.encode_prompts(prompts, truncate=truncate)
        # one shared negative prompt is encoded once and broadcast by the sampler (as training.generate_images)
        same = all(n == negatives[0] for n in negatives)
        u = self.encode_prompts(negatives[:1] if same else negatives, truncate=truncate) if guidance != 1.0 else None
        uncond = None if u is None else (u.hidden, u.valid, u.pooled_index)
        want_paths = bool(return_paths or return_masks)
        kw = dict(shape=(len(prompts), self.model.cfg.in_channels, h, w), guidance=float(guidance),
                  generator=generator, collect_paths=want_paths, progress=progress)
        n_calls = self._model_calls(sampler, steps, spacing)
        kw["collect_masks"] = [n_calls - 1] if return_masks else False  # the last model call only
        if sampler in OWN_SAMPLERS:
            from raphael_ref.sampling import sample

            x, paths = sample(model, self.schedule, (c.hidden, c.valid, c.pooled_index), uncond, steps=steps,
                              sampler=sampler, eta=eta, spacing=spacing or "leading",
                              set_alpha_to_one=sc.set_alpha_to_one, paint=paint, **kw)
        else:
            from raphael_ref.schedulers import sample_with_scheduler

            x, paths = sample_with_scheduler(model, self.schedule, (c.hidden, c.valid, c.pooled_index), uncond,
                                             scheduler=sampler, steps=steps, spacing=spacing,
                                             set_alpha_to_one=sc.set_alpha_to_one, paint=paint, **kw)
        images = self.codec.decode(x.float()).float().cpu()  # (B, 3, H, W) in [-1, 1]
        lowres = None
        if self.sr is not None:  # the cascade's SR stage on the base images, same prompts (raphael_ref/sr.py, E80)
            lowres = images
            images = self.sr(lowres.clamp(-1, 1), prompts, negative_prompts=negatives, generator=generator,
                             **self.sr_options)  # (B, 3, H', W')
        masks = paths.masks[-1] if return_masks else None
        if paths is not None and not return_paths:
            paths = None
        return RaphaelPipelineOutput(self.to_pil(images) if output_type == "pil" else images, paths, masks, lowres)

    def paint_with_words(self, prompt: str | Sequence[str], regions, *, weight: float = 1.0, mode: str = "replace"):
        """A ``PaintWithWords`` for ``prompt`` from ``{phrase: region}`` (one dict per prompt, or one dict for a
        single prompt): each phrase's tokens are found in its prompt (``paint.find_token_indices``); regions are
        (H, W) float tensors in [0, 1] at image resolution."""
        from raphael_ref.paint import PaintWithWords, find_token_indices

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = [regions] if isinstance(regions, dict) else list(regions)
        if len(per_prompt) != len(prompts) or not all(isinstance(r, dict) for r in per_prompt):
            raise ValueError(f"regions must be one dict {{phrase: region}} per prompt ({len(prompts)})")
        items = [[(find_token_indices(self.text_encoder, p, phrase), region) for phrase, region in r.items()]
                 for p, r in zip(prompts, per_prompt)]
        return PaintWithWords(items, weight=weight, mode=mode)

    def _model_calls(self, sampler: str, steps: int | None, spacing: str | None) -> int:
        """How many model calls a sampling run makes (the masks of the last one are kept)."""
        if sampler == "ddpm":
            return self.schedule.T
        if sampler == "ddim":
            return steps
        from raphael_ref.schedulers import make_scheduler

        sched = make_scheduler(sampler, self.schedule, spacing=spacing)
        sched.set_timesteps(steps)
        return len(sched.timesteps)

    @staticmethod
    def _negatives(negative_prompt, n: int) -> list[str]:
        """One negative prompt per prompt: None -> "", a string -> repeated, a list -> checked length."""
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        negatives = list(negative_prompt)
        if len(negatives) != n or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt must be a string or a list of {n} strings (one per prompt), got "
                             f"{len(negatives)} item(s)")
        return negatives

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """(B, 3, H, W) in [-1, 1] -> B PIL RGB images (``training.to_uint8``: rounded, clamped)."""
        from PIL import Image

        from raphael_ref.training import to_uint8

        return [Image.fromarray(a.numpy()) for a in to_uint8(images)]  # (H, W, 3) uint8 -> RGB

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(config={self.config.name!r}, device={self.device}, "
                f"text_encoder={self.text_encoder.config.name!r}, codec={type(self.codec).__name__}, "
                f"T={self.schedule.T})")
