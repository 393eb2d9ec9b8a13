"""The full model: transformer block, 16-block U-Net, presets, edge-supervised objective."""

from __future__ import annotations

import pytest
import torch

from raphael_ref.config import get_preset
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.models import RaphaelUNet, TransformerBlock, build_on_meta, count_parameters
from raphael_ref.objective import training_losses
from raphael_ref.text_encoder import TextEncoder
from raphael_ref.token_attention import TokenTargets

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle"]


def micro_cfg(**overrides):
    """The toy preset at 16x16 with 4-channel-per-group widths: same 16-block layout, seconds on CPU."""
    base = {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8, "model.norm_groups": 4,
            "model.expert_mult": 2, "model.edge_width": 4}
    base.update(overrides)
    return get_preset("toy", base).model


def _text(d_y: int, prompts=PROMPTS):
    enc = TextEncoder.tiny(seed=0)
    assert enc.d_y == d_y
    return enc(prompts)


def _batch(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    edge = (torch.rand(B, 1, cfg.sample_size, cfg.sample_size, generator=g) > 0.8).float()
    return x0, noise, edge


@pytest.mark.parametrize("preset", ["toy", "small", "paper"])
def test_sixteen_blocks_in_sd_layout(preset):
    cfg = get_preset(preset).model
    model = build_on_meta(cfg)
    assert len(model.transformer_blocks()) == 16
    # 2 per level on three down levels, 1 in the middle, 3 per level on three up levels
    assert list(cfg.transformer_down) == [2, 2, 2, 0] and cfg.transformer_mid == 1 and list(cfg.transformer_up) == [0, 3, 3, 3]


@pytest.mark.spec_id("model.unet")
def test_block_grids_and_aux():
    cfg = micro_cfg()
    model = RaphaelUNet(cfg).eval()
    enc = _text(cfg.d_y)
    x0, _, _ = _batch(cfg)
    with torch.no_grad():
        out, aux = model(x0, torch.tensor([3, 900]), enc.hidden, enc.valid, enc.pooled_index, return_masks=True)
    assert out.shape == x0.shape
    s = cfg.sample_size
    assert [a.grid for a in aux] == [(s, s)] * 2 + [(s // 2, s // 2)] * 2 + [(s // 4, s // 4)] * 2 + [(s // 8, s // 8)] \
        + [(s // 4, s // 4)] * 3 + [(s // 2, s // 2)] * 3 + [(s, s)] * 3
    for a in aux:
        assert a.space_routes.shape == (2, cfg.n_y) and a.space_routes.dtype == torch.long
        assert a.time_routes.shape == (2,)
        assert a.edge_logits.shape == (2, 1, *a.grid)
        assert a.masks.shape == (2, a.grid[0] * a.grid[1], cfg.n_y) and a.masks.dtype == torch.bool
        # every text token's mask keeps at least its argmax position (Sec. 3.1 threshold)
        assert a.masks.any(dim=1).all()


@pytest.mark.spec_id("model.unet")
def test_toy_preset_forward_backward_edge_loss():
    """The toy preset itself (32x32 pixels, all 16 blocks) trains one step: finite grads everywhere."""
    cfg = get_preset("toy").model
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).train()
    _randomize(model)  # zero-init proj_out would otherwise block the main path's gradient at step 0
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    t = torch.tensor([10, 700])  # one sample under T_c = 500, one above
    out = training_losses(model, NoiseSchedule.make(T=1000), x0, t, noise, enc.hidden, enc.valid,
                          enc.pooled_index, edge)
    assert torch.isfinite(out["total"]) and out["edge"] > 0 and out["denoise"] > 0
    out["total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    blk = model.transformer_blocks()[0]
    # edge loss reaches P_theta and, through the pooled-token map, the cross-attention projections
    assert blk.edge.convs[0].weight.grad.abs().sum() > 0
    assert blk.to_k.weight.grad.abs().sum() > 0
    # straight-through gates receive gradient (the argmax alone would give none)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.time_gate.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.text_gate.parameters())


@pytest.mark.spec_id("model.unet")
def test_edge_loss_only_below_T_c():
    cfg = micro_cfg()
    model = RaphaelUNet(cfg).train()
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    sched = NoiseSchedule.make(T=1000)
    high = training_losses(model, sched, x0, torch.tensor([600, 999]), noise, enc.hidden, enc.valid, enc.pooled_index, edge)
    assert high["edge"].item() == 0.0
    low = training_losses(model, sched, x0, torch.tensor([0, 499]), noise, enc.hidden, enc.valid, enc.pooled_index, edge)
    assert low["edge"].item() > 0.0


def test_training_losses_read_the_config_through_a_ddp_style_wrapper():
    """A wrapper exposing the model as .module (DDP) gives the same losses: the config is read from it."""

    class Wrapper(torch.nn.Module):  # what DDP looks like to training_losses: .module, no .cfg
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    torch.manual_seed(0)
    cfg = micro_cfg()
    model = RaphaelUNet(cfg).eval()
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    args = (NoiseSchedule.make(T=1000), x0, torch.tensor([3, 800]), noise, enc.hidden, enc.valid, enc.pooled_index, edge)
    direct, wrapped = training_losses(model, *args), training_losses(Wrapper(model), *args)
    assert not hasattr(Wrapper(model), "cfg")
    for k in ("total", "denoise", "edge"):
        assert torch.equal(direct[k], wrapped[k]), k


@pytest.mark.parametrize("switch", ["model.use_space_moe", "model.use_time_moe", "model.use_edge"])
def test_ablation_switches(switch):
    cfg = micro_cfg(**{switch: False})
    model = RaphaelUNet(cfg).train()
    blk = model.transformer_blocks()[0]
    if switch == "model.use_space_moe":
        assert not hasattr(blk, "space_experts") and blk.space_ffn.n_experts == 1
    if switch == "model.use_time_moe":
        assert not hasattr(blk, "time_experts") and blk.time_ffn.n_experts == 1
    if switch == "model.use_edge":
        assert blk.edge is None
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    out = training_losses(model, NoiseSchedule.make(T=1000), x0, torch.tensor([1, 2]), noise, enc.hidden,
                          enc.valid, enc.pooled_index, edge if cfg.use_edge else None)
    out["total"].backward()
    assert torch.isfinite(out["total"])


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised output layers nonzero weights so outputs depend on every block."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.spec_id("model.unet")
def test_train_eval_parity_of_moe_layers():
    """Eval routes are deterministic; with the gate noise off, train mode computes exactly eval mode."""
    cfg = micro_cfg(**{"model.gate_noise_std": 0.0, "model.checkpoint": False})
    model = RaphaelUNet(cfg)
    _randomize(model)
    enc = _text(cfg.d_y)
    x0, _, _ = _batch(cfg)
    t = torch.tensor([5, 800])
    model.eval()
    with torch.no_grad():
        e1, a1 = model(x0, t, enc.hidden, enc.valid, enc.pooled_index)
        e2, a2 = model(x0, t, enc.hidden, enc.valid, enc.pooled_index)
    assert torch.equal(e1, e2)
    assert all(torch.equal(p.space_routes, q.space_routes) and torch.equal(p.time_routes, q.time_routes) for p, q in zip(a1, a2))
    model.train()
    with torch.no_grad():
        e3, a3 = model(x0, t, enc.hidden, enc.valid, enc.pooled_index)
    torch.testing.assert_close(e3, e1, rtol=0, atol=0)
    # and with noise on, training routes do change somewhere (the noise is real)
    noisy = micro_cfg(**{"model.gate_noise_std": 5.0, "model.checkpoint": False})
    model.cfg.gate_noise_std = noisy.gate_noise_std
    with torch.no_grad():
        _, a4 = model(x0, t, enc.hidden, enc.valid, enc.pooled_index)
    assert any(not torch.equal(p.space_routes, q.space_routes) for p, q in zip(a1, a4))


def test_checkpointing_gives_same_loss_and_grads():
    """Recomputation under activation checkpointing replays the same gate noise, routes and grads."""
    cfg_ck = micro_cfg(**{"model.checkpoint": True, "model.gate_noise_std": 5.0})
    cfg_no = micro_cfg(**{"model.checkpoint": False, "model.gate_noise_std": 5.0})
    torch.manual_seed(0)
    m1 = RaphaelUNet(cfg_ck).train()
    _randomize(m1)  # otherwise zero-init proj_out leaves experts and gates without gradient
    m2 = RaphaelUNet(cfg_no).train()
    m2.load_state_dict(m1.state_dict())
    enc = _text(cfg_ck.d_y)
    x0, noise, edge = _batch(cfg_ck)
    t = torch.tensor([3, 300])
    sched = NoiseSchedule.make(T=1000)
    losses = []
    for m in (m1, m2):
        torch.manual_seed(123)  # same gate noise in both runs
        out = training_losses(m, sched, x0, t, noise, enc.hidden, enc.valid, enc.pooled_index, edge)
        out["total"].backward()
        losses.append(out["total"].detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    blk = m1.transformer_blocks()[0]
    assert blk.space_experts.w1.grad.abs().sum() > 0 and any(p.grad.abs().sum() > 0 for p in blk.text_gate.parameters())
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("preset", ["toy"])
def test_bf16_autocast_forward_backward_finite(preset):
    cfg = get_preset(preset).model
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).train()
    _randomize(model)
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_losses(model, NoiseSchedule.make(T=1000), x0, torch.tensor([10, 400]), noise, enc.hidden,
                              enc.valid, enc.pooled_index, edge)
    out["total"].backward()
    assert torch.isfinite(out["total"])
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n


@pytest.mark.slow
def test_bf16_autocast_small_preset_finite():
    cfg = get_preset("small").model
    model = RaphaelUNet(cfg).train()
    B = 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    y = torch.randn(B, cfg.n_y, cfg.d_y, generator=g)
    valid = torch.arange(cfg.n_y)[None] < 12
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_losses(model, NoiseSchedule.make(T=1000), x0, torch.tensor([100]), torch.randn_like(x0), y,
                              valid, torch.tensor([11]), torch.rand(B, 1, cfg.sample_size, cfg.sample_size))
    out["total"].backward()
    assert torch.isfinite(out["total"])
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_preset_is_three_billion():
    counts = count_parameters(build_on_meta(get_preset("paper").model))
    assert abs(counts["total"] - 3.0e9) <= 0.10 * 3.0e9, counts
    assert counts["space_experts"] > 0 and counts["time_experts"] > 0 and counts["resblocks"] > 0


def test_bad_inputs_name_the_problem():
    cfg = micro_cfg()
    model = RaphaelUNet(cfg).eval()
    enc = _text(cfg.d_y)
    x0, _, _ = _batch(cfg)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="x_t must be"):
        model(x0[:, :2], t, enc.hidden, enc.valid, enc.pooled_index)
    with pytest.raises(ValueError, match="multiples of"):
        model(x0[..., :15, :15], t, enc.hidden, enc.valid, enc.pooled_index)
    with pytest.raises(ValueError, match="d_y"):
        model(x0, t, enc.hidden[..., :8], enc.valid, enc.pooled_index)
    with pytest.raises(ValueError, match="integer timesteps"):
        model(x0, t.float(), enc.hidden, enc.valid, enc.pooled_index)
    with pytest.raises(ValueError, match="pooled_index"):
        model(x0, t, enc.hidden, enc.valid, torch.tensor([0, 77]))
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad, t, enc.hidden, enc.valid, enc.pooled_index)


@pytest.mark.slow
def test_overfit_one_batch():
    """Loss on one fixed batch falls by at least half within a few hundred AdamW steps (CPU)."""
    cfg = micro_cfg(**{"model.checkpoint": False, "model.gate_noise_std": 0.0})
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).train()
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    t = torch.tensor([50, 300])
    sched = NoiseSchedule.make(T=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for step in range(300):
        out = training_losses(model, sched, x0, t, noise, enc.hidden, enc.valid, enc.pooled_index, edge)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        first = out["total"].item() if first is None else first
    assert out["total"].item() <= 0.5 * first, (first, out["total"].item())


@pytest.mark.spec_id("model.unet")
@pytest.mark.parametrize("padding", [{}, {"model.attend_padding": True, "model.count_padding": True}],
                         ids=["caption-tokens", "all-77-slots"])
def test_block_equals_composition_of_literal_forms(padding):
    """TransformerBlock (fast forms, SDPA) == the paper's block composed by hand from the literal
    equation functions, in float64: values and gradients (order, residuals, norms, mask source)."""
    from raphael_ref.attention import cross_attention_literal
    from raphael_ref.gates import text_route, time_route
    from raphael_ref.masks import threshold_mask_literal
    from raphael_ref.space_moe import space_moe_literal
    from raphael_ref.time_moe import time_moe_literal

    cfg = micro_cfg(**padding)
    torch.manual_seed(0)
    blk = TransformerBlock(16, cfg.d_y, 64, cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    B, side = 2, 4
    x = torch.randn(B, side * side, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, cfg.n_y, cfg.d_y, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.arange(cfg.n_y)[None] <= torch.tensor([[5], [9]])
    pooled = torch.tensor([5, 9])
    temb = torch.randn(B, 64, generator=g, dtype=torch.float64)

    out, (s_r, t_r, pooled_map, edge_logits, _) = blk(x, (side, side), y, valid, pooled, temb)

    h = x + blk.self_attn(blk.norm1(x))  # self-attention sublayer
    key_valid = None if cfg.attend_padding else valid  # the toy preset attends the caption's tokens only (E72)
    attn, maps = cross_attention_literal(blk.to_q(blk.norm2(h)), blk.to_k(y), blk.to_v(y), blk.heads,
                                         key_valid=key_valid)
    M = maps.mean(dim=1)  # (B, n_x, n_y)
    h_c = h + blk.to_out(attn)  # h_c: the stream after cross-attention
    tr, tw = time_route(blk.time_gate, temb, training=False)
    h_p = h_c + time_moe_literal(blk.norm3(h_c), tr, tw, blk.time_experts)  # h'
    masks = threshold_mask_literal(M.detach(), cfg.mask_alpha)
    sr, sw = text_route(blk.text_gate, y, training=False)
    ref = h_p + space_moe_literal(blk.norm4(h_p), masks, sr, sw, blk.space_experts, valid=valid,
                                  count_padding=cfg.count_padding)
    ref_pooled = torch.stack([M[b, :, pooled[b]] for b in range(B)]).reshape(B, 1, side, side)

    assert torch.equal(s_r, sr) and torch.equal(t_r, tr)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pooled_map, ref_pooled, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(edge_logits, blk.edge(ref_pooled), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((out ** 2).sum() + edge_logits.sum(), (x, y))
    want = torch.autograd.grad((ref ** 2).sum() + blk.edge(ref_pooled).sum(), (x, y))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --- model.prediction = "v" (not in RAPHAEL; erratum E88) ---------------------------------------------------------

def _scrambled(model, seed=0):
    """Non-zero weights everywhere (the output conv and residual branches start at zero), so outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.spec_id("ddpm.eps_from_v")
@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_prediction_unet_returns_the_eps_of_its_v(zero_snr):
    """With the same weights, the "v" U-Net's output is eps_from_v(x_t, t, the "eps" U-Net's output): the network is
    the same, only the reading of its last layer differs. At an untrained (zero) last layer it returns
    sqrt(1 - abar_t) x_t; on a zero-terminal-SNR schedule it returns x_t at t = T - 1, where eps is x_t."""
    from raphael_ref.diffusion import eps_from_v

    cfg_e, cfg_v = micro_cfg(**{"model.prediction": "eps"}), micro_cfg(**{"model.prediction": "v"})
    sched = NoiseSchedule.make("scaled_linear", 1000, zero_terminal_snr=zero_snr)
    torch.manual_seed(0)
    fresh = RaphaelUNet(cfg_v, schedule=sched).eval()
    m_e = _scrambled(RaphaelUNet(cfg_e)).eval()
    m_v = RaphaelUNet(cfg_v, schedule=sched).eval()
    m_v.load_state_dict(m_e.state_dict())  # same keys: the option adds no parameters
    enc = _text(cfg_e.d_y)
    x, _, _ = _batch(cfg_e)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out_e, _ = m_e(x, t, enc.hidden, enc.valid, enc.pooled_index)
        out_v, _ = m_v(x, t, enc.hidden, enc.valid, enc.pooled_index)
        out_0, _ = fresh(x, t, enc.hidden, enc.valid, enc.pooled_index)
    torch.testing.assert_close(out_v, eps_from_v(x, t, out_e, sched), rtol=0, atol=0)
    assert not torch.allclose(out_v, out_e)
    torch.testing.assert_close(out_0, sched.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1) * x)
    if zero_snr:
        torch.testing.assert_close(out_0[1], x[1], rtol=0, atol=0)


def test_v_prediction_needs_its_schedule_and_round_trips_a_checkpoint(tmp_path):
    from raphael_ref.checkpoint import load_model, save_model
    from raphael_ref.models import build_unet, schedule_for

    cfg = get_preset("toy", {"model.prediction": "v", "diffusion.zero_terminal_snr": True})
    # built from the model config alone it holds the default schedule until a loss or sampler gives it theirs,
    # which it keeps; after that (or when given one) another schedule is refused: its eps would be silently wrong
    bare = RaphaelUNet(cfg.model)
    assert bare.schedule.alphas_cumprod[-1] > 0 and not bare.schedule_given  # the default, not this config's
    x0 = torch.rand(2, 3, 24, 24) * 2 - 1
    enc = _text(cfg.model.d_y)
    args = (x0, torch.tensor([3, 900]), torch.randn_like(x0), enc.hidden, enc.valid, enc.pooled_index)
    edge = torch.zeros(2, 1, 24, 24)
    training_losses(bare, schedule_for(cfg), *args, edge_map=edge)
    assert bare.schedule_given and bare.schedule.alphas_cumprod[-1] == 0  # took the config's zero-terminal-SNR one
    with pytest.raises(ValueError, match="different noise schedule"):
        training_losses(bare, NoiseSchedule.make("scaled_linear", 1000), *args, edge_map=edge)
    from raphael_ref.sampling import sample

    with pytest.raises(ValueError, match="different noise schedule"):
        sample(build_unet(cfg), NoiseSchedule.make("scaled_linear", 1000), (enc.hidden, enc.valid, enc.pooled_index),
               None, shape=(2, 3, 24, 24), steps=2)
    with pytest.raises(ValueError, match="model.prediction"):
        get_preset("toy", {"model.prediction": "x0"})
    assert schedule_for(get_preset("toy", {"model.prediction": "eps"})) is None  # the paper's eps: no schedule held
    torch.manual_seed(0)
    model = _scrambled(build_unet(cfg)).eval()
    assert torch.equal(model.schedule.alphas_cumprod, schedule_for(cfg).alphas_cumprod)
    save_model(tmp_path, model, cfg)
    loaded, cfg2 = load_model(tmp_path)
    assert cfg2.model.prediction == "v" and cfg2.diffusion.zero_terminal_snr
    enc = _text(cfg.model.d_y)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 999])
    with torch.no_grad():
        a, _ = model(x, t, enc.hidden, enc.valid, enc.pooled_index)
        b, _ = loaded.eval()(x, t, enc.hidden, enc.valid, enc.pooled_index)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_v_prediction_bf16_autocast_returns_float32_eps():
    """Under bf16 autocast the last layer's v is bf16; x_t's float32 precision is kept in eps = sqrt(abar) v +
    sqrt(1 - abar) x_t (the loss reads eps in float32 anyway)."""
    cfg = micro_cfg(**{"model.prediction": "v"})
    model = RaphaelUNet(cfg, schedule=NoiseSchedule.make("scaled_linear", 1000))
    enc = _text(cfg.d_y)
    x0, noise, edge = _batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(x0, torch.tensor([3, 900]), enc.hidden, enc.valid, enc.pooled_index)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_schedule_check_looks_through_wrappers():
    """check_model_schedule finds a "v" U-Net inside DDP-style ``.module`` and the SR stage's / ControlNet's ``.unet``
    wrappers: a bare U-Net takes the wrapper caller's schedule, and a different one is then refused."""
    from raphael_ref.models import check_model_schedule

    class Wrap(torch.nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            setattr(self, name, inner)

    cfg = micro_cfg(**{"model.prediction": "v"})
    bare = RaphaelUNet(cfg)
    wrapped = Wrap(Wrap(bare, "unet"), "module")
    short = NoiseSchedule.make("scaled_linear", 50)
    check_model_schedule(wrapped, short, "test")
    assert bare.schedule is short and bare.schedule_given
    with pytest.raises(ValueError, match="different noise schedule"):
        check_model_schedule(wrapped, NoiseSchedule.make("scaled_linear", 1000), "test")
    check_model_schedule(Wrap(RaphaelUNet(micro_cfg(**{"model.prediction": "eps"})), "unet"), short, "test")  # eps: no-op


@pytest.mark.parametrize("attend_padding, count_padding", [(False, False), (True, False), (True, True)])
def test_trimmed_text_changes_nothing_only_when_padding_is_ignored(attend_padding, count_padding):
    """TextEncoding.trimmed (tools/train.py cuts the padding slots when neither attended nor counted): the same
    losses and gradients, float64, train mode with the gate noise off, with the token-attention loss on (the default
    run trains with it; its pairs point at caption tokens, all inside the cut). A U-Net that attends to or counts
    the padding does depend on it, so the cut would change its losses: train.py cuts only for (False, False)."""
    cfg = micro_cfg(**{"model.gate_noise_std": 0.0, "model.attend_padding": attend_padding,
                       "model.count_padding": count_padding})
    torch.manual_seed(0)
    model = RaphaelUNet(cfg).double().train()
    _randomize(model)
    enc = _text(cfg.d_y)
    cut = enc.trimmed()
    n = int(enc.pooled_index.max()) + 1
    assert cut.hidden.shape[1] == n < cfg.n_y and torch.equal(cut.hidden, enc.hidden[:, :n])
    assert torch.equal(cut.valid, enc.valid[:, :n]) and cut.valid.sum() == enc.valid.sum()
    x0, noise, edge = (a.double() for a in _batch(cfg))
    sched, t = NoiseSchedule.make(T=1000), torch.tensor([10, 700])

    # token-loss pairs (sample, token) on caption tokens of both prompts, each with a random pixel mask
    S = cfg.sample_size
    pairs = torch.tensor([[0, 1], [0, 2], [0, 6], [1, 3], [1, int(enc.pooled_index[1]) - 1]])
    masks = (torch.rand(len(pairs), S, S, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    targets = TokenTargets(pairs[:, 0].clone(), pairs[:, 1].clone(), masks)

    def run(text):
        model.zero_grad(set_to_none=True)
        out = training_losses(model, sched, x0, t, noise, text.hidden.double(), text.valid, text.pooled_index, edge,
                              balance_loss=0.01, token_loss=0.05, token_targets=targets)
        out["total"].backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    (full, g_full), (short, g_short) = run(enc), run(cut)
    same = all(torch.allclose(full[k], short[k], rtol=1e-10, atol=1e-12)
               for k in ("total", "denoise", "edge", "balance", "token"))
    if (attend_padding, count_padding) == (False, False):
        assert same
        assert g_full.keys() == g_short.keys()
        for k in g_full:
            torch.testing.assert_close(g_short[k], g_full[k], rtol=1e-9, atol=1e-12)
    else:
        assert not same
