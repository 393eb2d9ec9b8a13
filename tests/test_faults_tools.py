"""Hardening (issue 10), tools and data: image decoding of 16-bit / palette / alpha / CMYK / bilevel
images (errata E64), user errors of tools/sample.py, evaluate.py and routes.py as `error:` lines with
exit code 2 before any long work, one prompt-truncation warning, and the `vae` extra (E64)."""

from __future__ import annotations

import io
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raphael_ref.checkpoint import save_model
from raphael_ref.config import get_preset
from raphael_ref.data.loader import resize_to_bucket
from raphael_ref.data.shards import ALPHA_BACKGROUND, image_to_rgb, iter_image_folder, iter_tar_samples
from raphael_ref.models import RaphaelUNet
from raphael_ref.testing import load_tool

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
         "model.expert_mult": 2, "model.edge_width": 4, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
         "model.transformer_down": [1, 1], "model.transformer_up": [1, 1], "diffusion.T": 20,
         "model.edge_t_cutoff": 10}


# ------------------------------------------------------------------------------ item 7: image decoding


def _ramp16() -> np.ndarray:
    return (np.arange(32 * 32).reshape(32, 32) * 61).astype(np.uint16)  # 0 .. 62,403: mid-grey on average


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(img: Image.Image) -> np.ndarray:
    out = image_to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out, dtype=np.int64)  # (H, W, 3)


def test_16_bit_grayscale_png_in_an_image_folder_keeps_its_brightness(tmp_path):
    """A 16-bit PNG used to be clipped at 255 by PIL's convert("RGB"): mean 254.5 instead of ~118."""
    a = _ramp16()
    (tmp_path / "a.png").write_bytes(_png(Image.fromarray(a)))
    (tmp_path / "a.txt").write_text("a grey ramp")
    (sample,) = list(iter_image_folder(tmp_path))
    got = np.asarray(sample["image"], dtype=np.float64)  # (H, W, 3)
    want = np.round(a / 257.0)
    assert np.abs(got - want[..., None]).max() <= 0.5  # 16-bit scaled by 1/257, rounded, on all 3 channels
    assert abs(got.mean() - a.mean() / 257.0) < 0.5


def test_16_bit_png_in_a_tar_shard_keeps_its_brightness(tmp_path):
    a = _ramp16()
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k.png", _png(Image.fromarray(a))), ("k.txt", b"a grey ramp")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(iter_tar_samples(shard))
    assert abs(np.asarray(sample["image"], dtype=np.float64).mean() - a.mean() / 257.0) < 0.5


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes_scale_by_1_over_257(mode):
    a = np.array([[0, 257, 32896], [65535, 1000, 514]], dtype=np.int64)
    img = Image.fromarray(a.astype(np.uint16)) if mode == "I;16" else Image.fromarray(a.astype(np.int32))
    img = img.convert(mode) if mode != "I;16" else img
    assert img.mode == mode
    got = _rgb(img)
    assert (got[..., 0] == np.round(a / 257.0)).all() and (got == got[..., :1]).all()


def test_resize_to_bucket_keeps_16_bit_images():
    img = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 = 128 * 257
    out = resize_to_bucket(img, (4, 4))  # (3, 4, 4) uint8
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 4) and (out == 128).all()


def test_alpha_is_composited_on_the_documented_white_background():
    assert ALPHA_BACKGROUND == (255, 255, 255)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # black, alpha 0 / 255 / 128 / 0
    rgba[..., 3] = [[0, 255], [128, 0]]
    got = _rgb(Image.fromarray(rgba, mode="RGBA"))
    assert (got[0, 0] == 255).all() and (got[0, 1] == 0).all() and (got[1, 1] == 255).all()
    assert np.abs(got[1, 0] - 255 * (1 - 128 / 255)).max() <= 1  # half-transparent black on white: grey
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    assert (_rgb(la) == got).all()


def test_palette_with_a_transparent_index_and_without():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 red, 1 blue
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert _rgb(p).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    p.info["transparency"] = 0  # index 0 transparent (tRNS), as a GIF-style palette PNG has it
    assert _rgb(p).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    again = Image.open(io.BytesIO(_png(p)))  # the same through a PNG file
    assert again.mode == "P" and _rgb(again).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_cmyk_bilevel_grey_and_rgb_images():
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))  # pure cyan
    assert _rgb(cmyk).tolist() == [[[0, 255, 255]]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert _rgb(bilevel).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert _rgb(Image.new("L", (1, 1), 77)).tolist() == [[[77, 77, 77]]]
    assert _rgb(Image.new("RGB", (1, 1), (1, 2, 3))).tolist() == [[[1, 2, 3]]]


def test_fid_image_folder_reads_16_bit_images(tmp_path):
    from raphael_ref.evaluation.metrics import ImageFolder

    (tmp_path / "a.png").write_bytes(_png(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))))
    assert (ImageFolder(tmp_path)[0] == 128).all()


# ------------------------------------------------------------------------------ item 9: tool errors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = get_preset("toy", MICRO)
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("ckpt"), RaphaelUNet(cfg.model), cfg)


@pytest.fixture(scope="module")
def sample_tool():
    return load_tool("sample")


@pytest.fixture()
def no_sampling(sample_tool, monkeypatch):
    """Fail the test if sample.py starts sampling: user errors must be found before."""
    def boom(*a, **k):
        raise AssertionError("sampling started before the arguments were checked")
    monkeypatch.setattr(sample_tool.RaphaelPipeline, "__call__", boom)  # sample.py samples through the pipeline
    return sample_tool


BAD_SAMPLE_ARGS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "21"], "--steps"),  # more than T = 20 of the checkpoint
    (["--eta", "-0.5"], "--eta"),
    (["--eta", "nan"], "--eta"),
    (["--eta", "1.5"], "--eta"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "-1"], "--guidance"),
]


@pytest.mark.parametrize("extra,flag", BAD_SAMPLE_ARGS)
def test_sample_rejects_bad_numbers_before_sampling(no_sampling, checkpoint, tmp_path, capsys, extra, flag):
    argv = [str(checkpoint), "--raw", "--out", str(tmp_path / "o"), "--prompt", "a red circle", *extra]
    assert no_sampling.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and "Traceback" not in err


def test_sample_rejects_an_unwritable_out_before_sampling(no_sampling, checkpoint, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert no_sampling.main([str(checkpoint), "--raw", "--out", str(out), "--prompt", "a"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "--out" in err


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_sample_rejects_a_read_only_out_before_sampling(no_sampling, checkpoint, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert no_sampling.main([str(checkpoint), "--raw", "--out", str(ro), "--prompt", "a"]) == 2
    finally:
        ro.chmod(0o755)
    assert "--out" in capsys.readouterr().err


def test_sample_accepts_the_edges_of_the_ranges(sample_tool, checkpoint, tmp_path, capsys):
    """steps = T, eta = 1 and guidance = 0 are legal: sampling starts (stopped right there)."""
    calls = []

    def stop(*a, **k):
        calls.append(k)
        raise KeyboardInterrupt

    import unittest.mock as mock

    with mock.patch.object(sample_tool.RaphaelPipeline, "__call__", stop), pytest.raises(KeyboardInterrupt):
        sample_tool.main([str(checkpoint), "--raw", "--out", str(tmp_path / "o"), "--prompt", "a", "--steps", "20",
                          "--eta", "1", "--guidance", "0"])
    assert calls and calls[0]["num_inference_steps"] == 20 and calls[0]["eta"] == 1.0 and calls[0]["guidance_scale"] == 0.0


def test_sample_warns_once_about_a_truncated_prompt(sample_tool, checkpoint, tmp_path, capsys):
    long_prompt = " ".join(["red"] * 100)  # 100 BPE tokens > 75
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample_tool.main([str(checkpoint), "--raw", "--out", str(tmp_path / "o"), "--prompt", long_prompt,
                                 "--steps", "1"]) == 0
    from raphael_ref.text_encoder import PromptTruncatedWarning

    msgs = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(msgs) == 1, msgs
    assert "100 BPE tokens" in msgs[0] and "dropped the last 25" in msgs[0]


@pytest.fixture(scope="module")
def evaluate_tool():
    return load_tool("evaluate")


@pytest.fixture(scope="module")
def routes_tool():
    return load_tool("routes")


def _exit2(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("tool", ["evaluate", "routes"])
def test_evaluate_and_routes_missing_checkpoint_is_an_error_line(tool, evaluate_tool, routes_tool, tmp_path, capsys):
    mod = evaluate_tool if tool == "evaluate" else routes_tool
    err = _exit2(mod.main, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert "nope" in err
    assert not (tmp_path / "o").exists()  # nothing written before the check


@pytest.mark.parametrize("tool", ["evaluate", "routes"])
def test_evaluate_and_routes_reject_bad_numbers_and_out(tool, evaluate_tool, routes_tool, checkpoint, tmp_path,
                                                        capsys):
    mod = evaluate_tool if tool == "evaluate" else routes_tool
    base = [str(checkpoint), "--raw", "--out", str(tmp_path / "o")]
    for extra, flag in ((["--guidance", "nan"], "--guidance"), (["--guidance", "-2"], "--guidance"),
                        (["--steps", "21"], "--steps")):
        assert flag in _exit2(mod.main, base + extra, capsys)
    if tool == "evaluate":
        assert "--eta" in _exit2(mod.main, base + ["--eta", "nan"], capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out" in _exit2(mod.main, [str(checkpoint), "--raw", "--out", str(a_file / "sub")], capsys)


# ------------------------------------------------------------------------------ item 13: the vae extra


def test_vae_extra_holds_diffusers_and_the_test_extra_keeps_it():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("diffusers") for r in extras["vae"])
    assert any(r.startswith("diffusers") for r in extras["test"])


def test_missing_diffusers_names_the_extra(tmp_path, monkeypatch):
    from raphael_ref.codec import VAECodec

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError) as e:
        VAECodec.from_pretrained(tmp_path)
    msg = str(e.value)
    assert 'pip install "raphael_ref[vae]"' in msg and "model.codec=identity" in msg


def test_sample_without_diffusers_is_an_error_line(sample_tool, tmp_path, monkeypatch, capsys):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text("{}")
    cfg = get_preset("toy", {**MICRO, "model.codec": "vae", "model.in_channels": 4, "model.vae_path": str(vae_dir)})
    ckpt = save_model(tmp_path / "ckpt", RaphaelUNet(cfg.model), cfg)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setattr(sample_tool.RaphaelPipeline, "__call__", lambda *a, **k: pytest.fail("sampling started"))
    assert sample_tool.main([str(ckpt), "--raw", "--out", str(tmp_path / "o"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "raphael_ref[vae]" in err
