"""Issue 11, items 4-5: expert-usage monitoring, the optional load-balancing loss (erratum E73), TensorBoard.

- ``raphael_ref.monitoring.ExpertUsage``: counts equal a literal count, entropy, the collapse rule, strict
  JSON, the DDP sum (simulated in one process), the checkpoint window state;
- ``raphael_ref.balance``: fast == literal (values and gradients), known values, the gradient, the mean
  over the model's layers, its place in ``training_losses``, and that it spreads the routes on a toy run;
- ``tools/train.py``: ``expert_usage`` in log.jsonl, the collapse warning, ``expert_usage.png``, the
  window across a resume, and the TensorBoard option (its missing-package error; the writer when the
  package is importable).

Runs are micro models (16 x 16 px, width 16) trained for a few steps in-process, as in test_faults_train.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raphael_ref import monitoring as MON
from raphael_ref import training as T
from raphael_ref.balance import balance_loss, balance_loss_literal, model_balance_loss
from raphael_ref.config import get_preset, load_config
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.models import RaphaelUNet
from raphael_ref.monitoring import ExpertUsage, chance_min_items, collapse_warning, plot_expert_usage
from raphael_ref.objective import training_losses

MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.warmup_steps=2",
         "sample.steps=2", "sample.every=0", "train.keep_ckpts=0"]


def _aux(space=None, time=None, index=0):
    """A stand-in for models.BlockAux with only what the monitoring reads."""
    return SimpleNamespace(index=index, space_routes=space, time_routes=time)


def _literal_usage(aux_steps, y_valids, n_blocks, k_s, k_t):
    """Counts by plain loops: (n_blocks, k_s) space over valid tokens, (n_blocks, k_t) time over samples."""
    cs = [[0] * k_s for _ in range(n_blocks)]
    ct = [[0] * k_t for _ in range(n_blocks)]
    for aux, valid in zip(aux_steps, y_valids):
        for a in aux:
            B, n_y = a.space_routes.shape
            for b in range(B):
                for i in range(n_y):
                    if valid is None or valid[b, i]:
                        cs[a.index][int(a.space_routes[b, i])] += 1
                cs_t = int(a.time_routes[b])
                ct[a.index][cs_t] += 1
    return cs, ct


# ------------------------------------------------------------------------------ ExpertUsage


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 3), B=st.integers(1, 3), n_y=st.integers(1, 5),
       k_s=st.integers(1, 6), k_t=st.integers(1, 4), n_blocks=st.integers(1, 3), masked=st.booleans())
def test_usage_counts_fractions_and_entropy_equal_a_literal_count(seed, steps, B, n_y, k_s, k_t, n_blocks, masked):
    g = torch.Generator().manual_seed(seed)
    usage = ExpertUsage(n_blocks, k_s, k_t, min_items=1)
    aux_steps, valids = [], []
    for _ in range(steps):
        aux = [_aux(torch.randint(0, k_s, (B, n_y), generator=g), torch.randint(0, k_t, (B,), generator=g), j)
               for j in range(n_blocks)]
        valid = (torch.rand(B, n_y, generator=g) < 0.6) if masked else None
        usage.update(aux, valid)
        aux_steps.append(aux)
        valids.append(valid)
    cs, ct = _literal_usage(aux_steps, valids, n_blocks, k_s, k_t)
    s = usage.summary()
    assert s["steps"] == steps
    for name, counts, k in (("space", cs, k_s), ("time", ct, k_t)):
        got = s[name]
        assert got["n_experts"] == k and got["items"] == [sum(r) for r in counts]
        for b, row in enumerate(counts):
            n = sum(row)
            if n == 0:
                assert got["fractions"][b] is None and got["entropy"][b] is None
                continue
            f = [c / n for c in row]
            assert got["fractions"][b] == pytest.approx(f, abs=1e-6)
            h = -sum(p * math.log(p) for p in f if p > 0)
            assert got["entropy"][b] == pytest.approx(h, abs=1e-6)
            assert got["entropy_norm"][b] == (None if k == 1 else pytest.approx(h / math.log(k), abs=1e-6))
            one = k > 1 and max(row) == n
            assert (b in got["collapsed"]) == one
    json.dumps(s, allow_nan=False)  # strict JSON, as log.jsonl


def test_padding_tokens_are_not_counted():
    routes = torch.tensor([[0, 1, 2, 2, 2]])  # (1, 5): tokens 3 and 4 are padding, routed to expert 2
    valid = torch.tensor([[True, True, True, False, False]])
    usage = ExpertUsage(1, 3, 0, min_items=1)
    usage.update([_aux(routes, None)], valid)
    s = usage.summary()
    assert s["space"]["items"] == [3] and s["space"]["fractions"][0] == pytest.approx([1 / 3] * 3)
    assert s["space"]["entropy_norm"][0] == pytest.approx(1.0) and s["time"] is None
    usage.reset()
    usage.update([_aux(routes, None)])  # no mask: every slot counts
    assert usage.summary()["space"]["fractions"][0] == pytest.approx([0.2, 0.2, 0.6])


def test_micro_batches_count_items_of_every_forward_and_one_step():
    """Gradient accumulation: K forwards per optimizer step add all their routes but one step to the window."""
    usage = ExpertUsage(1, 2, 2, min_items=1)
    aux = [_aux(torch.tensor([[0, 1]]), torch.tensor([1]))]
    for k in range(3):  # K = 3 micro-batches of one optimizer step
        usage.update(aux, count_step=k == 2)
    s = usage.summary()
    assert s["steps"] == 1 and s["space"]["items"] == [6] and s["time"]["items"] == [3]
    usage.update(aux)  # the default: one forward = one step
    assert usage.summary()["steps"] == 2


def test_collapse_needs_one_expert_for_the_whole_window_and_enough_items():
    assert chance_min_items(4) == 11 and chance_min_items(6) == 9 and chance_min_items(2) == 21
    for k in (2, 4, 6):  # the smallest N with k^(1-N) <= 1e-6
        n = chance_min_items(k)
        assert k ** (1 - n) <= 1e-6 < k ** (2 - n)
    usage = ExpertUsage(2, 0, 4)
    for step in range(3):  # block 0: every sample to expert 2; block 1: one sample goes to expert 0 at step 1
        t1 = torch.tensor([0, 1, 1, 1]) if step == 1 else torch.ones(4, dtype=torch.long)
        usage.update([_aux(None, torch.full((4,), 2), 0), _aux(None, t1, 1)])
        s = usage.summary()["time"]
        assert s["collapsed"] == ([0] if 4 * (step + 1) >= 11 else []), step  # 12 samples after 3 steps
    assert s["fractions"][0] == [0.0, 0.0, 1.0, 0.0] and s["entropy"][0] == 0.0 and s["entropy_norm"][0] == 0.0
    assert ExpertUsage(2, 0, 4, min_items=1).summary()["time"]["collapsed"] == []  # no items: not collapsed
    one = ExpertUsage(1, 1, 0, min_items=1)  # a single expert cannot collapse
    one.update([_aux(torch.zeros(2, 3, dtype=torch.long), None)])
    assert one.summary()["space"]["collapsed"] == [] and one.summary()["space"]["entropy_norm"] == [None]


def test_summary_does_not_consume_the_window_and_reset_clears_it():
    usage = ExpertUsage(1, 2, 2)
    usage.update([_aux(torch.tensor([[0, 1]]), torch.tensor([1]))])
    a, b = usage.summary(), usage.summary()
    assert a == b and a["space"]["items"] == [2] and a["time"]["items"] == [1]
    usage.reset()
    s = usage.summary()
    assert s["steps"] == 0 and s["space"]["items"] == [0] and s["space"]["fractions"] == [None]


def test_usage_sums_the_ranks_under_a_process_group(monkeypatch):
    """Under DDP the window's counts are all-reduced (summed) before the read-out; simulated with 3 ranks of
    identical counts in one process. The local counts are left as they were."""
    usage = ExpertUsage(1, 3, 2, min_items=1)
    usage.update([_aux(torch.tensor([[0, 0, 2]]), torch.tensor([1]))])
    calls = []

    def all_reduce(t):
        calls.append(t.shape)
        t.mul_(3)  # three ranks, each with these counts

    monkeypatch.setattr(MON.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(MON.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(MON.dist, "all_reduce", all_reduce)
    s = usage.summary()
    assert calls == [torch.Size([1, 5])]  # one collective for both MoEs
    assert s["space"]["items"] == [9] and s["space"]["fractions"][0] == pytest.approx([2 / 3, 0, 1 / 3])
    assert s["time"]["items"] == [3] and usage.counts.sum() == 4


def test_window_state_round_trip_and_ranks():
    usage = ExpertUsage(2, 3, 2)
    usage.update([_aux(torch.tensor([[0, 2]]), torch.tensor([1]), 0),
                  _aux(torch.tensor([[1, 1]]), torch.tensor([0]), 1)])
    state = json.loads(json.dumps(usage.window_state()))  # through state.json
    r0, r1 = ExpertUsage(2, 3, 2), ExpertUsage(2, 3, 2)
    r0.load_window_state(state, rank=0)
    r1.load_window_state(state, rank=1)
    assert torch.equal(r0.counts, usage.counts) and r0.steps == 1
    assert r1.counts.sum() == 0 and r1.steps == 1  # the next all-reduce counts each item once
    other = ExpertUsage(2, 6, 4)
    other.load_window_state(state)  # another model's counts: a fresh window
    assert other.counts.sum() == 0 and other.steps == 0
    other.load_window_state(None)
    assert other.steps == 0


def test_update_checks_the_model():
    with pytest.raises(ValueError, match="n_space = 0"):
        ExpertUsage(1, 0, 2).update([_aux(torch.zeros(1, 2, dtype=torch.long), None)])
    with pytest.raises(ValueError, match="block index 3"):
        ExpertUsage(2, 2, 2).update([_aux(None, torch.zeros(1, dtype=torch.long), 3)])
    with pytest.raises(ValueError, match="y_valid"):
        ExpertUsage(1, 2, 0).update([_aux(torch.zeros(1, 2, dtype=torch.long), None)],
                                    torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_blocks"):
        ExpertUsage(0, 2, 2)


def test_usage_of_a_real_forward_counts_every_block():
    cfg = get_preset("toy", {"model.sample_size": 8, "model.use_edge": False, "model.text_encoder": "tiny"})
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()
    B, n_y = 2, 77
    y, valid = torch.randn(B, n_y, cfg.model.d_y), torch.zeros(B, n_y, dtype=torch.bool)
    valid[0, :5], valid[1, :9] = True, True
    _, aux = model(torch.randn(B, 3, 8, 8), torch.tensor([3, 900]), y, valid, torch.tensor([4, 8]))
    usage = ExpertUsage.for_config(cfg)
    usage.update(aux, valid)
    s = usage.summary()
    assert s["space"]["items"] == [14] * 16 and s["time"]["items"] == [2] * 16
    for a in aux:  # the counts are the routes of that block
        assert s["space"]["fractions"][a.index][int(a.space_routes[0, 0])] > 0
        assert s["time"]["fractions"][a.index][int(a.time_routes[1])] > 0


def test_collapse_warning_names_block_moe_and_remedy():
    usage = ExpertUsage(3, 2, 4, min_items=1)
    usage.update([_aux(torch.tensor([[0, 1]]), torch.tensor([3]), 0),
                  _aux(torch.tensor([[1, 1]]), torch.tensor([0]), 1),
                  _aux(torch.tensor([[0, 1]]), torch.tensor([1]), 2)])
    s = usage.summary()
    msg = collapse_warning(s, step=40)
    assert "\n" not in msg and "step 40" in msg
    assert "space-MoE of block 1 (expert 1)" in msg
    assert "time-MoE of blocks 0 (expert 3), 1 (expert 0), 2 (expert 1)" in msg
    assert "model.gate_noise_std" in msg and "train.balance_loss" in msg
    usage.reset()
    usage.update([_aux(torch.tensor([[0, 1]]), torch.tensor([3]), 0)])
    assert "space-MoE" not in collapse_warning(usage.summary(), 1)
    assert collapse_warning({"steps": 1, "space": None, "time": None}, 1) is None


def test_plot_expert_usage_draws_the_last_window(tmp_path):
    usage = ExpertUsage(3, 4, 2, min_items=1)
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}]  # lines without usage are skipped
    for step in (3, 6):
        usage.update([_aux(torch.tensor([[0, 1, 2]]), torch.tensor([1]), j) for j in range(3)])
        records.append({"step": step, "expert_usage": usage.summary()})
        usage.reset()
    plot_expert_usage(records, tmp_path / "u.png")
    with Image.open(tmp_path / "u.png") as im:
        assert im.format == "PNG" and im.size[0] >= 560
        px = im.convert("RGB").load()
        heatmap_h = 52 + 3 * 34  # the rows of the last window (the entropy lines below draw the time-MoE in red)
        reds = sum(1 for x in range(im.size[0]) for y in range(heatmap_h) if px[x, y][0] > 150 > px[x, y][1])
    assert reds > 50, "the collapsed time-MoE rows (all samples to expert 1) are drawn in red"
    plot_expert_usage(records[:2], tmp_path / "empty.png")  # no window yet: a placeholder, no error
    assert (tmp_path / "empty.png").is_file() and not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------ balance loss (E73)


def _draw(seed, shape, n, masked):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(*shape, n, generator=g, dtype=torch.float64), -1)
    routes = torch.randint(0, n, shape, generator=g)
    valid = (torch.rand(shape, generator=g) < 0.7) if masked else None
    return probs, routes, valid


@pytest.mark.spec_id("moe.balance_loss")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), n_y=st.integers(0, 5), n=st.integers(1, 6),
       masked=st.booleans(), per_sample=st.booleans())
def test_balance_loss_fast_equals_literal(seed, B, n_y, n, masked, per_sample):
    shape = (B,) if per_sample else (B, n_y)
    probs, routes, valid = _draw(seed, shape, n, masked)
    p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    fast, lit = balance_loss(p1, routes, valid), balance_loss_literal(p2, routes, valid)
    torch.testing.assert_close(fast, lit, rtol=1e-12, atol=1e-12)
    fast.backward()
    lit.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-12, atol=1e-12)
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):  # the half inputs accumulate in float32
        got = balance_loss(probs.to(dt), routes, valid)
        assert got.dtype == torch.float32 and abs(float(got) - float(lit.detach())) <= tol * max(1.0, float(lit.detach()))


@pytest.mark.spec_id("moe.balance_loss")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), reps=st.integers(1, 4))
def test_balance_loss_known_values(seed, n, reps):
    """Even routes: L = sum_i P_i = 1 whatever the probabilities. All items to one expert i: L = n P_i,
    n when its probability is 1. Its gradient w.r.t. p_i(x) is n f_i / N for every counted item, 0 for the
    others: the experts that take more items are pushed down more."""
    g = torch.Generator().manual_seed(seed)
    N = n * reps
    probs = torch.softmax(torch.randn(N, n, generator=g, dtype=torch.float64), -1).requires_grad_()
    even = torch.arange(N) % n  # every expert takes reps items
    torch.testing.assert_close(balance_loss(probs, even), torch.tensor(1.0, dtype=torch.float64))
    one = torch.full((N,), 1)
    torch.testing.assert_close(balance_loss(probs, one), n * probs[:, 1].mean())
    hard = torch.nn.functional.one_hot(one, n).double()
    torch.testing.assert_close(balance_loss(hard, one), torch.tensor(float(n), dtype=torch.float64))
    routes = torch.randint(0, n, (N,), generator=g)
    valid = torch.rand(N, generator=g) < 0.6
    balance_loss(probs, routes, valid).backward()
    k = int(valid.sum())
    f = torch.bincount(routes[valid], minlength=n).double() / max(k, 1)
    want = torch.where(valid[:, None], n * f[None, :] / max(k, 1), torch.zeros(()))  # (N, n)
    torch.testing.assert_close(probs.grad, want.double())


@pytest.mark.spec_id("moe.balance_loss")
def test_balance_loss_edge_cases_and_errors():
    probs = torch.full((2, 3), 1 / 3, requires_grad=True)
    none = torch.zeros(2, dtype=torch.bool)
    for fn in (balance_loss, balance_loss_literal):
        z = fn(probs, torch.tensor([0, 1]), none)  # no counted item: 0, still in the graph
        assert float(z.detach()) == 0.0 and z.requires_grad
    with pytest.raises(ValueError, match="routes must be a torch.long tensor of shape \\(2,\\)"):
        balance_loss(probs, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="valid must be None or a torch.bool"):
        balance_loss(probs, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="probs must be a floating tensor"):
        balance_loss(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="routes must lie in \\[0, 2\\]"):
        balance_loss_literal(probs, torch.tensor([0, 3]))


def _toy(**over):
    sets = {"model.sample_size": 8, "model.use_edge": False, "model.text_encoder": "tiny", **over}
    return get_preset("toy", sets)


def _batch(g, B=8, d_y=32, n_valid=8):
    x0 = torch.randn(B, 3, 8, 8, generator=g)
    y = torch.randn(B, 77, d_y, generator=g)
    valid = torch.zeros(B, 77, dtype=torch.bool)
    valid[:, :n_valid] = True
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise, y, valid, torch.full((B,), n_valid - 1)


@pytest.mark.spec_id("moe.balance_loss")
def test_model_balance_loss_is_the_mean_over_the_gated_layers():
    for over, n_terms in (({}, 32), ({"model.time_router": "intervals"}, 16), ({"model.use_space_moe": False}, 16)):
        cfg = _toy(**over)
        torch.manual_seed(0)
        model = RaphaelUNet(cfg.model).eval()
        x0, t, _, y, valid, pooled = _batch(torch.Generator().manual_seed(1), B=3)
        _, aux = model(x0, t, y, valid, pooled, return_probs=True)
        terms = [balance_loss_literal(a.space_probs, a.space_routes, valid) for a in aux if a.space_probs is not None]
        terms += [balance_loss_literal(a.time_probs, a.time_routes) for a in aux if a.time_probs is not None]
        assert len(terms) == n_terms, over
        torch.testing.assert_close(model_balance_loss(aux, valid), torch.stack(terms).mean())
        for a in aux:  # the probabilities are the gates' softmax: their argmax is the route (eval: no noise)
            if a.space_probs is not None:
                assert a.space_probs.dtype == torch.float32 and torch.equal(a.space_probs.argmax(-1), a.space_routes)
            if a.time_probs is not None:
                assert torch.equal(a.time_probs.argmax(-1), a.time_routes)
        _, plain = model(x0, t, y, valid, pooled)
        assert all(a.space_probs is None and a.time_probs is None for a in plain)  # not asked: not returned
    with pytest.raises(ValueError, match="return_probs=True"):
        model_balance_loss(plain, valid)


@pytest.mark.spec_id("moe.balance_loss")
def test_training_losses_adds_the_balance_term_only_when_on():
    cfg = _toy()
    sched = NoiseSchedule.make("scaled_linear", 1000)
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model).eval()  # eval: no gate noise, the same forward each call
    x0, t, noise, y, valid, pooled = _batch(torch.Generator().manual_seed(2), B=3)
    off = training_losses(model, sched, x0, t, noise, y, valid, pooled)
    on = training_losses(model, sched, x0, t, noise, y, valid, pooled, balance_loss=0.5)
    assert "balance" not in off and all(a.space_probs is None for a in off["aux"])
    torch.testing.assert_close(on["denoise"], off["denoise"])
    torch.testing.assert_close(on["balance"], model_balance_loss(on["aux"], valid))
    torch.testing.assert_close(on["total"], off["total"] + 0.5 * on["balance"])
    assert 0 < float(on["balance"]) <= 6  # n sum_i f_i P_i <= n max_i P_i
    on["balance"].backward()  # the term reaches the gates, and only them
    block = model.transformer_blocks()[0]
    for gate in (block.text_gate.fc2.weight, block.time_gate.fc2.weight):
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert all(p.grad is None for p in block.space_experts.parameters())
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="balance_loss must be a finite number >= 0"):
            training_losses(model, sched, x0, t, noise, y, valid, pooled, balance_loss=bad)


def _eval_usage(model, cfg):
    """Usage of the deterministic (eval) routes on 4 fixed batches of 8: mean normalised entropy per MoE."""
    model.eval()
    usage, g = ExpertUsage.for_config(cfg), torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _ in range(4):
            x0, t, _, y, valid, pooled = _batch(g)
            usage.update(model(x0, t, y, valid, pooled)[1], valid)
    model.train()
    s = usage.summary()
    return {m: sum(s[m]["entropy_norm"]) / len(s[m]["entropy_norm"]) for m in ("space", "time")}, s


@pytest.mark.spec_id("moe.balance_loss")
def test_balance_loss_spreads_the_routes_on_a_toy_run():
    """30 AdamW steps of the toy U-Net (8 x 8 px, no edge loss) on random data, from one init, with and without
    the balancing loss. Gate noise off (model.gate_noise_std=0), so that the training routes are the
    deterministic ones that sampling uses. Measured (2 CPU cores, ~6 s a run): mean normalised entropy of the
    eval routes space 0.75 / time 0.27 at init, 0.76 / 0.23 after 30 steps without the term, 0.98 / 0.86
    with coefficient 1; time blocks collapsed onto one expert: 6 at init, 9 without, 0 with."""
    cfg = _toy(**{"model.gate_noise_std": 0.0})
    sched = NoiseSchedule.make("scaled_linear", 1000)
    torch.manual_seed(0)
    init = RaphaelUNet(cfg.model)
    start, _ = _eval_usage(init, cfg)
    result = {}
    for coef in (0.0, 1.0):
        model = copy.deepcopy(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            x0, t, noise, y, valid, pooled = _batch(g)
            out = training_losses(model, sched, x0, t, noise, y, valid, pooled, balance_loss=coef)
            opt.zero_grad(set_to_none=True)
            out["total"].backward()
            opt.step()
        result[coef] = _eval_usage(model, cfg)
    (off, s_off), (on, s_on) = result[0.0], result[1.0]
    assert start["time"] < 0.6, f"the toy's time gates should start concentrated, got {start}"
    assert on["time"] > off["time"] + 0.3 and on["space"] > off["space"] + 0.1, (start, off, on)
    assert on["time"] > start["time"] + 0.3 and on["space"] > start["space"] + 0.1, (start, off, on)
    assert len(s_on["time"]["collapsed"]) < len(s_off["time"]["collapsed"]), (s_on["time"], s_off["time"])


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("assignment,match", [
    ("train.balance_loss=-0.5", "train.balance_loss: must be a finite number >= 0"),
    ("train.balance_loss=nan", "train.balance_loss"),
    ("train.balance_loss=inf", "train.balance_loss"),
    ("train.balance_loss=abc", "train.balance_loss"),
    ("train.tensorboard=maybe", "train.tensorboard"),
    ("train.tensorboard=3", "train.tensorboard"),
])
def test_bad_new_train_fields_are_named(assignment, match):
    with pytest.raises(ValueError, match=match):
        load_config("toy", overrides=[assignment])


def test_balance_loss_needs_a_gate():
    ok = load_config("toy", overrides=["train.balance_loss=0.01", "train.tensorboard=true"])
    assert ok.train.balance_loss == 0.01 and ok.train.tensorboard is True
    assert load_config("toy").train.balance_loss == 0.0 and load_config("paper").train.tensorboard is False
    load_config("toy", overrides=["train.balance_loss=0.01", "model.use_space_moe=false"])  # the time gate
    with pytest.raises(ValueError, match="train.balance_loss: balances the gates"):
        load_config("toy", overrides=["train.balance_loss=0.01", "model.use_space_moe=false",
                                      "model.time_router=intervals"])
    load_config("toy", overrides=["train.balance_loss=0", "model.use_space_moe=false", "model.use_time_moe=false"])


# ------------------------------------------------------------------------------ tools/train.py


def _train():
    from raphael_ref.testing import load_tool

    return load_tool("train")


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _records(run: Path) -> list[dict]:
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
            for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory) -> Path:
    """4 steps with the balancing loss, a log line every 2 steps and a checkpoint at 2 and 4."""
    out = tmp_path_factory.mktemp("bal") / "run"
    # the toy preset: no token loss (the default run's, E89), so the loss is denoise + edge + the balance term
    code = _train().main(["--out", str(out), "--preset", "toy"] + _sets(*MICRO, "train.steps=4", "train.log_every=2",
                                                                        "train.ckpt_every=2", "train.balance_loss=0.01"))
    assert code == 0
    return out


def test_log_holds_expert_usage_and_balance(balanced_run):
    recs = _records(balanced_run)
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        u = r["expert_usage"]
        assert u["steps"] == 2 and u["space"]["n_experts"] == 6 and u["time"]["n_experts"] == 4
        assert len(u["space"]["fractions"]) == 16 and u["time"]["items"] == [2 * 4] * 16  # 2 steps of 4 samples
        items = u["space"]["items"]
        assert len(set(items)) == 1 and 2 * 4 * 2 <= items[0] < 2 * 4 * 77  # the valid tokens, not 77 slots
        assert all(sum(f) == pytest.approx(1, abs=1e-5) for f in u["space"]["fractions"])
        assert 0 < r["balance"] <= 6  # n sum_i f_i P_i <= n max_i P_i; 1 when the routes are even
        assert r["loss"] == pytest.approx(r["denoise"] + r["edge"] + 0.01 * r["balance"], rel=1e-6)
    with Image.open(balanced_run / "expert_usage.png") as im:
        assert im.format == "PNG"
    state = json.loads((balanced_run / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["expert_usage"]["steps"] == 0 and state["balance_window"] == 0.0  # saved after the log line


def test_usage_window_survives_a_resume(tmp_path):
    """log_every 4, checkpoint at 2, a kill after step 3 (its checkpoint lost): the step-4 window of the resumed
    run counts the restored steps 1-2 and steps 3-4, exactly as the uninterrupted run (the gate noise draws
    are restored too)."""
    import shutil

    sets = (*MICRO, "train.log_every=4", "train.ckpt_every=2", "train.balance_loss=0.01")
    full, half = tmp_path / "full", tmp_path / "half"
    assert _train().main(["--out", str(full)] + _sets(*sets, "train.steps=4")) == 0
    assert _train().main(["--out", str(half)] + _sets(*sets, "train.steps=3")) == 0
    shutil.rmtree(half / "checkpoints" / "step_0000003")
    (half / "checkpoints" / "latest").write_text("step_0000002\n")
    state = json.loads((half / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["expert_usage"]["steps"] == 2 and state["balance_window"] > 0
    assert _train().main(["--out", str(half), "--resume"] + _sets("train.steps=4")) == 0
    a, b = _records(full), _records(half)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4]
    assert a[0]["expert_usage"] == b[0]["expert_usage"] and a[0]["expert_usage"]["steps"] == 4
    assert a[0]["balance"] == b[0]["balance"]


def test_collapsed_window_prints_one_warning_per_window(tmp_path, capsys, monkeypatch):
    """Gates whose logits always favour expert 0: every block collapses; each log window (4 steps of 4 samples:
    16 >= 11 time samples) prints one ``warning:`` line naming the blocks, both MoEs and the remedies."""
    from raphael_ref.gates import GateFFN

    def favour_expert_0(self, x):
        logits = torch.zeros(*x.shape[:-1], self.n_experts, dtype=x.dtype)
        logits[..., 0] = 50.0
        return logits + 0 * x.sum()

    monkeypatch.setattr(GateFFN, "forward", favour_expert_0)
    code = _train().main(["--out", str(tmp_path / "run")] + _sets(*MICRO, "train.steps=8", "train.log_every=4",
                                                                    "train.ckpt_every=8"))
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    for step, line in zip((4, 8), warnings):
        assert f"up to step {step}" in line and "space-MoE of blocks 0 (expert 0)" in line
        assert "time-MoE of blocks 0 (expert 0)" in line and "15 (expert 0)" in line
        assert "train.balance_loss" in line and "model.gate_noise_std" in line
    recs = _records(tmp_path / "run")
    assert recs[-1]["expert_usage"]["time"]["collapsed"] == list(range(16))


def test_healthy_short_windows_do_not_warn(tmp_path, capsys):
    """A window of 2 steps of 4 samples (8 < 11) cannot show a time-MoE collapse: no false alarm."""
    code = _train().main(["--out", str(tmp_path / "run")] + _sets(*MICRO, "train.steps=2", "train.log_every=2",
                                                                    "train.ckpt_every=2", "model.gate_noise_std=0"))
    err = capsys.readouterr().err
    assert code == 0 and "time-MoE" not in err, err


def test_tensorboard_missing_is_a_clear_error_before_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package looks like
    with pytest.raises(ValueError, match="pip install tensorboard"):
        MON.check_tensorboard()
    out = tmp_path / "run"
    code = _train().main(["--out", str(out)] + _sets(*MICRO, "train.steps=1", "train.tensorboard=true"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "pip install tensorboard" in err
    assert "train.tensorboard=false" in err and not out.exists()


def test_tensorboard_scalars_mirror_the_log_record():
    usage = ExpertUsage(2, 2, 2, min_items=1)
    usage.update([_aux(torch.tensor([[0, 1]]), torch.tensor([1]), j) for j in range(2)])
    rec = {"step": 5, "loss": 0.5, "denoise": 0.4, "edge": 0.1, "lr": 1e-3, "grad_norm": 0.25, "grad_norm_max": 0.5,
           "token": 0.3, "sec_per_step": 0.2, "images_per_sec": 20.0, "balance": None, "expert_usage": usage.summary()}
    tags = MON.tensorboard_scalars(rec)
    assert tags["train/loss"] == 0.5 and tags["train/lr"] == 1e-3 and "train/balance" not in tags
    assert tags["train/grad_norm"] == 0.25 and tags["train/grad_norm_max"] == 0.5 and tags["train/token"] == 0.3
    assert tags["expert_usage/space_entropy_norm/block_01"] == pytest.approx(1.0)
    assert tags["expert_usage/time_entropy_norm/block_00"] == 0.0 and tags["expert_usage/time_collapsed_blocks"] == 2


def test_tensorboard_writer_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = _train().main(["--out", str(tmp_path / "run")] + _sets(*MICRO, "train.steps=2", "train.log_every=1",
                                                                    "train.ckpt_every=2", "train.tensorboard=true"))
    assert code == 0
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/denoise", "train/edge", "train/lr", "train/grad_norm", "train/sec_per_step",
                "expert_usage/space_entropy_norm/block_00", "expert_usage/time_entropy_norm/block_15"):
        assert tag in tags, tags
    loss = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in _records(tmp_path / "run")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert loss == pytest.approx(logged, rel=1e-6)
