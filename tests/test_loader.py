"""Training batches: shapes, rank/worker splits, deterministic resume, caption dropout, single-bucket batches."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raphael_ref.data import loader as L
from raphael_ref.data.buckets import BUCKETS, bucket_nearest, scaled_buckets
from raphael_ref.data.loader import caption_dropout_mask, make_train_loader, reader_shards, synthetic_indices
from raphael_ref.data.synthetic import SyntheticShapes, render

SMALL_BUCKETS = scaled_buckets(BUCKETS, 16)  # (28, 52) ... (52, 28)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root: Path, sizes_per_shard: list[list[tuple[int, int]]], latent_shape=None) -> list[Path]:
    """Shards of solid images of the given (h, w); key "s{shard}-{i}", json records the size."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, sizes in enumerate(sizes_per_shard):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (h, w) in enumerate(sizes):
                key = f"s{s}-{i:03d}"
                members = [(f"{key}.txt", f"image {s} {i}".encode()),
                           (f"{key}.json", json.dumps({"h": h, "w": w, "aesthetic": 6.0}).encode())]
                if latent_shape is None:
                    members.insert(0, (f"{key}.png", _png(np.full((h, w, 3), 40 * s % 256, np.uint8))))
                else:
                    members.insert(0, (f"{key}.latent.npy", _npy(np.full(latent_shape, s + i / 100, np.float32))))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# -- synthetic -----------------------------------------------------------------------------------

def test_synthetic_batches_have_the_documented_shapes_and_ranges():
    (b,) = _take(make_train_loader("synthetic", image_size=32, batch_size=6, seed=1, caption_dropout=0.0), 1)
    assert b["image"].dtype == torch.float32 and b["image"].shape == (6, 3, 32, 32)
    assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
    assert len(b["caption"]) == len(b["key"]) == len(b["scene"]) == 6
    ds = SyntheticShapes(seed=1)
    for key, cap, scene, img in zip(b["key"], b["caption"], b["scene"], b["image"]):
        i = int(key.rsplit("-", 1)[1])
        assert key == ds.key(i) and scene == ds.scene(i) and cap == scene.caption
        assert torch.equal(img, render(scene).float() / 127.5 - 1)


@given(world=st.integers(1, 4), bs=st.integers(1, 5), length=st.integers(5, 40), seed=st.integers(0, 100))
@settings(max_examples=30)
def test_ranks_see_disjoint_indices_that_cover_each_epoch(world, bs, length, seed):
    steps = math.ceil(length / (world * bs)) + 1
    per_rank = [[i for k in range(steps) for i in synthetic_indices(k, bs, r, world, seed, length)] for r in range(world)]
    # the first `length` global positions (one epoch) are a permutation of the data set
    positions = {}
    for r, idx in enumerate(per_rank):
        for p, i in enumerate(idx):
            positions[p * world + r] = i
    epoch0 = [positions[q] for q in range(length)]
    assert sorted(epoch0) == list(range(length))


def test_two_ranks_of_the_loader_are_disjoint():
    keys = []
    for rank in range(2):
        loader = make_train_loader("synthetic", image_size=16, batch_size=4, rank=rank, world_size=2, seed=3,
                                   synthetic_length=40)
        keys.append({k for b in _take(loader, 5) for k in b["key"]})
    assert len(keys[0]) == len(keys[1]) == 20 and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 40  # together: one whole epoch


def test_resume_at_a_step_equals_the_continued_stream(monkeypatch):
    kw = dict(image_size=16, batch_size=5, seed=7, caption_dropout=0.5, rank=1, world_size=3, synthetic_length=37)
    full = _take(make_train_loader("synthetic", **kw), 12)
    resumed = _take(make_train_loader("synthetic", start_step=8, **kw), 4)
    for a, b in zip(full[8:], resumed):
        assert a["key"] == b["key"] and a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    # nothing skipped is rendered: a restart far into training renders one batch
    calls = []
    monkeypatch.setattr(L, "render", lambda scene: calls.append(1) or render(scene))
    _take(make_train_loader("synthetic", start_step=10**6, **kw), 1)
    assert len(calls) == 5


def test_worker_processes_yield_the_same_synthetic_stream():
    kw = dict(image_size=16, batch_size=3, seed=2)
    single = _take(make_train_loader("synthetic", **kw), 5)
    multi = _take(make_train_loader("synthetic", num_workers=2, start_step=1, **kw), 4)
    assert [b["key"] for b in single[1:]] == [b["key"] for b in multi]
    assert [b["caption"] for b in single[1:]] == [b["caption"] for b in multi]


def test_caption_dropout_one_drops_every_caption_and_keeps_the_images():
    """p = 1: the no-text control model of the evaluation (issue 5) sees only empty captions, same images."""
    assert caption_dropout_mask(1000, 1.0, np.random.default_rng(0)).all()
    kw = dict(image_size=16, batch_size=6, seed=2)
    (none,) = _take(make_train_loader("synthetic", caption_dropout=1.0, **kw), 1)
    (some,) = _take(make_train_loader("synthetic", caption_dropout=0.0, **kw), 1)
    assert none["caption"] == [""] * 6 and all(c for c in some["caption"])
    assert torch.equal(none["image"], some["image"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        caption_dropout_mask(3, -0.1, np.random.default_rng(0))


def test_building_and_iterating_a_loader_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    loader = make_train_loader("synthetic", image_size=16, batch_size=2, seed=3)
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


def test_caption_dropout_rate():
    p, n = 0.3, 20000
    rate = caption_dropout_mask(n, p, np.random.default_rng(0)).mean()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial proportion
    batches = _take(make_train_loader("synthetic", image_size=16, batch_size=50, seed=0, caption_dropout=p), 20)
    dropped = sum(c == "" for b in batches for c in b["caption"])
    assert abs(dropped / 1000 - p) < 5 * math.sqrt(p * (1 - p) / 1000)
    for b in batches:  # a dropped caption is "", the others are the scene's caption
        assert all(c in ("", s.caption) for c, s in zip(b["caption"], b["scene"]))
    none = _take(make_train_loader("synthetic", image_size=16, batch_size=50, seed=0, caption_dropout=0.0), 2)
    assert all(c for b in none for c in b["caption"])


def test_synthetic_multiscale_reports_the_square_bucket_and_keeps_image_size():
    for buckets in (None, scaled_buckets(BUCKETS, 20)):  # square bucket (640, 640) or (32, 32)
        loader = make_train_loader("synthetic", image_size=32, batch_size=2, multiscale=True, buckets=buckets)
        (b,) = _take(loader, 1)
        assert (buckets or BUCKETS)[b["bucket"]] in ((640, 640), (32, 32)) and b["image"].shape == (2, 3, 32, 32)


# -- shards --------------------------------------------------------------------------------------

@given(n=st.integers(0, 40), world=st.integers(1, 4), workers=st.integers(1, 4))
@settings(max_examples=50)
def test_every_shard_goes_to_exactly_one_rank_and_worker(n, world, workers):
    owned = [i for r in range(world) for w in range(workers) for i in reader_shards(n, r, world, w, workers)]
    assert sorted(owned) == list(range(n))


def test_shard_loader_reads_each_shard_in_one_reader(tmp_path):
    paths = _write_shards(tmp_path, [[(20, 20)] * 3 for _ in range(4)])
    seen = {}
    for rank in range(2):
        loader = make_train_loader(str(tmp_path), image_size=8, batch_size=3, rank=rank, world_size=2,
                                   caption_dropout=0.0, num_workers=2)
        for b in _take(loader, 8):  # 2 epochs of the rank's 2 shards per worker
            for k in b["key"]:
                seen.setdefault(k.split("-")[0], set()).add(rank)
            assert b["image"].shape == (3, 3, 8, 8)
    assert sorted(seen) == [f"s{i}" for i in range(len(paths))]
    assert all(len(r) == 1 for r in seen.values())


def test_center_crop_without_multiscale(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name, data in (("k.png", _png(arr)), ("k.txt", b"split")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (b,) = _take(make_train_loader(str(tmp_path / "a.tar"), image_size=16, batch_size=1, caption_dropout=0.0), 1)
    img = b["image"][0]  # resized to 16 x 32, columns 8..24 kept: 8 red then 8 blue
    assert img.shape == (3, 16, 16) and b["bucket"] is None
    assert torch.allclose(img[:, :, :7].mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    assert torch.allclose(img[:, :, 9:].mean((1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)


@pytest.mark.spec_id("data.multiscale_batches")
def test_multiscale_batches_come_from_one_bucket_in_proportion_to_counts(tmp_path):
    rng = np.random.default_rng(0)
    # bucket 3 (square) holds most images, bucket 0 (wide) a few, bucket 8 (tall) some
    kinds = [(40, 40)] * 60 + [(28, 52)] * 12 + [(52, 28)] * 24
    order = rng.permutation(len(kinds))
    sizes = [kinds[i] for i in order]
    _write_shards(tmp_path, [sizes[i::4] for i in range(4)])
    meta = {}
    for s in range(4):
        for i, hw in enumerate(sizes[s::4]):
            meta[f"s{s}-{i:03d}"] = hw
    loader = make_train_loader(str(tmp_path), image_size=40, batch_size=4, multiscale=True, buckets=SMALL_BUCKETS,
                               caption_dropout=0.0)
    counts = Counter()
    for b in _take(loader, 48):  # about two epochs
        bucket = b["bucket"]
        assert b["image"].shape == (4, 3, *SMALL_BUCKETS[bucket])
        assert {bucket_nearest(*meta[k], SMALL_BUCKETS) for k in b["key"]} == {bucket}
        counts[bucket] += 1
    assert set(counts) == {0, 3, 8}
    # 96 images, 4 per batch: 15, 3 and 6 batches per epoch; allow one pooled round of slack
    assert abs(counts[3] / 2 - 15) <= 5 and abs(counts[0] / 2 - 3) <= 3 and abs(counts[8] / 2 - 6) <= 4


def test_latents_are_batched_instead_of_images(tmp_path):
    _write_shards(tmp_path, [[(0, 0)] * 4], latent_shape=(4, 5, 6))
    (b,) = _take(make_train_loader(str(tmp_path), image_size=40, batch_size=3, caption_dropout=0.0), 1)
    assert "image" not in b and b["latent"].shape == (3, 4, 5, 6) and b["latent"].dtype == torch.float32
    assert torch.equal(b["latent"][1], torch.full((4, 5, 6), 0.01))


def test_tar_resume_is_deterministic_and_starts_at_a_shard_boundary(tmp_path):
    _write_shards(tmp_path, [[(12, 12)] * 5 for _ in range(3)])
    kw = dict(image_size=8, batch_size=2, seed=4, caption_dropout=0.2)
    a = _take(make_train_loader(str(tmp_path), start_step=3, **kw), 4)
    b = _take(make_train_loader(str(tmp_path), start_step=3, **kw), 4)
    assert [x["key"] for x in a] == [x["key"] for x in b] and [x["caption"] for x in a] == [x["caption"] for x in b]
    assert a[0]["key"][0].endswith("-000")  # 6 samples consumed: one whole shard skipped, next one from its start
    full = _take(make_train_loader(str(tmp_path), **kw), 3)
    first_shard = full[0]["key"][0].split("-")[0]
    assert a[0]["key"][0].split("-")[0] != first_shard


def test_image_folder_source(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 14, 3), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"picture {i}")
    (b,) = _take(make_train_loader(str(tmp_path), image_size=8, batch_size=3, caption_dropout=0.0), 1)
    assert sorted(b["key"]) == ["im0", "im1", "im2"] and b["image"].shape == (3, 3, 8, 8)
    assert sorted(b["caption"]) == ["picture 0", "picture 1", "picture 2"]


def test_invalid_arguments_raise(tmp_path):
    _write_shards(tmp_path, [[(8, 8)]] * 2)
    with pytest.raises(ValueError, match="readers"):
        make_train_loader(str(tmp_path), image_size=8, batch_size=1, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="not 'synthetic'"):
        make_train_loader(str(tmp_path / "nothing*.tar"), image_size=8, batch_size=1)
    with pytest.raises(ValueError, match="multiscale"):
        make_train_loader("synthetic", image_size=32, batch_size=1, buckets=SMALL_BUCKETS)
    with pytest.raises(ValueError, match="caption_dropout"):
        make_train_loader("synthetic", image_size=32, batch_size=1, caption_dropout=1.5)
    with pytest.raises(ValueError, match="rank"):
        make_train_loader("synthetic", image_size=32, batch_size=1, rank=2, world_size=2)


def test_the_synthetic_loader_passes_the_scene_mix_on():
    kw = dict(image_size=32, batch_size=64, seed=5)
    default = next(iter(make_train_loader("synthetic", **kw)))
    mixed = next(iter(make_train_loader("synthetic", count_prob=0.0, distinct_shapes=True, **kw)))
    ds = SyntheticShapes(seed=5, count_prob=0.0, distinct_shapes=True)
    keys = mixed["key"]
    assert keys == default["key"]  # the same items of the stream, drawn from the other mix
    scenes = [ds.scene(int(k.rsplit("-", 1)[1])) for k in keys]
    assert mixed["scene"] == scenes
    assert all(len({o.shape for o in s.objects}) == len(s.objects) for s in scenes)
    assert torch.equal(mixed["image"], torch.stack([render(s) for s in scenes]).float() / 127.5 - 1.0)
    assert [s.caption for s in mixed["scene"]] != [s.caption for s in default["scene"]]
