"""Latent codec: images in [-1, 1] <-> the space the diffusion model works in.

RAPHAEL Sec. 4 ("Implementations") compresses images with a pre-trained VAE, following the
Latent Diffusion Model: the U-Net denoises latents z = encode(x) and samples are decoded back.
The paper's own VAE is not released, so :class:`VAECodec` adapts any diffusers ``AutoencoderKL``
stored in a LOCAL directory (e.g. the ``vae`` folder of a Stable Diffusion checkpoint), and the
toy preset uses :class:`IdentityCodec` (pixel-space diffusion). diffusers comes with the ``vae``
extra (``pip install "raphael_ref[vae]"``; errata E64); only :meth:`VAECodec.from_pretrained` imports it.

Latent normalization (errata E42 of ``spec/errata.md``), z the posterior draw:

    latents = (z - shift) * scaling_factor / std,      z = (latents * std / scaling_factor) + shift

with shift = ``latents_mean`` (per channel) or ``shift_factor`` or 0, and std = ``latents_std``
(per channel) or 1, all read from the VAE's config, so that latents have about unit variance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["IdentityCodec", "LatentCodec", "SpaceToDepthCodec", "VAECodec", "POSTERIORS"]

POSTERIORS = ("sample", "mode")


def _import_diffusers():
    """diffusers' ``AutoencoderKL`` and ``is_accelerate_available``; without the ``vae`` extra, an ImportError
    that says what to install (errata E64)."""
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import is_accelerate_available
    except ImportError as e:
        raise ImportError(
            "model.codec='vae' needs the diffusers package (the VAE is a diffusers AutoencoderKL), which is "
            'not installed: pip install "raphael_ref[vae]" (or pip install "diffusers>=0.27"), or train and '
            "sample in pixel space with --set model.codec=identity --set model.in_channels=3. "
            f"({type(e).__name__}: {e})"
        ) from e
    return AutoencoderKL, is_accelerate_available


@runtime_checkable
class LatentCodec(Protocol):
    """What the diffusion model needs from an image codec.

    encode: images (B, 3, H, W) in [-1, 1] -> latents (B, latent_channels, H / f, W / f)
    decode: latents -> images (B, 3, H, W), nominally in [-1, 1] (not clamped)
    f = downsample_factor; latents are already multiplied by scaling_factor.
    """

    latent_channels: int
    downsample_factor: int
    scaling_factor: float

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _check_4d(x: torch.Tensor, name: str, channels: int, factor: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W) ({what}), got {tuple(x.shape)}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"{name} height and width must be multiples of the downsample factor {factor}, got "
            f"{tuple(x.shape[2:])}; resize or crop the images (see raphael_ref.data.buckets)"
        )


class IdentityCodec(nn.Module):
    """Pixel space: latents are the images themselves (toy preset; channels 3, factor 1, scale 1)."""

    latent_channels = 3
    downsample_factor = 1
    scaling_factor = 1.0

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns ``images`` unchanged (B, 3, H, W); ``generator`` is unused."""
        _check_4d(images, "images", 3, 1, "RGB in [-1, 1]")
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Returns ``latents`` unchanged (B, 3, H, W)."""
        _check_4d(latents, "latents", 3, 1, "pixel-space latents")
        return latents


class SpaceToDepthCodec(nn.Module):
    """Pixel space, patched: each f x f pixel patch becomes 3 f^2 channels of one latent position.

        encode: (B, 3, H, W) -> (B, 3 f^2, H / f, W / f)   (torch.nn.functional.pixel_unshuffle)
        decode: the exact inverse                           (torch.nn.functional.pixel_shuffle)

    Lossless and parameter-free: the diffusion is the pixel-space one (the noise of each pixel is
    still i.i.d. N(0, 1), latents are pixels rearranged), only the U-Net sees an f-times smaller
    grid, as the latent U-Net of the paper sees the VAE's 8-times smaller grid (Sec. 4). "simple
    diffusion" (Hoogeboom et al., 2023) starts its pixel-space U-Net the same way. Not in the paper:
    the toy preset's choice (erratum E68) because it makes a CPU step ~4x cheaper per image.
    """

    scaling_factor = 1.0

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"SpaceToDepthCodec: factor must be an int >= 1, got {factor!r}")
        self.downsample_factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3 f^2, H / f, W / f); ``generator`` is unused."""
        _check_4d(images, "images", 3, self.downsample_factor, "RGB in [-1, 1]")
        return torch.nn.functional.pixel_unshuffle(images, self.downsample_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3 f^2, h, w) -> (B, 3, f h, f w), the exact inverse of :meth:`encode`."""
        _check_4d(latents, "latents", self.latent_channels, 1, "space-to-depth latents")
        return torch.nn.functional.pixel_shuffle(latents, self.downsample_factor)

    def extra_repr(self) -> str:
        return f"factor={self.downsample_factor}"


class VAECodec(nn.Module):
    """Frozen diffusers ``AutoencoderKL`` with its latent normalization (RAPHAEL Sec. 4, LDM VAE).

    posterior: ``"sample"`` (default) draws z = mean + std * eps from the encoder's diagonal
        Gaussian with the ``generator`` passed to :meth:`encode`, as Stable Diffusion training
        does; ``"mode"`` returns its mean (deterministic; for evaluation and tests). E43.
    Outputs come back in the dtype of the input; the VAE itself runs in its own dtype.
    """

    def __init__(self, vae: nn.Module, posterior: str = "sample") -> None:
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        cfg = vae.config
        self.vae = vae
        self.posterior = posterior
        self.in_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        mean = getattr(cfg, "latents_mean", None)
        std = getattr(cfg, "latents_std", None)
        shift_factor = getattr(cfg, "shift_factor", None)
        if mean is not None and shift_factor is not None:
            raise ValueError("VAE config sets both latents_mean and shift_factor; keep one of them")
        if (mean is None) != (std is None):
            raise ValueError("VAE config must set latents_mean and latents_std together")
        shift = torch.zeros(self.latent_channels, dtype=torch.float64)  # (C,)
        scale_std = torch.ones(self.latent_channels, dtype=torch.float64)  # (C,)
        if shift_factor is not None:
            shift.fill_(float(shift_factor))
        if mean is not None:
            shift = torch.as_tensor(mean, dtype=torch.float64).reshape(self.latent_channels)
            scale_std = torch.as_tensor(std, dtype=torch.float64).reshape(self.latent_channels)
        # float64 tables on the CPU, cast to the compute dtype and device at use (project convention)
        self.latent_shift = shift
        self.latent_std = scale_std
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        subfolder: str | None = None,
        posterior: str = "sample",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "VAECodec":
        """Load ``AutoencoderKL`` from a LOCAL directory (``local_files_only=True``; never downloads)."""
        directory = Path(directory)
        folder = directory / subfolder if subfolder else directory
        if not folder.is_dir():
            raise FileNotFoundError(
                f"VAE directory {folder} does not exist. Provide a local diffusers AutoencoderKL "
                f"folder holding config.json and diffusion_pytorch_model.safetensors (e.g. the "
                f"'vae' subfolder of a Stable Diffusion checkpoint: subfolder='vae'). Nothing is downloaded."
            )
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no config.json; it is not a diffusers AutoencoderKL folder "
                f"(did you mean subfolder='vae'?)"
            )
        AutoencoderKL, is_accelerate_available = _import_diffusers()

        # use_safetensors=True: never unpickle a .bin (project rule: no pickles).
        extra = {} if is_accelerate_available() else {"low_cpu_mem_usage": False}
        vae = AutoencoderKL.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dtype, **extra
        )
        codec = cls(vae, posterior=posterior)
        if device is not None:
            codec = codec.to(device)
        return codec

    def train(self, mode: bool = True) -> "VAECodec":
        """Frozen: stays in eval mode whatever ``mode`` a parent module asks for."""
        return super().train(False)

    def _vae_param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = self.latent_shift.to(device=like.device, dtype=like.dtype)[None, :, None, None]  # (1, C, 1, 1)
        std = self.latent_std.to(device=like.device, dtype=like.dtype)[None, :, None, None]  # (1, C, 1, 1)
        return shift, std

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C_in, H, W) in [-1, 1] -> normalized latents (B, C, H / f, W / f)."""
        _check_4d(images, "images", self.in_channels, self.downsample_factor, "in [-1, 1]")
        p = self._vae_param()
        dist = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
        z = dist.sample(generator=generator) if self.posterior == "sample" else dist.mode()  # (B, C, h, w)
        shift, std = self._stats(z)
        latents = (z - shift) * self.scaling_factor / std  # (B, C, h, w)
        return latents.to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, C, h, w) -> images (B, C_in, h * f, w * f), not clamped."""
        _check_4d(latents, "latents", self.latent_channels, 1, "normalized VAE latents")
        p = self._vae_param()
        z = latents.to(device=p.device, dtype=p.dtype)
        shift, std = self._stats(z)
        z = z * std / self.scaling_factor + shift  # (B, C, h, w)
        images = self.vae.decode(z).sample  # (B, C_in, H, W)
        return images.to(latents.dtype)

    def extra_repr(self) -> str:
        return (f"latent_channels={self.latent_channels}, downsample_factor={self.downsample_factor}, "
                f"scaling_factor={self.scaling_factor}, posterior={self.posterior!r}")
