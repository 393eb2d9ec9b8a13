"""RAPHAEL Sec. 4, "Dataset": readers for image-text pairs with the paper's filters.

"we filter the images using the aesthetic scorer same as Stable Diffusion and remove the image-text
pairs that have scores smaller than 4.7. We remove the images with watermarks either. [...] we clean
them by removing useless information such as URLs, HTML tags, and email addresses."

Sources:
- img2dataset / WebDataset tar shards (`iter_tar_samples`): members grouped by key, the key being
  the member path up to the first '.' of its file name and the rest its extension (so
  "000123.latent.safetensors" has extension "latent.safetensors"). Consecutive members with one
  key form a sample, as img2dataset writes them. Image: .jpg/.jpeg/.png/.webp; caption: .txt
  (else the json's "caption"); metadata: optional .json.
- a folder of images with same-stem .txt captions and optional .json metadata (`iter_image_folder`).

Filters (decisions, spec/_parts/data_pipeline_errata.md):
- aesthetic: keep score >= 4.7 (`AESTHETIC_MIN`); the score is read from the json keys "aesthetic",
  "AESTHETIC_SCORE" or "aesthetic_score" (img2dataset/LAION names). Missing or null: kept (the
  filter applies "when the json has one").
- watermark: drop when the LAION watermark probability ("pwatermark" or "PWATERMARK") is > 0.5
  (`PWATERMARK_MAX`, the classifier's decision boundary; the paper gives no threshold). Missing
  or null: kept.
- caption: `clean_caption`, then drop empty captions.

Images are decoded to 8-bit RGB by `image_to_rgb` (errata E64): 16-bit grey scaled by 1/257,
transparency composited over white (`ALPHA_BACKGROUND`).

Nothing raises in the middle of an iteration: corrupt images, unreadable members, bad json and
broken or missing shards are skipped, counted in a `DataStats` and reported by one
`DataWarning` per kind (the first occurrence; later ones are only counted).
"""

from __future__ import annotations

import glob as _glob
import io
import json
import math
import re
import tarfile
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from raphael_ref.data.captions import clean_caption

__all__ = [
    "AESTHETIC_MIN",
    "PWATERMARK_MAX",
    "IMAGE_EXTENSIONS",
    "ALPHA_BACKGROUND",
    "LATENT_EXTENSIONS",
    "DataWarning",
    "DataStats",
    "aesthetic_score",
    "watermark_probability",
    "passes_aesthetic",
    "passes_watermark",
    "list_shards",
    "shard_sample_count",
    "iter_tar_samples",
    "list_image_files",
    "iter_image_files",
    "iter_image_folder",
    "image_to_rgb",
]

AESTHETIC_MIN = 4.7  # Sec. 4: "remove the image-text pairs that have scores smaller than 4.7"
PWATERMARK_MAX = 0.5  # not printed; the watermark classifier's decision boundary (errata)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LATENT_EXTENSIONS = ("latent.safetensors", "latent.npy")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (errata E64)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")
_WATERMARK_KEYS = ("pwatermark", "PWATERMARK")


class DataWarning(UserWarning):
    """A sample or shard was skipped (or its metadata ignored); see DataStats for the counts."""


# Kinds a sample can be dropped for; every seen sample is counted once: kept or one of these.
_DROP_KINDS = (
    "filtered_aesthetic",
    "filtered_watermark",
    "missing_caption",
    "empty_caption",
    "missing_image",
    "corrupt",
)


@dataclass
class DataStats:
    """Counts of one reader (or one loader worker).

    seen = kept + filtered_aesthetic + filtered_watermark + missing_caption + empty_caption +
    missing_image + corrupt (each sample counted once, by the first reason it was dropped for).
    bad_meta counts samples whose json could not be read (they are kept, unfiltered);
    broken_shard counts shards (or files) that could not be opened or ended early.
    """

    seen: int = 0
    kept: int = 0
    filtered_aesthetic: int = 0
    filtered_watermark: int = 0
    missing_caption: int = 0
    empty_caption: int = 0
    missing_image: int = 0
    corrupt: int = 0
    bad_meta: int = 0
    broken_shard: int = 0
    _warned: set = field(default_factory=set, repr=False, compare=False)

    @property
    def dropped(self) -> int:
        return sum(getattr(self, k) for k in _DROP_KINDS)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def count(self, kind: str, detail: str) -> None:
        """Add one to `kind`; warn (DataWarning) the first time this kind occurs."""
        if kind not in self.as_dict():
            raise ValueError(f"DataStats.count: unknown kind {kind!r}; expected one of {list(self.as_dict())}.")
        setattr(self, kind, getattr(self, kind) + 1)
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"raphael_ref.data: skipped ({kind}): {detail}. Further cases are counted in DataStats.{kind} "
                f"without a warning.",
                DataWarning,
                stacklevel=3,
            )


def _number(meta: dict[str, Any], keys: Sequence[str]) -> float | None:
    for k in keys:
        v = meta.get(k)
        if v is None or isinstance(v, bool):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            return x
    return None


def aesthetic_score(meta: dict[str, Any]) -> float | None:
    """The LAION aesthetic score in the metadata ("aesthetic", "AESTHETIC_SCORE" or "aesthetic_score"), or None."""
    return _number(meta, _AESTHETIC_KEYS)


def watermark_probability(meta: dict[str, Any]) -> float | None:
    """The LAION watermark probability in the metadata ("pwatermark" or "PWATERMARK"), or None."""
    return _number(meta, _WATERMARK_KEYS)


def passes_aesthetic(meta: dict[str, Any], threshold: float | None = AESTHETIC_MIN) -> bool:
    """RAPHAEL Sec. 4, Dataset: keep a pair unless its aesthetic score is smaller than 4.7.

    A missing score (or threshold None) keeps the pair.
    """
    score = aesthetic_score(meta)
    return threshold is None or score is None or score >= threshold


def passes_watermark(meta: dict[str, Any], threshold: float | None = PWATERMARK_MAX) -> bool:
    """RAPHAEL Sec. 4, Dataset: "We remove the images with watermarks": drop when pwatermark > 0.5.

    A missing probability (or threshold None) keeps the pair.
    """
    p = watermark_probability(meta)
    return threshold is None or p is None or p <= threshold


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset-style "{00000..00009}" ranges (zero padding kept from the first bound)."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    width = len(m.group(1))
    out = []
    for i in range(lo, hi + 1):
        out += _expand_braces(pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end() :])
    return out


def list_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Tar shards named by `source`: a directory (every *.tar below it), a glob, a
    "{00000..00099}" brace range, a single .tar file, or a list of those. Sorted, without duplicates."""
    if isinstance(source, (list, tuple)):
        found = [p for s in source for p in list_shards(s)]
        return sorted(set(found))
    src = str(source)
    path = Path(src)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.tar") if p.is_file())
    out = set()
    for pat in _expand_braces(src):
        if any(c in pat for c in "*?["):
            out.update(Path(p) for p in _glob.glob(pat, recursive=True) if p.endswith(".tar"))
        elif pat.endswith(".tar"):
            out.add(Path(pat))  # may not exist: the reader counts it as a broken shard
    return sorted(out)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset key/extension split: key = dir + file name up to its first '.', ext = the rest (lower case)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _iter_tar_members(path: Path, stats: DataStats) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, data) of the regular files of a tar, in order; a broken shard ends early, counted."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                data = f.read()
                key, ext = _split_name(member.name)
                yield key, ext, data
            end = tar.offset  # just past the last member
        # tarfile stops silently when a file is cut at a header boundary; a complete archive
        # ends with two zero blocks (1024 bytes) after its last member.
        if path.stat().st_size - end < 2 * tarfile.BLOCKSIZE:
            stats.count("broken_shard", f"{path}: no end-of-archive marker (truncated shard?)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        stats.count("broken_shard", f"{path}: {type(e).__name__}: {e}")


def _group_by_key(members: Iterable[tuple[str, str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, group = None, {}
    for k, ext, data in members:
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext] = data
    if group:
        yield key, group


def _load_latent(ext: str, data: bytes) -> torch.Tensor:
    if ext == "latent.npy":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(data)
    if "latent" in tensors:
        return tensors["latent"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"expected a tensor named 'latent' (or a single tensor); found {sorted(tensors)}")


def image_to_rgb(img):
    """An 8-bit RGB PIL image of any PIL image, by the decoding rules of errata E64.

    - 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N", and "I", the mode older Pillow gives 16-bit
      PNGs): values in [0, 65535] scaled by 1/257 and rounded (65535 -> 255), clipped to that range,
      copied to the three channels. PIL's own ``convert("RGB")`` clips them at 255 (white).
    - alpha ("RGBA", "LA", "PA", premultiplied "RGBa"/"La", and "P"/"L"/"RGB" with a ``transparency``
      entry such as a PNG tRNS chunk): composited over ``ALPHA_BACKGROUND`` (white).
    - everything else ("RGB", "L", "1", "CMYK", "YCbCr", palettes without transparency, ...):
      PIL's ``convert("RGB")`` ("1": 0 / 255; CMYK: PIL's naive conversion, no ICC profile).
    """
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64)  # (H, W) in [0, 65535]
        grey = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")  # (H, W, 3)
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now so truncated files fail here
        rgb = image_to_rgb(img)
        return rgb.copy() if rgb is img else rgb  # a copy outlives the closed file


@dataclass(frozen=True)
class _Filters:
    min_aesthetic: float | None
    max_pwatermark: float | None


def _make_sample(
    key: str,
    files: dict[str, bytes],
    stats: DataStats,
    filters: _Filters,
    where: str,
    prefer_latent: bool,
) -> dict[str, Any] | None:
    """Apply the Sec. 4 filters to one grouped sample; None (counted) when dropped."""
    stats.seen += 1
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            loaded = json.loads(files["json"].decode("utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError(f"expected a json object, got {type(loaded).__name__}")
            meta = loaded
        except (UnicodeDecodeError, ValueError) as e:
            stats.count("bad_meta", f"{where} {key}.json: {e}")
    if not passes_aesthetic(meta, filters.min_aesthetic):
        stats.count("filtered_aesthetic", f"{where} {key}: aesthetic {aesthetic_score(meta)} < {filters.min_aesthetic}")
        return None
    if not passes_watermark(meta, filters.max_pwatermark):
        stats.count(
            "filtered_watermark", f"{where} {key}: pwatermark {watermark_probability(meta)} > {filters.max_pwatermark}"
        )
        return None
    if "txt" in files:
        raw = files["txt"].decode("utf-8", errors="replace")
    elif isinstance(meta.get("caption"), str):
        raw = meta["caption"]
    else:
        stats.count("missing_caption", f"{where} {key}: no .txt member and no 'caption' in the json")
        return None
    caption = clean_caption(raw)
    if not caption:
        stats.count("empty_caption", f"{where} {key}: caption {raw[:60]!r} is empty after clean_caption")
        return None
    sample: dict[str, Any] = {"key": key, "caption": caption, "meta": meta}
    latent_ext = next((e for e in LATENT_EXTENSIONS if e in files), None)
    if prefer_latent and latent_ext is not None:
        try:
            sample["latent"] = _load_latent(latent_ext, files[latent_ext])
        except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt sample
            stats.count("corrupt", f"{where} {key}.{latent_ext}: {type(e).__name__}: {e}")
            return None
    else:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if image_ext is None:
            stats.count("missing_image", f"{where} {key}: no member with extension in {IMAGE_EXTENSIONS}")
            return None
        try:
            sample["image"] = _decode_image(files[image_ext])
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            stats.count("corrupt", f"{where} {key}.{image_ext}: {type(e).__name__}: {e}")
            return None
    stats.kept += 1
    return sample


def _check_threshold(name: str, v: float | None) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number or None (no filter); got {v!r}.")


def iter_tar_samples(
    paths: str | Path | Sequence[str | Path],
    *,
    stats: DataStats | None = None,
    min_aesthetic: float | None = AESTHETIC_MIN,
    max_pwatermark: float | None = PWATERMARK_MAX,
    prefer_latent: bool = False,
) -> Iterator[dict[str, Any]]:
    """RAPHAEL Sec. 4, Dataset: filtered samples of img2dataset tar shards, in shard then member order.

    Yields {"key": str, "image": PIL.Image (RGB), "caption": str (cleaned), "meta": dict (the json,
    {} if none)}. With prefer_latent=True, a sample with a "{key}.latent.safetensors" (tensor named
    "latent", or its only tensor) or "{key}.latent.npy" member yields "latent": torch.Tensor instead
    of "image" (the image is not decoded). `paths`: a list or tuple is read as the shard paths in
that order; anything else goes through `list_shards` (directory, glob, brace range, one file).
    Never raises for bad data: see DataStats.
    """
    _check_threshold("iter_tar_samples: min_aesthetic", min_aesthetic)
    _check_threshold("iter_tar_samples: max_pwatermark", max_pwatermark)
    stats = DataStats() if stats is None else stats
    filters = _Filters(min_aesthetic, max_pwatermark)
    shard_paths = [Path(p) for p in paths] if isinstance(paths, (list, tuple)) else list_shards(paths)
    for path in shard_paths:
        for key, files in _group_by_key(_iter_tar_members(path, stats)):
            sample = _make_sample(key, files, stats, filters, str(path), prefer_latent)
            if sample is not None:
                yield sample


def shard_sample_count(path: str | Path) -> int:
    """Number of samples (distinct consecutive keys) in a shard, without decoding anything.

    Reads img2dataset's "{shard}_stats.json" ("successes") when it sits next to the shard, else
    scans the tar headers. A broken shard counts the samples before the break; a missing one, 0.
    """
    path = Path(path)
    stats_file = path.with_name(path.stem + "_stats.json")
    if stats_file.is_file():
        try:
            return int(json.loads(stats_file.read_text())["successes"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    n, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    key, _ = _split_name(member.name)
                    if key != last:
                        n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    return n


def list_image_files(root: str | Path) -> list[Path]:
    """Image files (.jpg/.jpeg/.png/.webp, any case) below `root`, recursively, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"list_image_files: {str(root)!r} is not a directory; pass a folder of images.")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def iter_image_files(
    files: Sequence[str | Path],
    root: str | Path,
    *,
    stats: DataStats | None = None,
    min_aesthetic: float | None = AESTHETIC_MIN,
    max_pwatermark: float | None = PWATERMARK_MAX,
) -> Iterator[dict[str, Any]]:
    """Filtered samples of the given image files; caption from "{stem}.txt", metadata from "{stem}.json".

    key = the path relative to `root` without its extension. Same filters and counts as iter_tar_samples.
    """
    _check_threshold("iter_image_files: min_aesthetic", min_aesthetic)
    _check_threshold("iter_image_files: max_pwatermark", max_pwatermark)
    stats = DataStats() if stats is None else stats
    filters = _Filters(min_aesthetic, max_pwatermark)
    root = Path(root)
    for f in files:
        f = Path(f)
        group: dict[str, bytes] = {}
        try:
            group[f.suffix.lower().lstrip(".")] = f.read_bytes()
        except OSError as e:
            stats.seen += 1
            stats.count("corrupt", f"{f}: {type(e).__name__}: {e}")
            continue
        for ext in ("txt", "json"):
            side = f.with_suffix("." + ext)
            if side.is_file():
                try:
                    group[ext] = side.read_bytes()
                except OSError:
                    pass  # counted below as a missing caption / no metadata
        try:
            key = f.relative_to(root).with_suffix("").as_posix()
        except ValueError:
            key = f.with_suffix("").as_posix()
        sample = _make_sample(key, group, stats, filters, str(root), prefer_latent=False)
        if sample is not None:
            yield sample


def iter_image_folder(
    root: str | Path,
    *,
    stats: DataStats | None = None,
    min_aesthetic: float | None = AESTHETIC_MIN,
    max_pwatermark: float | None = PWATERMARK_MAX,
) -> Iterator[dict[str, Any]]:
    """RAPHAEL Sec. 4, Dataset: filtered samples of a folder of images with same-stem .txt captions (recursive).

    Yields {"key", "image": PIL.Image RGB, "caption", "meta"} like iter_tar_samples, in sorted path order.
    """
    yield from iter_image_files(
        list_image_files(root), root, stats=stats, min_aesthetic=min_aesthetic, max_pwatermark=max_pwatermark
    )
