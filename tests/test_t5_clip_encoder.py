"""eDiff-I's T5 + CLIP text encoding (seed 003; issue 13 item 4; errata E78, spec ``text.t5_clip_concat``).

Random tiny encoders written to disk (a tiny T5 by ``write_tiny_t5``, the tiny CLIP tower by
``TextEncoder.save``) and read back through the same code as real weights; nothing downloads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.config import get_preset
from raphael_ref.t5_encoder import (T5ClipTextEncoder, T5TextEncoder, build_t5_text_encoder, concat_text_tokens,
                                    write_tiny_t5)
from raphael_ref.text_encoder import TextEncoder, TextEncoding

pytest.importorskip("transformers")

N_T5 = 12  # T5 positions in the tests; CLIP's context is 77


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return TextEncoder.tiny(seed=1).save(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def enc(t5_dir, clip_dir):
    return T5ClipTextEncoder.from_pretrained(t5_dir, clip_dir, clip_dir, n_y=N_T5 + 77)


def _random_encoding(g: torch.Generator, B: int, n: int, d: int, pooled: list[int]) -> TextEncoding:
    h = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    p = torch.tensor(pooled)
    return TextEncoding(hidden=h, pooled_index=p, valid=torch.arange(n)[None] <= p[:, None],
                        pooled=h[torch.arange(B), p], ids=torch.randint(0, 50, (B, n), generator=g))


@pytest.mark.spec_id("text.t5_clip_concat")
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), n_t=st.integers(1, 6), d_t=st.integers(1, 5), n_c=st.integers(1, 6),
       d_c=st.integers(1, 5), data=st.data())
def test_concat_blocks_valid_and_pooled(B, n_t, d_t, n_c, d_c, data):
    """Each encoder's tokens sit in their own channel block (zeros in the other), in order T5 then CLIP; valid
    is the two masks side by side; the pooled token is CLIP's EOT, shifted by n_t."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    pt = data.draw(st.lists(st.integers(0, n_t - 1), min_size=B, max_size=B))
    pc = data.draw(st.lists(st.integers(0, n_c - 1), min_size=B, max_size=B))
    t5, clip = _random_encoding(g, B, n_t, d_t, pt), _random_encoding(g, B, n_c, d_c, pc)
    y = concat_text_tokens(t5, clip)
    assert y.hidden.shape == (B, n_t + n_c, d_t + d_c) and y.hidden.dtype == torch.float64
    assert torch.equal(y.hidden[:, :n_t, :d_t], t5.hidden) and torch.equal(y.hidden[:, n_t:, d_t:], clip.hidden)
    assert (y.hidden[:, :n_t, d_t:] == 0).all() and (y.hidden[:, n_t:, :d_t] == 0).all()
    assert torch.equal(y.valid, torch.cat([t5.valid, clip.valid], 1))
    assert y.pooled_index.tolist() == [n_t + p for p in pc]
    assert torch.equal(y.pooled, y.hidden[torch.arange(B), y.pooled_index])
    assert torch.equal(y.pooled[:, d_t:], clip.pooled) and (y.pooled[:, :d_t] == 0).all()
    assert torch.equal(y.ids, torch.cat([t5.ids, clip.ids], 1))


@pytest.mark.spec_id("text.t5_clip_concat")
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d_t=st.integers(1, 6), d_c=st.integers(1, 6), width=st.integers(1, 8))
def test_a_linear_map_of_the_joint_tokens_is_one_map_per_encoder(seed, d_t, d_c, width):
    """Why the block layout (E78): any Linear(d_t + d_c, w) the U-Net applies to y (to_k, to_v, the text
    gate's first layer) acts on T5 tokens as Linear(d_t, w) with W[:, :d_t] and on CLIP tokens as
    Linear(d_c, w) with W[:, d_t:]: two independent learned projections sharing only the bias."""
    g = torch.Generator().manual_seed(seed)
    t5, clip = _random_encoding(g, 2, 4, d_t, [1, 3]), _random_encoding(g, 2, 5, d_c, [4, 0])
    y = concat_text_tokens(t5, clip)
    lin = torch.nn.Linear(d_t + d_c, width).double()
    out = lin(y.hidden)  # (2, 9, w)
    torch.testing.assert_close(out[:, :4], t5.hidden @ lin.weight[:, :d_t].T + lin.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 4:], clip.hidden @ lin.weight[:, d_t:].T + lin.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("text.t5_clip_concat")
def test_concat_rejects_mismatched_encodings():
    g = torch.Generator().manual_seed(0)
    a, b = _random_encoding(g, 2, 3, 4, [0, 2]), _random_encoding(g, 1, 3, 4, [1])
    with pytest.raises(ValueError, match="encode the same prompts"):
        concat_text_tokens(a, b)
    c = _random_encoding(g, 2, 3, 4, [0, 1])
    with pytest.raises(ValueError, match="one dtype and device"):
        concat_text_tokens(a, TextEncoding(hidden=c.hidden.float(), pooled_index=c.pooled_index, valid=c.valid,
                                           pooled=c.pooled.float(), ids=c.ids))
    with pytest.raises(ValueError, match="valid must be a bool"):
        concat_text_tokens(a, TextEncoding(hidden=c.hidden, pooled_index=c.pooled_index, valid=c.valid.long(),
                                           pooled=c.pooled, ids=c.ids))


@pytest.mark.spec_id("text.t5_clip_concat")
def test_encoder_equals_the_two_encoders_run_apart(enc, t5_dir, clip_dir):
    prompts = ["a red circle on the left", ""]
    y = enc(prompts)
    t5 = T5TextEncoder.from_pretrained(t5_dir, n_y=N_T5)(prompts)
    clip = TextEncoder.load(clip_dir)(prompts)
    assert enc.d_y == 64 and enc.n_y == N_T5 + 77 and enc.n_t5 == N_T5 and y.hidden.shape == (2, N_T5 + 77, 64)
    assert torch.equal(y.hidden[:, :N_T5, :32], t5.hidden) and torch.equal(y.hidden[:, N_T5:, 32:], clip.hidden)
    assert (y.hidden[:, :N_T5, 32:] == 0).all() and (y.hidden[:, N_T5:, :32] == 0).all()
    # "a red circle on the left": 6 T5 words + </s>; CLIP: SOT + 6 BPE + EOT at 7. The empty prompt: </s>; SOT EOT.
    assert y.pooled_index.tolist() == [N_T5 + 7, N_T5 + 1]
    assert y.valid.sum(1).tolist() == [7 + 8, 1 + 2]
    assert torch.equal(enc(enc.tokenize(prompts)).hidden, y.hidden)  # ids in, same tokens out


def test_frozen_eval_no_graph(enc):
    assert enc.num_parameters() > 0 and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.t5.model.training and not enc.clip.training
    with torch.enable_grad():
        assert not enc(["a blue square"]).hidden.requires_grad
    assert enc.config.name == enc.name and "t5" in repr(enc)


def test_config_fields_and_clear_errors(t5_dir, clip_dir):
    base = {"model.text_encoder": "t5+clip", "model.text_encoder_weights": str(t5_dir),
            "model.text_encoder_clip": str(clip_dir), "model.text_encoder_clip_weights": str(clip_dir),
            "model.n_y": N_T5 + 77, "model.d_y": 64, "model.text_layer": "last"}
    cfg = get_preset("toy", base)
    enc = build_t5_text_encoder(cfg.model)
    assert isinstance(enc, T5ClipTextEncoder) and (enc.n_y, enc.d_y) == (cfg.model.n_y, cfg.model.d_y)
    assert enc.layer == "last"
    pen = build_t5_text_encoder(get_preset("toy", {**base, "model.text_layer": "penultimate"}).model)
    assert pen.clip.layer == "penultimate"  # text_layer is CLIP's; T5 always gives its last layer
    with pytest.raises(ValueError, match="model.text_encoder_clip"):
        get_preset("toy", {k: v for k, v in base.items() if k != "model.text_encoder_clip"})
    with pytest.raises(ValueError, match="model.text_encoder_weights"):
        get_preset("toy", {k: v for k, v in base.items() if k != "model.text_encoder_weights"})
    with pytest.raises(ValueError, match="not a CLIP text tower"):
        get_preset("toy", {**base, "model.text_encoder_clip": "t5"})
    with pytest.raises(ValueError, match="read only with model.text_encoder='t5\\+clip'"):
        get_preset("toy", {"model.text_encoder_clip": "toy-clip"})
    with pytest.raises(ValueError, match=r"model.n_y=154"):
        build_t5_text_encoder(get_preset("toy", {**base, "model.n_y": 78}).model)


def test_build_text_encoder_dispatches_t5_clip(t5_dir, clip_dir):
    """``training.build_text_encoder`` builds the joint encoder and checks d_y / n_y against the config."""
    from raphael_ref.training import build_text_encoder

    base = {"model.text_encoder": "t5+clip", "model.text_encoder_weights": str(t5_dir),
            "model.text_encoder_clip": str(clip_dir), "model.text_encoder_clip_weights": str(clip_dir),
            "model.n_y": N_T5 + 77, "model.d_y": 64, "model.text_layer": "last"}
    assert isinstance(build_text_encoder(get_preset("toy", base)), T5ClipTextEncoder)
    with pytest.raises(ValueError, match="set model.d_y=64"):
        build_text_encoder(get_preset("toy", {**base, "model.d_y": 32}))


def test_a_t5_clip_conditioned_unet_trains_a_step_and_samples(enc):
    """The U-Net reads the joint tokens as it reads CLIP's: a training step reaches both blocks of to_k, and
    guided DDIM sampling (empty prompt = </s> and SOT EOT) runs to finite images."""
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.models import RaphaelUNet
    from raphael_ref.objective import training_losses
    from raphael_ref.sampling import sample

    cfg = get_preset("toy", {"model.n_y": enc.n_y, "model.d_y": enc.d_y, "model.sample_size": 8,
                             "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
                             "model.edge_width": 4})
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model)
    text = enc(["a red circle on the left", "two blue squares"])
    schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    out = training_losses(model, schedule, x0, torch.tensor([10, 600]), torch.randn(x0.shape, generator=g),
                          text.hidden, text.valid, text.pooled_index, torch.rand(2, 1, 8, 8, generator=g))
    out["total"].mean().backward()
    assert torch.isfinite(out["total"]).all()
    to_k = [p.grad for n, p in model.named_parameters() if n.endswith("to_k.weight") and p.grad is not None]
    assert to_k and any(bool(gr[:, :32].abs().sum() > 0) for gr in to_k)  # the T5 block is read
    assert any(bool(gr[:, 32:].abs().sum() > 0) for gr in to_k)  # and the CLIP block
    u = enc([""])
    x, _ = sample(model, schedule, (text.hidden, text.valid, text.pooled_index), (u.hidden, u.valid, u.pooled_index),
                  shape=(2, 3, 8, 8), steps=3, guidance=4.0, generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_paint_token_positions_follow_the_t5_block(enc):
    """Paint-with-words on T5 + CLIP: a phrase's positions are its CLIP tokens, shifted past the T5 block; plain T5
    tokens are not CLIP BPE, so the helper refuses them with what to do instead."""
    from raphael_ref.paint import find_token_indices

    prompt = "a red circle on the left"
    want = [enc.t5.n_y + i for i in find_token_indices(enc.clip, prompt, "red circle")]
    got = find_token_indices(enc, prompt, "red circle")
    assert got == want and got[0] >= enc.t5.n_y
    ids = enc.clip.tokenize([prompt])[0].tolist()
    assert [ids[i - enc.t5.n_y] for i in got] == [ids[i] for i in find_token_indices(enc.clip, prompt, "red circle")]
    with pytest.raises(ValueError, match="give the token positions"):
        find_token_indices(enc.t5, prompt, "red circle")
