"""Latent codecs: IdentityCodec (pixel space) and VAECodec (diffusers AutoencoderKL, local dir).

VAECodec is checked against the raw diffusers model it wraps: latents must be the posterior
draw/mean normalized by the config's scaling (and shift) factors, decode must undo exactly that.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.codec import IdentityCodec, LatentCodec, VAECodec

diffusers = pytest.importorskip("diffusers")

# float32 CPU, a few convolutions deep: reassociation in conv/GroupNorm kernels only (~1e-6 abs).
TOL32 = {"rtol": 1e-5, "atol": 1e-5}
SCALE = 0.5  # not diffusers' default 0.18215, so a missing or doubled factor is visible


def tiny_vae(**overrides) -> torch.nn.Module:
    cfg = dict(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=SCALE,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**cfg).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


def load_raw(path) -> torch.nn.Module:
    """The diffusers model itself, loaded independently of VAECodec."""
    return diffusers.AutoencoderKL.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
    ).eval()


@pytest.fixture(scope="module")
def raw_vae(vae_dir):
    return load_raw(vae_dir)


@pytest.fixture(scope="module")
def mode_codec(vae_dir):
    return VAECodec.from_pretrained(vae_dir, posterior="mode")


@pytest.fixture(scope="module")
def sample_codec(vae_dir):
    return VAECodec.from_pretrained(vae_dir)  # default posterior: sample


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1)


@settings(max_examples=10)
@given(b=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12))
def test_identity_codec_is_identity(b, h, w):
    codec = IdentityCodec()
    assert isinstance(codec, LatentCodec)
    assert (codec.latent_channels, codec.downsample_factor, codec.scaling_factor) == (3, 1, 1.0)
    x = images(b, h, w)
    torch.testing.assert_close(codec.encode(x), x, rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.zeros(b, 4, h, w))


@settings(max_examples=6)
@given(b=st.integers(1, 2), h=st.sampled_from([4, 8, 12]), w=st.sampled_from([4, 8, 16]))
def test_vae_codec_shapes_and_downsample_factor(mode_codec, b, h, w):
    codec = mode_codec
    assert isinstance(codec, LatentCodec)
    assert (codec.latent_channels, codec.downsample_factor, codec.scaling_factor) == (4, 2, SCALE)
    z = codec.encode(images(b, h, w))
    f = codec.downsample_factor
    assert z.shape == (b, 4, h // f, w // f)
    assert codec.decode(z).shape == (b, 3, h, w)


def test_scaling_factor_is_applied(mode_codec, raw_vae):
    codec = mode_codec
    x = images(2, 8, 8)
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mode()  # (B, 4, 4, 4)
        decoded = raw_vae.decode(raw).sample  # (B, 3, 8, 8)
    latents = codec.encode(x)
    torch.testing.assert_close(latents, raw * SCALE, **TOL32)
    torch.testing.assert_close(codec.decode(latents), decoded, **TOL32)


def test_shift_factor_is_applied(tmp_path):
    tiny_vae(shift_factor=0.25).save_pretrained(tmp_path)
    codec = VAECodec.from_pretrained(tmp_path, posterior="mode")
    raw_vae = load_raw(tmp_path)
    x = images(1, 8, 8)
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mode()
        decoded = raw_vae.decode(raw).sample
    latents = codec.encode(x)
    torch.testing.assert_close(latents, (raw - 0.25) * SCALE, **TOL32)
    torch.testing.assert_close(codec.decode(latents), decoded, **TOL32)


def test_per_channel_latents_mean_and_std_are_applied(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    tiny_vae(latents_mean=mean, latents_std=std).save_pretrained(tmp_path)
    codec = VAECodec.from_pretrained(tmp_path, posterior="mode")
    raw_vae = load_raw(tmp_path)
    x = images(1, 8, 8)
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mode()
    m, s = torch.tensor(mean)[None, :, None, None], torch.tensor(std)[None, :, None, None]
    latents = codec.encode(x)
    torch.testing.assert_close(latents, (raw - m) * SCALE / s, **TOL32)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(latents), raw_vae.decode(raw).sample, **TOL32)


def test_posterior_sample_is_seeded(sample_codec, mode_codec, raw_vae):
    codec = sample_codec
    assert codec.posterior == "sample"
    x = images(2, 8, 8)
    a = codec.encode(x, generator=torch.Generator().manual_seed(1))
    b = codec.encode(x, generator=torch.Generator().manual_seed(1))
    c = codec.encode(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    with torch.no_grad():
        dist = raw_vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))  # (B, 4, 4, 4)
    torch.testing.assert_close(a, (dist.mean + dist.std * eps) * SCALE, **TOL32)
    mode = mode_codec.encode(x)
    assert not torch.allclose(a, mode)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_round_trip_is_finite(sample_codec, seed):
    codec = sample_codec
    x = images(2, 8, 8, seed=seed)
    y = codec.decode(codec.encode(x, generator=torch.Generator().manual_seed(seed)))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_frozen(vae_dir):
    codec = VAECodec.from_pretrained(vae_dir)
    assert all(not p.requires_grad for p in codec.parameters())
    torch.nn.Sequential(codec).train()
    assert not codec.training and not codec.vae.training
    x = images(1, 8, 8).requires_grad_(True)
    with torch.enable_grad():
        z = codec.encode(x)
    assert not z.requires_grad


def test_dtype_option_keeps_caller_dtype(vae_dir, mode_codec):
    codec = VAECodec.from_pretrained(vae_dir, dtype=torch.bfloat16, posterior="mode")
    assert all(p.dtype == torch.bfloat16 for p in codec.parameters())
    x = images(1, 8, 8)
    z = codec.encode(x)
    assert z.dtype == torch.float32 and codec.decode(z).dtype == torch.float32
    # bf16 VAE vs float32 VAE: ~8 conv/norm layers at u = 3.9e-3 on O(1) activations.
    ref = mode_codec.encode(x)
    torch.testing.assert_close(z, ref, rtol=5e-2, atol=5e-2)


def test_bad_inputs_are_rejected(vae_dir, sample_codec):
    codec = sample_codec
    with pytest.raises(ValueError, match="multiples of the downsample factor 2"):
        codec.encode(images(1, 7, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        codec.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="posterior must be one of"):
        VAECodec.from_pretrained(vae_dir, posterior="mean")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*AutoencoderKL"):
        VAECodec.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VAECodec.from_pretrained(tmp_path / "empty")


def test_subfolder_layout(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    codec = VAECodec.from_pretrained(tmp_path, subfolder="vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == codec.scaling_factor


@pytest.mark.gpu
def test_cuda_sample_matches_cpu_with_cpu_generator(vae_dir, sample_codec):
    cuda = VAECodec.from_pretrained(vae_dir, device="cuda")
    x = images(2, 8, 8)
    a = cuda.encode(x.cuda(), generator=torch.Generator().manual_seed(3))
    b = sample_codec.encode(x, generator=torch.Generator().manual_seed(3))
    assert a.device.type == "cuda"
    # cuDNN convolutions may run in TF32 (u = 4.9e-4) on a handful of layers: 5e-3 covers it.
    torch.testing.assert_close(a.cpu(), b, rtol=5e-3, atol=5e-3)
    assert torch.isfinite(cuda.decode(a)).all()
