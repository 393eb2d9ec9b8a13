"""Time-MoE layer (RAPHAEL App. 7.3): each sample's image tokens go through one time expert.

Printed:  h'(x_t) = te_{t_router(t_i)}( h_c(x_t) )

The route depends on the timestep only, so it is one expert per sample: all n_x tokens of sample
b go through expert te_{r_b}. We multiply by the gate weight w_b (spec decision; w_b == 1 in
value for the default "straight_through" gate mode). The output has the input's shape.

* ``time_moe_literal``: a loop over samples, one expert call each.
* ``time_moe``, two fast forms, equal to the literal one in values and gradients:
  ``impl="grouped"`` groups the batch by expert (index_select / index_copy) and runs each expert
  once on its samples: the least arithmetic, but the group sizes are data (one host sync per
  call, a graph break under ``torch.compile``). ``impl="dense"`` runs every expert on every
  sample and picks row b of expert r_b (``ExpertBank.forward`` then an index by (r_b, b)): no
  host sync and no data-dependent shape, for compiled or graph-captured code, at n_t times the
  expert arithmetic (the space-MoE's ``impl="dense"`` makes the same trade).
"""

from __future__ import annotations

from typing import Literal

import torch

from raphael_ref.experts import ExpertBank

__all__ = ["time_moe_literal", "time_moe"]

Impl = Literal["grouped", "dense"]


def _check_inputs(h, routes, weights, bank, check_values: bool = True) -> int:
    """Validate the time-MoE arguments; returns B."""
    if not isinstance(bank, ExpertBank):
        raise ValueError(f"bank must be a raphael_ref.experts.ExpertBank; got {type(bank).__name__}.")
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != 3:
        got = f"shape {tuple(h.shape)}, dtype {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"h must be a floating tensor of shape (B, n_x, d) (image tokens h_c); got {got}.")
    B, _, d = h.shape
    if d != bank.d:
        raise ValueError(f"h has feature size d = {d} but the expert bank was built for d = {bank.d}.")
    if not isinstance(routes, torch.Tensor) or routes.dtype != torch.long or routes.shape != (B,):
        got = f"shape {tuple(routes.shape)}, dtype {routes.dtype}" if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise ValueError(f"routes must be a torch.long tensor of shape (B,) = ({B},), one time expert per sample; got {got}.")
    if check_values and B and (int(routes.min()) < 0 or int(routes.max()) >= bank.n_experts):
        raise ValueError(f"routes must lie in [0, {bank.n_experts - 1}] (the bank has {bank.n_experts} experts); "
                         f"got values in [{int(routes.min())}, {int(routes.max())}].")
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or weights.shape != (B,):
        got = f"shape {tuple(weights.shape)}, dtype {weights.dtype}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating tensor of shape (B,) = ({B},) (gate weights); got {got}. "
                         f"Pass torch.ones(B) for the paper's plain argmax routing.")
    if routes.device != h.device or weights.device != h.device:
        raise ValueError(f"h, routes and weights must be on one device; h is on {h.device}.")
    return B


def time_moe_literal(h: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor, bank: ExpertBank) -> torch.Tensor:
    """RAPHAEL App. 7.3, time-MoE: h'(x_t) = w_b te_{t_router(t_b)}(h_c(x_t)), one expert call per sample b.

    h: (B, n_x, d) features h_c; routes: (B,) long; weights: (B,) gate weights. Returns (B, n_x, d).
    """
    B = _check_inputs(h, routes, weights, bank)
    out = [weights[b].to(h.dtype) * bank.expert(int(routes[b]), h[b]) for b in range(B)]  # B x (n_x, d)
    return torch.stack(out) if out else h.new_zeros(h.shape)  # (B, n_x, d)


def time_moe(h: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor, bank: ExpertBank,
             *, check_values: bool = True, impl: Impl = "grouped") -> torch.Tensor:
    """RAPHAEL App. 7.3, time-MoE, each expert run once (grouped by expert or on all samples); equals time_moe_literal.

    Same arguments and result as :func:`time_moe_literal`. ``impl="grouped"`` (default): each
    expert runs on its own samples; the group sizes cost one host sync per call
    (``bincount().tolist()``). ``impl="dense"``: every expert runs on every sample and sample b
    keeps expert r_b's rows; no host sync, no data-dependent shape (``torch.compile`` without a
    graph break). ``check_values=False`` skips the route range check (another host sync).
    """
    if impl not in ("grouped", "dense"):
        raise ValueError(f"impl must be 'grouped' or 'dense'; got {impl!r}.")
    B = _check_inputs(h, routes, weights, bank, check_values)
    if impl == "dense":
        every = bank(h)  # (k, B, n_x, d)  te_e(h[b]) for every expert e and sample b
        picked = every[routes, torch.arange(B, device=h.device)]  # (B, n_x, d)  te_{r_b}(h[b])
        return weights.to(h.dtype)[:, None, None] * picked  # (B, n_x, d)
    order = torch.argsort(routes, stable=True)  # (B,) samples sorted by expert
    counts = torch.bincount(routes, minlength=bank.n_experts).tolist()  # the one host sync: group sizes
    out = None  # (B, n_x, d) in the experts' output dtype; every row is written once below
    for e, rows in enumerate(torch.split(order, counts)):  # rows: (B_e,) samples routed to expert e
        if rows.numel() == 0:
            continue
        y = bank.expert(e, h.index_select(0, rows))  # (B_e, n_x, d)
        w = weights.index_select(0, rows).to(h.dtype)  # (B_e,)
        piece = w[:, None, None] * y  # (B_e, n_x, d)
        if out is None:
            # The experts' dtype, not h's: under CUDA bf16 autocast x @ w1 is bf16 but the float32 bias
            # promotes the expert's output to float32 (as in time_moe_literal); index_copy does not cast.
            out = piece.new_empty(h.shape)
        out = out.index_copy(0, rows, piece)  # (B, n_x, d)
    return out if out is not None else h.new_zeros(h.shape)  # (B, n_x, d)
