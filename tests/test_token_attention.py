"""The optional token-attention loss (TokenCompose's token loss on the cross-attention maps; erratum E82).

- ``token_targets``: which tokens of a synthetic caption are supervised, with which object's pixels;
- ``token_attention_loss``: fast == literal (values and gradients), known values, range, scale invariance;
- the model returns its maps only when asked, and its output does not change;
- ``training_losses`` adds the term only when on, and its gradient reaches the cross-attention queries and keys;
- the config checks and ``tools/train.py`` (the term in log.jsonl, alone and with the balancing loss).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.config import get_preset, load_config
from raphael_ref.data.synthetic import SyntheticShapes, make_scene, render
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.models import RaphaelUNet
from raphael_ref.objective import training_losses
from raphael_ref.text_encoder import TextEncoder
from raphael_ref.token_attention import (TokenTargets, grid_masks, model_token_attention_loss, token_attention_loss,
                                         token_attention_loss_literal, token_targets)

pytestmark = pytest.mark.spec_id("token.attention_loss")


def _object_pixels(scene, i):
    """Object i's pixels, read off a render of the scene with that object alone."""
    alone = make_scene([(o.shape, o.color, o.position) for o in scene.objects[i:i + 1]], scene.image_size)
    return (render(alone).sum(0) > 0).float()  # (S, S)


# ------------------------------------------------------------------------------ token_targets


def test_targets_of_a_two_object_caption():
    scene = make_scene([("circle", "white", "center"), ("circle", "purple", "left")], 24)
    assert scene.caption == "a white circle in the center and a purple circle on the left"
    tt = token_targets([scene], [scene.caption], 77)
    # SOT a white circle in the center and a purple circle on the left
    #  0  1   2     3    4   5    6     7  8   9      10    11  12  13
    assert tt.token.tolist() == [2, 3, 6, 9, 10, 13] and tt.sample.tolist() == [0] * 6
    ids = TextEncoder.tiny().tokenize([scene.caption])[0]
    from raphael_ref.text_encoder import clip_tokenizer

    words = [clip_tokenizer().decoder[int(ids[j])].replace("</w>", "") for j in tt.token]
    assert words == ["white", "circle", "center", "purple", "circle", "left"]
    for n, obj in enumerate([0, 0, 0, 1, 1, 1]):
        torch.testing.assert_close(tt.mask[n], _object_pixels(scene, obj), rtol=0, atol=0)
    only = token_targets([scene], [scene.caption], 77, words=("shape",))
    assert only.token.tolist() == [3, 10]


def test_targets_of_a_count_scene_cover_every_token_of_a_split_word():
    scene = make_scene([("triangle", "green", "left"), ("triangle", "green", "top")], 24)
    assert scene.caption == "two green triangles on the left and at the top"
    tt = token_targets([scene], [scene.caption], 77)
    # SOT two green tri angles on the left and at the top: "triangles" is two BPE tokens
    assert tt.token.tolist() == [2, 3, 4, 7, 11]
    union = torch.maximum(_object_pixels(scene, 0), _object_pixels(scene, 1))
    for n in range(3):  # colour and both pieces of the shape word: both objects
        torch.testing.assert_close(tt.mask[n], union, rtol=0, atol=0)
    torch.testing.assert_close(tt.mask[3], _object_pixels(scene, 0), rtol=0, atol=0)
    torch.testing.assert_close(tt.mask[4], _object_pixels(scene, 1), rtol=0, atol=0)


def test_targets_over_a_stream_of_scenes_and_dropped_captions():
    ds = SyntheticShapes(seed=3, image_size=24)
    scenes = [ds.scene(i) for i in range(300)]
    captions = [s.caption if i % 5 else "" for i, s in enumerate(scenes)]  # every fifth caption dropped
    tt = token_targets(scenes, captions, 77)
    assert set(tt.sample.tolist()) == {i for i in range(300) if i % 5}
    ids = TextEncoder.tiny().tokenize(captions)
    for b in (1, 2, 3, 4, 6):  # every supervised token is a content word of its caption, inside the caption
        toks = tt.token[tt.sample == b]
        objs = scenes[b].objects
        count = len(objs) >= 2 and len({(o.shape, o.color) for o in objs}) == 1  # one colour and shape word
        n_words = 2 + len(objs) if count else 3 * len(objs)
        assert len(toks) >= n_words and int(ids[b, toks].min()) > 0
        assert tt.mask[tt.sample == b].sum((1, 2)).min() > 0  # each pair has object pixels
    selected = tt.select(slice(100, 200))
    assert selected.sample.min() >= 0 and selected.sample.max() < 100
    assert len(selected.sample) == int(((tt.sample >= 100) & (tt.sample < 200)).sum())


def test_targets_clear_errors():
    scene = make_scene([("square", "red", "left")], 24)
    with pytest.raises(ValueError, match="not its scene's caption"):
        token_targets([scene], ["a blue square on the left"], 77)
    with pytest.raises(ValueError, match="not a data.synthetic.Scene"):
        token_targets(["a red square"], ["a red square on the left"], 77)
    with pytest.raises(ValueError, match="words must be distinct names"):
        token_targets([scene], [scene.caption], 77, words=("noun",))
    with pytest.raises(ValueError, match="1 scenes but 2 captions"):
        token_targets([scene], [scene.caption] * 2, 77)
    with pytest.raises(ValueError, match="slice"):
        token_targets([scene], [scene.caption], 77).select(slice(None, 3))
    empty = token_targets([scene], [""], 77)
    assert empty.sample.numel() == 0


# ------------------------------------------------------------------------------ the loss


def _random_case(seed, B=3, grid=(4, 4), n_y=6, N=7, S=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = torch.softmax(3 * torch.randn(B, grid[0] * grid[1], n_y, generator=g, dtype=dtype), dim=-1)
    t = TokenTargets(torch.randint(0, B, (N,), generator=g), torch.randint(0, n_y, (N,), generator=g),
                     (torch.rand(N, S, S, generator=g) > 0.5).float())
    return M, t


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), grid=st.sampled_from([(1, 1), (2, 2), (4, 4), (2, 4), (8, 8)]),
       N=st.integers(1, 9))
def test_fast_equals_literal_values_and_gradients(seed, grid, N):
    M, t = _random_case(seed, grid=grid, N=N)
    M1, M2 = M.clone().requires_grad_(True), M.clone().requires_grad_(True)
    fast, lit = token_attention_loss(M1, grid, t), token_attention_loss_literal(M2, grid, t)
    torch.testing.assert_close(fast, lit, rtol=1e-12, atol=1e-12)  # float64: the same sums, reordered
    fast.backward()
    lit.backward()
    torch.testing.assert_close(M1.grad, M2.grad, rtol=1e-10, atol=1e-12)
    assert 0 <= float(fast.detach()) <= 1


def test_known_values_and_scale_invariance():
    """A one-cell mask on a 2 x 2 grid: all of the token's mass in the cell gives 0, none of it 1, half of it
    (1 - 1/2)^2 = 1/4; the share is a ratio, so scaling a column leaves the loss unchanged."""
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # the top-left cell of a 2 x 2 grid, fully covered
    t = TokenTargets(torch.tensor([0]), torch.tensor([1]), mask)
    M = torch.zeros(1, 4, 3, dtype=torch.float64)
    M[0, :, 0] = 1
    M[0, 0, 1] = 0.7  # inside only
    assert float(token_attention_loss(M, (2, 2), t)) == 0.0
    M[0, :, 1] = torch.tensor([0.0, 0.2, 0.3, 0.1])  # outside only
    assert float(token_attention_loss(M, (2, 2), t)) == 1.0
    M[0, :, 1] = torch.tensor([0.375, 0.125, 0.125, 0.125], dtype=torch.float64)  # half inside (dyadic)
    assert float(token_attention_loss(M, (2, 2), t)) == pytest.approx(0.25, abs=1e-15)
    scaled = M.clone()
    scaled[0, :, 1] *= 7
    assert float(token_attention_loss(scaled, (2, 2), t)) == pytest.approx(0.25, abs=1e-15)
    # a half-covered cell counts half of its attention as inside
    half = torch.zeros(1, 4, 4)
    half[0, 0, :2] = 1  # one of the two pixel rows of the top-left cell
    M[0, :, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    th = TokenTargets(torch.tensor([0]), torch.tensor([1]), half)
    assert float(token_attention_loss(M, (2, 2), th)) == pytest.approx(0.25, abs=1e-15)
    torch.testing.assert_close(grid_masks(half, (2, 2)), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))


def test_loss_errors_and_the_mean_over_blocks():
    M, t = _random_case(0)
    with pytest.raises(ValueError, match="must be \\(B, n_x = 2 x 2, n_y\\)"):
        token_attention_loss(M, (2, 2), t)
    with pytest.raises(ValueError, match="multiple of the block's grid"):
        token_attention_loss(M[:, :9], (3, 3), t)
    with pytest.raises(ValueError, match="outside the map"):
        token_attention_loss_literal(M[:1], (4, 4), TokenTargets(torch.tensor([2]), torch.tensor([0]), t.mask[:1]))
    with pytest.raises(ValueError, match="return_maps=True"):
        model_token_attention_loss([], t)
    M2 = torch.softmax(torch.randn(3, 4, 6, dtype=torch.float64), -1)
    both = model_token_attention_loss([(M, (4, 4)), (M2, (2, 2))], t)
    torch.testing.assert_close(both, (token_attention_loss(M, (4, 4), t) + token_attention_loss(M2, (2, 2), t)) / 2)
    empty = TokenTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 8, 8))
    Mg = M.clone().requires_grad_(True)
    zero = token_attention_loss(Mg, (4, 4), empty)
    assert float(zero.detach()) == 0.0
    zero.backward()  # a batch with every caption dropped still runs the same backward
    assert float(Mg.grad.abs().sum()) == 0.0


def test_bfloat16_maps_agree_with_float64():
    """bf16 maps (rounded, u = 2^-8 relative each): the loss, summed in float32, moves by at most 2u (the
    golden's rule, raphael_ref/testing/cases_token_attention.py); measured ~1e-3."""
    M, t = _random_case(5, N=9)
    ref = float(token_attention_loss(M, (4, 4), t))
    low = token_attention_loss(M.to(torch.bfloat16), (4, 4), t)
    assert low.dtype == torch.float32 and abs(float(low) - ref) <= 2 * 2**-8


# ------------------------------------------------------------------------------ model and objective


def _toy(**over):
    return get_preset("toy", {"model.sample_size": 8, "model.use_edge": False, "model.text_encoder": "tiny", **over})


def _batch(B=3, S=8):
    ds = SyntheticShapes(seed=1, image_size=16)
    scenes = [ds.scene(i) for i in range(B)]
    enc = TextEncoder.tiny()
    with torch.no_grad():
        text = enc([s.caption for s in scenes])
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, 3, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return scenes, text, x0, t, torch.randn(x0.shape, generator=g)


def test_model_returns_its_maps_only_when_asked_and_its_output_is_unchanged():
    cfg = _toy()
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()
    _, text, x0, t, _ = _batch()
    with torch.no_grad():
        eps, aux = model(x0, t, text.hidden, text.valid, text.pooled_index)
        eps2, aux2 = model(x0, t, text.hidden, text.valid, text.pooled_index, return_maps=True)
    assert torch.equal(eps, eps2) and all(a.attn_map is None for a in aux)
    assert len(aux2) == 16 and all(a.space_probs is None for a in aux2)
    for a in aux2:
        h, w = a.grid
        assert a.attn_map.shape == (3, h * w, 77)
        torch.testing.assert_close(a.attn_map.sum(-1), torch.ones(3, h * w))  # softmax over the tokens
        assert float(a.attn_map[~text.valid[:, None, :].expand_as(a.attn_map)].abs().max()) == 0  # padding masked
        # the pooled (EOT) column is the edge head's map (Sec. 3.2)
        pooled = a.attn_map[torch.arange(3), :, text.pooled_index].reshape(3, 1, h, w)
        torch.testing.assert_close(pooled, a.pooled_map)


def test_training_losses_adds_the_token_term_only_when_on():
    cfg = _toy()
    sched = NoiseSchedule.make("scaled_linear", 1000)
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()
    scenes, text, x0, t, noise = _batch()
    targets = token_targets(scenes, [s.caption for s in scenes], 77)
    args = (model, sched, x0, t, noise, text.hidden, text.valid, text.pooled_index)
    off = training_losses(*args)
    on = training_losses(*args, token_loss=0.3, token_targets=targets)
    assert "token" not in off and all(a.attn_map is None for a in off["aux"])
    torch.testing.assert_close(on["denoise"], off["denoise"])
    # the pixel masks are 16 x 16, the model's grids 8 .. 1: the same masks pooled to each block's grid
    expect = model_token_attention_loss([(a.attn_map, a.grid) for a in on["aux"]], targets)
    torch.testing.assert_close(on["token"], expect)
    torch.testing.assert_close(on["total"], off["total"] + 0.3 * on["token"])
    both = training_losses(*args, token_loss=0.3, token_targets=targets, balance_loss=0.1)
    torch.testing.assert_close(both["total"], off["total"] + 0.3 * on["token"] + 0.1 * both["balance"])
    on["token"].backward()  # the term reaches every block's cross-attention queries and keys
    for block in model.transformer_blocks():
        for p in (block.to_q.weight, block.to_k.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    last = model.transformer_blocks()[-1]  # its experts act after its map, and no block reads a map after it
    assert all(p.grad is None for p in last.space_experts.parameters())
    assert all(p.grad is None for p in model.conv_out.parameters())
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="token_loss must be a finite number >= 0"):
            training_losses(*args, token_loss=bad, token_targets=targets)
    with pytest.raises(ValueError, match="needs token_targets"):
        training_losses(*args, token_loss=0.3)


def test_config_checks():
    cfg = load_config("toy", overrides=["train.token_loss=0.2", "train.token_words=[\"shape\"]"])
    assert cfg.train.token_loss == 0.2 and tuple(cfg.train.token_words) == ("shape",)
    assert get_preset("toy").train.token_loss == 0.0  # off by default: the paper's loss
    with pytest.raises(ValueError, match="train.token_loss.*train.source='synthetic'"):
        load_config("toy", overrides=["train.token_loss=0.2", "train.source=/data/shards"])
    with pytest.raises(ValueError, match="train.token_loss"):
        load_config("toy", overrides=["train.token_loss=-1"])
    with pytest.raises(ValueError, match="train.token_words"):
        load_config("toy", overrides=["train.token_words=[\"noun\"]"])


# ------------------------------------------------------------------------------ tools/train.py

MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.warmup_steps=2",
         "sample.steps=2", "sample.every=0", "train.keep_ckpts=0", "train.steps=4", "train.log_every=2",
         "train.ckpt_every=4"]


@pytest.mark.parametrize("balance", [0.0, 0.01])
def test_train_logs_the_token_term(tmp_path, balance):
    from raphael_ref.testing import load_tool

    out = tmp_path / "run"
    sets = [*MICRO, "train.token_loss=0.5", f"train.balance_loss={balance}"]
    assert load_tool("train").main(["--out", str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert 0 < r["token"] <= 1
        assert ("balance" in r) == (balance > 0)
        extra = 0.5 * r["token"] + balance * r.get("balance", 0.0)
        assert r["loss"] == pytest.approx(r["denoise"] + r["edge"] + extra, rel=1e-6)
    state = json.loads((out / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["token_window"] == 0.0  # saved after the log line
    assert np.isfinite([r["loss"] for r in recs]).all()
    assert Path(out / "config.json").exists() and json.loads((out / "config.json").read_text())["train"]["token_loss"] == 0.5
