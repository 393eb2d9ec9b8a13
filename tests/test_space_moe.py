"""Space-MoE (RAPHAEL Sec. 3.1): the literal loop over tokens and the regrouped fast forms."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.experts import ExpertBank
from raphael_ref.space_moe import space_moe, space_moe_literal

F64 = torch.float64
IMPLS = ("dense", "gather")
# float64: both forms add the same O(1) terms in a different order (<= n_y = 6 terms here);
# rounding is ~1e-16 per op, so 1e-12 leaves 1e4 of margin and still catches any missing term.
TOL64 = dict(rtol=1e-12, atol=1e-12)


def make_inputs(B, n_x, n_y, d, hidden, k, seed, mask_kind="bernoulli", dtype=F64, weight_kind="signed"):
    """Random space-MoE inputs; the bank has large biases so that e_k(0) is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n_x, d, generator=gen, dtype=F64)  # (B, n_x, d)
    if mask_kind == "threshold":  # the shape of a real mask: M = softmax over n_y, Mhat = M >= alpha max_j M
        M = (2 * torch.randn(B, n_x, n_y, generator=gen, dtype=F64)).softmax(-1)  # (B, n_x, n_y)
        alpha = torch.rand(B, 1, n_y, generator=gen, dtype=F64)  # (B, 1, n_y)
        masks = M >= alpha * M.amax(dim=1, keepdim=True)
    else:
        p = torch.rand((), generator=gen).item()
        masks = torch.rand(B, n_x, n_y, generator=gen) < p  # (B, n_x, n_y)
        if mask_kind == "empty_columns":  # whole columns False, some others all True
            col = torch.randint(0, 3, (B, 1, n_y), generator=gen)  # (B, 1, n_y)
            masks = (masks & (col != 0)) | (col == 2)
    routes = torch.randint(0, k, (B, n_y), generator=gen)  # (B, n_y)
    if weight_kind == "signed":
        weights = 2.5 * torch.rand(B, n_y, generator=gen, dtype=F64) - 0.5  # (B, n_y), some negative or ~0
    else:  # gate-like probabilities in (0, 1]
        weights = 1 - torch.rand(B, n_y, generator=gen, dtype=F64)
    valid = torch.rand(B, n_y, generator=gen) < 0.7  # (B, n_y)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64)
    with torch.no_grad():
        bank.b1.add_(torch.randn(k, hidden, generator=gen, dtype=F64))
        bank.b2.add_(torch.randn(k, d, generator=gen, dtype=F64))
    bank = bank.to(dtype)
    return h.to(dtype), masks, routes, weights.to(dtype), valid, bank


sizes = st.fixed_dictionaries({
    "B": st.integers(1, 3), "n_x": st.integers(1, 7), "n_y": st.integers(1, 6), "d": st.integers(1, 4),
    "hidden": st.integers(1, 5), "k": st.integers(1, 4), "seed": st.integers(0, 2**20),
    "mask_kind": st.sampled_from(["threshold", "bernoulli", "empty_columns"]),
})


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30)
@given(c=sizes, count_padding=st.booleans())
def test_fast_equals_literal(impl, c, count_padding):
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    lit = space_moe_literal(h, masks, routes, weights, bank, valid=valid, count_padding=count_padding)
    fast = space_moe(h, masks, routes, weights, bank, valid=valid, count_padding=count_padding, impl=impl)
    assert fast.shape == h.shape and fast.dtype == h.dtype
    torch.testing.assert_close(fast, lit, **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans())
def test_fast_gradients_equal_literal(impl, c, count_padding):
    """Gradients w.r.t. h, the gate weights and every expert parameter agree (random cotangent)."""
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    h.requires_grad_(True), weights.requires_grad_(True)
    leaves = [h, weights, *bank.parameters()]
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=F64)
    kw = dict(valid=valid, count_padding=count_padding)
    def grads(out):  # an output built from no leaf (every token padding) has zero gradient everywhere
        return torch.autograd.grad((out * g).sum(), leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)

    grads_lit = grads(space_moe_literal(h, masks, routes, weights, bank, **kw))
    grads_fast = grads(space_moe(h, masks, routes, weights, bank, impl=impl, **kw))
    for name, leaf, a, b in zip(["h", "weights", "w1", "b1", "w2", "b2"], leaves, grads_lit, grads_fast):
        a = torch.zeros_like(leaf) if a is None else a  # None: the leaf took no part (e.g. every token is padding)
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_at_zero_term_is_needed(impl, seed):
    """Masked-out positions still pass e_k(0) != 0 into the mean; dropping that term would be far off.

    no_e0 is the sum without it, (1/n_y) sum_i w_i Mhat_i o e_{r_i}(h), built here from bank.expert.
    """
    h, masks, routes, weights, _, bank = make_inputs(2, 16, 5, 3, 4, 3, seed, "threshold")
    lit = space_moe_literal(h, masks, routes, weights, bank)
    no_e0 = sum(weights[:, i, None, None] * masks[:, :, i, None] * torch.stack(
        [bank.expert(int(routes[b, i]), h[b]) for b in range(2)]) for i in range(5)) / 5
    assert (lit - no_e0).abs().max() > 0.1 * lit.abs().max()  # e(0) carries a large share of the output
    torch.testing.assert_close(space_moe(h, masks, routes, weights, bank, impl=impl), lit, **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("fn", [space_moe_literal, *(lambda *a, impl=i, **kw: space_moe(*a, impl=impl, **kw) for i in IMPLS)],
                         ids=["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes)
def test_one_expert_full_masks_is_the_expert(fn, c):
    """k = 1, Mhat = all ones, w = 1: the mean of n_y copies of e(h) is e(h)."""
    c = {**c, "k": 1}
    h, masks, routes, weights, _, bank = make_inputs(**c)
    out = fn(h, torch.ones_like(masks), routes, torch.ones_like(weights), bank)
    torch.testing.assert_close(out, bank.expert(0, h), **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", ["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans())
def test_empty_masks_give_mean_of_expert_at_zero(impl, c, count_padding):
    """Mhat = 0 everywhere: every position gets (1/n) sum_i w_i e_{r_i}(0), whatever h is."""
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    kw = dict(valid=valid, count_padding=count_padding)
    zeros = torch.zeros_like(masks)
    out = (space_moe_literal(h, zeros, routes, weights, bank, **kw) if impl == "literal"
           else space_moe(h, zeros, routes, weights, bank, impl=impl, **kw))
    counted = torch.ones_like(valid) if count_padding else valid
    e0 = bank.expert_at_zero()  # (k, d)
    expect = (weights * counted)[..., None].mul(e0[routes]).sum(1) / counted.sum(1).clamp_min(1)[:, None]  # (B, d)
    torch.testing.assert_close(out, expect[:, None, :].expand_as(out), **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", ["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans(), perm_seed=st.integers(0, 1000))
def test_token_permutation_invariance(impl, c, count_padding, perm_seed):
    """Reordering text tokens (with their masks, routes, weights, valid flags) leaves the mean unchanged."""
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    f = space_moe_literal if impl == "literal" else (lambda *a, **kw: space_moe(*a, impl=impl, **kw))
    p = torch.randperm(c["n_y"], generator=torch.Generator().manual_seed(perm_seed))
    a = f(h, masks, routes, weights, bank, valid=valid, count_padding=count_padding)
    b = f(h, masks[:, :, p], routes[:, p], weights[:, p], bank, valid=valid[:, p], count_padding=count_padding)
    torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", ["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes, a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_linear_in_weights(impl, c, a, b):
    """out(a w + b w') = a out(w) + b out(w'): the gate weights enter linearly."""
    h, masks, routes, w, valid, bank = make_inputs(**c)
    w2 = torch.randn(w.shape, generator=torch.Generator().manual_seed(c["seed"] + 7), dtype=F64)
    f = space_moe_literal if impl == "literal" else (lambda *x, **kw: space_moe(*x, impl=impl, **kw))
    lhs = f(h, masks, routes, a * w + b * w2, bank)
    rhs = a * f(h, masks, routes, w, bank) + b * f(h, masks, routes, w2, bank)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", ["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans())
def test_batch_independence(impl, c, count_padding):
    """Sample b of a batch equals the layer run on sample b alone."""
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    f = space_moe_literal if impl == "literal" else (lambda *x, **kw: space_moe(*x, impl=impl, **kw))
    full = f(h, masks, routes, weights, bank, valid=valid, count_padding=count_padding)
    for b in range(c["B"]):
        s = slice(b, b + 1)
        one = f(h[s], masks[s], routes[s], weights[s], bank, valid=valid[s], count_padding=count_padding)
        torch.testing.assert_close(full[s], one, **TOL64)


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", ["literal", *IMPLS])
@settings(max_examples=15)
@given(c=sizes)
def test_count_padding_false_is_the_mean_over_valid_tokens(impl, c):
    """count_padding=False: sample b equals the n_y-mean over its valid tokens only; padding tokens are ignored."""
    h, masks, routes, weights, valid, bank = make_inputs(**c)
    f = space_moe_literal if impl == "literal" else (lambda *x, **kw: space_moe(*x, impl=impl, **kw))
    out = f(h, masks, routes, weights, bank, valid=valid, count_padding=False)
    for b in range(c["B"]):
        keep = valid[b].nonzero().squeeze(1)
        if keep.numel() == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))  # no valid token: empty mean is 0
            continue
        ref = space_moe_literal(h[b:b + 1], masks[b:b + 1][:, :, keep], routes[b:b + 1, keep], weights[b:b + 1, keep], bank)
        torch.testing.assert_close(out[b:b + 1], ref, **TOL64)
    # changing what padding tokens carry changes nothing with count_padding=False, and does with True
    pad = ~valid
    masks2, routes2, weights2 = masks ^ pad[:, None, :], (routes + pad) % c["k"], weights + 3.0 * pad
    torch.testing.assert_close(f(h, masks2, routes2, weights2, bank, valid=valid, count_padding=False), out, **TOL64)
    if pad.any():
        assert not torch.allclose(f(h, masks2, routes2, weights2, bank, valid=valid), f(h, masks, routes, weights, bank, valid=valid))


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", IMPLS)
def test_experts_without_tokens_get_no_gradient(impl):
    """All tokens routed to expert 0: experts 1..k-1 neither run nor receive gradient (gather skips them)."""
    h, masks, _, weights, _, bank = make_inputs(2, 6, 5, 3, 4, 4, 0, "threshold")
    routes = torch.zeros(2, 5, dtype=torch.long)
    space_moe(h, masks, routes, weights, bank, impl=impl).square().sum().backward()
    assert bank.w1.grad[0].abs().sum() > 0 and bank.b2.grad[0].abs().sum() > 0
    for p in bank.parameters():
        assert torch.equal(p.grad[1:], torch.zeros_like(p.grad[1:]))


# Low precision: both forms evaluate the experts in the compute dtype and then add <= n_y gate-weighted
# terms in a different grouping (the literal rounds each product w_i e and accumulates in float32; the
# fast form rounds C_k, each product and one k-term sum, then accumulates in float32). The terms can
# cancel, so the error is measured against the term scale s = max|w| max(|e_k(h)|, |e_k(0)|), which
# bounds every term: a few roundings of u each. bf16 (u = 3.9e-3): 4 u = 1.6e-2 (observed <= 1.1 u
# over 300 random cases up to n_y = 77). float32 (u = 6.0e-8): 16 u = 1e-6 (n_y <= 6 terms here).
LOW_PRECISION_REL = {torch.bfloat16: 1.6e-2, torch.float32: 1e-6}


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("dtype", list(LOW_PRECISION_REL), ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans())
def test_low_precision_fast_matches_literal(dtype, impl, c, count_padding):
    h, masks, routes, weights, valid, bank = make_inputs(**c, dtype=dtype, weight_kind="gate")
    kw = dict(valid=valid, count_padding=count_padding)
    lit = space_moe_literal(h, masks, routes, weights, bank, **kw)
    fast = space_moe(h, masks, routes, weights, bank, impl=impl, **kw)
    assert fast.dtype == dtype
    with torch.no_grad():
        scale = weights.float().abs().max() * max(bank(h).float().abs().max(), bank.expert_at_zero().float().abs().max())
    assert (fast.float() - lit.float()).abs().max() <= LOW_PRECISION_REL[dtype] * scale


def _good(B=2, n_x=3, n_y=4, d=2, k=3):
    bank = ExpertBank(k, d, 5)
    return dict(h=torch.randn(B, n_x, d), masks=torch.rand(B, n_x, n_y) < 0.5, routes=torch.randint(0, k, (B, n_y)),
                weights=torch.ones(B, n_y), bank=bank, valid=torch.ones(B, n_y, dtype=torch.bool))


@pytest.mark.parametrize("fn", [space_moe_literal, space_moe], ids=["literal", "fast"])
@pytest.mark.parametrize("change, name", [
    (dict(h=torch.randn(2, 3)), "h"),
    (dict(h=torch.ones(2, 3, 2, dtype=torch.long)), "h"),
    (dict(h=torch.randn(2, 3, 5)), "d = 5"),
    (dict(masks=torch.rand(2, 3, 4)), "masks"),
    (dict(masks=torch.ones(2, 3, 4, dtype=torch.long)), "masks"),
    (dict(masks=torch.ones(2, 5, 4, dtype=torch.bool)), "masks"),
    (dict(routes=torch.zeros(2, 5, dtype=torch.long)), "routes"),
    (dict(routes=torch.zeros(2, 4, dtype=torch.int32)), "routes"),
    (dict(routes=torch.full((2, 4), 3)), "routes must lie"),
    (dict(routes=torch.full((2, 4), -1)), "routes must lie"),
    (dict(weights=torch.ones(2, 4, dtype=torch.long)), "weights"),
    (dict(weights=torch.ones(4)), "weights"),
    (dict(valid=torch.ones(2, 4)), "valid"),
    (dict(valid=torch.ones(2, 3, dtype=torch.bool)), "valid"),
    (dict(bank=torch.nn.Linear(2, 2)), "bank"),
])
def test_validation_errors(fn, change, name):
    with pytest.raises(ValueError, match=name):
        fn(**{**_good(), **change})


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        space_moe(**_good(), impl="sparse")


def test_inputs_are_not_modified():
    args = _good()
    before = copy.deepcopy(args)
    for impl in IMPLS:
        space_moe(**args, impl=impl)
    space_moe_literal(**args)
    for key in ("h", "masks", "routes", "weights", "valid"):
        assert torch.equal(args[key], before[key])


def test_dense_compiles_as_one_graph():
    """impl="dense" with check_values=False has no data-dependent shapes or host syncs: fullgraph tracing works."""
    h, masks, routes, weights, valid, bank = make_inputs(2, 5, 4, 3, 6, 3, 0, "threshold", dtype=torch.float32)
    f = torch.compile(lambda *a: space_moe(*a, bank, valid=valid, impl="dense", check_values=False),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(h, masks, routes, weights), space_moe_literal(h, masks, routes, weights, bank),
                               rtol=1e-6, atol=1e-6)  # float32, n_y = 4 terms: ~ 16 u


@pytest.mark.spec_id("smoe.output")
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=15)
@given(c=sizes, count_padding=st.booleans())
def test_geglu_experts_fast_equals_literal(impl, c, count_padding):
    """model.expert_act = "geglu" (E76): the regrouped forms, e_k(0) term included, equal the token loop."""
    h, masks, routes, weights, valid, _ = make_inputs(**c)
    gen = torch.Generator().manual_seed(c["seed"] + 2)
    bank = ExpertBank(c["k"], c["d"], c["hidden"], generator=gen, dtype=F64, act="geglu")
    with torch.no_grad():  # large biases: e_k(0) = (a0 * GELU(g0)) W2 + b2 far from zero
        bank.b1.add_(torch.randn(bank.b1.shape, generator=gen, dtype=F64))
        bank.b2.add_(torch.randn(bank.b2.shape, generator=gen, dtype=F64))
    h.requires_grad_(True)
    kw = dict(valid=valid, count_padding=count_padding)
    lit = space_moe_literal(h, masks, routes, weights, bank, **kw)
    fast = space_moe(h, masks, routes, weights, bank, impl=impl, **kw)
    torch.testing.assert_close(fast, lit, **TOL64)
    if lit.requires_grad:
        leaves = [h, *bank.parameters()]
        g = torch.randn(h.shape, generator=gen, dtype=F64)
        for name, a, b in zip(["h", "w1", "b1", "w2", "b2"],
                              torch.autograd.grad((lit * g).sum(), leaves, allow_unused=True),
                              torch.autograd.grad((fast * g).sum(), leaves, allow_unused=True)):
            a = torch.zeros_like(b) if a is None and b is not None else a
            b = torch.zeros_like(a) if b is None and a is not None else b
            if a is not None:
                torch.testing.assert_close(b, a, **TOL64, msg=lambda m: f"grad {name}: {m}")
