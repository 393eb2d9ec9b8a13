"""Cross-attention and its map M (RAPHAEL Sec. 2, U-Net with Text Prompts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raphael_ref.attention import cross_attention, cross_attention_literal, cross_attention_map

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Unit roundoff (half an ulp, relative) of each half type: a correctly rounded result is within u.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@st.composite
def qkv_problems(draw, max_b=3, max_nx=10, max_ny=9):
    """Random (q, k, v, heads, key_valid) in float64, drawn from a torch generator seeded by hypothesis."""
    B = draw(st.integers(1, max_b))
    n_x = draw(st.integers(1, max_nx))
    n_y = draw(st.integers(1, max_ny))
    heads = draw(st.sampled_from([1, 2, 4]))
    d_head = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))  # logits up to ~ scale^2 * sqrt(d_head) * 3
    use_mask = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d = heads * d_head
    q = scale * torch.randn(B, n_x, d, generator=g, dtype=torch.float64)
    k = scale * torch.randn(B, n_y, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, n_y, d, generator=g, dtype=torch.float64)
    key_valid = None
    if use_mask:
        key_valid = torch.rand(B, n_y, generator=g) < 0.6
        key_valid[:, 0] = True  # at least one valid key per prompt (the start token)
    return q, k, v, heads, key_valid


def _cast(problem, dtype):
    """(q, k, v, heads, key_valid) with q, k, v cast to dtype."""
    q, k, v, heads, key_valid = problem
    return q.to(dtype), k.to(dtype), v.to(dtype), heads, key_valid


def _textbook_single_head(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softmax(Q K^T / sqrt(d)) V for one (n_x, d) x (n_y, d) pair, in float64 numpy, row by row."""
    d = q.shape[1]
    s = q @ k.T / math.sqrt(d)  # (n_x, n_y)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    M = e / e.sum(axis=1, keepdims=True)
    return M @ v, M


@pytest.mark.spec_id("attn.cross_output")
@pytest.mark.parametrize("need_map", [False, True])  # the SDPA output, or the maps times V
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_fast_output_equals_literal_float32(problem, need_map):
    q, k, v, heads, key_valid = _cast(problem, torch.float32)
    out_lit, maps_lit = cross_attention_literal(q, k, v, heads, key_valid=key_valid)
    out_fast, M = cross_attention(q, k, v, heads, key_valid=key_valid, need_map=need_map)
    if need_map:
        torch.testing.assert_close(M, maps_lit.mean(1), rtol=1e-5, atol=2e-6)
    else:
        assert M is None
    # float32: both accumulate O(n_y + d_head) terms of O(1) values in float32 -> ~1e-6.
    torch.testing.assert_close(out_fast, out_lit, rtol=1e-5, atol=2e-6)


@pytest.mark.spec_id("attn.cross_output")
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("need_map", [False, True])
@settings(max_examples=15)
@given(problem=qkv_problems())
def test_fast_output_equals_literal_half(problem, dtype_name, need_map):
    dtype = HALF[dtype_name]
    q, k, v, heads, key_valid = _cast(problem, dtype)
    out_lit, _ = cross_attention_literal(q, k, v, heads, key_valid=key_valid)
    out_fast, _ = cross_attention(q, k, v, heads, key_valid=key_valid, need_map=need_map)
    assert out_fast.dtype == out_lit.dtype == dtype
    # Both are convex combinations of v. The literal form rounds once (u relative); the fused
    # kernel also rounds intermediates (probabilities, partial sums) to the half type: observed
    # <= 1.6 u max|v| over 400 random problems, bound 4 u max|v|. With need_map the maps times V run in
    # float32 and round once at the end, as the literal form does.
    u = UNIT_ROUNDOFF[dtype]
    vmax = float(v.abs().max())
    torch.testing.assert_close(out_fast.double(), out_lit.double(), rtol=2 * u, atol=4 * u * max(vmax, 1.0))


@pytest.mark.spec_id("attn.cross_map")
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_map_rows_sum_to_one_nonnegative_and_ignore_invalid_keys(problem):
    q, k, _, heads, key_valid = problem
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):  # one rounding per term summed
        M = cross_attention_map(q.to(dtype), k.to(dtype), heads, key_valid=key_valid)
        assert M.shape == (q.shape[0], q.shape[1], k.shape[1]) and M.dtype == dtype
        assert (M >= 0).all()
        torch.testing.assert_close(M.sum(-1), torch.ones_like(M.sum(-1)), rtol=0, atol=tol)
        if key_valid is not None:
            assert (M.masked_select(~key_valid[:, None, :].expand_as(M)) == 0).all()


@pytest.mark.spec_id("attn.cross_map")
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_map_is_mean_over_heads_of_literal_head_maps(problem):
    q, k, v, heads, key_valid = problem
    _, maps = cross_attention_literal(q, k, v, heads, key_valid=key_valid)
    assert maps.shape == (q.shape[0], heads, q.shape[1], k.shape[1])
    M = cross_attention_map(q, k, heads, key_valid=key_valid)
    torch.testing.assert_close(M, maps.mean(dim=1), rtol=1e-12, atol=1e-14)
    out_fast, M_fast = cross_attention(q, k, v, heads, key_valid=key_valid, need_map=True)
    assert torch.equal(M_fast, M)


@pytest.mark.spec_id("attn.cross_map")
@settings(max_examples=20)
@given(problem=qkv_problems(), shift_seed=st.integers(0, 2**31 - 1))
def test_map_invariant_to_a_common_key_shift(problem, shift_seed):
    """Adding one vector c to every key adds q.c / sqrt(d_head) to a whole row of logits: softmax ignores it."""
    q, k, _, heads, key_valid = problem
    c = torch.randn(k.shape[0], 1, k.shape[2], generator=torch.Generator().manual_seed(shift_seed), dtype=torch.float64)
    M = cross_attention_map(q, k, heads, key_valid=key_valid)
    M_shift = cross_attention_map(q, k + 3 * c, heads, key_valid=key_valid)
    torch.testing.assert_close(M_shift, M, rtol=1e-10, atol=1e-12)


@pytest.mark.spec_id("attn.cross_map")
@settings(max_examples=20)
@given(problem=qkv_problems(), perm_seed=st.integers(0, 2**31 - 1))
def test_map_columns_follow_key_permutation_and_rows_follow_queries(problem, perm_seed):
    q, k, v, heads, key_valid = problem
    g = torch.Generator().manual_seed(perm_seed)
    pk = torch.randperm(k.shape[1], generator=g)
    pq = torch.randperm(q.shape[1], generator=g)
    kv_p = None if key_valid is None else key_valid[:, pk]
    M = cross_attention_map(q, k, heads, key_valid=key_valid)
    M_p = cross_attention_map(q[:, pq], k[:, pk], heads, key_valid=kv_p)
    torch.testing.assert_close(M_p, M[:, pq][:, :, pk], rtol=1e-12, atol=1e-14)
    out, _ = cross_attention_literal(q, k, v, heads, key_valid=key_valid)
    out_p, _ = cross_attention_literal(q[:, pq], k[:, pk], v[:, pk], heads, key_valid=kv_p)
    torch.testing.assert_close(out_p, out[:, pq], rtol=1e-12, atol=1e-12)


@pytest.mark.spec_id("attn.cross_map")
@pytest.mark.spec_id("attn.cross_output")
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_single_head_is_the_textbook_formula(problem):
    """heads = 1 is the paper's formula with d the full width; checked against numpy in float64."""
    q, k, v, _, _ = problem
    for dtype, rtol, atol in ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-6)):
        out, maps = cross_attention_literal(q.to(dtype), k.to(dtype), v.to(dtype), 1)
        out_fast, M = cross_attention(q.to(dtype), k.to(dtype), v.to(dtype), 1, need_map=True)
        # reference from the float64 values of the dtype-rounded inputs
        qn, kn, vn = (x.to(dtype).double().numpy() for x in (q, k, v))
        for b in range(q.shape[0]):
            out_ref, M_ref = _textbook_single_head(qn[b], kn[b], vn[b])
            for got_M in (maps[b, 0], M[b]):
                np.testing.assert_allclose(got_M.double().numpy(), M_ref, rtol=rtol, atol=atol)
            for got_out in (out[b], out_fast[b]):
                np.testing.assert_allclose(got_out.double().numpy(), out_ref, rtol=rtol, atol=atol)


@pytest.mark.spec_id("attn.cross_map")
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_half_inputs_softmax_runs_in_float32(problem, dtype_name):
    """Half inputs: the map is the float32 map of the same (rounded) inputs, rounded once at the end."""
    dtype = HALF[dtype_name]
    q, k, v, heads, key_valid = _cast(problem, dtype)
    M = cross_attention_map(q, k, heads, key_valid=key_valid)
    assert M.dtype == dtype
    assert torch.equal(M, cross_attention_map(q.float(), k.float(), heads, key_valid=key_valid).to(dtype))
    out, maps = cross_attention_literal(q, k, v, heads, key_valid=key_valid)
    out32, maps32 = cross_attention_literal(q.float(), k.float(), v.float(), heads, key_valid=key_valid)
    assert torch.equal(maps, maps32.to(dtype))
    # the value product: a half matmul accumulates in float32, but its kernel's blocking (hence the float32
    # sum's last bits) may differ from the float32 kernel's, by CPU, thread count and load; a sum near a
    # half-precision rounding boundary then rounds to the neighbouring value: one unit in the last place
    # (2 u relative), and the fp16 subnormal spacing 6e-8 absolute. Seen once in a full-suite run.
    torch.testing.assert_close(out.float(), out32.to(dtype).float(), rtol=2 * UNIT_ROUNDOFF[dtype], atol=6e-8)
    # ... hence within one rounding (u relative) of the float64 map, up to float32 error; the
    # atol covers fp16 subnormals (spacing 6e-8).
    M64 = cross_attention_map(q.double(), k.double(), heads, key_valid=key_valid)
    u = UNIT_ROUNDOFF[dtype]
    assert ((M.double() - M64).abs() <= u * M64 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.spec_id("attn.cross_map")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_bound_detects_logits_computed_in_half(dtype):
    """The bound above can fail: a map whose logits Q K^T were rounded to the half type violates it."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 16, 32, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 7, 32, generator=g, dtype=torch.float64).to(dtype)
    heads, d_head = 4, 8
    M64 = cross_attention_map(q.double(), k.double(), heads)
    qh = q.reshape(2, 16, heads, d_head).transpose(1, 2)
    kh = k.reshape(2, 7, heads, d_head).transpose(1, 2)
    naive = ((qh @ kh.transpose(-1, -2)) / math.sqrt(d_head)).float().softmax(-1).mean(1).to(dtype)
    u = UNIT_ROUNDOFF[dtype]
    bound = u * M64 * (1 + 1e-5) + 1e-7
    assert not ((naive.double() - M64).abs() <= bound).all()
    assert ((cross_attention_map(q, k, heads).double() - M64).abs() <= bound).all()


@pytest.mark.spec_id("attn.cross_map")
def test_map_gradients_reach_q_and_k():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    key_valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda a, b: cross_attention_map(a, b, 2, key_valid=key_valid), (q, k))
    # rows sum to 1, so use a non-constant functional; both inputs get a nonzero gradient.
    w = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    (cross_attention_map(q, k, 2, key_valid=key_valid) * w).sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    # a masked key receives no gradient
    assert (k.grad[0, 2] == 0).all()


@pytest.mark.spec_id("attn.cross_output")
@settings(max_examples=20)
@given(problem=qkv_problems())
def test_masked_keys_equal_dropping_them(problem):
    q, k, v, heads, key_valid = problem
    if key_valid is None:
        key_valid = torch.ones(k.shape[:2], dtype=torch.bool)
    out, _ = cross_attention(q, k, v, heads, key_valid=key_valid)
    for b in range(q.shape[0]):
        keep = key_valid[b]
        ref, _ = cross_attention_literal(q[b : b + 1], k[b : b + 1, keep], v[b : b + 1, keep], heads)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-12, atol=1e-12)


def test_invalid_inputs_raise():
    q, k = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="no valid key"):
        cross_attention_map(q, k, 2, key_valid=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by heads"):
        cross_attention_map(q, k, 3)
    with pytest.raises(ValueError, match="agree in B and d"):
        cross_attention_map(q, torch.randn(1, 4, 6), 2)
    with pytest.raises(ValueError, match="key_valid"):
        cross_attention_map(q, k, 2, key_valid=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape of k"):
        cross_attention(q, k, torch.randn(1, 5, 8), 2)
    with pytest.raises(ValueError, match="share dtype"):
        cross_attention_map(q, k.double(), 2)
    with pytest.raises(ValueError, match="heads"):
        cross_attention_map(q, k, 0)


@pytest.mark.spec_id("attn.cross_map")
def test_map_stays_float32_under_autocast():
    """Under a bf16 autocast region the logits and softmax must still run in float32."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 64, 32, generator=g) * 3
    k = torch.randn(2, 77, 32, generator=g) * 3
    ref = cross_attention_map(q.double(), k.double(), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        M = cross_attention_map(q, k, 4)
        _, M_lit = cross_attention_literal(q, k, k, 4)
    assert M.dtype == torch.float32
    # float32 logits of O(10) magnitude: ~1e-6 relative; a bf16 matmul would be off by ~1e-2.
    torch.testing.assert_close(M.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M_lit.mean(1).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.spec_id("attn.cross_output")
def test_fast_gradients_equal_literal():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 16, generator=g, dtype=torch.float64, requires_grad=True) for n in (12, 7, 7))
    out_f, M_f = cross_attention(q, k, v, 2, need_map=True)
    grads_f = torch.autograd.grad((out_f.sum() + (M_f ** 2).sum()), (q, k, v))
    out_l, maps_l = cross_attention_literal(q, k, v, 2)
    grads_l = torch.autograd.grad((out_l.sum() + (maps_l.mean(1) ** 2).sum()), (q, k, v))
    for a, b in zip(grads_f, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sdpa_falls_back_to_the_math_backend_on_the_vnni_packing_error(monkeypatch):
    # torch's CPU flash kernel raises this for bf16 under ATEN_CPU_CAPABILITY=default on AVX-512 hardware
    import torch.nn.functional as F

    from raphael_ref import attention as A

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    real, calls = F.scaled_dot_product_attention, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")
        return real(*args, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", flaky)
    torch.testing.assert_close(A.sdpa(q, k, v), want, rtol=1e-5, atol=1e-6)  # float32: kernel rounding only
    assert len(calls) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("some other kernel failure")

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", broken)
    with pytest.raises(RuntimeError, match="some other kernel failure"):
        A.sdpa(q, k, v)
