"""Cross-attention between image tokens and text tokens, and its map M (RAPHAEL Sec. 2).

The paper writes one head: ``attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` and defines the
cross-attention map ``M = softmax(Q K^T / sqrt(d))`` of shape ``(n_x, n_y)``. We use ``heads``
heads, as every latent-diffusion U-Net does, so (spec/errata.md):

- ``d`` under the square root is the per-head width ``d_head = d / heads``;
- the map ``M`` is the mean over heads of the per-head softmax maps (as prompt-to-prompt does);
  each row still sums to 1 over the text tokens;
- ``key_valid`` (optional, ``(B, n_y)`` bool) removes keys from the softmax (logit ``-inf``).
  The default ``None`` lets all ``n_y`` slots (77 with CLIP padding) take part, as Stable
  Diffusion does. A query row with no valid key is an error.

``q`` is ``h(x_t) W_x^qry`` and ``k``, ``v`` are ``E(y) W_y^key``, ``E(y) W_y^val``: already
projected. The projection matrices live in the model, not here.

Under bf16/fp16 the logits ``Q K^T`` and the softmax run in float32 (from the upcast inputs) and
the results are cast back to the input dtype once, at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["cross_attention_literal", "cross_attention", "cross_attention_map", "sdpa", "softmax_dtype"]


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """``F.scaled_dot_product_attention``, falling back to its math backend where torch's CPU flash kernel fails.

    torch's CPU flash kernel for bf16 / fp16 chooses VNNI packing from the hardware but refuses it when the ATen
    kernels are capped below AVX-512 (``ATEN_CPU_CAPABILITY=default`` on an AVX-512 machine): "pack_vnni2 is only
    supported when avx512 is supported". The math backend computes the same attention (within the dtype's rounding).
    """
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    except RuntimeError as e:
        if "pack_vnni" not in str(e):
            raise
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the logits and softmax are computed in: float32 for half types, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _check_qk(q: Tensor, k: Tensor, heads: int, key_valid: Tensor | None) -> None:
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be a floating tensor of shape (B, n, d) (already projected), got {got}"
            )
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(
            f"q and k must share dtype and device, got q {q.dtype} on {q.device}, k {k.dtype} on {k.device}; "
            "cast them to one compute dtype first"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q (B, n_x, d) and k (B, n_y, d) must agree in B and d, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or q.shape[1] < 1:
        raise ValueError(f"need at least one query and one key, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % heads:
        raise ValueError(f"the width d={q.shape[2]} must be divisible by heads={heads}; pick heads dividing d")
    if key_valid is not None:
        B, n_y = k.shape[0], k.shape[1]
        if not isinstance(key_valid, Tensor) or key_valid.dtype != torch.bool or tuple(key_valid.shape) != (B, n_y):
            got = (
                f"{tuple(key_valid.shape)} {key_valid.dtype}"
                if isinstance(key_valid, Tensor)
                else type(key_valid).__name__
            )
            raise ValueError(f"key_valid must be a bool tensor of shape (B, n_y) = {(B, n_y)}, got {got}")
        if key_valid.device != k.device:
            raise ValueError(f"key_valid must be on {k.device}, got {key_valid.device}")
        # a value check (host sync): skipped under torch.compile, where it would break the graph; a row with no
        # valid key then gives a NaN map and output (the training step's non-finite check catches it)
        if not torch.compiler.is_compiling() and not bool(key_valid.any(dim=1).all()):
            bad = (~key_valid.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"key_valid has no valid key in batch rows {bad}: softmax over no key is undefined; "
                "keep at least one token (e.g. the start token) valid per prompt"
            )


def _check_v(k: Tensor, v: Tensor) -> None:
    if not isinstance(v, Tensor) or v.dim() != 3 or tuple(v.shape) != tuple(k.shape):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v must have the shape of k (B, n_y, d) = {tuple(k.shape)}, got {got}")
    if v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must share dtype/device with k ({k.dtype}, {k.device}), got ({v.dtype}, {v.device})")


def _split_heads(x: Tensor, heads: int) -> Tensor:
    B, n, d = x.shape
    return x.reshape(B, n, heads, d // heads).transpose(1, 2)  # (B, heads, n, d_head)


def _check_bias(q: Tensor, k: Tensor, heads: int, logit_bias: Tensor | None) -> None:
    if logit_bias is None:
        return
    shape = (q.shape[0], heads, q.shape[1], k.shape[1])
    if not isinstance(logit_bias, Tensor) or not logit_bias.is_floating_point() or tuple(logit_bias.shape) != shape:
        got = f"{tuple(logit_bias.shape)} {logit_bias.dtype}" if isinstance(logit_bias, Tensor) else type(logit_bias).__name__
        raise ValueError(f"logit_bias must be a float tensor of shape (B, heads, n_x, n_y) = {shape}, got {got}")


def _head_maps(q: Tensor, k: Tensor, heads: int, key_valid: Tensor | None,
               logit_bias: Tensor | None = None) -> Tensor:
    """Per-head softmax(Q_h K_h^T / sqrt(d_head)) in the softmax dtype: (B, heads, n_x, n_y).

    Autocast is switched off here: under a bf16/fp16 autocast region the logits matmul would
    otherwise be recast to half precision even though its inputs were upcast.
    """
    work = softmax_dtype(q.dtype)
    d_head = q.shape[-1] // heads
    with torch.autocast(device_type=q.device.type, enabled=False):
        Qh = _split_heads(q.to(work), heads)  # (B, heads, n_x, d_head)
        Kh = _split_heads(k.to(work), heads)  # (B, heads, n_y, d_head)
        logits = Qh @ Kh.transpose(-1, -2) / math.sqrt(d_head)  # (B, heads, n_x, n_y)
        if logit_bias is not None:  # an additive bias (paint-with-words, raphael_ref.paint)
            logits = logits + logit_bias.to(work)
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)  # (B, heads, n_x, n_y)


def cross_attention_literal(
    q: Tensor, k: Tensor, v: Tensor, heads: int, *, key_valid: Tensor | None = None,
    logit_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RAPHAEL Sec. 2, U-Net with Text Prompts: attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V, per head.

    Literal form: one plain loop over heads, explicit softmax. ``q`` (B, n_x, d), ``k``/``v``
    (B, n_y, d) are already projected; ``d`` must be divisible by ``heads`` and ``sqrt(d)`` is
    ``sqrt(d / heads)``. Logits, softmax and the weighted sum run in float32 when the inputs are
    bf16/fp16 and are cast back to the input dtype at the end.

    ``logit_bias`` (optional, (B, heads, n_x, n_y) float) is added to the scaled logits before the softmax
    (eDiff-I's paint-with-words, ``raphael_ref.paint``); None: the paper's attention.

    Returns ``(out, maps)``: ``out`` (B, n_x, d), heads concatenated in order; ``maps``
    (B, heads, n_x, n_y), the per-head softmax maps (rows sum to 1).
    """
    _check_qk(q, k, heads, key_valid)
    _check_v(k, v)
    _check_bias(q, k, heads, logit_bias)
    work = softmax_dtype(q.dtype)
    d_head = q.shape[-1] // heads
    outs, maps = [], []
    with torch.autocast(device_type=q.device.type, enabled=False):  # keep logits and softmax in `work`
        for h in range(heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            Q = q[..., cols].to(work)  # (B, n_x, d_head)
            K = k[..., cols].to(work)  # (B, n_y, d_head)
            V = v[..., cols].to(work)  # (B, n_y, d_head)
            logits = Q @ K.transpose(1, 2) / math.sqrt(d_head)  # (B, n_x, n_y)
            if logit_bias is not None:
                logits = logits + logit_bias[:, h].to(work)  # paint-with-words bias of head h
            if key_valid is not None:
                logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))  # invalid keys leave the softmax
            M_h = torch.softmax(logits, dim=-1)  # (B, n_x, n_y), rows sum to 1
            maps.append(M_h)
            outs.append(M_h @ V)  # (B, n_x, d_head)
    out = torch.cat(outs, dim=-1).to(q.dtype)  # (B, n_x, d)
    return out, torch.stack(maps, dim=1).to(q.dtype)  # (B, heads, n_x, n_y)


def cross_attention_map(q: Tensor, k: Tensor, heads: int, *, key_valid: Tensor | None = None,
                        map_dtype: torch.dtype | None = None, logit_bias: Tensor | None = None) -> Tensor:
    """RAPHAEL Sec. 2, U-Net with Text Prompts: M = softmax(Q K^T / sqrt(d)), averaged over heads.

    ``M[b, j, i]`` is the correspondence of image token ``j`` with text token ``i``:
    ``M = (1/heads) sum_h softmax(Q_h K_h^T / sqrt(d_head))``, shape (B, n_x, n_y), entries
    >= 0, rows summing to 1. Computed in float32 under bf16/fp16 (autocast included), returned in
    ``map_dtype`` (default: the input dtype; the model asks for float32 so that its threshold
    masks are not taken on a half-precision map). Differentiable in ``q`` and ``k``.
    """
    _check_qk(q, k, heads, key_valid)
    _check_bias(q, k, heads, logit_bias)
    M = _head_maps(q, k, heads, key_valid, logit_bias).mean(dim=1)  # (B, n_x, n_y)
    return M.to(q.dtype if map_dtype is None else map_dtype)


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    key_valid: Tensor | None = None,
    need_map: bool = False,
    map_dtype: torch.dtype | None = None,
    logit_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """RAPHAEL Sec. 2, U-Net with Text Prompts: fast attention(Q, K, V); equals ``cross_attention_literal``.

    Without ``need_map`` the output comes from ``torch.nn.functional.scaled_dot_product_attention`` (fused
    kernels, float32 accumulation). With ``need_map`` the per-head softmax maps are computed (as in
    ``cross_attention_map``, in the softmax dtype), the output is those maps times V (one batched product over
    the heads, in the softmax dtype, then cast back) and ``M`` is their head mean: the fused kernels do not return
    the map, so a second pass through them would only repeat the logits. ``logit_bias`` (B, heads, n_x, n_y) goes
    to SDPA as a float (additive) ``attn_mask`` (-inf at invalid keys) and into the map as well.

    Returns ``(out (B, n_x, d), M (B, n_x, n_y) or None)``.
    """
    _check_qk(q, k, heads, key_valid)
    _check_v(k, v)
    if need_map:
        # The map is needed anyway: its per-head softmax times V is the output (the literal form's sums, batched
        # over heads), cheaper than a second pass through SDPA.
        _check_bias(q, k, heads, logit_bias)
        P = _head_maps(q, k, heads, key_valid, logit_bias)  # (B, heads, n_x, n_y) in the softmax dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = P @ _split_heads(v.to(P.dtype), heads)  # (B, heads, n_x, d_head)
        B, _, n_x, _ = out.shape
        out = out.transpose(1, 2).reshape(B, n_x, q.shape[-1]).to(q.dtype)  # (B, n_x, d)
        M = P.mean(dim=1)  # (B, n_x, n_y)
        return out, M.to(q.dtype if map_dtype is None else map_dtype)
    mask = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, n_y), True = attend
    if logit_bias is not None:
        _check_bias(q, k, heads, logit_bias)
        mask = logit_bias.to(q.dtype) if mask is None else \
            logit_bias.to(q.dtype).masked_fill(~mask, float("-inf"))  # (B, heads, n_x, n_y) additive
    out = sdpa(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), attn_mask=mask
    )  # (B, heads, n_x, d_head)
    B, _, n_x, _ = out.shape
    return out.transpose(1, 2).reshape(B, n_x, q.shape[-1]), None  # (B, n_x, d); no map asked
