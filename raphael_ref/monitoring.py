"""Expert usage while training: how the gates spread the routed items over the experts, per block.

For each transformer block and each MoE (space: ``BlockAux.space_routes`` (B, n_y), one expert per
text token; time: ``BlockAux.time_routes`` (B,), one expert per sample), over a log window:

    fraction_i = (# items routed to expert i) / (# items)          i = 1..n
    entropy    = -sum_i fraction_i ln fraction_i                   (nats; 0 when one expert takes all)
    entropy_norm = entropy / ln n                                  (1 when the items are spread evenly)

Items of the space-MoE are the *valid* text tokens (``y_valid``, the caption's tokens with BOS/EOS),
not the padding slots: although the space-MoE sums the padding slots too under ``model.count_padding``
(the paper's n_y = 77), they are the same learned slots in every caption (72 of 77 for a 5-word
prompt) and would hide how the gate treats the words, whose routing the paper analyses (Fig. 4, 9).
The load-balancing loss (``raphael_ref.balance``) counts the same items.

A block *collapsed* in a window when every item of that window went to one expert and the window holds
at least ``min_items`` items: by default the smallest count at which a gate that spreads its items
evenly over n experts would do that by chance with probability below 1e-6,
``1 + ceil(ln 1e6 / ln n)`` (11 samples for 4 time experts, 9 tokens for 6 space experts), so a short
window of a few samples does not raise a false alarm.

:class:`ExpertUsage` keeps the counts on the device (``update`` adds one step's routes without a host
sync) and reads them once per window (``summary``: one all-reduce under DDP / FSDP, one copy to the
host). :func:`collapse_warning`, :func:`plot_expert_usage` and :class:`TensorBoardLog` serve
``tools/train.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["ExpertUsage", "chance_min_items", "collapse_warning", "plot_expert_usage", "TensorBoardLog",
           "tensorboard_scalars", "check_tensorboard"]

CHANCE = 1e-6  # probability below which an even router would put a whole window on one expert


def chance_min_items(n_experts: int, chance: float = CHANCE) -> int:
    """Smallest N with n * (1/n)^N <= ``chance``: fewer items all on one expert are no evidence of collapse."""
    if n_experts < 2:
        return 1
    return 1 + math.ceil(math.log(1.0 / chance) / math.log(n_experts) - 1e-9)


class ExpertUsage:
    """Per-block route counts of a log window, kept on ``device``: (n_blocks, n_space + n_time) long.

    ``n_space`` / ``n_time``: experts of the space-MoE / time-MoE (0 when that MoE is off).
    ``min_items``: items a window needs before a one-expert window counts as collapsed (None: the
    chance threshold :func:`chance_min_items` of each MoE).
    """

    def __init__(self, n_blocks: int, n_space: int, n_time: int, device: torch.device | str = "cpu",
                 min_items: int | None = None):
        for name, v, lo in (("n_blocks", n_blocks, 1), ("n_space", n_space, 0), ("n_time", n_time, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"ExpertUsage: {name} must be an int >= {lo}, got {v!r}")
        if min_items is not None and (isinstance(min_items, bool) or not isinstance(min_items, int) or min_items < 1):
            raise ValueError(f"ExpertUsage: min_items must be None or an int >= 1, got {min_items!r}")
        self.n_blocks, self.n_space, self.n_time, self.min_items = n_blocks, n_space, n_time, min_items
        self.counts = torch.zeros(n_blocks, n_space + n_time, dtype=torch.long, device=device)  # (n_blocks, k_s + k_t)
        self.steps = 0  # optimizer steps in the window (update calls with count_step=True)

    @classmethod
    def for_config(cls, cfg, device: torch.device | str = "cpu", min_items: int | None = None) -> "ExpertUsage":
        """The accumulator of a ``RaphaelConfig``'s U-Net (its transformer blocks and MoE sizes)."""
        m = cfg.model
        return cls(cfg.n_transformer_blocks, m.n_space_experts if m.use_space_moe else 0,
                   m.n_time_experts if m.use_time_moe else 0, device, min_items)

    # ------------------------------------------------------------------ accumulate
    def update(self, aux: Sequence[Any], y_valid: torch.Tensor | None = None, *, count_step: bool = True) -> None:
        """Add one forward's routes: ``aux`` the list of ``models.BlockAux``; ``y_valid`` (B, n_y) bool the
        text tokens that count (None: every slot). No host sync: one ``index_add_`` on the device.
        ``count_step``: whether this forward ends an optimizer step (the window counts optimizer steps;
        under gradient accumulation only the last of the K micro-batches passes True)."""
        width = self.counts.shape[1]
        idx, add = [], []  # flat (block, expert) index of each item, and 1 (or 0: padding token) per item
        for a in aux:
            if not 0 <= a.index < self.n_blocks:
                raise ValueError(f"ExpertUsage: block index {a.index} outside [0, {self.n_blocks}); build the "
                                 f"accumulator for this model (ExpertUsage.for_config)")
            base = a.index * width
            if a.space_routes is not None:
                if not self.n_space:
                    raise ValueError("ExpertUsage: the model has a space-MoE but the accumulator has n_space = 0")
                r = a.space_routes  # (B, n_y) long
                if y_valid is not None and y_valid.shape != r.shape:
                    raise ValueError(f"y_valid must be (B, n_y) = {tuple(r.shape)} like the space routes, got "
                                     f"{tuple(y_valid.shape)}")
                idx.append((base + r).reshape(-1))
                add.append(torch.ones_like(r).reshape(-1) if y_valid is None
                           else y_valid.to(r.device).long().reshape(-1))
            if a.time_routes is not None:
                if not self.n_time:
                    raise ValueError("ExpertUsage: the model has a time-MoE but the accumulator has n_time = 0")
                r = a.time_routes  # (B,) long
                idx.append((base + self.n_space + r).reshape(-1))
                add.append(torch.ones_like(r).reshape(-1))
        if idx:
            dev = self.counts.device
            self.counts.view(-1).index_add_(0, torch.cat(idx).to(dev), torch.cat(add).to(dev))
        self.steps += bool(count_step)

    def reset(self) -> None:
        self.counts.zero_()
        self.steps = 0

    def _reduced(self) -> torch.Tensor:
        """The window's counts summed over the ranks (a copy; collective when a process group of > 1 ranks
        is up: every rank must call it), on the host."""
        c = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(c)
        return c.cpu()  # the window's one host sync

    # ------------------------------------------------------------------ read out
    def summary(self) -> dict[str, Any]:
        """JSON-able usage of the window (collective under DDP / FSDP: every rank calls it).

        ``{"steps": s, "space": {...} | None, "time": {...} | None}``, each MoE ``{"n_experts", "min_items",
        "items": [per block], "fractions": [[per expert] per block], "entropy": [...], "entropy_norm": [...],
        "collapsed": [block indices]}``; a block with no item has fractions / entropy ``None``.
        """
        c = self._reduced()  # (n_blocks, k_s + k_t)
        return {"steps": self.steps,
                "space": self._moe(c[:, :self.n_space]) if self.n_space else None,
                "time": self._moe(c[:, self.n_space:]) if self.n_time else None}

    def _moe(self, counts: torch.Tensor) -> dict[str, Any]:
        k = counts.shape[1]
        min_items = self.min_items if self.min_items is not None else chance_min_items(k)
        items, fractions, entropy, entropy_norm, collapsed = [], [], [], [], []
        for b, row in enumerate(counts.tolist()):
            n = sum(row)
            items.append(n)
            if n == 0:
                fractions.append(None)
                entropy.append(None)
                entropy_norm.append(None)
                continue
            f = [x / n for x in row]
            h = -sum(p * math.log(p) for p in f if p > 0)
            fractions.append([round(p, 6) for p in f])
            entropy.append(round(h, 6))
            entropy_norm.append(round(h / math.log(k), 6) if k > 1 else None)
            if k > 1 and max(row) == n and n >= min_items:
                collapsed.append(b)
        return {"n_experts": k, "min_items": min_items, "items": items, "fractions": fractions,
                "entropy": entropy, "entropy_norm": entropy_norm, "collapsed": collapsed}

    # ------------------------------------------------------------------ checkpoints
    def window_state(self) -> dict[str, Any]:
        """The window so far, summed over the ranks (collective), for a checkpoint's state.json."""
        return {"steps": self.steps, "counts": self._reduced().tolist()}

    def load_window_state(self, state: dict[str, Any] | None, rank: int = 0) -> None:
        """Restore :meth:`window_state`: rank 0 takes the summed counts, the other ranks start at zero (so the
        next all-reduce counts each item once). A missing or mismatched state (an older checkpoint) resets."""
        self.reset()
        if not state:
            return
        counts = torch.tensor(state.get("counts", []), dtype=torch.long)
        if tuple(counts.shape) != tuple(self.counts.shape):
            return
        self.steps = int(state.get("steps", 0))
        if rank == 0:
            self.counts.copy_(counts.to(self.counts.device))


def collapse_warning(summary: dict[str, Any], step: int) -> str | None:
    """One line (no ``warning:`` prefix) naming the blocks whose usage collapsed to one expert over the
    window of ``summary`` (:meth:`ExpertUsage.summary`) and what to do, or None."""
    parts = []
    for moe, what in (("space", "tokens"), ("time", "samples")):
        s = summary.get(moe)
        if not s or not s["collapsed"]:
            continue
        which = ", ".join(f"{b} (expert {max(range(s['n_experts']), key=lambda i: s['fractions'][b][i])})"
                          for b in s["collapsed"])
        parts.append(f"{moe}-MoE of block{'s' if len(s['collapsed']) > 1 else ''} {which}: all {what} to one expert")
    if not parts:
        return None
    return (f"expert collapse over the {summary['steps']} steps up to step {step}: " + "; ".join(parts)
            + ". The other experts of those blocks get no gradient; raise the gate noise (model.gate_noise_std) or "
              "add the load-balancing loss (train.balance_loss, e.g. 0.01); see docs/training.md, \"Expert usage\"")


# ---------------------------------------------------------------------- plot

def _usage_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if isinstance(r.get("expert_usage"), dict) and isinstance(r.get("step"), (int, float))]


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def plot_expert_usage(records: Sequence[dict[str, Any]], path: str | Path, cell: int = 34) -> None:
    """Draw the ``expert_usage`` of a log (``training.read_log``) into a PNG with Pillow.

    Top: a heatmap of the last window, one row per block, one column per expert (space-MoE left,
    time-MoE right), the cell's shade and label its fraction, a red row label for a collapsed block,
    the row's normalised entropy at its right. Bottom: the mean and the lowest normalised entropy over
    the blocks against the step (1: items spread evenly; 0: one expert takes all).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    recs = _usage_records(records)
    last = recs[-1]["expert_usage"] if recs else {}
    moes = [(name, last.get(name)) for name in ("space", "time") if last.get(name)]
    n_blocks = max((len(s["items"]) for _, s in moes), default=0)
    left, top, gap, lab = 64, 52, 60, 46
    widths = [s["n_experts"] * cell + lab for _, s in moes]
    W = max(560, left + sum(widths) + gap * max(0, len(widths) - 1) + 24)
    heat_h = top + max(1, n_blocks) * cell + 24
    line_h = 236
    img = Image.new("RGB", (W, heat_h + line_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if not recs:
        draw.text((left, 8), "expert usage: no window logged yet", fill=(0, 0, 0), font=font)
        _save_png(img, path)
        return
    draw.text((left, 6), f"expert usage, last window ({last.get('steps', '?')} steps to step {recs[-1]['step']}): "
                         f"fraction of items per expert", fill=(0, 0, 0), font=font)
    x0 = left
    for (name, s), w in zip(moes, widths):
        k = s["n_experts"]
        draw.text((x0, top - 26), f"{name}-MoE ({'text tokens' if name == 'space' else 'samples'})",
                  fill=(0, 0, 0), font=font)
        for i in range(k):
            draw.text((x0 + i * cell + cell // 2 - 3, top - 13), str(i), fill=(0, 0, 0), font=font)
        draw.text((x0 + k * cell + 6, top - 13), "H/ln n", fill=(0, 0, 0), font=font)
        for b in range(len(s["items"])):
            y = top + b * cell
            red = b in s["collapsed"]
            draw.text((x0 - 30, y + cell // 2 - 6), f"b{b:02d}", fill=(200, 0, 0) if red else (0, 0, 0), font=font)
            fr = s["fractions"][b]
            for i in range(k):
                v = None if fr is None else fr[i]
                shade = (235, 235, 235) if v is None else tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
                box = [x0 + i * cell, y, x0 + (i + 1) * cell - 1, y + cell - 1]
                draw.rectangle(box, fill=shade, outline=(200, 0, 0) if red else (255, 255, 255))
                if v is not None:
                    draw.text((box[0] + 4, y + cell // 2 - 6), f"{round(100 * v)}",
                              fill=(255, 255, 255) if v > 0.5 else (0, 0, 0), font=font)
            e = s["entropy_norm"][b]
            draw.text((x0 + k * cell + 6, y + cell // 2 - 6), "-" if e is None else f"{e:.2f}",
                      fill=(200, 0, 0) if red else (0, 0, 0), font=font)
        x0 += w + gap
    _entropy_lines(draw, font, recs, (left, heat_h + 20, W - 16, heat_h + line_h - 42))
    _save_png(img, path)


def _entropy_lines(draw, font, recs, box) -> None:
    """Mean and lowest normalised entropy over the blocks, per MoE, against the step, inside ``box``."""
    x_lo, y_lo, x_hi, y_hi = box
    draw.text((x_lo, y_lo - 16), "normalised entropy H/ln n (thick: mean over blocks, thin: lowest block)",
              fill=(0, 0, 0), font=font)
    draw.rectangle([x_lo, y_lo, x_hi, y_hi], outline=(0, 0, 0))
    steps = [r["step"] for r in recs]
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(s, v):
        return x_lo + (s - s0) / (s1 - s0) * (x_hi - x_lo), y_hi - v * (y_hi - y_lo)

    for v in (0.0, 0.5, 1.0):
        _, py = xy(s0, v)
        draw.line([x_lo, py, x_hi, py], fill=(225, 225, 225))
        draw.text((x_lo - 26, py - 6), f"{v:.1f}", fill=(0, 0, 0), font=font)
    for i in range(5):
        s = s0 + (s1 - s0) * i / 4
        px, _ = xy(s, 0.0)
        draw.text((px - 10, y_hi + 6), f"{int(round(s))}", fill=(0, 0, 0), font=font)
    colors = {"space": (31, 119, 180), "time": (214, 39, 40)}
    for j, name in enumerate(("space", "time")):
        mean_pts, low_pts = [], []
        for r in recs:
            s = r["expert_usage"].get(name)
            if not s:
                continue
            es = [e for e in s.get("entropy_norm", []) if isinstance(e, (int, float))]
            if es:
                mean_pts.append(xy(r["step"], _mean(es)))
                low_pts.append(xy(r["step"], min(es)))
        for pts, width in ((mean_pts, 2), (low_pts, 1)):
            if len(pts) > 1:
                draw.line(pts, fill=colors[name], width=width)
            elif pts:
                x, y = pts[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[name])
        if mean_pts:  # legend under the step labels
            lx, ly = x_lo + 110 * j, y_hi + 18
            draw.line([lx, ly + 6, lx + 20, ly + 6], fill=colors[name], width=2)
            draw.text((lx + 26, ly), f"{name}-MoE", fill=(0, 0, 0), font=font)


def _save_png(img, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- TensorBoard

TENSORBOARD_HINT = ("train.tensorboard=true needs the tensorboard package: pip install tensorboard (or "
                    "pip install -e \".[tensorboard]\"), or set train.tensorboard=false")


def check_tensorboard() -> None:
    """Raise ValueError with the install command when ``torch.utils.tensorboard`` cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{TENSORBOARD_HINT} ({type(e).__name__}: {e})") from None


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a ``log.jsonl`` record as TensorBoard tags: the losses, lr, gradient norm, speed and each block's
    normalised usage entropy (``expert_usage/<moe>_entropy_norm/block_XX``); non-finite and null values are
    left out."""
    out: dict[str, float] = {}
    for key in ("loss", "denoise", "edge", "balance", "token", "lr", "grad_norm", "grad_norm_max", "sec_per_step",
                "images_per_sec", "skipped"):
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"train/{key}"] = float(v)
    usage = record.get("expert_usage") or {}
    for moe in ("space", "time"):
        s = usage.get(moe)
        if not s:
            continue
        for b, e in enumerate(s["entropy_norm"]):
            if e is not None:
                out[f"expert_usage/{moe}_entropy_norm/block_{b:02d}"] = float(e)
        out[f"expert_usage/{moe}_collapsed_blocks"] = float(len(s["collapsed"]))
    return out


class TensorBoardLog:
    """The ``log.jsonl`` scalars, also written with ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir``.

    ``purge_step``: on resume, the first step after the checkpoint, so that events a killed run wrote past
    the checkpoint are hidden (as ``log.jsonl`` drops them).
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, v in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
