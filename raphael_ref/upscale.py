"""Super-resolution of generated images with an ESRGAN-family model (RAPHAEL Sec. 4.1, App. 7.8).

RAPHAEL reaches 4096 x 6144 by upscaling its samples with a "tailor-made" SR-GAN, Real-ESRGAN
(ref. [9]); Fig. 22 / 23 show the results. The paper's SR model is not released, so this module runs
any ESRGAN-family checkpoint (Real-ESRGAN x4plus / x2plus, ESRGAN, ...) that ``spandrel`` recognises:
spandrel reads the weight file and detects the architecture and scale from its keys. Weights are read
from a local file only (nothing downloads).

Large outputs are made tile by tile (:func:`upscale_tiled`): the input is cut into ``tile x tile``
cores; each core is upscaled together with ``pad`` pixels of context on every side (clamped at the
image border) and only the core's part of the output is kept. When ``pad`` is at least the network's
receptive-field radius (in input pixels), every kept output pixel sees exactly the input it would see
untiled, so the tiled output equals the untiled one up to float rounding (tested); no blending seam.
For Real-ESRGAN x4plus that radius is large on paper (347 3 x 3 convolutions at the input resolution)
but its effective field is far smaller: Real-ESRGAN's own tiling keeps 10 pixels of context, and the
default ``pad=32`` keeps more. Memory: the output (3 x sH x sW floats: 302 MB for 4096 x 6144 in
float32, on ``out_device``) plus one tile's activations: for x4plus (64 channels) a 256-pixel core
with 32 pixels of context needs about 1 GB in float32 (its widest maps, 64 x 1280 x 1280 after the
second upsampling, are 420 MB each); the activations scale with (tile + 2 pad)^2.

    up = Upscaler.from_file("RealESRGAN_x4plus.pth", device="cuda")
    big = up(images, tile=256, pad=32)      # (B, 3, H, W) in [0, 1] -> (B, 3, 4H, 4W)

Needs ``spandrel`` (extra ``sr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

__all__ = ["Upscaler", "tile_cores", "upscale_tiled"]


def tile_cores(size: int, tile: int) -> list[tuple[int, int]]:
    """Cut ``[0, size)`` into consecutive cores of length ``tile`` (the last one may be shorter)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    return [(a, min(a + tile, size)) for a in range(0, size, tile)]


@torch.no_grad()
def upscale_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, *, tile: int = 256,
                  pad: int = 32, out_device: torch.device | str | None = None,
                  progress: Callable | None = None) -> torch.Tensor:
    """Apply the upscaler ``fn`` ((B, C, h, w) -> (B, C', scale h, scale w)) to ``x`` tile by tile.

    Each ``tile x tile`` core of ``x`` is upscaled with ``pad`` pixels of context on each side (fewer at
    the border) and the core's ``scale``-times region of the result is written into the output, which
    lives on ``out_device`` (default: ``x``'s device). ``progress`` wraps the list of tiles (e.g. tqdm).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    B, _, H, W = x.shape
    tiles = [(ys, xs) for ys in tile_cores(H, tile) for xs in tile_cores(W, tile)]
    out = None
    for (y0, y1), (x0, x1) in (progress(tiles) if progress is not None else tiles):
        cy0, cy1, cx0, cx1 = max(0, y0 - pad), min(H, y1 + pad), max(0, x0 - pad), min(W, x1 + pad)
        y = fn(x[:, :, cy0:cy1, cx0:cx1])  # (B, C', s (cy1 - cy0), s (cx1 - cx0))
        if y.shape[-2:] != ((cy1 - cy0) * scale, (cx1 - cx0) * scale):
            raise ValueError(f"the upscaler returned {tuple(y.shape[-2:])} for a {cy1 - cy0} x {cx1 - cx0} tile; "
                             f"expected x{scale}")
        if out is None:
            out = torch.empty(B, y.shape[1], H * scale, W * scale, dtype=y.dtype,
                              device=out_device if out_device is not None else x.device)
        oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
        out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
            y[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale].to(out.device)
    return out


class Upscaler:
    """An ESRGAN-family super-resolution model read from a local file through ``spandrel``."""

    def __init__(self, descriptor, path: Path | None = None) -> None:
        self.descriptor = descriptor
        self.path = path

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> "Upscaler":
        """Read the weights at ``path`` (.pth / .safetensors) and detect the architecture."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"upscaler weights {path} not found. Give a local ESRGAN-family weight file, e.g. "
                f"RealESRGAN_x4plus.pth from the Real-ESRGAN release (xinntao/Real-ESRGAN); nothing is downloaded.")
        try:
            from spandrel import ImageModelDescriptor, ModelLoader
        except ImportError as e:  # pragma: no cover - the test extra installs it
            raise ImportError("the upscaler needs spandrel: pip install 'raphael_ref[sr]'") from e
        try:
            desc = ModelLoader(device=torch.device(device)).load_from_file(str(path))
        except Exception as e:  # spandrel names the keys it could not place
            raise ValueError(f"{path}: not a super-resolution model spandrel recognises ({type(e).__name__}: {e})") from e
        if not isinstance(desc, ImageModelDescriptor) or desc.scale < 2:
            raise ValueError(f"{path}: {desc.architecture.name} with scale {getattr(desc, 'scale', '?')} is not an "
                             f"upscaler (an image-to-image model with scale >= 2 is needed)")
        desc.model.eval()
        desc.to(dtype)
        return cls(desc, path)

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, tile: int | None = 256, pad: int = 32,
                 out_device: torch.device | str | None = None, progress: Callable | None = None) -> torch.Tensor:
        """Upscale ``images`` (B, 3, H, W) in [0, 1] to (B, 3, scale H, scale W) in [0, 1].

        ``tile=None`` runs the whole image at once; otherwise :func:`upscale_tiled` with ``tile`` / ``pad``.
        """
        if images.dim() != 4 or images.shape[1] != self.descriptor.input_channels:
            raise ValueError(f"images must be (B, {self.descriptor.input_channels}, H, W), got {tuple(images.shape)}")
        if images.is_floating_point() is False:
            raise ValueError(f"images must be floats in [0, 1], got {images.dtype} (divide uint8 images by 255)")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("images must hold finite values in [0, 1] (PIL / 255, or (x + 1) / 2 of a sample)")
        p = next(self.descriptor.model.parameters())
        fn = lambda t: self.descriptor(t.to(p.device, p.dtype)).clamp(0, 1)  # noqa: E731
        if tile is None:
            out = fn(images)
            return out.to(out_device) if out_device is not None else out
        return upscale_tiled(fn, images, self.scale, tile=tile, pad=pad, out_device=out_device, progress=progress)
