"""Text and time gate networks (RAPHAEL Sec. 3.1 "Text Gate Network", App. 7.3 "Time Gate Network").

As printed (both gates have the same form)::

    route(y_i)   = argmax(softmax(G(E(y_i)) + eps))        G : R^{d_y} -> R^k
    t_router(t)  = argmax(softmax(G'(E'(t)) + eps))        G': R^{d_t} -> R^{n_t}

Counting the parentheses, the noise ``eps`` is added to the gate *logits*, inside the softmax.
Decisions (spec/errata.md):

- noise law: ``eps ~ N(0, noise_std^2)`` i.i.d. per logit, in logit units, drawn only in training
  (noisy gating of Shazeer et al. 2017, the paper's MoE reference [7]); ``noise_std`` defaults to
  ``DEFAULT_NOISE_STD = 1.0``. In eval no noise is drawn: the route is ``argmax(softmax(G(.)))
  = argmax(G(.))``, deterministic.
- gradient: argmax has none. ``grad_mode`` picks the expert weight that multiplies the chosen
  expert's output, with ``p = softmax(logits + eps)`` (the vector whose argmax is the route):
  ``"none"`` (weight 1, gate untrained: the paper literally), ``"switch"`` (weight ``p_route``,
  Switch Transformer) or ``"straight_through"`` (weight ``p_route / p_route.detach()``: exactly 1
  in the forward pass, as in the paper, while the backward pass carries ``d log p_route``).
  Default ``"straight_through"``.
- the softmax runs in float32 whatever the logits' dtype; weights are returned in the logits'
  dtype (so they do not upcast the expert outputs they multiply).
- ``G`` is an FFN with GELU (Table 2): Linear(d_in, hidden) -> GELU -> Linear(hidden, k), hidden
  defaulting to ``d_in``. The text gate sees the text token representation ``E(y_i)`` (the text
  encoder's output token, before the cross-attention key projection); the time gate sees the time
  embedding ``E'(t)`` of the U-Net.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_NOISE_STD",
    "GRAD_MODES",
    "GateFFN",
    "gate_noise",
    "per_sample_noise",
    "per_sample_noise_active",
    "noise_checkpoint_contexts",
    "sample_stream_seed",
    "gate_softmax",
    "route_literal",
    "gate_route",
    "text_route",
    "time_route",
]

DEFAULT_NOISE_STD = 1.0  # std of the Gaussian gate noise, in logit units (training only)
GRAD_MODES = ("none", "switch", "straight_through")


class GateFFN(nn.Module):
    """RAPHAEL Table 2 / Sec. 3.1: the gate G : R^{d_in} -> R^{n_experts}, an FFN with GELU.

    ``Linear(d_in, hidden) -> GELU -> Linear(hidden, n_experts)``; ``hidden`` defaults to
    ``d_in`` (not stated in the paper). Returns logits ``(..., n_experts)``.
    """

    def __init__(self, d_in: int, n_experts: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = d_in if hidden is None else hidden
        for name, val in (("d_in", d_in), ("n_experts", n_experts), ("hidden", hidden)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"GateFFN: {name} must be a positive int, got {val!r}")
        self.d_in, self.n_experts, self.hidden = d_in, n_experts, hidden
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, n_experts)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"GateFFN expects inputs (..., {self.d_in}), got {tuple(x.shape)}")
        return self.fc2(self.act(self.fc1(x)))  # (..., n_experts)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, hidden={self.hidden}, n_experts={self.n_experts}"


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point() or logits.shape[-1] < 1:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating tensor (..., k) with k >= 1 experts, got {got}")


def _check_noise_std(noise_std: float) -> None:
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not 0.0 <= noise_std < float("inf"):
        raise ValueError(f"noise_std must be a finite number >= 0 (0 disables the noise), got {noise_std!r}")


def gate_noise(
    shape: torch.Size | tuple[int, ...],
    noise_std: float = DEFAULT_NOISE_STD,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """RAPHAEL Sec. 3.1, Text Gate Network: the noise eps ~ N(0, noise_std^2) added to the gate logits.

    float32, drawn on the generator's device (CPU by default) and moved to ``device``.
    """
    _check_noise_std(noise_std)
    streams = getattr(_STREAMS, "state", None)
    if streams is not None and generator is None:  # train.rng = "sample": row i from sample i's own stream
        eps = streams.draw(tuple(shape))
        eps = eps * float(noise_std)
        return eps if device is None else eps.to(device)
    draw_on = generator.device if generator is not None else (device if device is not None else "cpu")
    # generator passed only when given: torch.compile with a dynamic batch size cannot trace randn(generator=None)
    kw = {} if generator is None else {"generator": generator}
    eps = torch.randn(tuple(shape), device=draw_on, dtype=torch.float32, **kw)
    eps = eps * float(noise_std)
    return eps if device is None else eps.to(device)


# ---------------------------------------------------------------- per-sample noise streams (train.rng = "sample")
# With train.rng = "sample" (tools/train.py) every random draw of a training sample comes from a stream of its
# own, seeded by (train.seed, the sample's position in the global data stream), so the draws do not depend on
# which rank holds the sample or how the batch is cut into micro-batches: a run resumed on another world size
# goes on with the same draws. Inside ``per_sample_noise(seeds)`` the gate noise of row i of every gate is drawn
# from a CPU generator seeded by sample_stream_seed(seeds[i], c), c counting the gate-noise draws since the
# context opened (the same order in every forward: the blocks run in a fixed order). Activation checkpointing
# recomputes a block in the backward pass: ``noise_checkpoint_contexts`` (the ``context_fn`` of
# torch.utils.checkpoint) replays the counter the block started from, so the recomputed routes are the forward's.

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_stream_seed(*keys: int) -> int:
    """A seed in [0, 2^63) for torch.Generator.manual_seed from integer keys (e.g. seed, sample position, draw).

    Keys are folded in order through SplitMix64, so (a, b) and (b, a) give different seeds.
    """
    h = 0
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"sample_stream_seed: keys must be ints >= 0, got {keys!r}")
        h = _splitmix64(h ^ (k & _MASK64))
    return h >> 1


class _SampleStreams:
    def __init__(self, seeds: tuple[int, ...], calls: int) -> None:
        self.seeds, self.calls = seeds, calls

    def draw(self, shape: tuple[int, ...]) -> Tensor:
        if len(shape) < 1 or shape[0] != len(self.seeds):
            raise RuntimeError(f"per-sample gate noise: the gate logits {shape} do not have one row per sample of the "
                               f"batch ({len(self.seeds)} samples; train.rng = 'sample' needs the batch axis first)")
        g, rows = torch.Generator(), []
        for s in self.seeds:
            g.manual_seed(sample_stream_seed(s, self.calls))
            rows.append(torch.randn(shape[1:], generator=g, dtype=torch.float32))
        self.calls += 1
        return torch.stack(rows)  # (B, ...)


_STREAMS = threading.local()


@contextlib.contextmanager
def per_sample_noise(seeds: Sequence[int], start: int = 0) -> Iterator[None]:
    """Within the context, gate noise drawn without a generator comes from one stream per sample (row).

    ``seeds``: one int >= 0 per row of the batch (e.g. sample_stream_seed(train.seed, position)). Nested
    contexts restore the outer one on exit. Thread-local (autograd may recompute on another thread: the
    checkpoint contexts open their own).
    """
    seeds = tuple(int(s) for s in seeds)
    if any(s < 0 for s in seeds):
        raise ValueError("per_sample_noise: seeds must be ints >= 0")
    prev = getattr(_STREAMS, "state", None)
    _STREAMS.state = _SampleStreams(seeds, start)
    try:
        yield
    finally:
        _STREAMS.state = prev


def per_sample_noise_active() -> bool:
    """Whether a ``per_sample_noise`` context is open on this thread."""
    return getattr(_STREAMS, "state", None) is not None


def noise_checkpoint_contexts():
    """``context_fn`` for torch.utils.checkpoint: the recomputation draws the gate noise the forward drew."""
    state = getattr(_STREAMS, "state", None)
    if state is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), per_sample_noise(state.seeds, state.calls)


def gate_softmax(logits: Tensor, eps: Tensor | None = None) -> Tensor:
    """RAPHAEL Sec. 3.1, Text Gate Network: p = softmax(G(E(y_i)) + eps), in float32. ``(..., k)``."""
    _check_logits(logits)
    z = logits.float()  # (..., k)
    if eps is not None:
        if tuple(eps.shape) != tuple(logits.shape):
            raise ValueError(f"eps must have the logits' shape {tuple(logits.shape)}, got {tuple(eps.shape)}")
        z = z + eps.to(device=z.device, dtype=torch.float32)
    return torch.softmax(z, dim=-1)  # (..., k)


def route_literal(logits: Tensor, eps: Tensor) -> Tensor:
    """RAPHAEL Sec. 3.1, Text Gate Network: route = argmax(softmax(G(E(y_i)) + eps)), exactly as printed.

    ``logits`` = G(E(y_i)) (..., k); ``eps`` same shape (zeros for no noise). Returns torch.long
    (...), ties to the lowest index (torch.argmax).
    """
    _check_logits(logits)
    if not isinstance(eps, Tensor) or tuple(eps.shape) != tuple(logits.shape):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eps must have the logits' shape {tuple(logits.shape)} (zeros for no noise), got {got}")
    p = torch.softmax(logits.float() + eps.float(), dim=-1)  # (..., k)
    return torch.argmax(p, dim=-1)  # (...)


def gate_route(
    logits: Tensor,
    *,
    training: bool,
    noise_std: float = DEFAULT_NOISE_STD,
    grad_mode: str = "straight_through",
    generator: torch.Generator | None = None,
    return_probs: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """RAPHAEL Sec. 3.1 / App. 7.3: (route, weight) with route = argmax(softmax(logits + eps)).

    ``eps = gate_noise(logits.shape, noise_std, generator=generator)`` in training, no noise (and
    no random draw) otherwise. ``weights`` per ``grad_mode`` (module docstring), in the logits'
    dtype. Returns ``(routes torch.long (...), weights (...))`` for ``logits`` (..., k); with
    ``return_probs`` also ``p = softmax(logits + eps)`` (..., k) float32, with gradient (the router
    probabilities of a load-balancing loss, ``raphael_ref.balance``; not in the paper).
    """
    _check_logits(logits)
    if not isinstance(training, bool):
        raise ValueError(f"training must be a bool (pass module.training), got {training!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    _check_noise_std(noise_std)
    eps = gate_noise(logits.shape, noise_std, generator=generator, device=logits.device) if training else None
    p = gate_softmax(logits, eps)  # (..., k) float32
    routes = torch.argmax(p, dim=-1)  # (...) long
    if grad_mode == "none":
        weights = torch.ones(routes.shape, dtype=logits.dtype, device=logits.device)  # (...)
    else:
        p_route = p.gather(-1, routes.unsqueeze(-1)).squeeze(-1)  # (...), >= 1/k > 0
        weights = p_route if grad_mode == "switch" else p_route / p_route.detach()  # (...)
        weights = weights.to(logits.dtype)
    return (routes, weights, p) if return_probs else (routes, weights)


def _check_gate(gate: nn.Module, x: Tensor, name: str, ndim: int, shape: str) -> None:
    if not isinstance(gate, GateFFN):
        raise ValueError(f"gate must be a GateFFN, got {type(gate).__name__}")
    if not isinstance(x, Tensor) or x.dim() != ndim or x.shape[-1] != gate.d_in:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {shape} with width {gate.d_in} (the gate's d_in), got {got}")


def text_route(
    gate: GateFFN,
    y: Tensor,
    *,
    training: bool,
    noise_std: float = DEFAULT_NOISE_STD,
    grad_mode: str = "straight_through",
    generator: torch.Generator | None = None,
    return_probs: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """RAPHAEL Sec. 3.1, Text Gate Network: route(y_i) = argmax(softmax(G(E(y_i)) + eps)) for every token.

    ``y`` (B, n_y, d_y): text token representations E(y). Returns ``(routes (B, n_y) long,
    weights (B, n_y))``, one space expert per text token; with ``return_probs`` also the router
    probabilities ``(B, n_y, k)`` float32 (:func:`gate_route`).
    """
    _check_gate(gate, y, "y", 3, "(B, n_y, d_y)")
    logits = gate(y)  # (B, n_y, k)
    return gate_route(logits, training=training, noise_std=noise_std, grad_mode=grad_mode, generator=generator,
                      return_probs=return_probs)


def time_route(
    gate: GateFFN,
    t_emb: Tensor,
    *,
    training: bool,
    noise_std: float = DEFAULT_NOISE_STD,
    grad_mode: str = "straight_through",
    generator: torch.Generator | None = None,
    return_probs: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """RAPHAEL App. 7.3, Time Gate Network: t_router(t_i) = argmax(softmax(G'(E'(t_i)) + eps)).

    ``t_emb`` (B, d_t): the U-Net's time embedding E'(t). Returns ``(routes (B,) long,
    weights (B,))``, one time expert per sample; with ``return_probs`` also the router
    probabilities ``(B, n_t)`` float32 (:func:`gate_route`).
    """
    _check_gate(gate, t_emb, "t_emb", 2, "(B, d_t)")
    logits = gate(t_emb)  # (B, n_t)
    return gate_route(logits, training=training, noise_std=noise_std, grad_mode=grad_mode, generator=generator,
                      return_probs=return_probs)


def interval_route(t: Tensor, n_experts: int, T: int) -> tuple[Tensor, Tensor]:
    """eDiff-I-style fixed time routing (seed 003; Balaji et al., 2022): expert e takes the timesteps of
    the e-th of ``n_experts`` equal intervals of [0, T), route(t) = floor(t n_experts / T).

    Not RAPHAEL: a control for Fig. 6 (a time-MoE whose route is a fixed function of t, no gate).
    eDiff-I splits its denoisers by noise level (a binary tree of intervals; uniformly spaced
    intervals are the alternative its authors name). ``t`` (B,) 0-based timesteps. Returns
    ``(routes (B,) long, weights (B,) ones)``.
    """
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"t must be a 1-d integer tensor of timesteps; got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1; got {n_experts!r}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1; got {T!r}")
    routes = torch.div(t.long().clamp(0, T - 1) * n_experts, T, rounding_mode="floor")  # (B,)
    return routes, torch.ones(t.shape, dtype=torch.float32, device=t.device)
