"""Real-data readers: RAPHAEL Sec. 4 "Dataset" filters, and bad data skipped with counted warnings."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raphael_ref.data.shards import (
    AESTHETIC_MIN,
    PWATERMARK_MAX,
    DataStats,
    DataWarning,
    iter_image_folder,
    iter_tar_samples,
    list_shards,
    passes_aesthetic,
    passes_watermark,
    shard_sample_count,
)


def _image_bytes(fmt: str = "JPEG", size=(12, 8), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, caption: str | None = "a photo of a cat", meta: dict | None = None, image: bytes | None = None,
            ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = [(f"{key}.{ext}", _image_bytes() if image is None else image)]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def _read(paths, **kw):
    stats = DataStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(iter_tar_samples(paths, stats=stats, **kw))
    return samples, stats, [w for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.spec_id("data.filter_aesthetic")
@pytest.mark.spec_id("data.filter_watermark")
def test_paper_thresholds():
    assert AESTHETIC_MIN == 4.7 and PWATERMARK_MAX == 0.5


@pytest.mark.spec_id("data.filter_aesthetic")
@given(score=st.floats(0, 10, allow_nan=False), key=st.sampled_from(["aesthetic", "AESTHETIC_SCORE", "aesthetic_score"]))
@settings(max_examples=50)
def test_aesthetic_filter_removes_scores_smaller_than_4_7(score, key):
    assert passes_aesthetic({key: score}) == (score >= 4.7)
    assert passes_aesthetic({key: str(score)}) == (score >= 4.7)  # img2dataset may write numbers as strings
    assert passes_aesthetic({key: score}, threshold=None)


@pytest.mark.spec_id("data.filter_watermark")
@given(p=st.floats(0, 1, allow_nan=False), key=st.sampled_from(["pwatermark", "PWATERMARK"]))
@settings(max_examples=50)
def test_watermark_filter_removes_probable_watermarks(p, key):
    assert passes_watermark({key: p}) == (p <= 0.5)
    assert passes_watermark({key: p}, threshold=None)


@pytest.mark.spec_id("data.filter_aesthetic")
@pytest.mark.spec_id("data.filter_watermark")
def test_missing_or_null_scores_keep_the_pair():
    for meta in ({}, {"aesthetic": None, "pwatermark": None}, {"aesthetic": float("nan")}, {"aesthetic": "n/a"}):
        assert passes_aesthetic(meta) and passes_watermark(meta)


@pytest.mark.spec_id("data.filter_aesthetic")
@pytest.mark.spec_id("data.filter_watermark")
def test_mixed_shards_are_read_with_every_bad_case_counted(tmp_path):
    good = _write_tar(tmp_path / "00000.tar", [
        *_sample("000", "a <b>red</b> car http://x.com/a.jpg", {"aesthetic": 5.1, "pwatermark": 0.1}),
        *_sample("001", "low score", {"aesthetic": 4.69}),
        *_sample("002", "watermarked", {"AESTHETIC_SCORE": 6.0, "pwatermark": 0.9}),
        *_sample("003", None, {"aesthetic": 6.0}),  # no .txt and no caption in the json
        *_sample("004", "caption in the json only", image=_image_bytes("PNG"), ext="png")[:1],
        ("004.json", json.dumps({"caption": "from json", "aesthetic": None}).encode()),
        *_sample("005", "broken image", image=b"\xff\xd8\xff\xe0 not a jpeg"),
        *_sample("006", "https://only.a/url <br/>"),  # empty after cleaning
        ("007.txt", b"caption without image"),
        *_sample("008", "webp image", image=_image_bytes("WEBP"), ext="webp"),
        *_sample("009", "bad json", image=_image_bytes("PNG"), ext="png"),
        ("009.json", b"{not json"),
    ])
    full = _write_tar(tmp_path / "00001.tar", [*_sample("100", "first"), *_sample("101", "second")])
    truncated = tmp_path / "00002.tar"
    with tarfile.open(full) as tar:
        cut = tar.getmember("101.jpg").offset_data + 50
    truncated.write_bytes(full.read_bytes()[:cut])  # ends inside the image of sample 101
    cut_at_header = tmp_path / "00002b.tar"
    cut_at_header.write_bytes(full.read_bytes()[: cut - 50 - 512])  # ends just before the header of 101.jpg
    garbage = tmp_path / "00003.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    missing = tmp_path / "00004.tar"

    samples, stats, caught = _read([good, full, truncated, cut_at_header, garbage, missing])
    keys = [s["key"] for s in samples]
    assert keys == ["000", "004", "008", "009", "100", "101", "100", "100"]
    assert samples[0]["caption"] == "a red car"  # clean_caption applied
    assert samples[1]["caption"] == "from json"
    assert all(s["image"].mode == "RGB" for s in samples)
    assert samples[0]["meta"]["pwatermark"] == 0.1 and samples[3]["meta"] == {}
    expected = dict(filtered_aesthetic=1, filtered_watermark=1, missing_caption=1, empty_caption=1, missing_image=1,
                    corrupt=1, bad_meta=1, broken_shard=4)
    assert {k: v for k, v in stats.as_dict().items() if k in expected} == expected
    # truncated shard: sample 100 complete, 101 cut inside its image: the shard ends there, counted
    assert stats.kept == 8 and stats.seen == stats.kept + stats.dropped
    # one warning per kind, however many occurrences
    kinds = sorted(str(w.message).split("(")[1].split(")")[0] for w in caught)
    assert kinds == sorted(k for k, v in stats.as_dict().items() if v and k not in ("seen", "kept"))


def test_warns_once_per_kind_and_keeps_counting(tmp_path):
    shard = _write_tar(tmp_path / "a.tar", [m for i in range(5) for m in _sample(f"{i:03d}", "x", {"aesthetic": 1.0})])
    stats = DataStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(iter_tar_samples([shard], stats=stats)) == []
        assert list(iter_tar_samples([shard], stats=stats)) == []
    assert stats.filtered_aesthetic == 10 and stats.seen == 10
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1


def test_filters_can_be_disabled(tmp_path):
    shard = _write_tar(tmp_path / "a.tar", [*_sample("0", "x", {"aesthetic": 1.0}), *_sample("1", "y", {"pwatermark": 1.0})])
    samples, stats, _ = _read([shard], min_aesthetic=None, max_pwatermark=None)
    assert [s["key"] for s in samples] == ["0", "1"] and stats.dropped == 0
    with pytest.raises(ValueError, match="min_aesthetic"):
        list(iter_tar_samples([shard], min_aesthetic="high"))


def test_decoded_image_matches_what_was_written(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    shard = _write_tar(tmp_path / "a.tar", _sample("k", "x", image=buf.getvalue(), ext="png"))
    (sample,) = iter_tar_samples([shard])
    assert np.array_equal(np.array(sample["image"]), pixels)


def test_keys_follow_webdataset_rules(tmp_path):
    latent = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    from safetensors.torch import save

    shard = _write_tar(tmp_path / "a.tar", [
        ("sub/dir/x1.jpg", _image_bytes()), ("sub/dir/x1.txt", b"one"),
        ("sub/dir/x1.latent.safetensors", save({"latent": latent})),
        ("x2.JPG", _image_bytes()), ("x2.txt", b"two"),
    ])
    samples, stats, _ = _read([shard], prefer_latent=True)
    assert [s["key"] for s in samples] == ["sub/dir/x1", "x2"]
    assert torch.equal(samples[0]["latent"], latent) and "image" not in samples[0]
    assert "image" in samples[1] and "latent" not in samples[1]
    samples, _, _ = _read([shard])  # prefer_latent=False: the image is decoded
    assert "image" in samples[0] and "latent" not in samples[0]


def test_npy_latent(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    buf = io.BytesIO()
    np.save(buf, arr)
    shard = _write_tar(tmp_path / "a.tar", [("k.txt", b"x"), ("k.latent.npy", buf.getvalue())])
    (s,) = iter_tar_samples([shard], prefer_latent=True)
    assert np.array_equal(s["latent"].numpy(), arr)


def test_list_shards_forms(tmp_path):
    for i in range(3):
        _write_tar(tmp_path / f"{i:05d}.tar", _sample("a", "x"))
    (tmp_path / "nested").mkdir()
    _write_tar(tmp_path / "nested" / "n.tar", _sample("a", "x"))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 17}))
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar", "00002.tar", "n.tar"]
    assert [p.name for p in list_shards(str(tmp_path / "0000*.tar"))] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.name for p in list_shards(str(tmp_path / "{00001..00002}.tar"))] == ["00001.tar", "00002.tar"]
    assert shard_sample_count(tmp_path / "00000.tar") == 17  # from img2dataset's stats file
    assert shard_sample_count(tmp_path / "00001.tar") == 1  # from the headers
    assert shard_sample_count(tmp_path / "missing.tar") == 0


def test_image_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.jpg").write_bytes(_image_bytes())
    (tmp_path / "a" / "one.txt").write_text("first <i>image</i>")
    (tmp_path / "a" / "b" / "two.PNG").write_bytes(_image_bytes("PNG"))
    (tmp_path / "a" / "b" / "two.txt").write_text("second")
    (tmp_path / "a" / "b" / "two.json").write_text(json.dumps({"aesthetic": 5.0}))
    (tmp_path / "low.png").write_bytes(_image_bytes("PNG"))
    (tmp_path / "low.txt").write_text("low")
    (tmp_path / "low.json").write_text(json.dumps({"aesthetic": 2.0}))
    (tmp_path / "nocap.jpg").write_bytes(_image_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "broken.txt").write_text("broken")
    stats = DataStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        samples = list(iter_image_folder(tmp_path, stats=stats))
    assert [(s["key"], s["caption"]) for s in samples] == [("a/b/two", "second"), ("a/one", "first image")]
    assert samples[0]["meta"] == {"aesthetic": 5.0}
    assert (stats.seen, stats.kept, stats.filtered_aesthetic, stats.missing_caption, stats.corrupt) == (5, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="not a directory"):
        list(iter_image_folder(tmp_path / "nothing"))


def test_stats_count_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown kind"):
        DataStats().count("nonsense", "x")
