"""Time-MoE (RAPHAEL App. 7.3): one time expert per sample; the grouped fast form equals the per-sample loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.experts import ExpertBank, expert_ffn
from raphael_ref.time_moe import time_moe, time_moe_literal

F64 = torch.float64
# float64: the grouped form runs the same expert on the same rows; only matmul blocking may differ.
TOL64 = dict(rtol=1e-12, atol=1e-12)
FORMS = {"literal": time_moe_literal, "fast": time_moe}


def make_inputs(B, n_x, d, hidden, k, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n_x, d, generator=gen, dtype=F64)  # (B, n_x, d)
    routes = torch.randint(0, k, (B,), generator=gen)  # (B,)
    weights = 2 * torch.rand(B, generator=gen, dtype=F64) - 0.5  # (B,)
    bank = ExpertBank(k, d, hidden, generator=gen, dtype=F64)
    return h.to(dtype), routes, weights.to(dtype), bank.to(dtype)


sizes = st.fixed_dictionaries({
    "B": st.integers(1, 6), "n_x": st.integers(1, 5), "d": st.integers(1, 4), "hidden": st.integers(1, 5),
    "k": st.integers(1, 4), "seed": st.integers(0, 2**20),
})


@pytest.mark.spec_id("tmoe.output")
@settings(max_examples=30)
@given(c=sizes)
def test_literal_is_weighted_expert_per_sample(c):
    """out[b] = w_b te_{r_b}(h[b]) with te an FFN with the bank's slice r_b; shape equals the input's."""
    h, routes, weights, bank = make_inputs(**c)
    out = time_moe_literal(h, routes, weights, bank)
    assert out.shape == h.shape and out.dtype == h.dtype
    for b in range(c["B"]):
        r = int(routes[b])
        ref = weights[b] * expert_ffn(h[b], bank.w1[r], bank.b1[r], bank.w2[r], bank.b2[r])
        torch.testing.assert_close(out[b], ref, **TOL64)


@pytest.mark.spec_id("tmoe.output")
@settings(max_examples=30)
@given(c=sizes)
def test_fast_equals_literal_values_and_gradients(c):
    h, routes, weights, bank = make_inputs(**c)
    h.requires_grad_(True), weights.requires_grad_(True)
    leaves = [h, weights, *bank.parameters()]
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=F64)
    lit, fast = time_moe_literal(h, routes, weights, bank), time_moe(h, routes, weights, bank)
    torch.testing.assert_close(fast, lit, **TOL64)
    grads_lit = torch.autograd.grad((lit * g).sum(), leaves)
    grads_fast = torch.autograd.grad((fast * g).sum(), leaves)
    for name, a, b in zip(["h", "weights", "w1", "b1", "w2", "b2"], grads_lit, grads_fast):
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m: f"grad {name}: {m}")
    used = torch.zeros(c["k"], dtype=torch.bool).index_fill_(0, routes, True)
    for p in grads_fast[2:]:  # experts no sample was routed to get exactly zero gradient
        assert torch.equal(p[~used], torch.zeros_like(p[~used]))


@pytest.mark.spec_id("tmoe.output")
@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=20)
@given(c=sizes, perm_seed=st.integers(0, 1000))
def test_batch_permutation_equivariance(form, c, perm_seed):
    """Permuting the batch (with routes and weights) permutes the output: grouping by expert loses no sample."""
    h, routes, weights, bank = make_inputs(**c)
    p = torch.randperm(c["B"], generator=torch.Generator().manual_seed(perm_seed))
    f = FORMS[form]
    torch.testing.assert_close(f(h[p], routes[p], weights[p], bank), f(h, routes, weights, bank)[p], **TOL64)


@pytest.mark.spec_id("tmoe.output")
@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=20)
@given(c=sizes)
def test_batch_independence_and_weight_linearity(form, c):
    """Sample b alone gives the same result; scaling w_b scales only row b."""
    h, routes, weights, bank = make_inputs(**c)
    f = FORMS[form]
    full = f(h, routes, weights, bank)
    for b in range(c["B"]):
        torch.testing.assert_close(f(h[b:b + 1], routes[b:b + 1], weights[b:b + 1], bank), full[b:b + 1], **TOL64)
    scale = torch.arange(1, c["B"] + 1, dtype=F64)
    torch.testing.assert_close(f(h, routes, weights * scale, bank), full * scale[:, None, None], **TOL64)


@pytest.mark.spec_id("tmoe.output")
@pytest.mark.parametrize("form", FORMS)
def test_single_expert_unit_weights_is_the_expert(form):
    h, _, _, bank = make_inputs(3, 4, 5, 6, 1, 0)
    out = FORMS[form](h, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=F64), bank)
    torch.testing.assert_close(out, bank.expert(0, h), **TOL64)


# bfloat16: both forms run the same bf16 expert on the same rows and multiply by w_b once; the only
# possible difference is matmul blocking over a different row count, i.e. <= 1-2 ulp of the output
# (u = 3.9e-3): 2 u = 8e-3 of the largest |output|.
@pytest.mark.spec_id("tmoe.output")
@settings(max_examples=15)
@given(c=sizes)
def test_bf16_fast_matches_literal(c):
    h, routes, weights, bank = make_inputs(**c, dtype=torch.bfloat16)
    lit, fast = time_moe_literal(h, routes, weights, bank), time_moe(h, routes, weights, bank)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - lit.float()).abs().max() <= 8e-3 * lit.float().abs().max().clamp_min(1e-3)


def _good(B=3, n_x=2, d=4, k=2):
    return dict(h=torch.randn(B, n_x, d), routes=torch.randint(0, k, (B,)), weights=torch.ones(B), bank=ExpertBank(k, d, 5))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("change, name", [
    (dict(h=torch.randn(3, 4)), "h"),
    (dict(h=torch.randn(3, 2, 6)), "d = 6"),
    (dict(routes=torch.zeros(3, 1, dtype=torch.long)), "routes"),
    (dict(routes=torch.zeros(3, dtype=torch.int32)), "routes"),
    (dict(routes=torch.tensor([0, 1, 2])), "routes must lie"),
    (dict(weights=torch.ones(3, 2)), "weights"),
    (dict(weights=torch.ones(3, dtype=torch.long)), "weights"),
    (dict(bank=torch.nn.Linear(4, 4)), "bank"),
])
def test_validation_errors(form, change, name):
    with pytest.raises(ValueError, match=name):
        FORMS[form](**{**_good(), **change})


@pytest.mark.spec_id("tmoe.output")
@pytest.mark.parametrize("impl", ["grouped", "dense"])
@settings(max_examples=15)
@given(c=sizes)
def test_geglu_experts_fast_equals_literal(impl, c):
    """model.expert_act = "geglu" (E76): both fast forms equal the per-sample loop, values and gradients."""
    h, routes, weights, _ = make_inputs(**c)
    bank = ExpertBank(c["k"], c["d"], c["hidden"], generator=torch.Generator().manual_seed(c["seed"]), dtype=F64,
                      act="geglu")
    h.requires_grad_(True), weights.requires_grad_(True)
    leaves = [h, weights, *bank.parameters()]
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=F64)
    lit, fast = time_moe_literal(h, routes, weights, bank), time_moe(h, routes, weights, bank, impl=impl)
    torch.testing.assert_close(fast, lit, **TOL64)
    for b in range(c["B"]):
        r = int(routes[b])
        ref = weights[b] * expert_ffn(h[b], bank.w1[r], bank.b1[r], bank.w2[r], bank.b2[r], act="geglu")
        torch.testing.assert_close(lit[b], ref, **TOL64)
    for name, a, b in zip(["h", "weights", "w1", "b1", "w2", "b2"], torch.autograd.grad((lit * g).sum(), leaves),
                          torch.autograd.grad((fast * g).sum(), leaves)):
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m: f"grad {name}: {m}")


class _PromotingBank(ExpertBank):
    """Experts whose output dtype differs from the input's, as under CUDA bf16 autocast: there x @ w1 runs
    in bf16 but the float32 bias promotes e(x) to float32 (CPU autocast hides this: its index_copy promotes)."""

    def expert(self, k, x):
        return super().expert(k, x.to(self.w1.dtype))  # bf16 in, float32 out


@pytest.mark.spec_id("tmoe.output")
@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_fast_form_keeps_the_experts_output_dtype(impl):
    """Regression (found on an H200): the grouped form wrote float32 expert outputs into a buffer of h's
    dtype (bf16) with index_copy, which CUDA rejects. Both fast forms must return what the literal returns."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, 4, generator=gen).to(torch.bfloat16)  # (B, n_x, d)
    routes, weights = torch.tensor([1, 0, 1, 1, 0]), torch.rand(5, generator=gen)
    bank = _PromotingBank(2, 4, 6, generator=gen)  # float32 parameters
    lit = time_moe_literal(h, routes, weights, bank)
    fast = time_moe(h, routes, weights, bank, impl=impl)
    assert lit.dtype == fast.dtype == torch.float32
    # same expert, same rows, same float32 arithmetic; the gate weight is rounded to bf16 in both forms
    torch.testing.assert_close(fast, lit, rtol=1e-6, atol=1e-6)
