"""eDiff-I's paint-with-words (raphael_ref/paint.py; spec paint.attention_bias, errata E77)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from raphael_ref.attention import cross_attention, cross_attention_literal, cross_attention_map
from raphael_ref.config import get_preset
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.masks import threshold_mask
from raphael_ref.models import RaphaelUNet
from raphael_ref.paint import (PaintWithWords, find_token_indices, paint_logit_bias, paint_logit_bias_literal,
                               paint_map, paint_masks, paint_sigma, resize_region)
from raphael_ref.sampling import sample
from raphael_ref.text_encoder import TextEncoder

PROMPTS = ["a red circle on the left", "a blue square on the right"]


def micro_cfg():
    base = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
            "model.expert_mult": 2, "model.edge_width": 4}
    return get_preset("toy", base).model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = micro_cfg()
    model = RaphaelUNet(cfg).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every change
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = TextEncoder.tiny(seed=0)
    text = enc(PROMPTS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return cfg, model, enc, text, x


def right_half(s: int) -> torch.Tensor:
    r = torch.zeros(s, s)
    r[:, s // 2:] = 1.0
    return r


def _paint(enc, s, weight=2.0, mode="replace"):
    idx = find_token_indices(enc, PROMPTS[0], "circle")
    return PaintWithWords([[(idx, right_half(s))], []], weight=weight, mode=mode)


def _qk(B=2, n_x=16, n_y=8, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_x, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, n_y, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, n_y, d, generator=g, dtype=torch.float64)
    P = torch.zeros(B, n_x, n_y, dtype=torch.float64)
    P[0, : n_x // 2, 2] = 1.0
    P[0, n_x // 2: n_x // 2 + 2, 2] = 0.5
    P[1, n_x // 4:, 3] = 0.75
    key_valid = torch.ones(B, n_y, dtype=torch.bool)
    key_valid[1, 5:] = False
    return q, k, v, P, torch.tensor([1.5, 0.7], dtype=torch.float64), key_valid


@pytest.mark.spec_id("paint.attention_bias")
@pytest.mark.parametrize("masked", [False, True])
def test_fast_bias_equals_literal(masked):
    q, k, v, P, scale, kv = _qk()
    kv = kv if masked else None
    fast = paint_logit_bias(q, k, 4, P, scale, key_valid=kv)
    lit = paint_logit_bias_literal(q, k, 4, P, scale, key_valid=kv)
    torch.testing.assert_close(fast, lit, rtol=1e-12, atol=1e-12)
    # the biased attention: SDPA with a float attn_mask == the literal loop; the map too
    out, M = cross_attention(q, k, v, 4, key_valid=kv, need_map=True, logit_bias=fast)
    out_l, maps = cross_attention_literal(q, k, v, 4, key_valid=kv, logit_bias=lit)
    torch.testing.assert_close(out, out_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M, maps.mean(dim=1), rtol=1e-12, atol=1e-12)
    # literal meaning: bias = scale * max(QK^T / sqrt(d_head)) * P, head 0 of sample 0
    logits = q[0, :, :8] @ k[0, :, :8].T / math.sqrt(8)
    torch.testing.assert_close(fast[0, 0], 1.5 * logits.max() * P[0])


@pytest.mark.spec_id("paint.attention_bias")
def test_float32_fast_path_matches_float64_literal():
    q, k, v, P, scale, kv = _qk(seed=3)
    bias32 = paint_logit_bias(q.float(), k.float(), 4, P.float(), scale.float(), key_valid=kv)
    out32, M32 = cross_attention(q.float(), k.float(), v.float(), 4, key_valid=kv, need_map=True, logit_bias=bias32)
    out64, maps = cross_attention_literal(q, k, v, 4, key_valid=kv,
                                          logit_bias=paint_logit_bias_literal(q, k, 4, P, scale, key_valid=kv))
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M32.double(), maps.mean(1), rtol=1e-5, atol=1e-5)


@pytest.mark.spec_id("paint.attention_bias")
def test_bias_raises_attention_of_painted_token_inside_region():
    q, k, v, P, scale, _ = _qk(seed=5)
    bias = paint_logit_bias(q, k, 4, P, torch.tensor([2.0, 2.0], dtype=torch.float64))
    M0 = cross_attention_map(q, k, 4)
    M1 = cross_attention_map(q, k, 4, logit_bias=bias)
    inside = P[0, :, 2] == 1.0
    assert bool((M1[0, inside, 2] > M0[0, inside, 2]).all())
    outside = P[0, :, 2] == 0
    torch.testing.assert_close(M1[0, outside], M0[0, outside])  # no bias outside the painted region


@pytest.mark.spec_id("paint.attention_bias")
def test_masks_replace_and_add():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 16, 8, generator=g) > 0.5
    P = torch.zeros(2, 16, 8)
    P[0, :6, 2] = 1.0
    P[0, 6:8, 2] = 0.25  # under half painted: not in the region
    rep = paint_masks(masks, P, "replace")
    assert torch.equal(rep[0, :, 2], P[0, :, 2] >= 0.5)
    keep = torch.ones(2, 16, 8, dtype=torch.bool)
    keep[0, :, 2] = False
    assert torch.equal(rep[keep], masks[keep])  # unpainted tokens keep their masks
    add = paint_masks(masks, P, "add")
    assert torch.equal(add[0, :, 2], masks[0, :, 2] | (P[0, :, 2] >= 0.5))
    assert torch.equal(add[keep], masks[keep])


def test_resize_region_and_paint_map():
    r = right_half(16)
    torch.testing.assert_close(resize_region(r, (4, 4)).reshape(4, 4), right_half(4).double())
    torch.testing.assert_close(resize_region(r, (1, 1)), torch.tensor([0.5], dtype=torch.float64))
    spec = PaintWithWords([[([2, 3], r)], []])
    P = paint_map(spec, (2, 2), 8)
    assert P.shape == (2, 4, 8) and P[1].abs().sum() == 0
    assert torch.equal(P[0, :, 2], torch.tensor([0.0, 1.0, 0.0, 1.0])) and torch.equal(P[0, :, 3], P[0, :, 2])
    assert P[0, :, [0, 1, 4, 5, 6, 7]].abs().sum() == 0


def test_sigma_schedule():
    sched = NoiseSchedule.make("linear", 1000)
    spec = PaintWithWords([[]]).with_schedule(sched.alphas_cumprod)
    t = torch.tensor([0, 999])
    s = paint_sigma(spec, t)
    abar = sched.alphas_cumprod.double()[t]
    torch.testing.assert_close(s, torch.log1p(torch.sqrt((1 - abar) / abar)))
    assert s[1] > s[0]  # stronger at high noise
    torch.testing.assert_close(paint_sigma(PaintWithWords([[]]), t), torch.ones(2, dtype=torch.float64))


def test_find_token_indices():
    enc = TextEncoder.tiny(seed=0)
    idx = find_token_indices(enc, "a red circle on the left", "red circle")
    assert idx == [2, 3]
    assert find_token_indices(enc, "a red circle on the left", "circle") == [3]
    with pytest.raises(ValueError, match="not in the tokens"):
        find_token_indices(enc, "a red circle", "square")


@pytest.mark.spec_id("paint.attention_bias")
def test_weight_zero_or_none_is_bit_identical(setup):
    cfg, model, enc, text, x = setup
    t = torch.tensor([500, 20])
    args = (x, t, text.hidden, text.valid, text.pooled_index)
    with torch.no_grad():
        base, _ = model(*args)
        none, _ = model(*args, paint=None)
        zero, _ = model(*args, paint=_paint(enc, cfg.sample_size, weight=0.0))
        empty, _ = model(*args, paint=PaintWithWords([[], []], weight=3.0))
        on, _ = model(*args, paint=_paint(enc, cfg.sample_size, weight=2.0))
    assert torch.equal(base, none) and torch.equal(base, zero) and torch.equal(base, empty)
    assert not torch.equal(base, on)
    assert torch.equal(base[1], on[1])  # the painting of sample 0 does not touch sample 1


@pytest.mark.spec_id("paint.attention_bias")
def test_model_replace_puts_the_region_into_the_painted_token_mask(setup):
    cfg, model, enc, text, x = setup
    idx = find_token_indices(enc, PROMPTS[0], "circle")[0]
    t = torch.tensor([500, 500])
    with torch.no_grad():
        _, aux = model(x, t, text.hidden, text.valid, text.pooled_index, return_masks=True,
                       paint=_paint(enc, cfg.sample_size, weight=1.0, mode="replace"))
        _, aux_add = model(x, t, text.hidden, text.valid, text.pooled_index, return_masks=True,
                           paint=_paint(enc, cfg.sample_size, weight=1.0, mode="add"))
    for a, b in zip(aux, aux_add):
        h, w = a.grid
        want = right_half(cfg.sample_size)
        want = resize_region(want, (h, w)) >= 0.5
        assert torch.equal(a.masks[0, :, idx], want), a.index
        assert bool((b.masks[0, :, idx] | ~want).all())  # add: the region is in the mask
    # the bias raises the painted token's attention inside the region, in the model's map
    with torch.no_grad():
        blk = model.transformer_blocks()[0]
        q = torch.randn(2, 64, blk.to_q.out_features)
        k = blk.to_k(text.hidden)
        P = paint_map(_paint(enc, 8), (8, 8), text.hidden.shape[1])
        bias = paint_logit_bias(q, k, blk.heads, P, torch.tensor([1.0, 1.0]), key_valid=text.valid)
        M0 = cross_attention_map(q, k, blk.heads, key_valid=text.valid)
        M1 = cross_attention_map(q, k, blk.heads, key_valid=text.valid, logit_bias=bias)
        inside = P[0, :, idx] > 0
        assert bool((M1[0, inside, idx] > M0[0, inside, idx]).all())
        torch.testing.assert_close(threshold_mask(M1)[1], threshold_mask(M0)[1])


def test_sample_passes_paint_to_the_conditional_branch_only(setup):
    cfg, model, enc, text, _ = setup
    sched = NoiseSchedule.make("linear", 1000)
    seen = []
    orig = model.forward

    def spy(*a, **kw):
        seen.append(kw.get("paint"))
        return orig(*a, **kw)

    model.forward = spy
    try:
        u = TextEncoder.tiny(seed=0)([""])
        shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        kw = dict(shape=shape, steps=2, guidance=7.5)
        x_p, _ = sample(model, sched, (text.hidden, text.valid, text.pooled_index), (u.hidden, u.valid, u.pooled_index),
                        generator=torch.Generator().manual_seed(0), paint=_paint(enc, cfg.sample_size, weight=2.0), **kw)
        x_0, _ = sample(model, sched, (text.hidden, text.valid, text.pooled_index), (u.hidden, u.valid, u.pooled_index),
                        generator=torch.Generator().manual_seed(0), paint=_paint(enc, cfg.sample_size, weight=0.0), **kw)
        x_n, _ = sample(model, sched, (text.hidden, text.valid, text.pooled_index), (u.hidden, u.valid, u.pooled_index),
                        generator=torch.Generator().manual_seed(0), **kw)
    finally:
        del model.forward
    p = seen[0]
    assert p.batch_size == 4 and len(p.regions[0]) == 1 and all(len(r) == 0 for r in p.regions[1:])
    assert p.alphas_cumprod is not None
    assert torch.equal(x_0, x_n) and not torch.equal(x_p, x_n)
    assert torch.equal(x_p[1], x_n[1])


def test_errors(setup):
    cfg, model, enc, text, x = setup
    s = cfg.sample_size
    with pytest.raises(ValueError, match="mode"):
        PaintWithWords([[]], mode="multiply")
    with pytest.raises(ValueError, match="weight"):
        PaintWithWords([[]], weight=-1.0)
    with pytest.raises(ValueError, match="region must be"):
        PaintWithWords([[([1], torch.ones(1, s, s))]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PaintWithWords([[([1], 2 * torch.ones(s, s))]])
    with pytest.raises(ValueError, match="token_indices"):
        PaintWithWords([[(1, torch.ones(s, s))]])
    t = torch.tensor([10, 10])
    args = (x, t, text.hidden, text.valid, text.pooled_index)
    with pytest.raises(ValueError, match="out of range"):
        model(*args, paint=PaintWithWords([[([77], right_half(s))], []]))
    with pytest.raises(ValueError, match="padding"):
        model(*args, paint=PaintWithWords([[([40], right_half(s))], []]))
    with pytest.raises(ValueError, match="2 prompts|batch has 2"):
        model(*args, paint=PaintWithWords([[([1], right_half(s))]]))
    with pytest.raises(ValueError, match="aspect ratio"):
        model(*args, paint=PaintWithWords([[([1], torch.ones(s, 2 * s))], []]))
    with pytest.raises(ValueError, match="PaintWithWords"):
        model(*args, paint={"circle": right_half(s)})
    q, k, v, P, scale, _ = _qk()
    with pytest.raises(ValueError, match="logit_bias"):
        cross_attention(q, k, v, 4, logit_bias=torch.zeros(2, 4, 16, 7, dtype=torch.float64))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_pipeline_paint_with_words(tmp_path_factory, sampler):
    from raphael_ref import RaphaelPipeline
    from raphael_ref.testing.tiny_run import make_tiny_run

    if sampler != "ddim":
        pytest.importorskip("diffusers")
    pipe = RaphaelPipeline.from_run(make_tiny_run(tmp_path_factory.mktemp("paint") / "run"))
    s = pipe.model.cfg.sample_size * pipe.codec.downsample_factor
    prompts = ["a red circle on the left", "two blue squares"]
    spec = pipe.paint_with_words(prompts, [{"red circle": right_half(s)}, {}], weight=1.0, mode="replace")
    assert spec.regions[0][0][0] == [2, 3] and spec.regions[1] == []
    kw = dict(num_inference_steps=2, generator=3, output_type="pt", return_masks=True, sampler=sampler)
    out = pipe(prompts, paint=spec, **kw)
    for m in out.masks:  # the last model call's masks, conditional branch
        n_x = m.shape[1]
        g = int(math.isqrt(n_x))
        want = resize_region(right_half(s), (g, g)) >= 0.5
        assert torch.equal(m[0, :, 2], want) and torch.equal(m[0, :, 3], want)
    off = pipe(prompts, paint=dataclasses.replace(spec, weight=0.0), **kw)
    ref = pipe(prompts, **kw)
    assert torch.equal(off.images, ref.images)
    assert all(torch.equal(a, b) for a, b in zip(off.masks, ref.masks))
    with pytest.raises(ValueError, match="one dict"):
        pipe.paint_with_words(prompts, {"red circle": right_half(s)})
