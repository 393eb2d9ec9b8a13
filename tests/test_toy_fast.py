"""The fast toy (issue 9): space-to-depth codec, the eDiff-I interval router, the toy preset's choices."""

from __future__ import annotations

import pytest
import torch

from raphael_ref.codec import SpaceToDepthCodec
from raphael_ref.config import get_preset, load_config, toy
from raphael_ref.gates import interval_route
from raphael_ref.models import RaphaelUNet


# ------------------------------------------------------------------------ space-to-depth codec


@pytest.mark.spec_id("codec.space_to_depth")
@pytest.mark.parametrize("f", [1, 2, 3, 4])
def test_space_to_depth_is_lossless_and_literal(f):
    g = torch.Generator().manual_seed(f)
    x = torch.rand(2, 3, 6 * f, 3 * f, generator=g) * 2 - 1
    c = SpaceToDepthCodec(f)
    z = c.encode(x)
    assert z.shape == (2, 3 * f * f, 6, 3) and (c.latent_channels, c.downsample_factor) == (3 * f * f, f)
    assert torch.equal(c.decode(z), x)  # a permutation of the entries: exact
    # literal form: channel (ch, i, j) of latent cell (r, s) is pixel (ch, f r + i, f s + j)
    for ch, i, j, r, s in [(0, 0, 0, 0, 0), (2, f - 1, 0, 5, 2), (1, 0, f - 1, 3, 1)]:
        assert z[1, ch * f * f + i * f + j, r, s] == x[1, ch, f * r + i, f * s + j]


@pytest.mark.spec_id("codec.space_to_depth")
def test_space_to_depth_keeps_the_noise_iid():
    """q(x_t | x_0) in latent space is the pixel-space one: eps ~ N(0, I) maps to eps ~ N(0, I)."""
    c = SpaceToDepthCodec(3)
    eps = torch.randn(4000, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    z = c.encode(eps).reshape(4000, 27)
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(27), atol=0.08, rtol=0)  # 4000 samples: sd of an entry ~0.016


def test_space_to_depth_errors():
    with pytest.raises(ValueError, match="factor"):
        SpaceToDepthCodec(0)
    with pytest.raises(ValueError, match="multiples of the downsample factor 3"):
        SpaceToDepthCodec(3).encode(torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, 27, H, W\)"):
        SpaceToDepthCodec(3).decode(torch.zeros(1, 12, 2, 2))


S2D = ["model.codec=space_to_depth", "model.codec_factor=3", "model.sample_size=8"]


def test_config_checks_the_space_to_depth_channels():
    with pytest.raises(ValueError, match="model.in_channels.*27"):
        load_config("toy", overrides=S2D + ["model.in_channels=12"])
    cfg = load_config("toy", overrides=S2D + ["model.in_channels=27"])
    assert cfg.model.codec_factor == 3
    with pytest.raises(ValueError, match="model.codec_factor"):
        load_config("toy", overrides=S2D + ["model.codec_factor=0", "model.in_channels=27"])


# ------------------------------------------------------------------------ eDiff-I interval router


@pytest.mark.spec_id("gate.interval_route")
def test_interval_route_pinned():
    t = torch.tensor([0, 249, 250, 499, 500, 999])
    routes, w = interval_route(t, 4, 1000)
    assert routes.tolist() == [0, 0, 1, 1, 2, 3] and torch.equal(w, torch.ones(6))
    assert interval_route(torch.tensor([0, 332, 333, 334, 999]), 3, 1000)[0].tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="integer"):
        interval_route(torch.tensor([0.5]), 4, 1000)
    with pytest.raises(ValueError, match="n_experts"):
        interval_route(torch.tensor([1]), 0, 1000)


@pytest.mark.spec_id("gate.interval_route")
def test_interval_router_model_routes_by_t_and_has_no_time_gate():
    cfg = get_preset("toy", {"model.time_router": "intervals", "model.sample_size": 8}).model
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).eval()
    assert not any("time_gate" in n for n, _ in model.named_parameters())
    learned = RaphaelUNet(get_preset("toy").model)
    assert any("time_gate" in n for n, _ in learned.named_parameters())
    B = 4
    t = torch.tensor([10, 300, 600, 990])
    y = torch.randn(B, 77, 32)
    valid = torch.zeros(B, 77, dtype=torch.bool)
    valid[:, :5] = True
    with torch.no_grad():
        _, aux = model(torch.randn(B, 3, 8, 8), t, y, valid, torch.full((B,), 4))
    for a in aux:
        assert a.time_routes.tolist() == [0, 1, 2, 3]


def test_interval_router_needs_the_diffusion_T():
    with pytest.raises(ValueError, match="model.time_router_T"):
        load_config("toy", overrides=["model.time_router=intervals", "diffusion.T=500"])
    load_config("toy", overrides=["model.time_router=intervals", "diffusion.T=500", "model.time_router_T=500"])
    with pytest.raises(ValueError, match="model.time_router"):
        load_config("toy", overrides=["model.time_router=bogus"])


# ------------------------------------------------------------------------ the toy preset


def test_toy_preset_keeps_every_raphael_component():
    cfg = toy()
    m = cfg.model
    assert cfg.n_transformer_blocks == 16
    assert m.use_space_moe and m.use_time_moe and m.use_edge and m.time_router == "learned"
    assert (m.n_space_experts, m.n_time_experts) == (6, 4)
    assert m.text_encoder == "toy-clip" and m.codec == "identity" and m.sample_size == 24  # 24 x 24 px


# ------------------------------------------------------------------------ L_denoise weighting option


@pytest.mark.spec_id("loss.denoise_weight")
def test_v_weighting_is_the_v_prediction_loss_for_an_eps_network():
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.objective import denoise_weights

    s = NoiseSchedule.make("scaled_linear", T=1000)
    t_all = torch.arange(1000)
    w = denoise_weights(s, t_all, "v")
    assert w.dtype == torch.float64 and abs(float(w.mean()) - 1.0) < 1e-12
    assert torch.equal(denoise_weights(s, t_all, "none"), torch.ones(1000, dtype=torch.float64))
    # literal: w(t) ||eps - eps_hat||^2 == (SNR + 1) ||x0 - x0_hat||^2 / mean_s(1 / abar_s)
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 100, 500, 900, 999])
    ab = s.alphas_cumprod[t][:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    snr = (ab / (1 - ab)).flatten()
    lhs = denoise_weights(s, t, "v") * ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3))
    rhs = (snr + 1) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3)) / (1 / s.alphas_cumprod).mean()
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=0)  # float64; 1/sqrt(abar) amplifies rounding by <= 15x
    with pytest.raises(ValueError, match="loss weighting"):
        denoise_weights(s, t, "min_snr")


@pytest.mark.spec_id("loss.denoise_weight")
def test_training_losses_applies_the_weighting():
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.objective import denoise_weights, training_losses

    cfg = get_preset("toy", {"model.use_edge": False, "model.sample_size": 8})
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()
    s = NoiseSchedule.make("scaled_linear", T=1000)
    g = torch.Generator().manual_seed(1)
    B = 3
    x0, noise = torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, 8, generator=g)
    y = torch.randn(B, 77, 32, generator=g)
    valid = torch.zeros(B, 77, dtype=torch.bool)
    valid[:, :4] = True
    t = torch.tensor([5, 500, 990])
    w = denoise_weights(s, t, "v").float()
    pooled = torch.full((1,), 3)
    for b in range(B):  # "denoise" is the batch mean: compare one sample at a time
        args = (model, s, x0[b:b + 1], t[b:b + 1], noise[b:b + 1], y[b:b + 1], valid[b:b + 1], pooled)
        with torch.no_grad():
            plain = training_losses(*args)["denoise"]
            v = training_losses(*args, loss_weight="v")["denoise"]
        torch.testing.assert_close(v, plain * w[b], rtol=1e-6, atol=0)  # float32 product of the same numbers
    assert w[2] > 5 * w[0]  # high noise levels count more: the point of the option


@pytest.mark.spec_id("loss.denoise_weight")
@pytest.mark.parametrize("cap", [1.0, 5.0, 50.0])
def test_capped_v_weighting(cap):
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.objective import denoise_weights

    s = NoiseSchedule.make("scaled_linear", T=1000)
    t_all = torch.arange(1000)
    w = denoise_weights(s, t_all, "v", cap)
    assert w.dtype == torch.float64 and abs(float(w.mean()) - 1.0) < 1e-12
    # literal: min(1/abar_t, cap) / mean_s min(1/abar_s, cap), one t at a time
    inv = [min(1.0 / float(s.alphas_cumprod[k]), cap) for k in range(1000)]
    mean = sum(inv) / 1000
    for k in (0, 250, 600, 800, 999):
        assert abs(float(w[k]) - inv[k] / mean) <= 1e-12 * inv[k] / mean
    assert float(w.max() / w.min()) <= cap * (1 + 1e-12)  # the point of the cap: the spread is bounded
    if cap == 1.0:
        torch.testing.assert_close(w, torch.ones(1000, dtype=torch.float64), rtol=1e-12, atol=0)
    # the uncapped v weighting leaves the low noise levels almost nothing; the cap gives them weight back
    share = lambda ws: float(ws[:250].sum() / ws.sum())  # noqa: E731
    assert share(w) > share(denoise_weights(s, t_all, "v"))
    # a zero-terminal-SNR schedule has 1/abar = inf at t = T-1: uncapped it is unusable, capped it is finite
    z = NoiseSchedule.make("scaled_linear", T=1000, zero_terminal_snr=True)
    assert torch.isfinite(denoise_weights(z, t_all, "v", cap)).all()


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("nan"), True, "5"])
def test_capped_v_weighting_rejects_bad_caps(bad):
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.objective import denoise_weights

    with pytest.raises(ValueError, match="max_weight"):
        denoise_weights(NoiseSchedule.make("scaled_linear", T=100), torch.arange(3), "v", bad)


def test_loss_weight_max_config():
    assert get_preset("toy", {"train.loss_weight_max": "5"}).train.loss_weight_max == 5.0
    with pytest.raises(ValueError, match="train.loss_weight_max"):
        get_preset("toy", {"train.loss_weight_max": "0.5"})
    with pytest.raises(ValueError, match="train.loss_weight_max"):
        get_preset("toy", {"train.loss_weight": "none", "train.loss_weight_max": "5"})


# ------------------------------------------------------------------------ 2D sin-cos position embedding option


@pytest.mark.spec_id("model.pos_embed")
@pytest.mark.parametrize("h,w,dim", [(1, 1, 4), (3, 5, 16), (6, 6, 64), (24, 24, 32)])
def test_sincos_position_embedding_equals_literal(h, w, dim):
    from raphael_ref.unet_parts import sincos_position_embedding, sincos_position_embedding_literal

    fast = sincos_position_embedding(h, w, dim)
    assert fast.shape == (h * w, dim) and fast.dtype == torch.float32
    # float32 sin/cos of arguments up to max(h, w) <= 24 rad: error ~ a few float32 ulps of the argument
    torch.testing.assert_close(fast.double(), sincos_position_embedding_literal(h, w, dim), rtol=0, atol=1e-5)
    if h * w > 1:  # every token gets its own embedding
        d = torch.cdist(fast, fast) + torch.eye(h * w) * 10
        assert float(d.min()) > 1e-3


def test_sincos_position_embedding_rejects_bad_sizes():
    from raphael_ref.unet_parts import sincos_position_embedding

    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(2, 2, 6)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        sincos_position_embedding(0, 2, 8)


def test_pos_embed_option_changes_the_forward_only_when_on():
    cfg0 = get_preset("toy", {"model.use_edge": False, "model.sample_size": 8, "model.pos_embed": "none"})
    cfg1 = get_preset("toy", {"model.use_edge": False, "model.sample_size": 8, "model.pos_embed": "sincos"})
    torch.manual_seed(0)
    m0 = RaphaelUNet(cfg0.model).eval()
    m1 = RaphaelUNet(cfg1.model).eval()
    m1.load_state_dict(m0.state_dict())  # no new parameters: the embedding is fixed
    for st in m0.modules():  # proj_out is zero-initialised; open it so the transformer output reaches eps_hat
        if hasattr(st, "proj_out"):
            torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    m1.load_state_dict(m0.state_dict())
    torch.nn.init.normal_(m0.conv_out.weight, std=0.1)
    m1.load_state_dict(m0.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randn(2, 77, 32, generator=g)
    valid = torch.ones(2, 77, dtype=torch.bool)
    args = (x, torch.tensor([10, 900]), y, valid, torch.tensor([3, 3]))
    with torch.no_grad():
        a, b = m0(*args)[0], m1(*args)[0]
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="model.pos_embed"):
        get_preset("toy", {"model.pos_embed": "learned"})


def test_pos_embed_cache_equals_the_function_per_grid_and_dtype():
    """SpatialTransformer.position_embedding caches the fixed embedding per (grid, device, dtype): the cached tensor
    equals sincos_position_embedding exactly, is reused on a second call, and a new grid or dtype gets its own."""
    from raphael_ref.models import SpatialTransformer
    from raphael_ref.unet_parts import sincos_position_embedding

    cfg = get_preset("toy", {"model.use_edge": False, "model.sample_size": 8})
    st = next(m for m in RaphaelUNet(cfg.model).modules() if isinstance(m, SpatialTransformer))
    C = st.proj_in.out_features
    a = st.position_embedding(4, 4, "cpu", torch.float32)
    assert torch.equal(a, sincos_position_embedding(4, 4, C)) and st.position_embedding(4, 4, "cpu", torch.float32) is a
    b = st.position_embedding(2, 3, "cpu", torch.float32)
    assert b.shape == (6, C) and torch.equal(b, sincos_position_embedding(2, 3, C))
    h = st.position_embedding(4, 4, "cpu", torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h, a.to(torch.bfloat16))
    assert "_pe_cache" not in "".join(RaphaelUNet(cfg.model).state_dict())
