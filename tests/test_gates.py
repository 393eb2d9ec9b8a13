"""Text and time gates: route = argmax(softmax(G(.) + eps)) (RAPHAEL Sec. 3.1 and App. 7.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.gates import (
    GRAD_MODES,
    GateFFN,
    gate_noise,
    gate_route,
    gate_softmax,
    route_literal,
    text_route,
    time_route,
)


def _gate(d_in: int, k: int, seed: int, hidden: int | None = None, dtype=torch.float32) -> GateFFN:
    torch.manual_seed(seed)
    return GateFFN(d_in, k, hidden).to(dtype)


@st.composite
def text_problems(draw):
    B, n_y, d_y = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 12))
    k = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    y = torch.randn(B, n_y, d_y, generator=torch.Generator().manual_seed(seed))
    return _gate(d_y, k, seed % 1000), y


@st.composite
def logits_batches(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    k = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([0.01, 1.0, 10.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return scale * torch.randn(*shape, k, generator=g)


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.spec_id("gate.time_route")
def test_gate_ffn_is_linear_gelu_linear():
    """Table 2: gates are FFNs with GELU. Checked against W2 gelu(W1 x + b1) + b2 written out in float64."""
    gate = _gate(5, 3, 0, hidden=7).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    h = x @ gate.fc1.weight.T + gate.fc1.bias
    h = h * 0.5 * (1 + torch.erf(h / math.sqrt(2)))  # exact (erf) GELU
    torch.testing.assert_close(gate(x), h @ gate.fc2.weight.T + gate.fc2.bias, rtol=1e-12, atol=1e-12)
    assert _gate(5, 3, 0).hidden == 5  # hidden defaults to d_in


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.spec_id("gate.time_route")
@settings(max_examples=25)
@given(logits=logits_batches(), noise_std=st.sampled_from([0.0, 0.1, 1.0, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_gate_route_equals_literal_with_the_same_noise(logits, noise_std, seed):
    routes, _ = gate_route(logits, training=True, noise_std=noise_std, generator=torch.Generator().manual_seed(seed))
    eps = gate_noise(logits.shape, noise_std, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(routes, route_literal(logits, eps))
    # the literal form as printed, argmax(softmax(logits + eps)), evaluated in float64: the float32
    # route may differ only where the two largest noisy logits are within float32 rounding.
    z = logits.double() + eps.double()
    ref = torch.softmax(z, -1).argmax(-1)
    top2 = z.topk(min(2, z.shape[-1]), -1).values
    near_tie = (top2[..., 0] - top2[..., -1]) < 1e-5 * (1 + top2[..., 0].abs())
    assert not ((routes != ref) & ~near_tie).any()


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.spec_id("gate.time_route")
@settings(max_examples=25)
@given(logits=logits_batches(), grad_mode=st.sampled_from(GRAD_MODES), seed=st.integers(0, 2**31 - 1))
def test_eval_routes_are_deterministic_argmax_of_logits(logits, grad_mode, seed):
    g = torch.Generator().manual_seed(seed)
    state = g.get_state()
    r1, w1 = gate_route(logits, training=False, grad_mode=grad_mode, generator=g)
    r2, w2 = gate_route(logits, training=False, grad_mode=grad_mode, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(g.get_state(), state)  # eval draws no random number
    assert torch.equal(r1, r2) and torch.equal(w1, w2)
    assert torch.equal(r1, route_literal(logits, torch.zeros_like(logits)))
    assert torch.equal(r1, gate_softmax(logits).argmax(-1))
    # argmax of softmax = argmax of logits, unless float32 softmax rounds two near-tied winners equal
    top2 = logits.topk(min(2, logits.shape[-1]), -1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-5) | (logits.shape[-1] == 1)
    assert torch.equal(r1[clear], logits.argmax(-1)[clear])
    # and noise_std = 0 in training is the eval route
    r0, _ = gate_route(logits, training=True, noise_std=0.0, grad_mode=grad_mode)
    assert torch.equal(r0, r1)


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.spec_id("gate.time_route")
@settings(max_examples=25)
@given(logits=logits_batches(), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_routes_in_range_and_forward_weights(logits, training, seed):
    k = logits.shape[-1]
    out = {
        mode: gate_route(logits, training=training, grad_mode=mode, generator=torch.Generator().manual_seed(seed))
        for mode in GRAD_MODES
    }
    routes = out["none"][0]
    assert routes.dtype == torch.long and routes.shape == logits.shape[:-1]
    assert ((routes >= 0) & (routes < k)).all()
    for mode, (r, w) in out.items():
        assert torch.equal(r, routes), "the gradient mode must not change the route"
        assert w.shape == routes.shape and w.dtype == logits.dtype
    assert (out["none"][1] == 1).all() and (out["straight_through"][1] == 1).all()  # exactly 1, as printed
    eps = gate_noise(logits.shape, generator=torch.Generator().manual_seed(seed)) if training else None
    p = gate_softmax(logits, eps)
    assert torch.equal(out["switch"][1], p.gather(-1, routes[..., None])[..., 0])
    assert (out["switch"][1] >= 1 / k - 1e-6).all()  # the winner's probability is at least 1/k


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_gate_gradient_per_mode(grad_mode):
    gate = _gate(6, 4, 0)
    y = torch.randn(2, 5, 6)
    expert_out = torch.randn(2, 5)  # stands for a scalar summary of the chosen expert's output
    routes, w = text_route(gate, y, training=True, grad_mode=grad_mode, generator=torch.Generator().manual_seed(0))
    if grad_mode == "none":
        assert not w.requires_grad
        return
    (w * expert_out).sum().backward()
    grads = [p.grad for p in gate.parameters()]
    assert all(g_ is not None and g_.abs().sum() > 0 for g_ in grads)
    # the reference gradient: d/dtheta sum(c * p_route) ("switch") or sum(c * log p_route) ("straight_through")
    eps = gate_noise((2, 5, 4), generator=torch.Generator().manual_seed(0))
    gate.zero_grad()
    logp = torch.log_softmax(gate(y) + eps, -1).gather(-1, routes[..., None])[..., 0]
    target = logp.exp() if grad_mode == "switch" else logp
    (target * expert_out).sum().backward()
    for g_, p in zip(grads, gate.parameters()):
        torch.testing.assert_close(g_, p.grad, rtol=1e-5, atol=1e-6)  # float32, a few ops


@pytest.mark.spec_id("gate.text_route")
def test_noise_changes_near_tied_routes_with_the_stated_law():
    """Two experts, logits (Delta, 0), eps ~ N(0, s^2): P(route = 1) = Phi(-Delta / (s sqrt 2))."""
    N, delta = 4000, 0.5
    logits = torch.tensor([delta, 0.0]).expand(N, 2)
    assert (gate_route(logits, training=False)[0] == 0).all()
    for s in (0.5, 1.0, 2.0):
        routes, _ = gate_route(logits, training=True, noise_std=s, generator=torch.Generator().manual_seed(0))
        expected = 0.5 * math.erfc(delta / (s * math.sqrt(2)) / math.sqrt(2))
        sigma = math.sqrt(expected * (1 - expected) / N)  # binomial std of the frequency, <= 0.008
        assert abs(routes.float().mean().item() - expected) < 5 * sigma


@pytest.mark.spec_id("gate.text_route")
@settings(max_examples=25)
@given(problem=text_problems(), grad_mode=st.sampled_from(GRAD_MODES))
def test_text_route_batched_equals_per_token(problem, grad_mode):
    gate, y = problem
    routes, w = text_route(gate, y, training=False, grad_mode=grad_mode)
    assert routes.shape == y.shape[:2] and w.shape == y.shape[:2]
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            r_bi, w_bi = text_route(gate, y[b : b + 1, i : i + 1], training=False, grad_mode=grad_mode)
            assert r_bi.item() == routes[b, i].item()
            torch.testing.assert_close(w_bi[0, 0], w[b, i], rtol=1e-5, atol=1e-6)  # float32 matmul order


@pytest.mark.spec_id("gate.time_route")
@settings(max_examples=25)
@given(B=st.integers(1, 6), d_t=st.integers(1, 16), n_t=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_time_route_batched_equals_per_sample_and_argmax(B, d_t, n_t, seed):
    gate = _gate(d_t, n_t, seed % 1000)
    t_emb = torch.randn(B, d_t, generator=torch.Generator().manual_seed(seed))
    routes, w = time_route(gate, t_emb, training=False)
    assert routes.shape == (B,) and routes.dtype == torch.long and (w == 1).all()
    assert ((routes >= 0) & (routes < n_t)).all()
    for b in range(B):
        assert time_route(gate, t_emb[b : b + 1], training=False)[0].item() == routes[b].item()
    assert torch.equal(routes, route_literal(gate(t_emb), torch.zeros(B, n_t)))


@pytest.mark.spec_id("gate.time_route")
def test_time_route_training_noise_and_gradient():
    gate = _gate(8, 4, 1)
    t_emb = torch.randn(512, 8)
    r_eval, _ = time_route(gate, t_emb, training=False)
    r_a, w = time_route(gate, t_emb, training=True, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    r_b, _ = time_route(gate, t_emb, training=True, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r_a, r_b)  # same generator state, same routes
    assert (r_a != r_eval).any()  # noise of the order of the logit gaps moves some routes
    w.sum().backward()
    assert all(p.grad is not None for p in gate.parameters())


@pytest.mark.spec_id("gate.text_route")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gate_softmax_in_float32(dtype):
    gate = _gate(6, 5, 2, dtype=dtype)
    y = torch.randn(3, 7, 6).to(dtype)
    routes, w = text_route(gate, y, training=False, grad_mode="switch")
    logits = gate(y)  # (3, 7, 5) in the half dtype
    assert w.dtype == dtype
    p32 = torch.softmax(logits.float(), -1)
    assert torch.equal(routes, p32.argmax(-1))
    assert torch.equal(w, p32.gather(-1, routes[..., None])[..., 0].to(dtype))


def test_invalid_inputs_raise():
    gate = _gate(4, 3, 0)
    with pytest.raises(ValueError, match="grad_mode"):
        gate_route(torch.randn(2, 3), training=True, grad_mode="gumbel")
    with pytest.raises(ValueError, match="noise_std"):
        gate_route(torch.randn(2, 3), training=True, noise_std=-1.0)
    with pytest.raises(ValueError, match="training"):
        gate_route(torch.randn(2, 3), training=None)
    with pytest.raises(ValueError, match=r"\(B, n_y, d_y\)"):
        text_route(gate, torch.randn(2, 4), training=False)
    with pytest.raises(ValueError, match=r"\(B, d_t\)"):
        time_route(gate, torch.randn(2, 5), training=False)
    with pytest.raises(ValueError, match="eps"):
        route_literal(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="positive int"):
        GateFFN(4, 0)


def test_gate_noise_traces_under_compile_with_a_dynamic_batch():
    """torch.compile(dynamic=True) traces gate_noise with a symbolic batch size (dynamo could not trace
    randn(..., generator=None) there: tools/bench.py gpu's compiled training step failed on it)."""
    from raphael_ref.gates import gate_noise

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x[:, None] + gate_noise((x.shape[0], 4), 0.0), backend="eager", dynamic=True)
    for B in (2, 3, 5):
        assert torch.equal(fn(torch.ones(B)), torch.ones(B, 4))
