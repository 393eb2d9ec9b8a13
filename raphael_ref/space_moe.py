"""Space-MoE layer (RAPHAEL Sec. 3.1): each text token sends its image region to one expert.

Printed:  (1/n_y) sum_{i=1}^{n_y} e_{route(y_i)}( h'(x_t) o Mhat_i )

with h' (n_x, d) the image tokens, Mhat_i (n_x,) the binary region of text token i (column i of
the thresholded cross-attention map), o the Hadamard product broadcast over the feature axis,
and e_1..e_k FFN experts. We multiply each term by the gate weight w_i (spec decision, see
``spec/errata.md``): in the default "straight_through" gate mode w_i == 1 in value.

Two forms, equal on every input (tests/test_space_moe.py):

* ``space_moe_literal``: the sum above as a Python loop over tokens i, one expert call each.
* ``space_moe``: the regrouped sum. An expert acts per position and Mhat_i[j] is 0 or 1, so
  e(h_j Mhat_i[j]) = Mhat_i[j] e(h_j) + (1 - Mhat_i[j]) e(0). Grouping the tokens by expert,

      sum_i w_i e_{r_i}(h o Mhat_i)[j] = sum_k C_k[j] e_k(h_j) + Cbar_k[j] e_k(0),
      C_k[j]    = sum_{i: r_i = k} w_i Mhat_i[j],
      Cbar_k[j] = sum_{i: r_i = k} w_i (1 - Mhat_i[j])     (= n_k - C_k[j], n_k = sum_{i: r_i=k} w_i),

  so each expert runs at most once per position instead of once per token (n_y = 77 tokens vs
  k = 6 experts in the paper). ``impl="dense"`` runs every expert on every position (no data-
  dependent shapes, compile-friendly); ``impl="gather"`` runs expert k only on the positions some token
  routed to k covers (exact: C_k is zero elsewhere), which is the fastest on the CPU.

Padding (``count_padding``; errata "padding tokens and n_y"): the paper fixes n_y = 77, the CLIP context length, so
by default all n_y slots, padding included, are summed and the sum is divided by n_y. With
``count_padding=False`` only tokens with ``valid`` True are summed and the sum is divided by
their number per sample (a sample with no valid token gets 0).
"""

from __future__ import annotations

from typing import Literal

import torch

from raphael_ref.experts import ExpertBank

__all__ = ["space_moe_literal", "space_moe", "token_weights"]

Impl = Literal["dense", "gather"]


def _check_inputs(h, masks, routes, weights, bank, valid, check_values: bool = True) -> tuple[int, int, int]:
    """Validate the space-MoE arguments; returns (B, n_x, n_y). The route range check syncs with the host."""
    if not isinstance(bank, ExpertBank):
        raise ValueError(f"bank must be a raphael_ref.experts.ExpertBank; got {type(bank).__name__}.")
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != 3:
        got = f"shape {tuple(h.shape)}, dtype {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"h must be a floating tensor of shape (B, n_x, d) (image tokens); got {got}.")
    B, n_x, d = h.shape
    if d != bank.d:
        raise ValueError(f"h has feature size d = {d} but the expert bank was built for d = {bank.d}; "
                         f"build ExpertBank(n_experts, {d}, hidden) or project h first.")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        got = masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a torch.bool tensor (B, n_x, n_y) of binary regions Mhat; got {got}. "
                         f"Threshold the attention map (M >= eta) instead of passing its values.")
    if masks.ndim != 3 or masks.shape[:2] != (B, n_x):
        raise ValueError(f"masks must have shape (B, n_x, n_y) = ({B}, {n_x}, n_y) to match h {tuple(h.shape)}; "
                         f"got {tuple(masks.shape)}.")
    n_y = masks.shape[2]
    if n_y < 1:
        raise ValueError("masks must have at least one text token (n_y >= 1); got n_y = 0.")
    if not isinstance(routes, torch.Tensor) or routes.dtype != torch.long or routes.shape != (B, n_y):
        got = f"shape {tuple(routes.shape)}, dtype {routes.dtype}" if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise ValueError(f"routes must be a torch.long tensor of shape (B, n_y) = ({B}, {n_y}); got {got}.")
    if check_values and routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= bank.n_experts):
        raise ValueError(f"routes must lie in [0, {bank.n_experts - 1}] (the bank has {bank.n_experts} experts); "
                         f"got values in [{int(routes.min())}, {int(routes.max())}].")
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or weights.shape != (B, n_y):
        got = f"shape {tuple(weights.shape)}, dtype {weights.dtype}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating tensor of shape (B, n_y) = ({B}, {n_y}) (gate weights); got {got}. "
                         f"Pass torch.ones(B, n_y) for the paper's plain argmax routing.")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != (B, n_y)):
        got = f"shape {tuple(valid.shape)}, dtype {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be None or a torch.bool tensor of shape (B, n_y) = ({B}, {n_y}); got {got}.")
    if {t.device for t in (h, masks, routes, weights)} != {h.device} or (valid is not None and valid.device != h.device):
        raise ValueError(f"h, masks, routes, weights and valid must be on one device; h is on {h.device}.")
    return B, n_x, n_y


def _counted(valid: torch.Tensor | None, count_padding: bool, B: int, n_y: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens enter the sum, (B, n_y) bool, and the divisor per sample, (B,) long."""
    if count_padding or valid is None:
        counted = torch.ones(B, n_y, dtype=torch.bool, device=device)  # (B, n_y)
        return counted, torch.full((B,), n_y, dtype=torch.long, device=device)
    return valid, valid.sum(dim=1).clamp_min(1)  # (B, n_y), (B,)


def space_moe_literal(h: torch.Tensor, masks: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor,
                      bank: ExpertBank, *, valid: torch.Tensor | None = None, count_padding: bool = True) -> torch.Tensor:
    """RAPHAEL Sec. 3.1, space-MoE: (1/n_y) sum_i w_i e_{route(y_i)}(h'(x_t) o Mhat_i), one expert call per token.

    h: (B, n_x, d) image tokens h'; masks: (B, n_x, n_y) bool, column i = Mhat_i; routes: (B, n_y)
    long expert index of each text token; weights: (B, n_y) gate weights w_i; valid: (B, n_y) bool
    text tokens that are not padding (used only with ``count_padding=False``; None: all are valid). Returns (B, n_x, d)
    in h's dtype; the n_y terms are accumulated in at least float32 (float32 for bf16/fp16/fp32 h).
    """
    B, n_x, n_y = _check_inputs(h, masks, routes, weights, bank, valid)
    counted, n_counted = _counted(valid, count_padding, B, n_y, h.device)
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    out = []
    for b in range(B):
        total = torch.zeros(n_x, bank.d, dtype=acc_dtype, device=h.device)  # (n_x, d)
        for i in range(n_y):
            if not counted[b, i]:
                continue
            region = h[b] * masks[b, :, i, None].to(h.dtype)  # (n_x, d)  h' o Mhat_i
            expert_out = bank.expert(int(routes[b, i]), region)  # (n_x, d)  e_{route(y_i)}(...)
            total = total + weights[b, i].to(h.dtype) * expert_out  # (n_x, d)
        out.append(total / n_counted[b])  # (n_x, d)  mean over the n_y tokens
    return torch.stack(out).to(h.dtype)  # (B, n_x, d)


def token_weights(masks: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor, counted: torch.Tensor,
                  n_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RAPHAEL Sec. 3.1, the space-MoE sum regrouped per expert: C_k[j] and Cbar_k[j], each (B, k, n_x).

    C_k[j] = sum_{i: r_i = k} w_i Mhat_i[j] (weight of e_k(h_j)); Cbar_k[j] = sum_{i: r_i = k}
    w_i (1 - Mhat_i[j]) (weight of e_k(0)); tokens with ``counted`` False are left out.
    """
    onehot = torch.nn.functional.one_hot(routes, n_experts).to(dtype)  # (B, n_y, k)
    w = torch.where(counted, weights.to(dtype), torch.zeros((), dtype=dtype, device=weights.device))  # (B, n_y)
    routed = onehot * w[..., None]  # (B, n_y, k)  w_i [r_i = k]
    m = masks.to(dtype)  # (B, n_x, n_y)
    C = torch.einsum("bji,bik->bkj", m, routed)  # (B, k, n_x)
    Cbar = torch.einsum("bji,bik->bkj", 1 - m, routed)  # (B, k, n_x)
    return C, Cbar


def space_moe(h: torch.Tensor, masks: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor, bank: ExpertBank,
              *, valid: torch.Tensor | None = None, count_padding: bool = True, impl: Impl = "dense",
              check_values: bool = True) -> torch.Tensor:
    """RAPHAEL Sec. 3.1, space-MoE, regrouped: (1/n_y) sum_k C_k o e_k(h') + Cbar_k e_k(0); equals space_moe_literal.

    Same arguments and result as :func:`space_moe_literal`. ``impl="dense"`` runs all k experts on
    all positions (no data-dependent shapes); ``impl="gather"`` runs expert k only on positions
    covered by a token routed to k (one host sync per expert). ``check_values=False`` skips the
    route range check, the only host sync of ``impl="dense"`` (for compiled or graph-captured code).
    """
    if impl not in ("dense", "gather"):
        raise ValueError(f"impl must be 'dense' or 'gather'; got {impl!r}.")
    B, n_x, n_y = _check_inputs(h, masks, routes, weights, bank, valid, check_values)
    k, d = bank.n_experts, bank.d
    counted, n_counted = _counted(valid, count_padding, B, n_y, h.device)
    acc = torch.promote_types(h.dtype, torch.float32)  # sums in >= float32, like the literal form
    # The experts may run in half precision under autocast; the regrouped sums never do.
    no_autocast = torch.autocast(device_type=h.device.type, enabled=False)
    with no_autocast:
        C, Cbar = token_weights(masks, routes, weights, counted, k, acc)  # (B, k, n_x) each
        e0 = bank.expert_at_zero()  # (k, d)
        at_zero = torch.einsum("bkj,kd->bjd", Cbar, e0.to(acc))  # (B, n_x, d)  sum_k Cbar_k e_k(0)
    if impl == "dense":
        at_h = bank.mixture(h, C.transpose(1, 2)).to(acc)  # (B, n_x, d)  sum_k C_k o e_k(h), all k on all j
    else:
        hits = torch.einsum("bji,bik->bkj", masks.float(),
                            (torch.nn.functional.one_hot(routes, k) * counted[..., None]).float())  # (B, k, n_x)
        h_flat = h.reshape(B * n_x, d)  # (B*n_x, d)
        at_h = torch.zeros(B * n_x, d, dtype=acc, device=h.device)  # (B*n_x, d)
        for e in range(k):
            pos = hits[:, e, :].reshape(-1).nonzero().squeeze(1)  # (N_e,)  positions some token routed to e covers
            if pos.numel() == 0:
                continue  # expert e got no token (or only empty regions): C_e == 0 everywhere
            y = bank.expert(e, h_flat.index_select(0, pos))  # (N_e, d)
            c = C[:, e, :].reshape(-1).index_select(0, pos)  # (N_e,)
            at_h = at_h.index_add(0, pos, c[:, None] * y.to(acc))  # (B*n_x, d)
        at_h = at_h.reshape(B, n_x, d)  # (B, n_x, d)
    return ((at_h + at_zero) / n_counted.to(acc)[:, None, None]).to(h.dtype)  # (B, n_x, d)
