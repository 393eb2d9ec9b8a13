"""Load-balancing auxiliary loss of the gates: not in RAPHAEL, an option (erratum E73).

The Switch Transformer form (Fedus et al., 2022, Eq. 4-6), one term per MoE layer::

    L_bal = n * sum_{i=1}^{n} f_i P_i
    f_i   = (1/N) sum_x 1[route(x) = i]        fraction of the N routed items sent to expert i (no gradient)
    P_i   = (1/N) sum_x p_i(x)                 mean router probability of expert i (gradient into the gate)

with ``p(x) = softmax(G(x) + eps)``, the vector whose argmax is the route (``gates.gate_route``), and
n experts. L_bal = 1 when the routes are spread evenly (f_i = 1/n, whatever P), and tends to n when
every item goes to one expert with probability 1; its gradient lowers the probability of the experts
that take more than their share.

Items: the valid (non-padding) text tokens for a space-MoE, one per sample for a time-MoE. The
padding slots are left out although ``model.count_padding`` sums them in the space-MoE: they are the
same learned slots in every caption (72 of 77 for a 5-word prompt) and would weigh more than the words
whose routing the loss is meant to spread (the same choice as ``raphael_ref.monitoring``).

Two forms, equal on every input (tests/test_monitoring.py): :func:`balance_loss_literal` (plain
loops over items and experts) and :func:`balance_loss` (one-hot sums, no host sync).
:func:`model_balance_loss` averages the layers' terms over the model's MoE layers that have a gate.
"""

from __future__ import annotations

import torch

__all__ = ["balance_loss_literal", "balance_loss", "model_balance_loss"]


def _check(probs: torch.Tensor, routes: torch.Tensor, valid: torch.Tensor | None) -> None:
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() < 1 or probs.shape[-1] < 1:
        got = f"{tuple(probs.shape)} {probs.dtype}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a floating tensor (..., n) of router probabilities over n >= 1 experts, "
                         f"got {got}")
    if not isinstance(routes, torch.Tensor) or routes.dtype != torch.long or routes.shape != probs.shape[:-1]:
        got = f"{tuple(routes.shape)} {routes.dtype}" if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise ValueError(f"routes must be a torch.long tensor of shape {tuple(probs.shape[:-1])} (probs without "
                         f"its expert axis), got {got}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or valid.shape != routes.shape):
        got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be None or a torch.bool tensor of shape {tuple(routes.shape)}, got {got}")


def balance_loss_literal(probs: torch.Tensor, routes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer Eq. 4 (Fedus et al., 2022): L_bal = n sum_i f_i P_i, as plain loops (erratum E73).

    probs (..., n) router probabilities p(x); routes (...) long expert of each item; valid (...) bool
    items that count (None: all). Returns a 0-d tensor in the accumulation dtype (>= float32); 0 with
    no valid item. Checks that every route lies in [0, n).
    """
    _check(probs, routes, valid)
    n = probs.shape[-1]
    acc = torch.promote_types(probs.dtype, torch.float32)
    p, r = probs.reshape(-1, n).to(acc), routes.reshape(-1)  # (N_all, n), (N_all,)
    keep = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(-1)  # (N_all,)
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= n):
        raise ValueError(f"routes must lie in [0, {n - 1}] ({n} experts), got values in "
                         f"[{int(r.min())}, {int(r.max())}]")
    N = int(keep.sum())
    if N == 0:
        return probs.sum().to(acc) * 0  # no routed item: 0, still part of the graph
    total = torch.zeros((), dtype=acc, device=probs.device)
    for i in range(n):
        f_i = sum(1 for x in range(r.numel()) if keep[x] and int(r[x]) == i) / N  # fraction routed to i
        P_i = sum(p[x, i] for x in range(r.numel()) if keep[x]) / N  # mean probability of i
        total = total + f_i * P_i
    return n * total


def balance_loss(probs: torch.Tensor, routes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer Eq. 4 (Fedus et al., 2022): L_bal = n sum_i f_i P_i; equals balance_loss_literal.

    Same arguments and result. Vectorised (one-hot sums), no host sync and no value check of the routes
    (they come from an argmax); f carries no gradient, P the gradient of ``probs``.
    """
    _check(probs, routes, valid)
    n = probs.shape[-1]
    acc = torch.promote_types(probs.dtype, torch.float32)
    keep = (torch.ones(routes.shape, dtype=acc, device=probs.device) if valid is None
            else valid.to(acc))  # (...)
    N = keep.sum().clamp_min(1)  # () items that count; 1 when none (then f = P = 0)
    f = (torch.nn.functional.one_hot(routes, n).to(acc) * keep[..., None]).reshape(-1, n).sum(0) / N  # (n,)
    P = (probs.to(acc) * keep[..., None]).reshape(-1, n).sum(0) / N  # (n,)
    return n * (f.detach() * P).sum()  # ()


def model_balance_loss(aux, y_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of :func:`balance_loss` over the MoE layers of a forward (erratum E73): a 0-d tensor.

    ``aux``: the list of ``models.BlockAux`` of ``RaphaelUNet.forward(..., return_probs=True)``; each block
    gives one term for its space-MoE (items: the text tokens with ``y_valid`` (B, n_y) True; None: all)
    and one for its time-MoE (items: the B samples) when that MoE has a gate. The mean (not the sum of
    Switch Transformer) keeps the coefficient independent of the number of blocks.
    """
    terms = []
    for a in aux:
        if a.space_probs is not None:
            terms.append(balance_loss(a.space_probs, a.space_routes, y_valid))
        if a.time_probs is not None:
            terms.append(balance_loss(a.time_probs, a.time_routes))
    if not terms:
        raise ValueError("no block returned router probabilities: call the model with return_probs=True, with a "
                         "space-MoE (model.use_space_moe) or a learned time gate (model.use_time_moe, "
                         "model.time_router='learned')")
    return torch.stack(terms).mean()  # ()
