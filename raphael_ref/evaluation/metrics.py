"""Image-quality and alignment metrics of RAPHAEL Sec. 4: FID (and KID) via torch-fidelity, CLIP score via open_clip.

RAPHAEL Sec. 4 reports zero-shot FID-30k on MS-COCO 256 x 256 (Table 1) and, in the ablations
(Fig. 6b), trade-off curves of FID against the CLIP score over guidance weights. Neither formula
is printed in the paper; we use the standard definitions:

    FID  = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})       (Heusel et al., 2017)
           mu, S: mean and (unbiased) covariance of Inception-v3 pool features (2048-d)
    KID  = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets
                                                                        (Binkowski et al., 2018)
    CLIP = 100 * max(cos(E_I(image), E_T(caption)), 0)                 (Hessel et al., 2021 with
           weight 100 instead of 2.5: the convention of torchmetrics' CLIPScore and of the
           text-to-image literature)

FID and KID run through ``torch_fidelity.calculate_metrics`` (the reference implementation the
community compares against); :func:`frechet_distance` and :func:`kid_unbiased` are literal forms
that the tests check torch-fidelity's numbers against.

Nothing downloads: the Inception weights are a local file (``inception_weights``; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``), CLIP is built from a local open_clip directory or a
model name plus a local checkpoint. A missing file is a ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "TINY_EXTRACTOR",
    "ClipScorer",
    "ImageFolder",
    "TinyRandomFeatureExtractor",
    "clip_score",
    "clip_score_from_embeddings",
    "fid_kid",
    "frechet_distance",
    "gaussian_statistics",
    "kid_unbiased",
    "load_clip",
    "polynomial_kernel",
    "register_tiny_feature_extractor",
    "save_images",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_EXTRACTOR = "inception-v3-compat"
TINY_EXTRACTOR = "raphael-tiny-random"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# literal forms
# ---------------------------------------------------------------------------------------------


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh((a + a.T) / 2)  # (d,), (d, d)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T  # (d, d)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """RAPHAEL Sec. 4 (Results on COCO), FID: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al., 2017).

    Computed in float64. Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}) for PSD S1, S2 (similar
    matrices), which keeps every square root symmetric.
    """
    for name, v, nd in (("mu1", mu1, 1), ("sigma1", sigma1, 2), ("mu2", mu2, 1), ("sigma2", sigma2, 2)):
        if not isinstance(v, torch.Tensor) or v.ndim != nd:
            raise ValueError(f"frechet_distance: {name} must be a {nd}-d tensor; got {getattr(v, 'shape', type(v))}")
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected mu (d,) and sigma (d, d) with one d for both sets; got "
                         f"{tuple(mu1.shape)}, {tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    mu1, mu2, s1, s2 = (x.to(torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    r1 = _sqrtm_psd(s1)  # (d, d)
    cross = _sqrtm_psd(r1 @ s2 @ r1)  # (d, d)
    diff = mu1 - mu2  # (d,)
    return diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross)


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of features (n, d), in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_statistics: features must be (n >= 2, d); got {tuple(features.shape)}")
    f = features.to(torch.float64)
    mu = f.mean(dim=0)  # (d,)
    c = f - mu  # (n, d)
    return mu, c.T @ c / (f.shape[0] - 1)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """KID kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1 / d by default; (n, d), (m, d) -> (n, m)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef0) ** degree


def kid_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                 coef0: float = 1.0) -> torch.Tensor:
    """RAPHAEL Sec. 4 (image quality), KID on one subset: the unbiased MMD^2 estimate (Binkowski et al., 2018).

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2,          x, y: (m, d) feature sets of one size m.
    """
    if x.ndim != 2 or y.shape != x.shape or x.shape[0] < 2:
        raise ValueError(f"kid_unbiased: x and y must be (m >= 2, d) of one shape; got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    m = x.shape[0]
    k_xx, k_yy, k_xy = (polynomial_kernel(a, b, degree, gamma, coef0) for a, b in ((x, x), (y, y), (x, y)))  # (m, m)
    off = ~torch.eye(m, dtype=torch.bool)  # (m, m) i != j
    return (k_xx[off].sum() + k_yy[off].sum()) / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """RAPHAEL Sec. 4 (Ablation, Fig. 6b), CLIP score per pair: 100 * max(cos(E_I, E_T), 0); (B, e), (B, e) -> (B,).

    Hessel et al. (2021) define CLIP-S = w max(cos, 0) with w = 2.5; text-to-image papers and
    torchmetrics' CLIPScore use w = 100, which we follow. The cosine is taken in float32 at least.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"clip_score_from_embeddings: embeddings must be (B, e) of one shape; got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    cos = F.cosine_similarity(image_emb.to(dtype), text_emb.to(dtype), dim=-1)  # (B,)
    return 100.0 * cos.clamp_min(0.0)


# ---------------------------------------------------------------------------------------------
# image sets
# ---------------------------------------------------------------------------------------------


class ImageFolder(torch.utils.data.Dataset):
    """Images of a folder (png/jpg, sorted by name) as uint8 (3, H, W) tensors, the way torch-fidelity reads them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"image folder {self.root} holds no {'/'.join(IMAGE_EXTENSIONS)} files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        from raphael_ref.data.shards import image_to_rgb  # 16-bit, palette, alpha (errata E64)

        with Image.open(self.files[i]) as im:
            arr = torch.frombuffer(bytearray(image_to_rgb(im).tobytes()), dtype=torch.uint8)
            return arr.reshape(im.height, im.width, 3).permute(2, 0, 1).contiguous()  # (3, H, W)


class _TensorImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "") -> list[Path]:
    """Write uint8 images (B, 3, H, W) as lossless PNGs ``{prefix}{i:06d}.png``."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"save_images expects uint8 images (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.cpu()):
        p = folder / f"{prefix}{i:06d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def _as_dataset(x: Any, which: str, datasets_root: str | None) -> torch.utils.data.Dataset:
    """A folder, a registered torch-fidelity dataset name, a uint8 tensor (N, 3, H, W) or a Dataset."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{which}: image tensors must be uint8 (N, 3, H, W); got {x.dtype} {tuple(x.shape)}")
        return _TensorImages(x.cpu())
    if isinstance(x, torch.utils.data.Dataset):
        return x
    if isinstance(x, (str, Path)):
        if Path(x).is_dir():
            return ImageFolder(x)
        if isinstance(x, str) and x in DATASETS_REGISTRY:
            root = datasets_root or os.path.join(os.path.dirname(torch.hub.get_dir()), "fidelity_datasets")
            os.makedirs(root, exist_ok=True)  # torch-fidelity's default root (it creates it too)
            return DATASETS_REGISTRY[x](root, False)  # download=False: a missing data set is an error
        raise FileNotFoundError(f"{which}: {x!r} is neither an image folder nor a registered torch-fidelity "
                                f"data set ({sorted(DATASETS_REGISTRY)})")
    raise ValueError(f"{which}: expected a folder, a registered data set name, a uint8 tensor or a Dataset; "
                     f"got {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# FID / KID through torch-fidelity
# ---------------------------------------------------------------------------------------------


def _builtin_extractor(name: str) -> bool:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY.get(name)
    return cls is not None and cls.__module__.startswith("torch_fidelity.")


@contextlib.contextmanager
def _inception_weights_file(path: str | Path | None) -> Iterator[str]:
    """A local Inception weights file torch-fidelity can read; checked to hold tensors only."""
    if path is None:
        raise ValueError(
            f"FID/KID need the Inception-v3 weights as a local file and nothing is downloaded: pass "
            f"inception_weights=<path to {INCEPTION_FILE}> (torch-fidelity's release file, {INCEPTION_URL}; "
            f"a .safetensors conversion of it also works)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {path} not found. Provide {INCEPTION_FILE} (torch-fidelity's release "
            f"file, {INCEPTION_URL}) or a .safetensors conversion of it; nothing is downloaded.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / INCEPTION_FILE
            torch.save(state, out)
            yield str(out)
        return
    try:  # torch-fidelity unpickles with weights_only=False: refuse anything that is not plain tensors
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we must not hand the file on
        raise ValueError(f"Inception weights file {path} is not a plain state dict of tensors ({e}); use "
                         f"{INCEPTION_FILE} from {INCEPTION_URL}") from e
    yield str(path)


def fid_kid(generated: Any, reference: Any, *, inception_weights: str | Path | None = None,
            feature_extractor: str = INCEPTION_EXTRACTOR, kid: bool = True, kid_subsets: int = 100,
            kid_subset_size: int = 1000, batch_size: int = 64, device: str | torch.device | None = None,
            datasets_root: str | None = None, seed: int = 2020, loader_workers: bool = False,
            verbose: bool = False) -> dict[str, float]:
    """FID (and KID) of ``generated`` against ``reference`` with ``torch_fidelity.calculate_metrics``.

    generated, reference: an image folder, a registered torch-fidelity data set name (never
        downloaded), a uint8 tensor (N, 3, H, W) or a Dataset of uint8 (3, H, W) images.
    inception_weights: local file of the Inception-v3 weights (required for the default extractor).
    feature_extractor: a torch-fidelity extractor name; other built-in ones (which download their
        weights) are refused, extractors registered by the caller are used as they are.
    kid_subset_size: clipped to the smaller set's size.
    loader_workers: read images with torch-fidelity's worker processes (min(4, 2 x cores)); off by
        default (torch-fidelity's ``save_cpu_ram``), which is faster for in-memory or small sets.
    Returns {"fid", "kid_mean", "kid_std", "n_generated", "n_reference"}.
    """
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {feature_extractor!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if _builtin_extractor(feature_extractor) and feature_extractor != INCEPTION_EXTRACTOR:
        raise ValueError(f"feature extractor {feature_extractor!r} would download its weights; use "
                         f"{INCEPTION_EXTRACTOR!r} with a local inception_weights file, or register your own")
    gen = _as_dataset(generated, "generated", datasets_root)
    ref = _as_dataset(reference, "reference", datasets_root)
    n_gen, n_ref = len(gen), len(ref)
    if min(n_gen, n_ref) < 2:
        raise ValueError(f"FID needs >= 2 images per set; got {n_gen} generated and {n_ref} reference")
    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs = dict(input1=gen, input2=ref, fid=True, kid=kid, feature_extractor=feature_extractor,
                  cuda=device.type == "cuda", batch_size=batch_size, cache=False, datasets_download=False,
                  kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, n_gen, n_ref), rng_seed=seed,
                  samples_shuffle=False, verbose=verbose, save_cpu_ram=not loader_workers)
    with contextlib.ExitStack() as stack:
        if feature_extractor == INCEPTION_EXTRACTOR:
            kwargs["feature_extractor_weights_path"] = stack.enter_context(_inception_weights_file(inception_weights))
        if device.type == "cuda" and device.index is not None:
            stack.enter_context(torch.cuda.device(device))
        out = torch_fidelity.calculate_metrics(**kwargs)
    result = {"fid": float(out[torch_fidelity.KEY_METRIC_FID]), "n_generated": n_gen, "n_reference": n_ref}
    if kid:
        result["kid_mean"] = float(out[torch_fidelity.KEY_METRIC_KID_MEAN])
        result["kid_std"] = float(out[torch_fidelity.KEY_METRIC_KID_STD])
    return result


@functools.lru_cache(maxsize=1)
def _tiny_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyRandomFeatureExtractor(FeatureExtractorBase):
        """Random 8-d conv features of uint8 images: a stand-in for Inception in offline tests.

        Weights are drawn from a fixed seed (a private generator; the global RNG is untouched), so
        features are a deterministic function of the image. The numbers mean nothing: only the code
        path (loading, batching, statistics) is exercised.
        """

        FEATURES = ("feat",)

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) / 8)
                self.conv.bias.copy_(torch.randn(8, generator=gen) / 8)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return TinyRandomFeatureExtractor.FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 images (B, 3, H, W); got {x.dtype} {tuple(x.shape)}")
            h = torch.tanh(self.conv(x.float() / 127.5 - 1.0))  # (B, 8, h, w)
            return (h.mean(dim=(2, 3)),)  # (B, 8)

    return TinyRandomFeatureExtractor


def __getattr__(name: str):  # TinyRandomFeatureExtractor is built lazily (torch_fidelity imported on use)
    if name == "TinyRandomFeatureExtractor":
        return _tiny_extractor_class()
    raise AttributeError(name)


def register_tiny_feature_extractor(name: str = TINY_EXTRACTOR) -> str:
    """Register the tiny random extractor with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    cls = _tiny_extractor_class()
    if name in FEATURE_EXTRACTORS_REGISTRY:
        if FEATURE_EXTRACTORS_REGISTRY[name] is not cls:
            raise ValueError(f"a different feature extractor is already registered as {name!r}")
        return name
    register_feature_extractor(name, cls)
    return name


# ---------------------------------------------------------------------------------------------
# CLIP score through open_clip
# ---------------------------------------------------------------------------------------------

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclasses.dataclass
class ClipScorer:
    """An open_clip model with its tokenizer and image preprocessing (size, mean, std)."""

    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized float (B, 3, s, s): bicubic resize of the short side, centre crop."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP images must be uint8 (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32) / 255.0  # (B, 3, H, W)
        H, W = x.shape[-2:]
        s = self.image_size
        h, w = (s, max(s, round(W * s / H))) if H <= W else (max(s, round(H * s / W)), s)
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]  # (B, 3, s, s)
        mean = torch.tensor(self.mean, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device)[None, :, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings (B, e), (B, e), before normalization."""
        img = self.model.encode_image(self.preprocess(images))  # (B, e)
        txt = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))  # (B, e)
        return img, txt


def load_clip(source: str | Path, weights: str | Path | None = None, *,
              device: str | torch.device = "cpu") -> ClipScorer:
    """An open_clip model from local files only.

    source: a directory in open_clip's local layout (``open_clip_config.json`` with ``model_cfg``
        and ``preprocess_cfg``, plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``:
        a Hugging Face snapshot of an open_clip model is such a directory), or a built-in open_clip
        model name (e.g. ``"ViT-g-14"``) together with ``weights``, a local checkpoint file.
    """
    import open_clip

    path = Path(source)
    with _offline():
        if path.is_dir():
            if not (path / OPEN_CLIP_CONFIG).is_file():
                raise FileNotFoundError(f"{path} has no {OPEN_CLIP_CONFIG}; an open_clip model directory holds "
                                        f"{OPEN_CLIP_CONFIG} and one of {OPEN_CLIP_WEIGHTS}")
            if not any((path / w).is_file() for w in OPEN_CLIP_WEIGHTS):
                raise FileNotFoundError(f"{path} holds no CLIP weights; provide one of {OPEN_CLIP_WEIGHTS} there")
            name = f"local-dir:{path}"
            model = open_clip.create_model(name, pretrained_image=False, pretrained_text=False, device=device)
        else:
            if open_clip.get_model_config(str(source)) is None:
                raise ValueError(f"CLIP source {source!r} is neither a local open_clip directory nor a built-in "
                                 f"open_clip model name (see open_clip.list_models())")
            if weights is None:
                raise ValueError(f"CLIP model {source!r} needs weights=<local checkpoint file> (e.g. the "
                                 f"open_clip_pytorch_model.bin of its release); nothing is downloaded")
            if not Path(weights).is_file():
                raise FileNotFoundError(f"CLIP weights file {weights} not found; provide the local open_clip "
                                        f"checkpoint of {source} (nothing is downloaded)")
            name = str(source)
            model = open_clip.create_model(name, pretrained=str(weights), pretrained_image=False,
                                           pretrained_text=False, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    model.eval().requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipScorer(model, tokenizer, int(size), mean, std)


def clip_score(images: torch.Tensor, texts: Sequence[str], scorer: ClipScorer, batch_size: int = 64) -> torch.Tensor:
    """CLIP score of each (image, text) pair, (B,) float32: 100 * max(cos(E_I, E_T), 0)."""
    if isinstance(texts, str) or len(texts) != images.shape[0]:
        raise ValueError(f"clip_score needs one text per image; got {images.shape[0]} images and "
                         f"{1 if isinstance(texts, str) else len(texts)} texts")
    out = []
    for i in range(0, images.shape[0], batch_size):
        img, txt = scorer.embed(images[i:i + batch_size], texts[i:i + batch_size])
        out.append(clip_score_from_embeddings(img, txt).float().cpu())
    return torch.cat(out)
