"""TextEncoder: tokenization, EOT pooling, valid mask, truncation, freezing, weights I/O.

The tiny random tower (width 32, 2 blocks) uses the real CLIP tokenizer, so every property
checked here holds for the ViT-g-14 tower too; oracles are open_clip's own tokenizer, its
``TextTransformer.forward`` (EOT pooling) and ``CLIP.encode_text`` (full-checkpoint loading).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from raphael_ref.testing import DEFAULT_TOL
from raphael_ref.text_encoder import (
    CLIP_VOCAB_SIZE,
    PromptTruncatedWarning,
    TextEncoder,
    TextEncoderConfig,
    clip_tokenizer,
)

N_Y = 77
WORDS = ["a", "furry", "bear", "under", "the", "sky", "red", "cat", "on", "mat", "!", "photo", "of"]
prompt = st.lists(st.sampled_from(WORDS), min_size=0, max_size=20).map(" ".join)
any_text = st.text(max_size=60)  # arbitrary unicode: the BPE must cope with all of it


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_tokenizer_ships_offline_with_clip_vocab(tok):
    assert tok.vocab_size == CLIP_VOCAB_SIZE
    assert tok.eot_token_id == CLIP_VOCAB_SIZE - 1  # EOT is the largest id: argmax finds it
    assert tok.sot_token_id == CLIP_VOCAB_SIZE - 2


@settings(max_examples=30)
@given(prompts=st.lists(st.one_of(prompt, any_text), min_size=1, max_size=3))
def test_tokenize_matches_open_clip(enc, tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = enc.tokenize(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), N_Y)
    torch.testing.assert_close(ids, tok(prompts, context_length=N_Y), rtol=0, atol=0)


@settings(max_examples=15)
@given(prompts=st.lists(st.one_of(prompt, any_text), min_size=1, max_size=4))
def test_encode_shapes_pooled_index_and_valid_mask(enc, tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        out = enc(prompts)
    B = len(prompts)
    assert out.hidden.shape == (B, N_Y, enc.d_y) and out.hidden.dtype == torch.float32
    assert out.pooled_index.shape == (B,) and out.pooled_index.dtype == torch.long
    assert out.valid.shape == (B, N_Y) and out.valid.dtype == torch.bool
    assert out.pooled.shape == (B, enc.d_y)
    assert torch.isfinite(out.hidden).all()
    for b, p in enumerate(prompts):
        n_bpe = min(len(tok.encode(p)), N_Y - 2)  # counted independently of the encoder
        k = int(out.pooled_index[b])
        assert k == n_bpe + 1  # SOT at 0, tokens at 1..n, EOT at n + 1
        assert int(out.ids[b, k]) == tok.eot_token_id
        assert out.valid[b, : k + 1].all() and not out.valid[b, k + 1:].any()
        torch.testing.assert_close(out.pooled[b], out.hidden[b, k], rtol=0, atol=0)


def test_pooled_matches_open_clip_eot_pooling(enc):
    ids = enc.tokenize(["a furry bear under the sky", "", "red cat"])
    ours = enc(ids).pooled  # (B, d_y)
    with torch.no_grad():
        theirs = enc.tower(ids)  # open_clip: ln_final, then argmax pooling; no projection here
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_penultimate_layer_skips_the_last_block():
    last = TextEncoder.tiny(seed=3, layer="last")
    pen = TextEncoder.tiny(seed=3, layer="penultimate")
    ids = last.tokenize(["a furry bear under the sky", "red cat"])
    tower = pen.tower
    with torch.no_grad():  # literal: embeddings, first block only, final norm
        x = tower.token_embedding(ids) + tower.positional_embedding  # (B, n_y, d_y)
        x = tower.transformer.resblocks[0](x, attn_mask=tower.attn_mask)
        ref = tower.ln_final(x)
    torch.testing.assert_close(pen(ids).hidden, ref, **dict(zip(("rtol", "atol"), DEFAULT_TOL["float32"])))
    assert not torch.allclose(last(ids).hidden, ref)


def test_valid_positions_ignore_padding_ids(enc):
    # Valid-mask semantics (E40): the causal tower makes positions <= EOT blind to what follows.
    ids = enc.tokenize(["a furry bear", "sky"])
    out = enc(ids)
    noisy = ids.clone()
    pad = ~out.valid
    noisy[pad] = torch.randint(0, CLIP_VOCAB_SIZE - 2, (int(pad.sum()),))  # no EOT among them
    out2 = enc(noisy)
    torch.testing.assert_close(out2.pooled_index, out.pooled_index)
    torch.testing.assert_close(out2.hidden[out.valid], out.hidden[out.valid], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2.hidden[pad], out.hidden[pad])


def test_long_prompt_warns_and_truncates(enc, tok):
    long = " ".join(["cat"] * 100)  # "cat" is one BPE token
    assert len(tok.encode(long)) == 100
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 1 .*100 BPE tokens.*dropped the last 25"):
        ids = enc.tokenize(["red cat", long])
    assert int(ids[1, -1]) == tok.eot_token_id
    assert ids[1, 1:-1].tolist() == tok.encode(long)[: N_Y - 2]
    with pytest.warns(PromptTruncatedWarning):
        out = enc(["red cat", long])
    assert int(out.pooled_index[1]) == N_Y - 1 and out.valid[1].all()


def test_prompt_that_just_fits_does_not_warn(enc, tok):
    fits = " ".join(["cat"] * (N_Y - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = enc.tokenize(fits)
    assert int(ids[0, -1]) == tok.eot_token_id


def test_empty_prompt_for_classifier_free_guidance(enc, tok):
    out = enc("")
    assert out.ids[0, :2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert not out.ids[0, 2:].any()
    assert int(out.pooled_index[0]) == 1 and int(out.valid.sum()) == 2
    assert torch.isfinite(out.hidden).all()


def test_frozen(enc):
    assert all(not p.requires_grad for p in enc.parameters())
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and not enc.tower.training
    with torch.enable_grad():
        out = enc(["a furry bear"])
    assert not out.hidden.requires_grad and out.hidden.grad_fn is None


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_save_load_round_trip(tmp_path, layer):
    enc = TextEncoder.tiny(seed=1, layer=layer)
    enc.save(tmp_path)
    loaded = TextEncoder.from_config(tmp_path / "config.json", weights=tmp_path / "model.safetensors")
    assert loaded.config == enc.config
    ids = enc.tokenize(["a furry bear under the sky", ""])
    a, b = enc(ids), loaded(ids)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=0)
    torch.testing.assert_close(TextEncoder.load(tmp_path)(ids).hidden, a.hidden, rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_loads_text_tower_of_full_open_clip_checkpoint(tmp_path, suffix):
    import open_clip

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": N_Y, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(5)
    clip = open_clip.CLIP(**model_cfg).eval()
    path = tmp_path / f"open_clip_model{suffix}"
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    assert any(k.startswith("visual.") for k in state)
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    enc = TextEncoder.from_config(model_cfg, weights=path)
    ids = enc.tokenize(["a furry bear under the sky", "red cat on the mat", ""])
    with torch.no_grad():
        ref = clip.encode_text(ids)  # (B, embed_dim): EOT token after ln_final, projected
    torch.testing.assert_close(enc(ids).pooled @ clip.text_projection, ref, rtol=1e-5, atol=1e-6)
    assert not any(n.startswith("visual") for n, _ in enc.named_parameters())


def test_wrong_shaped_weights_name_the_key(tmp_path):
    TextEncoder.tiny().save(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["positional_embedding"] = state["positional_embedding"][:-1]  # (76, 32)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"positional_embedding: expected \(77, 32\), file has \(76, 32\)"):
        TextEncoder.load(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    TextEncoder.tiny().save(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    del state["ln_final.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing keys: ln_final\.weight(.|\n)*unexpected keys: extra\.weight"):
        TextEncoder.load(tmp_path)


def test_missing_weights_file_says_what_to_provide(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=r"open_clip_pytorch_model\.bin not found.*ViT-g-14"):
        TextEncoder.from_config("ViT-g-14", weights=missing)


def test_vit_g14_text_tower_on_meta_device():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the meta device allocates nothing: no random-weights warning
        enc = TextEncoder.from_config("ViT-g-14", device="meta")
    cfg = enc.config
    assert (enc.d_y, enc.n_y, cfg.layers, cfg.heads, cfg.quick_gelu) == (1024, 77, 24, 16, False)
    assert all(p.is_meta for p in enc.parameters())
    w, L = cfg.width, cfg.layers
    # token + positional embeddings; per block: 2 LNs (4w), qkv (3w^2+3w), out (w^2+w),
    # MLP (4w^2+4w, 4w^2+w); final LN (2w). No text projection (E38).
    expected = CLIP_VOCAB_SIZE * w + N_Y * w + L * (12 * w * w + 13 * w) + 2 * w
    assert enc.num_parameters() == expected == 352_984_064


def test_random_weights_warn_except_for_tiny():
    cfg = {"text_cfg": {"width": 32, "heads": 2, "layers": 1}}
    with pytest.warns(UserWarning, match="RANDOM weights"):
        TextEncoder.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = TextEncoder.from_config("tiny", seed=4)
    b = TextEncoder.tiny(seed=4)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tower_tracks_float32(enc, dtype):
    # Two pre-LN blocks, fp32 accumulation on CPU and LayerNorm in float32: the error is a few
    # ulps of the O(1) LN output, inside DEFAULT_TOL (~8 u for bf16, ~10 u for fp16).
    low = TextEncoder.tiny(seed=0).to(dtype)
    ids = enc.tokenize(["a furry bear under the sky", "", "red cat on the mat"])
    out = low(ids)
    assert out.hidden.dtype == dtype
    rtol, atol = DEFAULT_TOL[str(dtype).replace("torch.", "")]
    torch.testing.assert_close(out.hidden.float(), enc(ids).hidden, rtol=rtol, atol=atol)


def test_bad_ids_are_rejected(enc):
    ids = enc.tokenize(["red cat"])
    with pytest.raises(ValueError, match=r"shape \(B, 77\)"):
        enc(ids[:, :10])
    with pytest.raises(ValueError, match="integer"):
        enc(ids.float())
    with pytest.raises(ValueError, match="end-of-text"):
        enc(torch.zeros(1, N_Y, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        enc(ids + CLIP_VOCAB_SIZE)
    with pytest.raises(ValueError, match="str or a sequence of str"):
        enc.tokenize([1, 2])


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoderConfig(width=32, heads=2, layers=2, vocab_size=1000)
    with pytest.raises(ValueError, match="penultimate"):
        TextEncoderConfig(width=32, heads=2, layers=1, layer="penultimate")
    with pytest.raises(ValueError, match="layer must be one of"):
        TextEncoderConfig(width=32, heads=2, layers=2, layer="middle")
    hf = {"text_cfg": {"hf_model_name": "xlm-roberta-base", "width": 32, "heads": 2, "layers": 2}}
    with pytest.raises(ValueError, match="hf_model_name"):
        TextEncoder.from_config(hf, device="meta")
    with pytest.raises(ValueError, match="unknown text encoder 'not-a-model'"):
        TextEncoder.from_config("not-a-model", device="meta")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        TextEncoder.from_config("hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K", device="meta")


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = TextEncoder.tiny(seed=7)
    after = torch.rand(3)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    b, c = TextEncoder.tiny(seed=7), TextEncoder.tiny(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tower.token_embedding.weight"], sc["tower.token_embedding.weight"])


@pytest.mark.gpu
def test_cuda_matches_cpu(enc):
    ids = enc.tokenize(["a furry bear under the sky", ""])
    out = TextEncoder.tiny(seed=0).to("cuda")(ids)  # ids stay on the CPU: moved by the encoder
    assert out.hidden.device.type == "cuda" and out.pooled_index.device.type == "cuda"
    # Same float32 math, different kernels (reduction order): ~1e-6 relative; 1e-4 leaves margin.
    torch.testing.assert_close(out.hidden.cpu(), enc(ids).hidden, rtol=1e-4, atol=1e-4)


def test_tiny_distinct_is_tiny_with_token_embeddings_of_std_one(tmp_path):
    """The toy preset's tower: the seeded tiny tower with its token embedding times 50 (std 0.02 -> 1), all
    else equal; words of one caption keep distinct features, which the plain random tower loses."""
    F = torch.nn.functional
    plain = TextEncoder.from_config("tiny", seed=0)
    distinct = TextEncoder.from_config("tiny-distinct", seed=0)
    a, b = plain.tower.state_dict(), distinct.tower.state_dict()
    assert torch.equal(b["token_embedding.weight"], a["token_embedding.weight"] * 50.0)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "token_embedding.weight")
    assert 0.9 < float(b["token_embedding.weight"].std()) < 1.1
    caps = ["a red circle on the left", "a blue square on the right"]
    hp, hd = plain(caps).hidden, distinct(caps).hidden
    red, circle, blue = (1, 0, 2), (1, 0, 3), (1, 1, 2)  # (tokens 2, 3 of caption 0; token 2 of caption 1)
    cos = lambda h, i, j: float(F.cosine_similarity(h[i[1], i[2]], h[j[1], j[2]], dim=0))  # noqa: E731
    assert cos(hp, red, circle) > 0.9 and cos(hd, red, circle) < 0.5  # two words of one caption
    assert cos(hd, red, blue) < cos(hp, red, blue)  # the colour words of two captions
    # saved and reloaded: the weights are the truth (the scale is not applied twice)
    distinct.save(tmp_path / "enc")
    again = TextEncoder.load(tmp_path / "enc")
    assert torch.equal(again(caps).hidden, hd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # random by design: no "random weights" warning
        TextEncoder.from_config("tiny-distinct", seed=0)


def test_encode_phrases_apart(enc, tok):
    """Later object phrases take the states of the phrase encoded alone; the first phrase, the separator, SOT and EOT
    keep the whole prompt's; a prompt with one object phrase is encoded as usual; bad input is refused."""
    from raphael_ref.text_encoder import encode_phrases_apart

    prompts = ["a red circle on the left and a blue triangle at the top", "a green square"]
    full, apart = enc(prompts), encode_phrases_apart(enc, prompts)
    n1, n2 = len(tok.encode("a red circle on the left")), len(tok.encode("a blue triangle at the top"))
    s2 = 1 + n1 + 1  # SOT, phrase 1, "and"
    alone = enc(["a blue triangle at the top"])
    assert torch.equal(apart.ids, full.ids) and torch.equal(apart.valid, full.valid)
    assert torch.equal(apart.pooled, full.pooled) and torch.equal(apart.pooled_index, full.pooled_index)
    assert torch.equal(apart.hidden[0, :s2], full.hidden[0, :s2])  # SOT, phrase 1 and "and"
    # the phrase's states as encoded alone (float32, possibly in another batch: kernels may round differently)
    torch.testing.assert_close(apart.hidden[0, s2:s2 + n2], alone.hidden[0, 1:1 + n2], rtol=1e-5, atol=1e-6)
    assert (apart.hidden[0, s2:s2 + n2] - full.hidden[0, s2:s2 + n2]).abs().max() > 1e-2  # they saw phrase 1 before
    assert torch.equal(apart.hidden[0, s2 + n2:], full.hidden[0, s2 + n2:])  # EOT and padding
    assert torch.equal(apart.hidden[1], full.hidden[1])
    three = encode_phrases_apart(enc, ["a red circle and a blue square and a green triangle"])
    n_sq = len(tok.encode("a blue square"))
    s3 = 1 + len(tok.encode("a red circle")) + 1 + n_sq + 1
    torch.testing.assert_close(three.hidden[0, s3:s3 + 3], enc(["a green triangle"]).hidden[0, 1:4], rtol=1e-5, atol=1e-6)
    # a part that does not open an object phrase stays with the phrase before it: a count prompt is unchanged, and
    # in "a red circle and at the top and a blue square" only the last phrase is encoded apart
    count = "two red circles on the left and at the bottom"
    assert torch.equal(encode_phrases_apart(enc, [count]).hidden, enc([count]).hidden)
    mixed = encode_phrases_apart(enc, ["a red circle and at the top and a blue square"])
    s_last = 1 + len(tok.encode("a red circle and at the top")) + 1
    assert torch.equal(mixed.hidden[0, :s_last], enc(["a red circle and at the top and a blue square"]).hidden[0, :s_last])
    torch.testing.assert_close(mixed.hidden[0, s_last:s_last + 3], enc(["a blue square"]).hidden[0, 1:4], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="sep must contain a word"):
        encode_phrases_apart(enc, prompts, sep="  ")
    with pytest.raises(ValueError, match="truncated"):
        encode_phrases_apart(enc, [" ".join(["red"] * 80) + " and a circle"])


def test_phrases_apart_encoder_in_training_and_sampling():
    """model.text_phrases_apart (E85): build_text_encoder gives the wrapped tower, whose encoding is
    encode_phrases_apart's, and a prompt with one object phrase is encoded as the plain tower does."""
    from raphael_ref.config import get_preset
    from raphael_ref.text_encoder import PhrasesApartEncoder, encode_phrases_apart
    from raphael_ref.training import build_text_encoder

    cfg = get_preset("toy", {"model.text_phrases_apart": True})
    enc = build_text_encoder(cfg)
    plain = build_text_encoder(get_preset("toy"))
    assert isinstance(enc, PhrasesApartEncoder) and not isinstance(plain, PhrasesApartEncoder)
    assert (enc.n_y, enc.d_y) == (plain.n_y, plain.d_y) and torch.equal(enc.tokenize(["a"]), plain.tokenize(["a"]))
    two = ["a red circle on the left and a blue square at the top", "a green square", ""]
    got, want = enc(two), encode_phrases_apart(plain, two)
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.valid, want.valid)
    assert not torch.equal(got.hidden[0], plain(two).hidden[0]) and torch.equal(got.hidden[1:], plain(two).hidden[1:])
    # evaluate.py --phrases-apart on such a checkpoint changes nothing more (the split is idempotent)
    torch.testing.assert_close(encode_phrases_apart(enc, two).hidden, got.hidden, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="as text"):
        enc(plain.tokenize(two))
    with pytest.raises(ValueError, match="CLIP TextEncoder"):
        PhrasesApartEncoder(object())
