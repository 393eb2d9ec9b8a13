"""FID/KID through torch-fidelity and the CLIP score through open_clip, offline with tiny random stand-ins."""

from __future__ import annotations

import datetime
import os
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from raphael_ref.data.synthetic import SyntheticShapes, render
from raphael_ref.evaluation import metrics as M


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _renders(seed: int, n: int, size: int = 32) -> torch.Tensor:
    ds = SyntheticShapes(seed=seed, image_size=size)
    return torch.stack([render(ds.scene(i)) for i in range(n)])  # (n, 3, S, S) uint8


@pytest.fixture(scope="module")
def image_sets():
    return _renders(1, 40), _renders(2, 40)


def _random_cov(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (2 * d)


# ------------------------------------------------------------------------------ FID / KID literal forms


@pytest.mark.spec_id("eval.fid")
@settings(max_examples=20)
@given(d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_reductions(d, seed):
    g = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = _random_cov(d, g), _random_cov(d, g)
    tol = dict(rtol=1e-9, atol=1e-9)  # float64 eigendecompositions of well-conditioned d <= 6 matrices
    # identical Gaussians: 0; equal covariances: the squared mean distance; symmetric
    torch.testing.assert_close(M.frechet_distance(mu1, s1, mu1, s1), torch.tensor(0.0, dtype=torch.float64), **tol)
    torch.testing.assert_close(M.frechet_distance(mu1, s1, mu2, s1), ((mu1 - mu2) ** 2).sum(), **tol)
    torch.testing.assert_close(M.frechet_distance(mu1, s1, mu2, s2), M.frechet_distance(mu2, s2, mu1, s1), **tol)
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2, the W2 distance of independent coordinates
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    torch.testing.assert_close(M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)), expected, **tol)
    assert M.frechet_distance(mu1, s1, mu2, s2) >= -1e-9


@pytest.mark.spec_id("eval.kid")
@settings(max_examples=15)
@given(m=st.integers(2, 7), d=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_kid_unbiased_equals_the_double_sum(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
    assert math.isclose(float(M.kid_unbiased(x, y)), expected, rel_tol=1e-10, abs_tol=1e-10)
    perm = torch.randperm(m, generator=g)
    assert math.isclose(float(M.kid_unbiased(x[perm], y)), expected, rel_tol=1e-10, abs_tol=1e-10)


# ------------------------------------------------------------------------------ torch-fidelity path


@pytest.mark.spec_id("eval.fid")
@pytest.mark.spec_id("eval.kid")
def test_torch_fidelity_fid_and_kid_match_the_literal_forms(image_sets):
    a, b = image_sets
    name = M.register_tiny_feature_extractor()
    out = M.fid_kid(a, b, feature_extractor=name, kid_subsets=1, kid_subset_size=len(a))
    fe = M.TinyRandomFeatureExtractor(name, ["feat"])
    fa, fb = fe(a)[0], fe(b)[0]  # (40, 8) float32, as torch-fidelity extracts them
    fid = M.frechet_distance(*M.gaussian_statistics(fa), *M.gaussian_statistics(fb))
    # Features are float32 and torch-fidelity extracts them in its own batches: on another CPU kernel
    # (ATEN_CPU_CAPABILITY=default vs avx2) they differ from ours by ~1 float32 ulp (2^-24 relative).
    # FID is a difference of terms of the size of tr(S) and |mu|^2, so its absolute error is a few
    # ulps of that scale, not of FID itself (here ~0.009, much smaller than the terms): 4 ulps of
    # the scale. Measured: 1.4e-8 absolute under `default`, the bound here is ~1e-7.
    (mu_a, s_a), (mu_b, s_b) = M.gaussian_statistics(fa), M.gaussian_statistics(fb)
    scale = float(torch.trace(s_a) + torch.trace(s_b) + mu_a.square().sum() + mu_b.square().sum())
    assert math.isclose(out["fid"], float(fid), rel_tol=1e-6, abs_tol=4 * 2.0**-24 * scale)
    # one subset holding every sample: the unbiased MMD^2 of the full sets (torch-fidelity works in float32)
    assert math.isclose(out["kid_mean"], float(M.kid_unbiased(fa, fb)), rel_tol=1e-4, abs_tol=1e-6)
    assert out["n_generated"] == out["n_reference"] == 40


@pytest.mark.spec_id("eval.fid")
def test_fid_of_a_set_with_itself_is_zero_and_folders_equal_tensors(image_sets, tmp_path):
    a, b = image_sets
    name = M.register_tiny_feature_extractor()
    assert abs(M.fid_kid(a, a, feature_extractor=name, kid=False)["fid"]) < 1e-6
    M.save_images(a, tmp_path / "a")
    M.save_images(b, tmp_path / "b")
    from_dirs = M.fid_kid(str(tmp_path / "a"), tmp_path / "b", feature_extractor=name, kid_subsets=5)
    from_tensors = M.fid_kid(a, b, feature_extractor=name, kid_subsets=5)
    assert from_dirs == pytest.approx(from_tensors, rel=1e-9)
    noise = torch.randint(0, 256, a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert M.fid_kid(noise, b, feature_extractor=name, kid=False)["fid"] > 10 * from_tensors["fid"]


def test_registered_dataset_is_read_without_download(image_sets, tmp_path):
    from torch_fidelity.registry import DATASETS_REGISTRY, register_dataset

    a, b = image_sets
    calls = []
    if "raphael-test-renders" not in DATASETS_REGISTRY:
        register_dataset("raphael-test-renders", lambda root, download: calls.append(download) or M._TensorImages(b))
    name = M.register_tiny_feature_extractor()
    by_name = M.fid_kid(a, "raphael-test-renders", feature_extractor=name, kid=False, datasets_root=str(tmp_path))
    assert by_name["fid"] == pytest.approx(M.fid_kid(a, b, feature_extractor=name, kid=False)["fid"], rel=1e-9)
    assert calls in ([False], []), "the data set must be built with download=False"


def test_missing_inception_weights_are_a_clear_error(image_sets, tmp_path):
    a, b = image_sets
    with pytest.raises(ValueError, match=M.INCEPTION_FILE):
        M.fid_kid(a, b)
    with pytest.raises(FileNotFoundError, match="nope.pth") as err:
        M.fid_kid(a, b, inception_weights=tmp_path / "nope.pth")
    assert M.INCEPTION_FILE in str(err.value)
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "when": datetime.datetime(2023, 1, 1)}, bad)  # not a plain state dict
    with pytest.raises(ValueError, match="plain state dict"):
        M.fid_kid(a, b, inception_weights=bad)
    with pytest.raises(ValueError, match="download"):
        M.fid_kid(a, b, feature_extractor="clip-vit-b-32")  # a built-in extractor that would download weights
    with pytest.raises(ValueError, match=">= 2 images"):
        M.fid_kid(a[:1], b, feature_extractor=M.register_tiny_feature_extractor())


# ------------------------------------------------------------------------------ CLIP score


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP written in open_clip's local-directory layout (config JSON + safetensors)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d, model


@pytest.mark.spec_id("eval.clip_score")
def test_clip_score_through_a_local_open_clip_directory(tiny_clip_dir, image_sets):
    d, model = tiny_clip_dir
    scorer = M.load_clip(d)
    assert scorer.image_size == 32 and scorer.mean == (0.5, 0.4, 0.3) and scorer.std == (0.2, 0.25, 0.3)
    assert scorer.tokenizer(["a red circle"]).shape == (1, 24)  # the config's context length
    images = image_sets[0][:6]
    texts = ["a red circle on the left", "", "two blue squares", "a", "b", "a white triangle at the top"]
    got = M.clip_score(images, texts, scorer, batch_size=4)
    # reference: the in-memory model the files were written from, preprocessing written out here
    mean = torch.tensor([0.5, 0.4, 0.3])[None, :, None, None]
    std = torch.tensor([0.2, 0.25, 0.3])[None, :, None, None]
    with torch.no_grad():
        e_i = model.encode_image((images.float() / 255 - mean) / std)  # 32 x 32 already: no resize
        e_t = model.encode_text(scorer.tokenizer(texts))
    cos = torch.nn.functional.cosine_similarity(e_i, e_t, dim=-1)
    # float32 embeddings of a 1-layer model: agreement to ~1e-5 relative in the cosine
    torch.testing.assert_close(got, 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert ((got >= 0) & (got <= 100)).all()


@pytest.mark.spec_id("eval.clip_score")
@settings(max_examples=20)
@given(b=st.integers(1, 5), e=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100))
def test_clip_score_from_embeddings_properties(b, e, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, e, generator=g), torch.randn(b, e, generator=g)
    s = M.clip_score_from_embeddings(x, y)
    assert ((s >= 0) & (s <= 100 + 1e-4)).all()
    torch.testing.assert_close(M.clip_score_from_embeddings(scale * x, y), s, rtol=1e-4, atol=1e-4)  # scale-free
    torch.testing.assert_close(M.clip_score_from_embeddings(x, x), torch.full((b,), 100.0), rtol=1e-5, atol=1e-4)
    assert torch.equal(M.clip_score_from_embeddings(x, -x), torch.zeros(b))  # negative cosine clipped at 0


def test_missing_clip_files_are_clear_errors(tiny_clip_dir, tmp_path):
    d, _ = tiny_clip_dir
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "open_clip_config.json").write_text((d / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        M.load_clip(tmp_path / "no_weights")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        M.load_clip(tmp_path / "no_config")
    with pytest.raises(ValueError, match="weights="):
        M.load_clip("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        M.load_clip("ViT-B-32", tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="one text per image"):
        M.clip_score(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a"], M.load_clip(d))


def test_safetensors_inception_weights_are_handed_over_as_a_plain_state_dict(tmp_path):
    state = {"Conv2d_1a_3x3.conv.weight": torch.randn(2, 3, 3, 3), "fc.bias": torch.randn(4)}
    save_file(state, str(tmp_path / "inception.safetensors"))
    with M._inception_weights_file(tmp_path / "inception.safetensors") as path:
        back = torch.load(path, weights_only=True)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert not os.path.exists(path), "the temporary .pth is removed afterwards"
    torch.save(state, tmp_path / "plain.pth")
    with M._inception_weights_file(tmp_path / "plain.pth") as path:
        assert path == str(tmp_path / "plain.pth")
