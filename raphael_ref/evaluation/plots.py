"""Figures of the evaluation tools with matplotlib (Agg backend, PNG files only).

    tradeoff_plot        Fig. 6b: alignment against fidelity over guidance weights, one curve per variant
    sweep_plot           Fig. 6a: alignment and fidelity against alpha and T_c, one line per guidance weight
    seeds_plot           several training seeds: each seed's value per variant and metric, and the mean ± se
    seeds_sweep_plot     Fig. 6a over several training seeds: each seed's curve and the mean ± se
    seeds_tradeoff_plot  Fig. 6b over several training seeds: the mean curve of each variant over guidance,
                                  one standard error on both axes
    time_expert_plot     Fig. 9:  per transformer block, the share of samples routed to each time expert
                                  against the sampler step (stacked areas)
    concept_paths_plot   Fig. 4 / 10: per concept, how often each space expert is chosen in each block
                                  (heatmaps), and the most frequent route of every concept through the blocks

matplotlib is an optional dependency (the ``eval`` extra); a missing install is an ImportError
that says how to install it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["concept_paths_plot", "seeds_plot", "seeds_sweep_plot", "seeds_tradeoff_plot", "sweep_plot",
           "time_expert_plot", "tradeoff_plot"]


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the evaluation plots need matplotlib: pip install matplotlib "
                          "(or pip install -e '.[eval]')") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _by_variant(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {k: sorted(v, key=lambda r: r["guidance"]) for k, v in out.items()}


def tradeoff_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, *, variants: Sequence[str] | None = None,
                  fidelity_name: str = "pixel-FD", title: str = "",
                  alignment_name: str = "alignment: detector accuracy") -> Path:
    """RAPHAEL Fig. 6b: one curve per variant through its (alignment, fidelity) points, labelled by guidance.

    rows: ``ablation.result_row`` dicts (keys variant, guidance, alignment, fidelity; alignment_se, when
    present, is drawn as a horizontal error bar of one standard error).
    variants: which variants to draw, in this order (default: every "module" group variant).
    """
    by = _by_variant(rows)
    if variants is None:
        variants = [v for v in by if any(r.get("group", "module") == "module" for r in by[v])]
    variants = [v for v in variants if v in by]
    if not variants:
        raise ValueError("tradeoff_plot: no rows for the requested variants; evaluate them first")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for v in variants:
        pts = by[v]
        x, y = [r["alignment"] for r in pts], [r["fidelity"] for r in pts]
        (line,) = ax.plot(x, y, marker="o", label=v)
        se = [r.get("alignment_se") for r in pts]
        if all(e is not None for e in se):  # one standard error of the alignment estimate
            ax.errorbar(x, y, xerr=se, fmt="none", ecolor=line.get_color(), alpha=0.35, capsize=2)
        for r in pts:
            ax.annotate(f"{r['guidance']:g}", (r["alignment"], r["fidelity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_xlabel(f"{alignment_name} (higher is better)")
    ax.set_ylabel(f"{fidelity_name} (lower is better)")
    ax.set_title(title or "Trade-off over guidance weights (cf. RAPHAEL Fig. 6b)")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sweep_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, *, fidelity_name: str = "pixel-FD",
               title: str = "") -> Path:
    """RAPHAEL Fig. 6a: for each swept hyper-parameter (alpha, T_c) alignment and fidelity against its
    value, one line per guidance weight. rows: result rows of the "alpha" and "t_c" groups."""
    groups = [(g, label) for g, label in (("alpha", "alpha (mask threshold, Sec. 3.1)"),
                                          ("t_c", "T_c (edge cut-off, Sec. 3.2)"))
              if any(r.get("group") == g for r in rows)]
    if not groups:
        raise ValueError("sweep_plot: no rows of the 'alpha' or 't_c' groups")
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(groups), figsize=(5.2 * len(groups), 7.0), squeeze=False)
    for j, (group, label) in enumerate(groups):
        pts = [r for r in rows if r.get("group") == group]
        for g in sorted({r["guidance"] for r in pts}):
            at = sorted((r for r in pts if r["guidance"] == g), key=lambda r: r["value"])
            xs = [r["value"] for r in at]
            axes[0, j].plot(xs, [r["alignment"] for r in at], marker="o", label=f"g = {g:g}")
            axes[1, j].plot(xs, [r["fidelity"] for r in at], marker="o", label=f"g = {g:g}")
        axes[0, j].set_ylabel("alignment: detector accuracy")
        axes[1, j].set_ylabel(f"{fidelity_name} (lower is better)")
        for i in range(2):
            axes[i, j].set_xlabel(label)
            axes[i, j].set_xticks(sorted({r["value"] for r in pts}))
            axes[i, j].grid(alpha=0.3)
            axes[i, j].ticklabel_format(axis="y", useOffset=False)
        axes[0, j].legend(fontsize=7)
    fig.suptitle(title or "Hyper-parameter sweeps (cf. RAPHAEL Fig. 6a)")
    return _save(fig, path)


def time_expert_plot(usage: torch.Tensor, timesteps: Sequence[int], path: str | Path, *,
                     block_names: Sequence[str] | None = None, title: str = "") -> Path:
    """RAPHAEL Fig. 9: per block, the share of samples routed to each time expert against the sampler step.

    usage: (K, S, n_t) fractions from ``routes.time_expert_usage`` (NaN rows: block without time-MoE).
    timesteps: (S,) the model timestep of each step (descending: noisy first), shown on the top axis.
    """
    if not isinstance(usage, torch.Tensor) or usage.ndim != 3:
        raise ValueError(f"time_expert_plot: usage must be a (K, S, n_t) tensor; got {getattr(usage, 'shape', usage)}")
    K, S, n_t = usage.shape
    if len(timesteps) != S:
        raise ValueError(f"time_expert_plot: {len(timesteps)} timesteps for {S} steps")
    plt = _pyplot()
    cols = min(4, K)
    rows = math.ceil(K / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False, sharex=True, sharey=True)
    steps = list(range(S))
    colors = plt.get_cmap("tab10").colors
    for k in range(rows * cols):
        ax = axes[k // cols, k % cols]
        if k >= K:
            ax.axis("off")
            continue
        name = block_names[k] if block_names else f"block {k}"
        u = usage[k].double()  # (S, n_t)
        if torch.isnan(u).all():
            ax.text(0.5, 0.5, "no time-MoE", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.stackplot(steps, *[u[:, e].tolist() for e in range(n_t)], colors=colors[:n_t],
                         labels=[f"expert {e}" for e in range(n_t)], step="mid" if S > 1 else None)
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, max(S - 1, 1))
    for ax in axes[-1]:
        ax.set_xlabel("sampler step (noisy -> clean)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of samples", fontsize=8)
    ticks = sorted({0, S // 2, S - 1})
    top = axes[0, 0].secondary_xaxis("top")
    top.set_xticks(ticks)
    top.set_xticklabels([f"t={int(timesteps[i])}" for i in ticks], fontsize=6)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=n_t, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Time-expert routes per transformer block (cf. RAPHAEL Fig. 9)")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return _save(fig, path)


def concept_paths_plot(freq: torch.Tensor, concepts: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """RAPHAEL Fig. 4 / 10: per concept a (blocks x experts) heatmap of how often each space expert is
    chosen, and a last panel with every concept's most frequent route through the blocks.

    freq: (C, K, k) fractions from ``routes.space_expert_frequency``.
    """
    if not isinstance(freq, torch.Tensor) or freq.ndim != 3 or freq.shape[0] != len(concepts):
        raise ValueError(f"concept_paths_plot: freq must be (C, K, k) with C = {len(concepts)} concepts; "
                         f"got {getattr(freq, 'shape', freq)}")
    C, K, k = freq.shape
    plt = _pyplot()
    cols = min(4, C + 1)
    rows = math.ceil((C + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.2 * rows), squeeze=False)
    for c in range(C):
        ax = axes[c // cols, c % cols]
        ax.imshow(freq[c].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(concepts[c], fontsize=9)
        ax.set_xlabel("space expert", fontsize=7)
        ax.set_ylabel("block", fontsize=7)
        ax.set_xticks(range(k))
        ax.tick_params(labelsize=6)
    ax = axes[C // cols, C % cols]
    cmap = plt.get_cmap("tab10" if C <= 10 else "tab20")
    modal = freq.argmax(dim=2)  # (C, K)
    for c in range(C):
        offset = (c - (C - 1) / 2) * 0.6 / max(C, 1)  # overlapping routes stay visible
        ax.plot(range(K), (modal[c].double() + offset).tolist(), marker="o", ms=3, lw=1.2, alpha=0.7,
                color=cmap(c % cmap.N), label=concepts[c])
    ax.set_xlabel("block (forward order)", fontsize=7)
    ax.set_ylabel("most frequent expert", fontsize=7)
    ax.set_yticks(range(k))
    ax.tick_params(labelsize=6)
    ax.set_title("routes", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    for i in range(C + 1, rows * cols):
        axes[i // cols, i % cols].axis("off")
    fig.suptitle(title or "Space-expert paths per concept (cf. RAPHAEL Fig. 4 / 10)")
    fig.tight_layout()
    return _save(fig, path)


def _seed_value(row: Mapping[str, Any], key: str, seed: int) -> float:
    """One seed's value of a metric in a combined row (NaN when that seed did not run the cell)."""
    return row[key]["per_seed"][row["seeds"].index(seed)] if seed in row["seeds"] else float("nan")


def seeds_plot(combined: Mapping[str, Any], path: str | Path, *, guidance: float | None = None,
               title: str = "") -> Path:
    """One panel per metric of ``ablation.combine_seeds``: each training seed's value per variant (points joined
    by a line, so the paired differences show), and the mean over seeds with one standard error (black)."""
    from raphael_ref.evaluation.ablation import SEED_METRICS

    rows = [r for r in combined["rows"] if guidance is None or r["guidance"] == guidance]
    if not rows:
        raise ValueError("seeds_plot: no rows (at this guidance weight)")
    g = rows[0]["guidance"] if guidance is None else guidance
    rows = [r for r in rows if r["guidance"] == g]
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "full", v))
    by = {r["variant"]: r for r in rows}
    metrics = [(k, hi, lab) for k, hi, lab in SEED_METRICS if all(k in by[v] for v in variants)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    seeds = combined["seeds"]
    for ax, (key, higher, label) in zip(axes[0], metrics):
        for s in seeds:
            ys = [_seed_value(by[v], key, s) for v in variants]
            ax.plot(range(len(variants)), ys, marker="o", alpha=0.6, label=f"seed {s}")
        means = [by[v][key]["mean"] for v in variants]
        ses = [by[v][key]["se"] or 0.0 for v in variants]
        ax.errorbar(range(len(variants)), means, yerr=ses, fmt="s", color="black", capsize=4, label="mean ± se")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=20, fontsize=8)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or f"Training seeds {seeds}, guidance {g:g} (cf. RAPHAEL Fig. 6b)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def seeds_sweep_plot(combined: Mapping[str, Any], path: str | Path, *, guidance: float | None = None,
                     title: str = "") -> Path:
    """RAPHAEL Fig. 6a over several training seeds (``ablation.combine_seeds`` with sweep rows): one column per
    sweep (alpha, T_c), one row per metric; each seed's curve (thin) and the mean over seeds with one standard
    error (black). The full model is each sweep's base point; it is found by its ``alpha_*``/``t_c_*`` twin row
    (the plan's sweep point equal to the base), so every curve has all its points."""
    from raphael_ref.evaluation.ablation import SEED_METRICS

    rows = [r for r in combined["rows"] if r.get("group") in ("alpha", "t_c")
            and (guidance is None or r["guidance"] == guidance)]
    if not rows:
        raise ValueError("seeds_sweep_plot: no rows of the 'alpha' or 't_c' groups (at this guidance weight)")
    g = rows[0]["guidance"] if guidance is None else guidance
    rows = [r for r in rows if r["guidance"] == g]
    groups = [(grp, lab) for grp, lab in (("alpha", "alpha (mask threshold, Sec. 3.1)"),
                                          ("t_c", "T_c (edge cut-off, Sec. 3.2)")) if any(r["group"] == grp for r in rows)]
    metrics = [(k, hi, lab) for k, hi, lab in SEED_METRICS if all(k in r for r in rows)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(4.6 * len(groups), 2.6 * len(metrics)),
                             squeeze=False, sharex="col")
    seeds = sorted({s for r in rows for s in r["seeds"]})  # the seeds that ran the sweeps (maybe fewer)
    for j, (grp, xlabel) in enumerate(groups):
        pts = sorted((r for r in rows if r["group"] == grp), key=lambda r: float(r["value"]))
        xs = [float(r["value"]) for r in pts]
        for i, (key, higher, label) in enumerate(metrics):
            ax = axes[i, j]
            for s in seeds:
                ys = [_seed_value(r, key, s) for r in pts]
                ax.plot(xs, ys, marker=".", alpha=0.45, lw=1, label=f"seed {s}")
            ax.errorbar(xs, [r[key]["mean"] for r in pts], yerr=[r[key]["se"] or 0.0 for r in pts], fmt="s-",
                        color="black", capsize=4, label="mean ± se")
            ax.set_ylabel(f"{label}\n({'higher' if higher else 'lower'} is better)", fontsize=8)
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
            ax.ticklabel_format(axis="y", useOffset=False)
        axes[-1, j].set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or f"Hyper-parameter sweeps over training seeds {seeds}, guidance {g:g} (cf. RAPHAEL Fig. 6a)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def seeds_tradeoff_plot(combined: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """RAPHAEL Fig. 6b over several training seeds (``ablation.combine_seeds``): one curve per module variant
    through its points over the guidance weights, each point the mean over seeds with one standard error on
    both axes. Left: the paper's axes at toy scale (toy CLIP score against FD in toy-CLIP features); right:
    detector accuracy against pixel-FD (or FID). A panel is drawn when every module row has both metrics."""
    rows = [r for r in combined["rows"] if r.get("group") == "module"]
    by = _by_variant(rows)
    if not by or max(len(v) for v in by.values()) < 2:
        raise ValueError("seeds_tradeoff_plot: needs module variants evaluated at 2 or more guidance weights")
    panels = [(x, y) for x, y in (("clip_score", "fd_toy_clip"), ("alignment", "fidelity"))
              if all(x in r and y in r for r in rows)]
    if not panels:
        raise ValueError("seeds_tradeoff_plot: no metric pair present in every module row")
    labels = {"clip_score": "toy CLIP score", "fd_toy_clip": "FD in toy-CLIP features",
              "alignment": "detector accuracy", "fidelity": "pixel-FD / FID"}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    variants = sorted(by, key=lambda v: (v != "full", v))
    for ax, (xk, yk) in zip(axes[0], panels):
        for v in variants:
            pts = by[v]
            xs, ys = [r[xk]["mean"] for r in pts], [r[yk]["mean"] for r in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=v, lw=2.2 if v == "full" else 1.2)
            ax.errorbar(xs, ys, xerr=[r[xk]["se"] or 0.0 for r in pts], yerr=[r[yk]["se"] or 0.0 for r in pts],
                        fmt="none", ecolor=line.get_color(), alpha=0.35, capsize=2)
            for r, x, y in zip(pts, xs, ys):
                ax.annotate(f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        ax.set_xlabel(f"{labels[xk]} (higher is better)")
        ax.set_ylabel(f"{labels[yk]} (lower is better)")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(useOffset=False)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or f"Trade-off over guidance weights, mean ± se over training seeds {combined['seeds']} "
                 "(cf. RAPHAEL Fig. 6b)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
