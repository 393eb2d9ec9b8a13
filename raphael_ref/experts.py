"""Expert feed-forward networks shared by the space-MoE and the time-MoE.

RAPHAEL App. 7.1, Table 2: "Architectures of experts and gate network: FFN", "Activations in
experts and gate network: GELU". An expert maps one image token to one image token:

    e(x) = GELU(x W1 + b1) W2 + b2,        x in R^d,  W1 in R^{d x h},  W2 in R^{h x d}

with the exact (erf) GELU. The paper gives no hidden width; it is a constructor argument here.
Experts act position-wise, so ``e(0) = GELU(b1) W2 + b2`` is what an expert returns on a masked
(zeroed) position; the space-MoE needs it (see ``raphael_ref.space_moe``).

A second form, ``act="geglu"`` (not in the paper: the FFN of Stable Diffusion's transformer blocks,
Shazeer 2020, so that its weights can be copied into the experts, ``tools/convert_sd.py``, erratum E76):

    e(x) = (a * GELU(g)) W2 + b2,   [a, g] = x W1 + b1,   W1 in R^{d x 2h} (a: first h columns, g: last h)

as diffusers' ``GEGLU`` (``proj`` then ``chunk(2)``: value first, gate second). ``hidden`` is h, the
width entering W2, in both forms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["expert_ffn", "ExpertBank", "EXPERT_ACTS"]

EXPERT_ACTS = ("gelu", "geglu")  # the expert forms: GELU MLP (the paper) or GEGLU (Stable Diffusion's FFN)


def _check_float(name: str, x: torch.Tensor, ndim: int, hint: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {hint}; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor {hint}; got dtype {x.dtype}. Cast it with .float().")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims {hint}; got shape {tuple(x.shape)}.")


def _check_act(act: str) -> int:
    """Columns of w1 per hidden unit: 1 for "gelu", 2 for "geglu" (value and gate)."""
    if act not in EXPERT_ACTS:
        raise ValueError(f"act must be one of {list(EXPERT_ACTS)} (the expert form, model.expert_act); got {act!r}.")
    return 2 if act == "geglu" else 1


def _activate(z: torch.Tensor, act: str) -> torch.Tensor:
    """GELU(z) for "gelu"; a * GELU(g) with [a, g] = z split in halves along the last axis for "geglu"."""
    if act == "geglu":
        a, g = z.chunk(2, dim=-1)  # (..., h) each: value first, gate second (diffusers' GEGLU)
        return a * F.gelu(g, approximate="none")  # (..., h)
    return F.gelu(z, approximate="none")  # (..., h)


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               act: str = "gelu") -> torch.Tensor:
    """RAPHAEL App. 7.1 Table 2, expert = FFN with GELU: e(x) = GELU(x w1 + b1) w2 + b2 (exact erf GELU).

    x: (..., d); w1: (d, h); b1: (h,); w2: (h, d); b2: (d,). Returns (..., d). Acts on each
    position independently (the last axis is the feature axis). ``act="geglu"`` (erratum E76):
    w1: (d, 2h), b1: (2h,) and e(x) = (a * GELU(g)) w2 + b2 with [a, g] = x w1 + b1 split in halves.
    """
    per = _check_act(act)
    shape = "(d, 2 * hidden)" if per == 2 else "(d, hidden)"
    _check_float("w1", w1, 2, f"of shape {shape}")
    d, cols = w1.shape
    if cols % per:
        raise ValueError(f"w1 must have shape (d, 2 * hidden) for act='geglu' (value and gate columns); "
                         f"got {tuple(w1.shape)} with an odd column count.")
    hidden = cols // per
    _check_float("b1", b1, 1, f"of shape ({cols},)")
    _check_float("w2", w2, 2, f"of shape (hidden, d) = ({hidden}, {d})")
    _check_float("b2", b2, 1, f"of shape (d,) = ({d},)")
    if b1.shape != (cols,) or w2.shape != (hidden, d) or b2.shape != (d,):
        raise ValueError(
            f"expert parameters disagree ({act}): w1 {tuple(w1.shape)} needs b1 ({cols},), w2 ({hidden}, {d}), "
            f"b2 ({d},); got b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}."
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != d:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor of shape (..., d) with d = {d} (rows of w1); got {got}.")
    a = _activate(x @ w1 + b1, act)  # (..., h)
    return a @ w2 + b2  # (..., d)


class ExpertBank(nn.Module):
    """RAPHAEL Sec. 3.1 / App. 7.3, the set of experts {e_1, ..., e_k}: k FFNs stored as stacked tensors.

    Parameters (initialized like ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
    and biases): w1 (k, d, h), b1 (k, h), w2 (k, h, d), b2 (k, d); with ``act="geglu"`` (E76)
    w1 (k, d, 2h) and b1 (k, 2h), value columns first, gate columns second.
    """

    def __init__(self, n_experts: int, d: int, hidden: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 act: str = "gelu") -> None:
        super().__init__()
        for name, v in (("n_experts", n_experts), ("d", d), ("hidden", hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}.")
        per = _check_act(act)
        self.n_experts, self.d, self.hidden, self.act = n_experts, d, hidden, act
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(n_experts, d, per * hidden, **kw))
        self.b1 = nn.Parameter(torch.empty(n_experts, per * hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d, **kw))
        self.b2 = nn.Parameter(torch.empty(n_experts, d, **kw))
        self.reset_parameters(generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init per expert: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for p, fan_in in ((self.w1, self.d), (self.b1, self.d), (self.w2, self.hidden), (self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            p.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_params(cls, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    act: str = "gelu") -> "ExpertBank":
        """A bank holding copies of the given stacked parameters (k, d, h), (k, h), (k, h, d), (k, d)
        (w1 (k, d, 2h) and b1 (k, 2h) for ``act="geglu"``)."""
        per = _check_act(act)
        _check_float("w1", w1, 3, "of shape (k, d, hidden)" if per == 1 else "of shape (k, d, 2 * hidden)")
        k, d, cols = w1.shape
        if cols % per:
            raise ValueError(f"w1 must have shape (k, d, 2 * hidden) for act='geglu'; got {tuple(w1.shape)}.")
        hidden = cols // per
        for name, p, shape in (("b1", b1, (k, cols)), ("w2", w2, (k, hidden, d)), ("b2", b2, (k, d))):
            _check_float(name, p, len(shape), f"of shape {shape}")
            if tuple(p.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} to match w1 {tuple(w1.shape)}; got {tuple(p.shape)}.")
        bank = cls(k, d, hidden, device=w1.device, dtype=w1.dtype, act=act)
        with torch.no_grad():
            for mine, given in ((bank.w1, w1), (bank.b1, b1), (bank.w2, w2), (bank.b2, b2)):
                mine.copy_(given)
        return bank

    def extra_repr(self) -> str:
        act = "" if self.act == "gelu" else f", act={self.act!r}"
        return f"n_experts={self.n_experts}, d={self.d}, hidden={self.hidden}{act}"

    def _check_index(self, k: int) -> int:
        if isinstance(k, torch.Tensor):
            if k.numel() != 1 or k.is_floating_point():
                raise ValueError(f"k must be one integer expert index; got tensor {tuple(k.shape)} {k.dtype}.")
            k = int(k.item())
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.n_experts:
            raise ValueError(f"k must be an expert index in [0, {self.n_experts - 1}]; got {k!r}.")
        return k

    def expert(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """e_k(x) for one expert k: x (..., d) -> (..., d)."""
        k = self._check_index(k)
        return expert_ffn(x, self.w1[k], self.b1[k], self.w2[k], self.b2[k], self.act)

    def expert_at_zero(self) -> torch.Tensor:
        """e_k(0) = GELU(b1_k) w2_k + b2_k for every expert: (k, d). Zero only when the biases make it so.
        (GEGLU: (a0 * GELU(g0)) w2_k + b2_k with [a0, g0] = b1_k.)"""
        a = _activate(self.b1, self.act)  # (k, h)
        return torch.einsum("kh,khd->kd", a, self.w2) + self.b2  # (k, d)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != self.d:
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating tensor of shape (..., {self.d}); got {got}.")

    def mixture(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[..., k] e_k(x) for x (..., d), weights (..., k): (..., d); equals
        ``torch.einsum("...k,k...d->...d", weights, self(x))`` (tests/test_experts.py).

        Every expert on every position, as two wide matrix products instead of 2 k small ones: the k first
        layers side by side, x [w1_1 ... w1_k] + [b1_1 ... b1_k] (one (d, k h) product), the activation per
        expert, each expert's hidden units scaled by its weight, and the k second layers stacked,
        [w_1 a_1 ... w_k a_k] [w2_1; ...; w2_k] (one (k h, d) product), plus sum_k w_k b2_k. Same sums
        as e_k(x) = GELU(x w1_k + b1_k) w2_k + b2_k weighted and added, in another order (float round-off).
        """
        self._check_x(x)
        k, d, h = self.n_experts, self.d, self.hidden
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() \
                or tuple(weights.shape) != tuple(x.shape[:-1]) + (k,):
            got = f"shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a floating tensor of shape (..., k) = {tuple(x.shape[:-1]) + (k,)} "
                             f"(one weight per position and expert); got {got}.")
        cols = self.w1.shape[-1]  # h ("gelu") or 2 h ("geglu") columns per expert
        w1 = self.w1.permute(1, 0, 2).reshape(d, k * cols)  # (d, k cols)  [w1_1 ... w1_k]
        z = torch.addmm(self.b1.reshape(k * cols), x.reshape(-1, d), w1)  # (N, k cols)
        a = _activate(z.reshape(-1, k, cols), self.act)  # (N, k, h)  a_k = GELU(x w1_k + b1_k)
        a = a * weights.reshape(-1, k, 1).to(a.dtype)  # (N, k, h)  w_k a_k
        out = a.reshape(-1, k * h) @ self.w2.reshape(k * h, d)  # (N, d)  sum_k w_k a_k w2_k
        out = out + weights.reshape(-1, k).to(out.dtype) @ self.b2.to(out.dtype)  # (N, d)  + sum_k w_k b2_k
        return out.reshape(*x.shape[:-1], d)  # (..., d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every position: x (..., d) -> (k, ..., d), row k = e_k(x)."""
        self._check_x(x)
        return torch.stack([self.expert(k, x) for k in range(self.n_experts)])  # (k, ..., d)
