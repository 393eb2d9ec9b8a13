"""Attend-and-Excite at sampling time (raphael_ref/excite.py, erratum E84; not in RAPHAEL).

- ``excite_loss``: fast == literal (values and gradients), known values, range, invariances, errors;
- ``Excite``: step sizes, grid choice, the update lowers the loss along its gradient, a batch without subjects
  keeps its latents;
- ``sampling.sample(excite=...)``: off is bit for bit the plain sampler, on changes only the samples with
  subjects, the attention recorder skips the update's model calls, and the tool's flags.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.excite import Excite, excite_loss, excite_loss_literal, gaussian_kernel, word_tokens

pytestmark = pytest.mark.spec_id("excite.loss")


def _maps(gen, B, grid, n_y, temp=2.0, dtype=torch.float64):
    return torch.softmax(temp * torch.randn(B, grid[0] * grid[1], n_y, generator=gen, dtype=dtype), dim=-1)


def _words(B, n_y, n_words):
    """Word tokens 1..n_words (SOT at 0, EOT at n_words + 1, padding after)."""
    valid = torch.zeros(B, n_y, dtype=torch.bool)
    valid[:, :n_words + 2] = True
    return word_tokens(valid, torch.full((B,), n_words + 1))


def test_gaussian_kernel_is_normalised_and_symmetric():
    g = gaussian_kernel(0.5)
    assert g.shape == (3, 3) and abs(float(g.sum()) - 1) < 1e-15
    assert torch.equal(g, g.T) and torch.equal(g, g.flip(0)) and int(g.argmax()) == 4
    # the centre over an edge neighbour is exp(1 / (2 sigma^2)) = e^2 at sigma 0.5
    assert math.isclose(float(g[1, 1] / g[0, 1]), math.e ** 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel(0.0)


def test_word_tokens_leave_out_sot_eot_and_padding():
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    w = word_tokens(valid, torch.tensor([3, 5]))
    assert w.tolist() == [[False, True, True, False, False, False], [False, True, True, True, True, False]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), grid=st.sampled_from([(2, 2), (3, 4), (4, 4), (5, 3)]),
       B=st.integers(1, 3), n_words=st.integers(2, 5))
def test_fast_equals_literal_values_and_gradients(seed, grid, B, n_words):
    gen = torch.Generator().manual_seed(seed)
    n_y = n_words + 3
    M = _maps(gen, B, grid, n_y).requires_grad_(True)
    words = _words(B, n_y, n_words)
    # each sample 0..n_words subjects (sample 0 always at least one), repeats allowed
    subjects = [torch.randint(1, n_words + 1, (int(torch.randint(1 if b == 0 else 0, n_words + 1, (1,),
                                                                 generator=gen)),), generator=gen).tolist()
                for b in range(B)]
    fast, lit = excite_loss(M, grid, subjects, words), excite_loss_literal(M, grid, subjects, words)
    torch.testing.assert_close(fast, lit, rtol=1e-12, atol=1e-12)
    g_fast, = torch.autograd.grad(fast, M)
    g_lit, = torch.autograd.grad(lit, M)
    torch.testing.assert_close(g_fast, g_lit, rtol=1e-10, atol=1e-12)
    assert 0 <= float(fast.detach()) <= sum(1 for s in subjects if s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_equals_literal_at_zero_tiny_and_tied_maps(dtype):
    """The inputs a softmax at temperature 2 never draws: a cell whose word tokens hold no attention (0 / 0 := 0 in
    both forms, no NaN in the gradient), cells where they hold ~1e-14 (SOT takes the rest; no clamping may change
    Abar there), and a uniform map whose peaks all tie (both forms share the gradient evenly among them)."""
    grid, n_y = (3, 3), 5
    words = _words(1, n_y, 2)
    zero = torch.softmax(torch.randn(1, 9, n_y, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    zero[0, 4, 1:3] = 0.0  # the centre cell: all attention on SOT / EOT
    tiny = torch.full((1, 9, n_y), 1e-14, dtype=torch.float64)
    tiny[..., 0] = 1 - 4e-14
    tiny[0, :, 1] *= torch.linspace(1, 3, 9, dtype=torch.float64)
    tied = torch.full((1, 9, n_y), 0.2, dtype=torch.float64)
    for M in (zero, tiny, tied):
        M = M.to(dtype).clone().requires_grad_(True)
        fast, lit = excite_loss(M, grid, [[1, 2]], words), excite_loss_literal(M, grid, [[1, 2]], words)
        torch.testing.assert_close(fast, lit, rtol=1e-6, atol=1e-7)
        g_fast, = torch.autograd.grad(fast, M)
        g_lit, = torch.autograd.grad(lit, M)
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_lit, rtol=1e-5, atol=1e-6)
    # the tiny cells are read as they are: token 1's share ranges over 1 / 2 .. 3 / 4 of the word attention
    lit_tiny = float(excite_loss_literal(tiny, grid, [[1]], words))
    assert 0.25 < lit_tiny < 0.5


def test_known_values():
    grid, n_y = (3, 3), 5  # SOT, 2 words, EOT, pad
    words = _words(1, n_y, 2)
    M = torch.zeros(1, 9, n_y, dtype=torch.float64)
    M[0, :, 0] = 0.5  # SOT holds half of every cell: left out of Abar
    M[0, :, 1] = 0.25
    M[0, :, 2] = 0.25
    # every cell's word attention splits evenly: Abar = 0.5 everywhere, smoothing keeps a constant, L = 0.5
    assert float(excite_loss(M, grid, [[1]], words)) == pytest.approx(0.5, abs=1e-15)
    # token 1 takes all word attention in the centre cell only: Abar_1 = one-hot centre; its smoothed peak is the
    # kernel's centre weight; token 2's Abar is 1 - that, whose smoothed peak at a corner sees no centre
    M2 = torch.zeros(1, 9, n_y, dtype=torch.float64)
    M2[0, :, 2] = 1.0
    M2[0, 4, 1], M2[0, 4, 2] = 1.0, 0.0
    g = gaussian_kernel()
    L1 = float(excite_loss(M2, grid, [[1]], words))
    assert L1 == pytest.approx(1 - float(g[1, 1]), abs=1e-14)
    # token 2: Abar_2 = 1 but 0 at the centre. With reflected borders a corner cell's neighbourhood holds the centre
    # four times (its diagonal, mirrored both ways; smoothed 1 - 4 g00), an edge cell's twice (1 - 2 g01 < 1 - 4 g00):
    # the peak is at a corner, L_2 = 4 g00
    L2 = float(excite_loss(M2, grid, [[2]], words))
    assert L2 == pytest.approx(4 * float(g[0, 0]), abs=1e-14)
    # the loss of a subject set is the max over its subjects (the most neglected one)
    assert float(excite_loss(M2, grid, [[1, 2]], words)) == pytest.approx(max(L1, L2), abs=1e-15)
    # over a batch: the sum of the samples' losses; a sample without subjects adds nothing
    M3 = torch.cat([M2, M2, M])
    words3 = _words(3, n_y, 2)
    assert float(excite_loss(M3, grid, [[1], [], [1]], words3)) == pytest.approx(L1 + 0.5, abs=1e-14)


def test_invariances():
    gen = torch.Generator().manual_seed(3)
    grid, n_y = (4, 4), 6
    M = _maps(gen, 2, grid, n_y)
    words = _words(2, n_y, 3)
    subj = [[1, 3], [2]]
    L = excite_loss(M, grid, subj, words)
    # attention on SOT, EOT or padding does not matter (Abar renormalises over the word tokens)
    M_more = M.clone()
    M_more[..., 0] *= 5
    M_more[..., 4:] *= 3
    torch.testing.assert_close(excite_loss(M_more, grid, subj, words), L, rtol=1e-12, atol=1e-12)
    # a common positive scale of a cell's word tokens does not matter either
    scale = torch.rand(2, 16, 1, generator=gen, dtype=torch.float64) + 0.5
    torch.testing.assert_close(excite_loss(M * scale, grid, subj, words), L, rtol=1e-12, atol=1e-12)
    # the order of a sample's subjects does not matter; a transposed grid with transposed maps gives the same loss
    torch.testing.assert_close(excite_loss(M, grid, [[3, 1], [2]], words), L, rtol=0, atol=0)
    Mt = M.reshape(2, 4, 4, n_y).transpose(1, 2).reshape(2, 16, n_y)
    torch.testing.assert_close(excite_loss(Mt, grid, subj, words), L, rtol=1e-12, atol=1e-12)


def test_loss_errors():
    M = torch.softmax(torch.randn(1, 9, 5), -1)
    words = _words(1, 5, 2)
    with pytest.raises(ValueError, match=r"\(B, n_x = 4 x 4"):
        excite_loss(M, (4, 4), [[1]], words)
    with pytest.raises(ValueError, match="not one of its caption's word tokens"):
        excite_loss(M, (3, 3), [[0]], words)  # SOT
    with pytest.raises(ValueError, match="not one of its caption's word tokens"):
        excite_loss(M, (3, 3), [[3]], words)  # EOT
    with pytest.raises(ValueError, match="one list of token indices per sample"):
        excite_loss(M, (3, 3), [[1], [1]], words)
    with pytest.raises(ValueError, match="bool"):
        excite_loss(M, (3, 3), [[1]], words.long())
    assert float(excite_loss(M, (3, 3), [[]], words)) == 0.0


def test_bfloat16_maps_agree_with_float64():
    """bf16 maps (u = 2^-8): Abar = M_s / sum M_words moves by ~2u relative, the 9-term smoothing and the peak by as
    much; L = 1 - peak with peak <= 1: |Delta L| <= 3u ~ 1.2e-2 per sample, checked at 2e-2 for 2 samples."""
    gen = torch.Generator().manual_seed(5)
    M = _maps(gen, 2, (6, 6), 8)
    words = _words(2, 8, 4)
    subj = [[1, 4], [2, 3]]
    ref = float(excite_loss(M, (6, 6), subj, words))
    got = excite_loss(M.bfloat16(), (6, 6), subj, words)
    assert got.dtype == torch.float32
    assert abs(float(got) - ref) < 2e-2


# ------------------------------------------------------------------------------ the update


def test_excite_settings_and_step_sizes():
    ex = Excite([(1, 2)], scale=20.0, steps=3)
    assert [ex.alpha(i, 10) for i in range(5)] == [20.0, 19.0, 18.0, 0.0, 0.0]  # scale (1 - i / 20)
    assert Excite([()], steps=20).alpha(19, 20) == pytest.approx(20 * (1 - 19 / 40))
    assert ex.pick_grid([(8, 8), (4, 4), (8, 8), (2, 2)]) == (4, 4)
    assert ex.pick_grid([(4, 4)]) == (4, 4)
    assert Excite([()], grid=(8, 8)).pick_grid([(8, 8), (4, 4)]) == (8, 8)
    with pytest.raises(ValueError, match="not a transformer block's grid"):
        Excite([()], grid=(5, 5)).pick_grid([(8, 8), (4, 4)])
    for bad in (dict(scale=-1.0), dict(scale=float("nan")), dict(steps=-1), dict(steps=2.5), dict(grid=(1, 4)),
                dict(sigma=0.0)):
        with pytest.raises(ValueError, match="excite"):
            Excite([(1,)], **bad)


PROMPTS = ["a red circle on the left and a blue square on the right", "a green triangle at the top"]


@pytest.fixture(scope="module")
def setup():
    from raphael_ref.config import get_preset
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.models import RaphaelUNet
    from raphael_ref.text_encoder import TextEncoder

    base = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
            "model.expert_mult": 2, "model.edge_width": 4}
    cfg = get_preset("toy", base).model
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every change
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = TextEncoder.tiny(seed=0)
    text, empty = enc(PROMPTS), enc([""])
    sched = NoiseSchedule.make("linear", 1000)
    return cfg, model, text, empty, sched


def _cond(c):
    return (c.hidden, c.valid, c.pooled_index)


def test_update_descends_the_loss_and_leaves_samples_without_subjects(setup):
    from raphael_ref.excite import excite_loss

    cfg, model, text, _, _ = setup
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([900, 900])
    ex = Excite([(3, 10), ()], scale=1.0)

    def loss(z):
        _, aux = model(z, t, *_cond(text), return_maps=True)
        grid = ex.pick_grid([a.grid for a in aux])
        M = torch.stack([a.attn_map for a in aux if tuple(a.grid) == grid]).mean(0)
        return excite_loss(M, grid, ex.subjects, word_tokens(text.valid, text.pooled_index))

    with torch.no_grad():
        L0 = float(loss(x))
    x1, L = ex.update(model, x, t, _cond(text), alpha=1.0)
    assert float(L) == pytest.approx(L0, rel=1e-6)
    assert not x1.requires_grad and x1.shape == x.shape
    assert torch.equal(x1[1], x[1]) and not torch.equal(x1[0], x[0])  # sample 1 has no subject
    # x1 - x = -alpha grad: a small step along it lowers L by about alpha |grad|^2 (first order)
    g = (x - x1)[0]
    eps = 1e-3 / float(g.norm())
    with torch.no_grad():
        L_step = float(loss(torch.stack([x[0] - eps * g, x[1]])))
    assert L_step < L0
    assert (L0 - L_step) == pytest.approx(eps * float(g.norm()) ** 2, rel=0.1)
    # a batch with no subject at all keeps its latents, bit for bit
    x2, L2 = Excite([(), ()]).update(model, x, t, _cond(text), alpha=5.0)
    assert torch.equal(x2, x) and float(L2) == 0.0


def test_sample_off_is_the_plain_sampler_and_on_moves_only_the_subject_samples(setup):
    from raphael_ref.sampling import sample

    cfg, model, text, empty, sched = setup
    shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kw = dict(shape=shape, steps=4, guidance=7.5)

    def run(excite):
        return sample(model, sched, _cond(text), _cond(empty), generator=torch.Generator().manual_seed(0),
                      excite=excite, **kw)[0]

    plain = run(None)
    assert torch.equal(run(Excite([(3, 10), (3,)], scale=0.0)), plain)  # scale 0: no update
    assert torch.equal(run(Excite([(3, 10), (3,)], scale=50.0, steps=0)), plain)  # no step updated
    on = run(Excite([(3, 10), ()], scale=50.0, steps=2))
    assert torch.isfinite(on).all() and not torch.equal(on[0], plain[0])
    assert torch.equal(on[1], plain[1])  # no subject: untouched (each sample's latent moves by its own gradient)
    assert model.training is False


def test_sample_and_tool_errors(setup, tmp_path, capsys):
    from raphael_ref.sampling import sample
    from raphael_ref.testing import load_tool

    cfg, model, text, empty, sched = setup
    shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    with pytest.raises(ValueError, match="subject lists for 1 samples"):
        sample(model, sched, _cond(text), None, shape=shape, steps=2, excite=Excite([(3,)]))
    with pytest.raises(ValueError, match="raphael_ref.excite.Excite"):
        sample(model, sched, _cond(text), None, shape=shape, steps=2, excite={"scale": 1})
    E = load_tool("evaluate")
    for argv, msg in ((["--excite-scale", "-1"], "--excite-scale must be"),
                      (["--excite-scale", "5", "--sampler", "euler", "--attention", "0"], "needs --sampler ddim"),
                      (["--excite-scale", "5", "--excite-steps", "0"], "--excite-steps must be"),
                      (["--excite-scale", "5", "--unconditional"], "needs a checkpoint and prompts"),
                      (["--excite-scale", "5", "--excite-words", "shape", "shape"], "name each word kind once"),
                      (["--excite-steps", "5"], "without --excite-scale")):
        # --reference matched stands in for a checkpoint (parse_args stops at the excite checks first)
        with pytest.raises(SystemExit):
            E.parse_args(["--reference", "matched", "--out", str(tmp_path)] + argv)
        assert msg in capsys.readouterr().err


def test_excite_subjects_of_benchmark_prompts():
    from raphael_ref.evaluation.prompts import evaluation_prompts
    from raphael_ref.testing import load_tool
    from raphael_ref.text_encoder import clip_tokenizer

    E = load_tool("evaluate")
    tok = clip_tokenizer()
    specs = evaluation_prompts(["two_objects", "counting", "single_object"], 4, image_size=24)
    for spec in (s for c in specs.values() for s in c):
        ids = tok.encode(spec.prompt)
        for words, names in ((["shape"], {o.shape for o in spec.scene.objects}),
                             (["position"], None)):
            (subj,) = E.excite_subjects(spec, 77, words)
            pieces = [tok.decode([ids[j - 1]]).strip() for j in subj]  # token j of the caption = ids[j - 1] (SOT 0)
            if names is not None:
                assert set(pieces) <= {n for s in names for n in (s, s + "s", "tri", "angles")} and pieces
            else:
                assert set(pieces) <= {"left", "right", "top", "bottom", "center"}
                assert len(pieces) == len(spec.scene.objects)


def test_attention_recorder_skips_the_update_calls(setup):
    """The evaluation's attention views count sampler steps by model calls; the update's calls (maps with gradient)
    must be neither counted nor recorded, so the views show the same steps with and without the update."""
    from raphael_ref.evaluation.attention_views import collect_attention

    cfg, model, text, empty, sched = setup
    shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kw = dict(shape=shape, steps=4, guidance=7.5, record_steps=[0, 3])
    _, plain = collect_attention(model, sched, _cond(text), _cond(empty), generator=torch.Generator().manual_seed(0),
                                 **kw)
    _, on = collect_attention(model, sched, _cond(text), _cond(empty), generator=torch.Generator().manual_seed(0),
                              excite=Excite([(3, 10), (3,)], scale=50.0, steps=2), **kw)
    assert plain.timesteps == on.timesteps and sorted(on.pooled) == [0, 3]
    assert len(on.pooled[0]) == len(plain.pooled[0]) == sum(1 for _ in on.grids) > 0
    # the update runs before step 0's sampler call, so the maps recorded at step 0 already see the moved latent
    assert not torch.equal(on.pooled[0][0][0], plain.pooled[0][0][0])
