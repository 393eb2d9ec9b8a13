"""torch.compile of the RAPHAEL U-Net: one graph, no graph break, compiled == eager (issue 11, item 2).

A graph break (a host sync such as ``.item()``/``.tolist()``, a data-dependent shape, Python branching
on a tensor value) splits the compiled model into pieces that run with eager glue between them, and
under ``fullgraph=True`` it is an error. The U-Net skips its input value checks under compile and
runs both MoEs in their sync-free "dense" forms there (``models._time_moe_impl``,
``models._space_moe_impl``); the dense time-MoE form is tested equal to the literal one here.

Fast tests trace with ``torch._dynamo.explain`` and compile with the ``aot_eager`` backend (no code
generation); the inductor comparison is ``@pytest.mark.slow`` (minutes of C++ compilation on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from raphael_ref.config import get_preset
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.experts import ExpertBank, expert_ffn
from raphael_ref.models import RaphaelUNet
from raphael_ref.objective import training_losses
from raphael_ref.time_moe import time_moe, time_moe_literal

# The toy preset shrunk for tracing speed: 8x8 pixels (grids 8, 4, 2, 1), width 16, the full 16-block
# layout with space-MoE (6 experts), time-MoE (4 experts) and the edge heads on.
MICRO = {"model.checkpoint": False, "model.sample_size": 8, "model.model_channels": 16, "model.head_dim": 8,
         "model.norm_groups": 4, "model.expert_mult": 2, "model.edge_width": 4}
VARIANTS = {
    "full": {},
    "intervals": {"model.time_router": "intervals"},
    "no_moe": {"model.use_space_moe": False, "model.use_time_moe": False},
    # the paper preset's activation checkpointing (a higher-order op under dynamo) and the CPU space-MoE form
    # (nonzero: data-dependent shapes), which the model swaps for "dense" under compile
    "checkpoint_gather": {"model.checkpoint": True, "model.moe_impl": "gather"},
}


def _cfg(**overrides):
    return get_preset("toy", {**MICRO, **overrides})


def _inputs(cfg, B: int = 3, seed: int = 0):
    """x_t, t, y, y_valid, pooled_index, noise, edge map: t spread over [0, T) so the time routes differ."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.in_channels, m.sample_size, m.sample_size, generator=g)
    t = torch.tensor([5, 400, 900][:B] + [7] * max(0, B - 3))
    y = torch.randn(B, m.n_y, m.d_y, generator=g)
    n_valid = torch.tensor([4, 9, 12][:B] + [6] * max(0, B - 3))
    y_valid = torch.arange(m.n_y)[None] < n_valid[:, None]  # (B, n_y)
    pooled = n_valid - 1  # the EOT token ends each prompt
    noise = torch.randn(x.shape, generator=g)
    edge = torch.rand(B, 1, m.sample_size, m.sample_size, generator=g)
    return x, t, y, y_valid, pooled, noise, edge


def _model(cfg, seed: int = 0) -> RaphaelUNet:
    torch.manual_seed(seed)
    model = RaphaelUNet(cfg.model)
    with torch.no_grad():  # zero-initialised output layers would hide most of the network from the comparison
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def _explain(model, *args, **kwargs):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(*args, **kwargs)
    finally:
        torch._dynamo.reset()


def _breaks(e) -> str:
    return "; ".join(f"{b.reason.splitlines()[0][:120]} @ {b.user_stack[-1] if b.user_stack else '?'}"
                     for b in e.break_reasons)


# ------------------------------------------------------------------------- (a) one graph, no break


# training mode of every variant is also traced by the fullgraph training-step test below (each trace of the
# 16-block U-Net takes ~15 s on one core, so the explain runs are not repeated for those)
@pytest.mark.parametrize("variant, mode", [("full", "train"), ("full", "eval"), ("intervals", "eval"),
                                           ("no_moe", "eval")])
def test_explain_forward_is_one_graph(variant, mode):
    """The U-Net forward traces as one graph without a break, in training (noisy gates) and eval mode."""
    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg).train(mode == "train")
    x, t, y, y_valid, pooled, _, _ = _inputs(cfg)
    e = _explain(model, x, t, y, y_valid, pooled)
    assert e.graph_break_count == 0 and e.graph_count == 1, f"{e.graph_count} graphs: {_breaks(e)}"


def test_explain_sampling_step_is_one_graph():
    """A classifier-free-guidance step of raphael_ref.sampling: eval mode, the batch doubled (cond + uncond),
    with the masks returned (as when sample() collects them; the masks are extra outputs of the same graph)."""
    cfg = _cfg()
    model = _model(cfg).eval()
    x, t, y, y_valid, pooled, _, _ = _inputs(cfg, B=2)
    uy, uvalid, upooled = torch.zeros_like(y), torch.zeros_like(y_valid), torch.zeros_like(pooled)
    uvalid[:, 0:2] = True
    upooled += 1
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, uy]), torch.cat([y_valid, uvalid]),
            torch.cat([pooled, upooled]))
    e = _explain(model, *args, return_masks=True)
    assert e.graph_break_count == 0 and e.graph_count == 1, f"{e.graph_count} graphs: {_breaks(e)}"


def _compiled_step(cfg, model, inputs, backend="aot_eager", seed=1):
    """training_losses + backward through ``torch.compile(model, fullgraph=True)``; returns (loss, aux, grads,
    frames). fullgraph=True turns any graph break into an error; the counter counts the compiled frames."""
    x, t, y, y_valid, pooled, noise, edge = inputs
    sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch.manual_seed(seed)  # the gate noise: the same draws in the same order as the eager step below
    out = training_losses(compiled, sched, x, t, noise, y, y_valid, pooled, edge, loss_weight=cfg.train.loss_weight)
    model.zero_grad(set_to_none=True)
    out["total"].mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch._dynamo.reset()
    return out, grads, counter.frame_count


def _eager_step(cfg, model, inputs, seed=1):
    x, t, y, y_valid, pooled, noise, edge = inputs
    sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    torch.manual_seed(seed)
    out = training_losses(model, sched, x, t, noise, y, y_valid, pooled, edge, loss_weight=cfg.train.loss_weight)
    model.zero_grad(set_to_none=True)
    out["total"].mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_routes(aux_c, aux_e):
    """The discrete choices (time and space routes, threshold masks) must agree before values can be compared."""
    for a, b in zip(aux_c, aux_e, strict=True):
        for name in ("time_routes", "space_routes"):
            ra, rb = getattr(a, name), getattr(b, name)
            assert (ra is None) == (rb is None) and (ra is None or torch.equal(ra, rb)), f"block {b.index} {name}"


def _assert_close_rel(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str):
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max |diff| {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


# aot_eager runs the eager aten kernels on the traced graph; the only difference is the time-MoE form (eager:
# "grouped", each expert on its samples; compiled: "dense", each expert on the whole batch and a gather), so
# the expert weight gradients are sums over a different set of rows, in a different order (float32 u = 6e-8),
# and that rounding flows back through the blocks below. Measured (float32, these seeds): losses bitwise equal,
# every parameter gradient within 4e-6 of its largest entry (the worst: a time gate's fc1, a sum with
# cancellation). 1e-4 leaves a 25x margin and is still far below any real defect (a wrong route, mask,
# weight or sign moves values at the 1e-2 .. 1 level).
AOT_REL = 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_compiles_fullgraph_and_matches_eager(variant):
    """Forward + backward of objective.training_losses through the compiled U-Net (fullgraph=True: a graph break
    raises): one compiled frame, and the losses, routes and every gradient equal the eager step's."""
    cfg = _cfg(**VARIANTS[variant])
    model = _model(cfg).train()
    inputs = _inputs(cfg)
    out_c, grads_c, frames = _compiled_step(cfg, model, inputs)
    assert frames == 1, f"{frames} compiled frames: the U-Net broke into pieces"
    out_e, grads_e = _eager_step(cfg, model, inputs)
    _assert_same_routes(out_c["aux"], out_e["aux"])
    for key in ("total", "denoise", "edge"):
        _assert_close_rel(out_c[key], out_e[key], AOT_REL, key)
    for n, g in grads_e.items():
        _assert_close_rel(grads_c[n], g, AOT_REL, f"grad {n}")


def test_eval_forward_compiled_matches_eager():
    cfg = _cfg()
    model = _model(cfg).eval()
    x, t, y, y_valid, pooled, _, _ = _inputs(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out_c, aux_c = compiled(x, t, y, y_valid, pooled)
        out_e, aux_e = model(x, t, y, y_valid, pooled)
    torch._dynamo.reset()
    _assert_same_routes(aux_c, aux_e)
    _assert_close_rel(out_c, out_e, AOT_REL, "eps_hat")


def test_value_checks_run_in_eager_only():
    """The input value checks (host syncs) still raise in eager; under compile they are skipped, not broken on."""
    cfg = _cfg()
    model = _model(cfg).eval()
    x, t, y, y_valid, pooled, _, _ = _inputs(cfg)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.clone().fill_(float("nan")), t, y, y_valid, pooled)
    with pytest.raises(ValueError, match="pooled_index must lie"):
        model(x, t, y, y_valid, pooled + 100)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # not fullgraph: a raise is a graph break, then eager
    with pytest.raises(ValueError, match="x_t must be"):  # the shape checks still run while tracing
        compiled(x[:, :2], t, y, y_valid, pooled)
    torch._dynamo.reset()


def test_config_train_compile():
    assert get_preset("toy").train.compile is False
    assert get_preset("toy", {"train.compile": "true"}).train.compile is True
    with pytest.raises(ValueError, match="train.compile"):
        get_preset("toy", {"train.compile": "maybe"})


# ------------------------------------------------------------------------- (c) inductor, slow

# float32, inductor's C++ kernels: fused elementwise chains, reductions (softmax, layer/group norms, the
# space-MoE sums) split and reordered, its own GEMM calls; each reassociation moves a result by a few ulp
# (u = 6e-8) and 16 blocks compound them. Measured <= 2e-5 of the largest value; 1e-3 leaves margin and is
# still two orders below a real defect. The discrete routes and masks are checked equal first.
INDUCTOR_REL = 1e-3


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    torch._inductor.config.fallback_random = True  # eager's RNG in the compiled graph: the same gate noise
    try:
        cfg = _cfg()
        model = _model(cfg).train()
        inputs = _inputs(cfg)
        out_c, grads_c, frames = _compiled_step(cfg, model, inputs, backend="inductor")
        out_e, grads_e = _eager_step(cfg, model, inputs)
    finally:
        torch._inductor.config.fallback_random = False
    assert frames == 1
    _assert_same_routes(out_c["aux"], out_e["aux"])
    for key in ("total", "denoise", "edge"):
        _assert_close_rel(out_c[key], out_e[key], INDUCTOR_REL, key)
    for n, g in grads_e.items():
        _assert_close_rel(grads_c[n], g, INDUCTOR_REL, f"grad {n}")


# ------------------------------------------------------------------------- (d) dense time-MoE == literal

F64 = torch.float64
# float64: the dense form runs every expert on the whole batch and keeps row b of expert r_b: the same
# FFN on the same rows as the literal per-sample call, up to matmul blocking over a different row count.
TOL64 = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("tmoe.output")
@settings(max_examples=20)
@given(B=st.integers(1, 5), n_x=st.integers(1, 4), d=st.integers(1, 4), hidden=st.integers(1, 5),
       k=st.integers(1, 4), seed=st.integers(0, 2**20))
def test_dense_time_moe_equals_literal(B, n_x, d, hidden, k, seed):
    """time_moe(impl="dense") == time_moe_literal in values and in the gradients of h, w and every expert
    parameter; experts no sample was routed to get exactly zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n_x, d, generator=gen, dtype=F64, requires_grad=True)  # (B, n_x, d)
    routes = torch.randint(0, k, (B,), generator=gen)  # (B,)
    weights = (2 * torch.rand(B, generator=gen, dtype=F64) - 0.5).requires_grad_(True)  # (B,)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64)
    leaves = [h, weights, *bank.parameters()]
    g = torch.randn(B, n_x, d, generator=gen, dtype=F64)
    lit = time_moe_literal(h, routes, weights, bank)
    dense = time_moe(h, routes, weights, bank, impl="dense")
    assert dense.shape == h.shape and dense.dtype == h.dtype
    torch.testing.assert_close(dense, lit, **TOL64)
    for b in range(B):  # and the printed equation itself, h'[b] = w_b te_{r_b}(h[b])
        r = int(routes[b])
        ref = weights[b] * expert_ffn(h[b], bank.w1[r], bank.b1[r], bank.w2[r], bank.b2[r])
        torch.testing.assert_close(dense[b], ref, **TOL64)
    for name, a, c in zip(["h", "weights", "w1", "b1", "w2", "b2"], torch.autograd.grad((lit * g).sum(), leaves),
                          torch.autograd.grad((dense * g).sum(), leaves)):
        torch.testing.assert_close(c, a, **TOL64, msg=lambda m: f"grad {name}: {m}")
        if name in ("w1", "b1", "w2", "b2"):
            unused = torch.ones(k, dtype=torch.bool).index_fill_(0, routes, False)
            assert torch.equal(c[unused], torch.zeros_like(c[unused]))


def test_dense_time_moe_has_no_graph_break():
    bank = ExpertBank(3, 4, 6)
    h, routes, w = torch.randn(5, 2, 4), torch.tensor([2, 0, 2, 1, 0]), torch.rand(5)
    e = _explain(lambda *a: time_moe(*a, check_values=False, impl="dense"), h, routes, w, bank)
    assert e.graph_break_count == 0 and e.graph_count == 1, _breaks(e)
    with pytest.raises(ValueError, match="impl must be"):
        time_moe(h, routes, w, bank, impl="sorted")


# ------------------------------------------------------------------------- tools/train.py, slow

@pytest.mark.slow
def test_train_tool_with_compile(tmp_path):
    """tools/train.py --set train.compile=true (inductor) trains, logs finite losses and writes checkpoints with
    the eager run's state-dict keys (the model is compiled in place: no ``_orig_mod.`` prefix)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    micro = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
             "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.log_every=1",
             "train.warmup_steps=2", "sample.steps=2", "train.steps=2", "train.ckpt_every=2"]
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"compile_{flag}"
        argv = [sys.executable, str(root / "tools" / "train.py"), "--out", str(out), "--device", "cpu"]
        for s in (*micro, f"train.compile={flag}"):
            argv += ["--set", s]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"compile={flag}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        runs[flag] = out
    from raphael_ref import training as T

    records = T.read_log(runs["true"] / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    keys = {flag: set(load_file(str(T.latest_checkpoint(run) / "model.safetensors"))) for flag, run in runs.items()}
    assert keys["true"] == keys["false"]
