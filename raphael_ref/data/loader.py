"""Training batches: synthetic or real (tar shards, image folders), with RAPHAEL Sec. 4 multi-scale buckets.

`make_train_loader` yields an infinite stream of per-rank batches

    {"image": float32 (B, 3, H, W) in [-1, 1], "caption": list[str], "key": list[str],
     "bucket": int | None}                       (+ "scene": list[Scene] for the synthetic source)

or, for samples with a pre-extracted latent ("{key}.latent.safetensors" holding a tensor named
"latent", or "{key}.latent.npy"), {"latent": float32 (B, C, h, w), "caption", "key", "bucket": None}
instead of "image". Latents are used as stored (never resized): they must have been extracted at
the training size; a batch holds latents of a single shape.

Order and distribution:
- "synthetic": scenes are rendered square at image_size (with multiscale=True they all fall in
  the 1:1 bucket, whose index is reported, but they are not resized to its pixel size). Item indices of SyntheticShapes(seed) are read in a per-epoch permutation
  (seeded by (seed, epoch)); rank r of W takes global positions r, r + W, r + 2W, ..., so ranks
  never share an index within an epoch. Step k of rank r holds positions [k B, (k + 1) B) of
  that rank. `start_step=N` computes those indices directly (nothing skipped is rendered), so a
  restarted loader yields exactly the batches an uninterrupted one would have from step N on,
  with any num_workers.
- tar shards / image folders: shard (or file) i goes to (rank, worker) with
  i % (W * num_workers) == rank * num_workers + worker, so every shard is read by exactly one
  reader; each reader cycles over its shards in a per-epoch permutation. Loader step k comes from
  worker k % num_workers. Resume is approximate: each reader skips whole shards (files) whose
  sample counts (img2dataset's "*_stats.json" or the tar headers, not decoded) add up to at most
  the samples it had consumed, and starts at the next shard boundary; the result is deterministic
  given (seed, start_step) but filtered samples make it differ from the uninterrupted stream.
- caption dropout (classifier-free guidance): each caption becomes "" with probability p, drawn
  from a generator seeded by (seed, rank, worker, batch number), so it is reproducible on resume.

Multi-scale (Sec. 4, "Multi-scale Training"): each image goes to its nearest bucket
(`bucket_nearest`), is resized to cover it and centre-cropped (`resize_crop_plan`); every batch
comes from one bucket. Batches are scheduled in rounds of R = len(buckets): the pool of pending
samples is filled to >= R B, the R batches of the round are shared among buckets by
`bucket_batch_shares(pool counts, R)` (proportional to the number of images each bucket holds),
and the round's batches are emitted in a seeded random order; a bucket short of B samples draws
more from the stream (the others keep theirs for the next round). Without multi-scale there is
one bucket (image_size, image_size) and R = 1: resize the shorter side to image_size (resize to
cover) and centre-crop.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from raphael_ref.data.buckets import bucket_batch_shares, bucket_nearest, resize_crop_plan
from raphael_ref.data.shards import (
    AESTHETIC_MIN,
    PWATERMARK_MAX,
    DataStats,
    image_to_rgb,
    iter_image_files,
    iter_tar_samples,
    list_image_files,
    list_shards,
    shard_sample_count,
)
from raphael_ref.data.synthetic import COUNT_SCENE_PROB, SyntheticShapes, render

__all__ = [
    "SYNTHETIC",
    "make_train_loader",
    "reader_shards",
    "synthetic_indices",
    "caption_dropout_mask",
    "resize_to_bucket",
    "SyntheticStream",
    "ShardStream",
]

SYNTHETIC = "synthetic"
_DROPOUT_STREAM = 0xD20  # separates the caption-dropout generator from other uses of the seed


def reader_shards(n_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shards read by (rank, worker): indices i with i % (world_size * num_workers) == rank * num_workers + worker."""
    _check_reader(rank, world_size, worker, num_workers, "reader_shards")
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 0:
        raise ValueError(f"reader_shards: n_shards must be an int >= 0; got {n_shards!r}.")
    readers = world_size * num_workers
    return list(range(rank * num_workers + worker, n_shards, readers))


def _check_reader(rank: int, world_size: int, worker: int, num_workers: int, fn: str) -> None:
    checks = (("world_size", world_size, 1), ("num_workers", num_workers, 1), ("rank", rank, 0), ("worker", worker, 0))
    for name, v, lo in checks:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{fn}: {name} must be an int >= {lo}; got {v!r}.")
    if rank >= world_size or worker >= num_workers:
        raise ValueError(f"{fn}: need rank < world_size and worker < num_workers; got rank {rank} of {world_size}, "
                         f"worker {worker} of {num_workers}.")


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, length: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length)


def synthetic_indices(step: int, batch_size: int, rank: int, world_size: int, seed: int, length: int) -> list[int]:
    """SyntheticShapes indices of batch `step` of `rank`: positions q = (step B + j) W + rank, j < B,
    epoch e = q // length, index = permutation(seed, e)[q % length]."""
    _check_reader(rank, world_size, 0, 1, "synthetic_indices")
    out = []
    for j in range(batch_size):
        q = (step * batch_size + j) * world_size + rank
        epoch, offset = divmod(q, length)
        out.append(int(_epoch_permutation(seed, epoch, length)[offset]))
    return out


def caption_dropout_mask(n: int, p: float, generator: np.random.Generator) -> np.ndarray:
    """Which of n captions to replace by "" (classifier-free guidance training): Bernoulli(p) each.

    p = 1 drops every caption: the model is trained with no text at all (the unconditional control of
    the evaluation, issue 5); the generator is still advanced by n draws so that streams stay aligned.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption_dropout_mask: p must lie in [0, 1]; got {p!r}.")
    return generator.random(n) < p


def _dropout_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DROPOUT_STREAM, *stream])


def resize_to_bucket(image, bucket: tuple[int, int]) -> torch.Tensor:
    """RAPHAEL Sec. 4: resize a PIL image to cover `bucket` (H_b, W_b) and centre-crop it: uint8 (3, H_b, W_b).

    Any mode is first decoded to 8-bit RGB by `shards.image_to_rgb` (16-bit scaled, alpha on white; E64).
    """
    from PIL import Image

    image = image_to_rgb(image)
    h_b, w_b = bucket
    rh, rw, top, left = resize_crop_plan(image.height, image.width, (h_b, w_b))
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), Image.BICUBIC)
    image = image.crop((left, top, left + w_b, top + h_b))
    arr = np.asarray(image, dtype=np.uint8)  # (H_b, W_b, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H_b, W_b)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 [0, 255] -> float32 [-1, 1]


class SyntheticStream(torch.utils.data.IterableDataset):
    """Infinite per-rank batches of SyntheticShapes; worker w of n yields steps start_step + w, + w + n, ..."""

    def __init__(self, *, image_size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 caption_dropout: float, start_step: int, max_objects: int, length: int,
                 bucket_index: int | None = None, count_prob: float = COUNT_SCENE_PROB,
                 distinct_shapes: bool = False):
        self.dataset = SyntheticShapes(seed=seed, image_size=image_size, length=length, max_objects=max_objects,
                                       count_prob=count_prob, distinct_shapes=distinct_shapes)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.caption_dropout, self.start_step = caption_dropout, start_step
        self.bucket_index = bucket_index

    def batch(self, step: int) -> dict[str, Any]:
        """Batch number `step` of this rank (a pure function of the arguments and step)."""
        ds = self.dataset
        idx = synthetic_indices(step, self.batch_size, self.rank, self.world_size, self.seed, len(ds))
        scenes = [ds.scene(i) for i in idx]
        images = torch.stack([render(s) for s in scenes])  # (B, 3, S, S) uint8
        drop = caption_dropout_mask(len(idx), self.caption_dropout, _dropout_rng(self.seed, self.rank, step))
        return {
            "image": _to_unit(images),  # (B, 3, H, W)
            "caption": ["" if d else s.caption for d, s in zip(drop, scenes)],
            "key": [ds.key(i) for i in idx],
            "bucket": self.bucket_index,
            "scene": scenes,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite per-rank batches from tar shards or image files, split across ranks and workers."""

    def __init__(self, *, kind: str, units: Sequence[Path], root: Path | None, image_size: int, batch_size: int,
                 rank: int, world_size: int, seed: int, caption_dropout: float, start_step: int,
                 buckets: Sequence[tuple[int, int]] | None, min_aesthetic: float | None,
                 max_pwatermark: float | None, num_workers: int):
        self.kind, self.units, self.root = kind, list(units), root
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.caption_dropout, self.start_step = caption_dropout, start_step
        self.buckets = None if buckets is None else tuple(tuple(b) for b in buckets)
        self.min_aesthetic, self.max_pwatermark = min_aesthetic, max_pwatermark
        self.num_workers = max(1, num_workers)
        self.stats = DataStats()  # of the in-process reader (num_workers = 0); workers keep their own

    # -- samples -------------------------------------------------------------------------------
    def _my_units(self, worker: int) -> list[Path]:
        mine = reader_shards(len(self.units), self.rank, self.world_size, worker, self.num_workers)
        return [self.units[i] for i in mine]

    def _unit_order(self, units: list[Path], worker: int, epoch: int) -> list[Path]:
        perm = np.random.default_rng([self.seed, self.rank, worker, epoch]).permutation(len(units))
        return [units[i] for i in perm]

    def _unit_samples(self, unit: Path) -> Iterator[dict[str, Any]]:
        kw = dict(stats=self.stats, min_aesthetic=self.min_aesthetic, max_pwatermark=self.max_pwatermark)
        if self.kind == "tar":
            return iter_tar_samples([unit], prefer_latent=True, **kw)
        return iter_image_files([unit], self.root, **kw)

    def _unit_size(self, unit: Path) -> int:
        return shard_sample_count(unit) if self.kind == "tar" else 1

    def _resume_point(self, units: list[Path], worker: int, consumed: int) -> tuple[int, int]:
        """(epoch, unit position) of the first whole unit after `consumed` samples (approximate resume)."""
        if consumed <= 0:
            return 0, 0
        sizes = {u: self._unit_size(u) for u in units}
        per_epoch = sum(sizes.values())
        if per_epoch == 0:
            return 0, 0
        epoch, rest = divmod(consumed, per_epoch)
        order = self._unit_order(units, worker, epoch)
        pos = 0
        while pos < len(order) and sizes[order[pos]] <= rest:  # whole units already consumed
            rest -= sizes[order[pos]]
            pos += 1
        return (epoch + 1, 0) if pos >= len(order) else (epoch, pos)

    def _samples(self, worker: int, consumed: int) -> Iterator[dict[str, Any]]:
        units = self._my_units(worker)
        epoch, pos = self._resume_point(units, worker, consumed)
        empty_epochs = 0
        while True:
            got = False
            for unit in self._unit_order(units, worker, epoch)[pos:]:
                for sample in self._unit_samples(unit):
                    got = True
                    yield sample
            if not got and pos == 0:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise RuntimeError(
                        f"make_train_loader: reader (rank {self.rank}, worker {worker}) found no usable sample in "
                        f"its {len(units)} {self.kind} unit(s) {[str(u) for u in units[:4]]}...; stats: "
                        f"{self.stats.as_dict()}. Check the source and the filters."
                    )
            else:
                empty_epochs = 0
            epoch, pos = epoch + 1, 0

    # -- batches -------------------------------------------------------------------------------
    def _group(self, sample: dict[str, Any]) -> tuple:
        """Which queue a sample waits in: its bucket (images) or its latent shape."""
        if "latent" in sample:
            return ("latent", tuple(sample["latent"].shape))
        img = sample["image"]
        if self.buckets is None:
            return ("image", -1)
        return ("image", bucket_nearest(img.height, img.width, self.buckets))

    def _prepare(self, group: tuple, sample: dict[str, Any]) -> dict[str, Any]:
        if group[0] == "latent":
            return {"key": sample["key"], "caption": sample["caption"], "x": sample["latent"].float()}
        bucket = (self.image_size, self.image_size) if group[1] == -1 else self.buckets[group[1]]
        return {"key": sample["key"], "caption": sample["caption"], "x": resize_to_bucket(sample["image"], bucket)}

    def _collate(self, group: tuple, items: list[dict[str, Any]], worker: int, number: int) -> dict[str, Any]:
        rng = _dropout_rng(self.seed, self.rank, worker, number)
        drop = caption_dropout_mask(len(items), self.caption_dropout, rng)
        x = torch.stack([it["x"] for it in items])  # (B, C, H, W)
        out = {
            "caption": ["" if d else it["caption"] for d, it in zip(drop, items)],
            "key": [it["key"] for it in items],
        }
        if group[0] == "latent":
            out["latent"], out["bucket"] = x, None
        else:
            out["image"], out["bucket"] = _to_unit(x), (None if group[1] == -1 else group[1])
        return out

    def batches(self, worker: int, first_batch: int) -> Iterator[dict[str, Any]]:
        """Batches of one reader, numbered from first_batch (its batches already served before a resume)."""
        rounds = 1 if self.buckets is None else len(self.buckets)
        bs = self.batch_size
        stream = self._samples(worker, consumed=first_batch * bs)
        queues: dict[tuple, deque] = {}

        def pull() -> None:
            sample = next(stream)
            group = self._group(sample)
            queues.setdefault(group, deque()).append(self._prepare(group, sample))

        number = first_batch
        round_rng = np.random.default_rng([self.seed, self.rank, worker, first_batch, 0x5CED])
        while True:
            while sum(len(q) for q in queues.values()) < rounds * bs:
                pull()
            groups = sorted(g for g, q in queues.items() if q)
            shares = bucket_batch_shares([len(queues[g]) for g in groups], rounds)
            schedule = [g for g, s in zip(groups, shares) for _ in range(s)]
            for i in round_rng.permutation(len(schedule)):
                g = schedule[i]
                while len(queues[g]) < bs:
                    pull()
                items = [queues[g].popleft() for _ in range(bs)]
                yield self._collate(g, items, worker, number)
                number += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        # loader steps [0, start_step) were served round-robin: worker w served those with step % n == w
        served = max(0, math.ceil((self.start_step - worker) / self.num_workers))
        yield from self.batches(worker, served)


def _identity(x):
    return x


def _resolve_source(source: str) -> tuple[str, list[Path], Path | None]:
    path = Path(source)
    if path.is_dir():
        tars = list_shards(path)
        if tars:
            return "tar", tars, None
        files = list_image_files(path)
        if files:
            return "folder", files, path
        raise ValueError(f"make_train_loader: directory {source!r} holds neither .tar shards nor images.")
    tars = list_shards(source)
    if not tars:
        raise ValueError(
            f"make_train_loader: source {source!r} is not 'synthetic', a directory, a .tar file or a glob / "
            f"brace range of .tar shards matching anything."
        )
    return "tar", tars, None


def make_train_loader(
    source: str,
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    multiscale: bool = False,
    caption_dropout: float = 0.1,
    num_workers: int = 0,
    buckets: Sequence[tuple[int, int]] | None = None,
    start_step: int = 0,
    max_objects: int = 3,
    count_prob: float = COUNT_SCENE_PROB,
    distinct_shapes: bool = False,
    synthetic_length: int = 1_000_000,
    min_aesthetic: float | None = AESTHETIC_MIN,
    max_pwatermark: float | None = PWATERMARK_MAX,
) -> torch.utils.data.DataLoader:
    """Infinite per-rank training batches (see the module docstring for order, resume and buckets).

    source: "synthetic", a directory of .tar shards (searched recursively), a glob or
    "{00000..00099}" range of .tar files, one .tar, or a folder of images with same-stem .txt captions.
    batch_size is per rank. multiscale: batches from the nearest of `buckets` (default: the paper's
    BUCKETS, 448..832 px, whatever image_size is; pass scaled_buckets(BUCKETS, f, step) for small
    presets); otherwise image_size x image_size crops. The synthetic source is always image_size;
    max_objects, count_prob and distinct_shapes set its scene mix (data.synthetic.sample_scene).
    Tar/folder sources need at least world_size * max(1, num_workers) shards (files).
    Returns a DataLoader (batch_size=None) whose iteration never ends; with num_workers = 0 its
    `.dataset.stats` holds the reader's DataStats.
    """
    for name, v, lo in (("image_size", image_size, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                        ("rank", rank, 0), ("seed", seed, 0), ("num_workers", num_workers, 0),
                        ("start_step", start_step, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"make_train_loader: {name} must be an int >= {lo}; got {v!r}.")
    if rank >= world_size:
        raise ValueError(f"make_train_loader: rank must be < world_size; got rank {rank}, world_size {world_size}.")
    if not (isinstance(caption_dropout, (int, float)) and 0.0 <= caption_dropout <= 1.0):
        raise ValueError(f"make_train_loader: caption_dropout must lie in [0, 1]; got {caption_dropout!r}.")
    if buckets is not None and not multiscale:
        raise ValueError("make_train_loader: buckets were given but multiscale=False; pass multiscale=True "
                         "to use them.")
    if multiscale:
        from raphael_ref.data.buckets import BUCKETS, _check_buckets

        buckets = BUCKETS if buckets is None else tuple(tuple(b) for b in buckets)
        _check_buckets(buckets, "make_train_loader")
    if not isinstance(source, (str, Path)):
        raise ValueError(f"make_train_loader: source must be a str; got {type(source).__name__}.")
    source = str(source)

    dataset: torch.utils.data.IterableDataset
    if source == SYNTHETIC:
        # Synthetic scenes are rendered square at image_size: multi-scale has nothing to bucket (all
        # fall in the 1:1 bucket), so it only sets batch["bucket"]; images are never resized to the
        # bucket's pixel size (the paper's 640 x 640 would be absurd for a 32 px preset).
        bucket_index = None
        if multiscale:
            bucket_index = bucket_nearest(image_size, image_size, buckets)
        dataset = SyntheticStream(image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size,
                                  seed=seed, caption_dropout=caption_dropout, start_step=start_step,
                                  max_objects=max_objects, length=synthetic_length, bucket_index=bucket_index,
                                  count_prob=count_prob, distinct_shapes=distinct_shapes)
    else:
        kind, units, root = _resolve_source(source)
        readers = world_size * max(1, num_workers)
        if len(units) < readers:
            raise ValueError(
                f"make_train_loader: {len(units)} {kind} unit(s) in {source!r} cannot feed {readers} readers "
                f"(world_size {world_size} x num_workers {max(1, num_workers)}); every reader needs at least one. "
                f"Write more, smaller shards or use fewer workers."
            )
        dataset = ShardStream(kind=kind, units=units, root=root, image_size=image_size, batch_size=batch_size,
                              rank=rank, world_size=world_size, seed=seed, caption_dropout=caption_dropout,
                              start_step=start_step, buckets=buckets if multiscale else None,
                              min_aesthetic=min_aesthetic, max_pwatermark=max_pwatermark, num_workers=num_workers)
    # A generator of its own: creating the iterator draws the workers' base seed from it, not from the
    # global torch RNG, so building a loader never shifts a training run's random streams.
    generator = torch.Generator().manual_seed(seed * world_size + rank)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                                       persistent_workers=num_workers > 0, generator=generator)
