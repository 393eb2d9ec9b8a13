"""Per-sample random streams (issue 11, item 3: a run resumed on another world size; ``train.rng = "sample"``).

With ``train.rng = "sample"`` every random draw of a training sample (caption-dropout coin, VAE posterior, t,
noise, gate noise) comes from a stream seeded by (train.seed, the sample's position in the global data stream),
so neither the world size nor the cut into micro-batches changes what a sample draws:

- ``sample_stream_seed``: deterministic, order-sensitive, in [0, 2^63), refuses bad keys;
- ``per_sample_noise``: row i of a gate-noise draw depends on sample i's seed only (the same when drawn in any
  batch), a fresh context starts the same draws again, contexts nest;
- activation checkpointing recomputes the forward's routes: loss and gradients equal the run without
  checkpointing (``noise_checkpoint_contexts`` replays the draw counter; without it the recomputation draws other
  noise);
- tools/train.py: positions of a step are the same set for every world size; with the gate noise on, K = 2
  micro-steps log the losses of one step of the whole batch (with train.rng = "rank" they do not);
- bad combinations (model.dropout > 0, train.compile) are config errors naming train.rng.
The 2-rank runs (DDP, and FSDP2 sharded checkpoints resumed on 1 rank) are in tests/test_dcp_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raphael_ref import gates
from raphael_ref.config import get_preset
from raphael_ref.gates import gate_noise, per_sample_noise, sample_stream_seed
from raphael_ref.models import RaphaelUNet

pytestmark = pytest.mark.spec

MICRO = ["model.sample_size=16", "model.model_channels=16", "model.head_dim=8", "model.norm_groups=4",
         "model.expert_mult=2", "model.edge_width=4", "train.batch_size=4", "train.log_every=1",
         "train.warmup_steps=2", "sample.steps=2", "sample.every=0", "train.keep_ckpts=0"]
# K = 2 micro-steps against one step of the batch, 3 optimizer steps, float32 on the CPU: the same per-sample
# draws, only the order of the batch reductions differs (tests/test_grad_accum.py explains the rounding).
# - logged losses (float64 means of float32 micro-means): rel 1e-6; measured 3e-8.
# - weights after 3 AdamW steps (lr up to 1e-3 in the warm-up): the update is almost lr sign(g), so rounding
#   moves a weight only where a gradient entry is within rounding of zero: atol 2e-5 (1/50 of one step).
#   Measured 1.6e-6. With train.rng = "rank" the gate noise is drawn per micro-batch, other routes train other
#   gate weights: measured 3e-3 apart (3 steps), which the same check catches, while its losses differ by only
#   3e-6 relative at this size (the zero-initialised output layer makes the loss barely route-dependent yet).
LOSS_REL = 1e-6
WEIGHT_ATOL = 2e-5


def _train():
    from raphael_ref.testing import load_tool

    return load_tool("train")


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _losses(run: Path) -> list[tuple[float, float, float]]:
    from raphael_ref import training as T

    return [(r["loss"], r["denoise"], r["edge"]) for r in T.read_log(run / "log.jsonl")]


# ------------------------------------------------------------------------------ seeds and streams


def test_stream_seed_deterministic_ordered_in_range():
    a = sample_stream_seed(0, 5)
    assert a == sample_stream_seed(0, 5) and 0 <= a < 2 ** 63
    seen = {sample_stream_seed(s, q) for s in range(4) for q in range(256)}
    assert len(seen) == 4 * 256  # no collision among 1024 (seed, position) pairs
    assert sample_stream_seed(1, 2) != sample_stream_seed(2, 1)
    assert sample_stream_seed(3) != sample_stream_seed(3, 0)
    for bad in ((-1,), (1.5,), (True,)):
        with pytest.raises(ValueError, match="keys must be ints"):
            sample_stream_seed(*bad)


def test_row_depends_on_its_own_seed_only():
    seeds = [sample_stream_seed(0, q) for q in range(4)]
    with per_sample_noise(seeds):
        first = gate_noise((4, 7, 3), 2.0)
        second = gate_noise((4, 3), 1.0)
    with per_sample_noise([seeds[2], seeds[0]]):  # another batch: sample 2 first, then sample 0
        a = gate_noise((2, 7, 3), 2.0)
        b = gate_noise((2, 3), 1.0)
    torch.testing.assert_close(a, first[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(b, second[[2, 0]], rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])  # different samples, different noise
    assert not torch.equal(first[0, :, :1].flatten(), second[0, :1].flatten() * 2)  # each draw moves the counter
    with per_sample_noise(seeds):  # a fresh context draws the same again
        torch.testing.assert_close(gate_noise((4, 7, 3), 2.0), first, rtol=0, atol=0)
    assert first.dtype == torch.float32 and abs(float(first.std()) - 2.0) < 0.5


def test_contexts_nest_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    ref = torch.randn(5)
    torch.manual_seed(0)
    with per_sample_noise([1, 2]):
        gate_noise((2, 4))
        with per_sample_noise([3]):
            inner = gate_noise((1, 4))
        outer = gate_noise((2, 4))  # the outer context's counter went on
    torch.testing.assert_close(torch.randn(5), ref, rtol=0, atol=0)  # no global draw happened
    with per_sample_noise([3]):
        torch.testing.assert_close(gate_noise((1, 4)), inner, rtol=0, atol=0)
    with per_sample_noise([1, 2]):
        gate_noise((2, 4))
        torch.testing.assert_close(gate_noise((2, 4)), outer, rtol=0, atol=0)
    assert getattr(gates._STREAMS, "state", None) is None
    with per_sample_noise([1, 2]), pytest.raises(RuntimeError, match="one row per sample"):
        gate_noise((3, 4))
    g = torch.Generator().manual_seed(7)  # an explicit generator wins over the context
    with per_sample_noise([1, 2]):
        x = gate_noise((2, 4), generator=g)
    torch.testing.assert_close(x, torch.randn((2, 4), generator=torch.Generator().manual_seed(7)), rtol=0, atol=0)


def _tiny_unet(checkpoint: bool) -> RaphaelUNet:
    cfg = get_preset("toy", {"model.sample_size": 16, "model.model_channels": 16, "model.head_dim": 8,
                             "model.norm_groups": 4, "model.expert_mult": 2, "model.edge_width": 4,
                             "model.checkpoint": checkpoint}).model
    torch.manual_seed(0)
    net = RaphaelUNet(cfg).train()
    with torch.no_grad():  # the output conv starts at zero: give it weights so every parameter gets a gradient
        net.conv_out.weight.normal_(0, 0.1)
    return net


def _loss_and_grads(net: RaphaelUNet, seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = net.cfg
    g = torch.Generator().manual_seed(1)
    B, S = len(seeds), cfg.sample_size
    x = torch.randn(B, cfg.in_channels, S, S, generator=g)
    y = torch.randn(B, 6, cfg.d_y, generator=g)
    valid = torch.ones(B, 6, dtype=torch.bool)
    t = torch.tensor([10, 400, 700, 990][:B])
    net.zero_grad(set_to_none=True)
    with per_sample_noise(seeds):
        out, aux = net(x, t, y, valid, torch.full((B,), 5))
    # the output and every block's edge logits (the routes decide both)
    target = torch.randn(out.shape, generator=g)
    loss = (out * target).mean() + sum((a.edge_logits ** 2).mean() for a in aux if a.edge_logits is not None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_checkpoint_recomputation_replays_the_gate_noise(monkeypatch):
    seeds = [sample_stream_seed(3, q) for q in range(4)]
    plain = _tiny_unet(False)
    ckpt = _tiny_unet(True)
    ckpt.load_state_dict(plain.state_dict())
    l0, g0 = _loss_and_grads(plain, seeds)
    l1, g1 = _loss_and_grads(ckpt, seeds)
    # the same operations, recomputed: equal up to float32 rounding of a different kernel schedule
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7 * (1 + float(g0[n].abs().max())), msg=n)
    # without the replay the recomputation draws other gate noise: other routes, other gradients (or an error)
    import raphael_ref.models as M

    monkeypatch.setattr(M, "noise_checkpoint_contexts",
                        lambda: (__import__("contextlib").nullcontext(), __import__("contextlib").nullcontext()))
    try:
        _, g2 = _loss_and_grads(ckpt, seeds)
    except torch.utils.checkpoint.CheckpointError:  # it may refuse recomputed tensors of another shape
        return
    assert any(not torch.allclose(g2[n], g0[n], rtol=1e-3, atol=1e-6) for n in g0)


# ------------------------------------------------------------------------------ tools/train.py


def test_positions_of_a_step_do_not_depend_on_the_world_size():
    pos = _train().sample_positions
    for step in (0, 3):
        one = pos(step, 8, 0, 1)
        assert one == list(range(8 * step, 8 * step + 8))
        for world in (2, 4, 8):
            got = sorted(q for r in range(world) for q in pos(step, 8 // world, r, world))
            assert got == one


def test_micro_steps_draw_what_one_step_draws(tmp_path):
    """Gate noise on (the default 1.0): K = 2 logs the K = 1 run's losses with train.rng = "sample"."""
    from safetensors.torch import load_file

    runs, weights = {}, {}
    for rng in ("sample", "rank"):
        for k in (1, 2):
            out = tmp_path / f"{rng}{k}"
            assert _train().main(["--out", str(out)] + _sets(*MICRO, "train.steps=3", f"train.rng={rng}",
                                                             f"train.grad_accum={k}")) == 0
            runs[rng, k] = _losses(out)
            weights[rng, k] = load_file(str(out / "checkpoints" / "step_0000003" / "model.safetensors"))
    a, b = runs["sample", 1], runs["sample", 2]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert abs(x - y) <= LOSS_REL * abs(x), (a, b)

    def gap(rng):
        w1, w2 = weights[rng, 1], weights[rng, 2]
        return max(float((w1[n] - w2[n]).abs().max()) for n in w1)

    assert gap("sample") <= WEIGHT_ATOL
    assert gap("rank") > 10 * WEIGHT_ATOL  # the per-rank streams draw the gate noise per micro-batch
    assert runs["sample", 1] != runs["rank", 1]


def test_sample_mode_refuses_dropout_and_compile(tmp_path, capsys):
    for extra, what in (("model.dropout=0.1", "model.dropout"), ("train.compile=true", "torch.compile")):
        rc = _train().main(["--out", str(tmp_path / "x")] + _sets(*MICRO, "train.steps=1", "train.rng=sample", extra))
        err = capsys.readouterr().err
        assert rc == 2 and "train.rng" in err and what in err, err
    rc = _train().main(["--out", str(tmp_path / "y")] + _sets(*MICRO, "train.steps=1", "train.rng=dice"))
    assert rc == 2 and "train.rng" in capsys.readouterr().err
