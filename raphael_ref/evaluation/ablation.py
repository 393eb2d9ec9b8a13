"""Ablations of RAPHAEL Sec. 4.2 (Fig. 6a, 6b): variants, the offline fidelity proxy "pixel-FD", tables.

Fig. 6b trains the full model and three variants (without space-MoE, without time-MoE, without
edge-supervised learning) and draws, per variant, the trade-off between image-text alignment (CLIP
score) and fidelity (FID) over the guidance weights 1.5, 3.0, 4.5, 6.0, 7.5, 9.0. Fig. 6a sweeps
the mask threshold alpha (Sec. 3.1, eta_i = alpha max_j M[j, i]) and the edge cut-off T_c (Sec. 3.2).

Here a variant is a set of config overrides (``model.use_space_moe=false`` ...) trained by
``tools/train.py`` with one budget and seed; ``tools/ablate.py`` runs the whole study. The axes:

    alignment   the compositional detector's overall accuracy (``tools/evaluate.py``: GenEval-style,
                mean of the category accuracies), in place of the CLIP score: on the synthetic
                domain the ground truth is programmatic and no CLIP weights are needed.
    fidelity    FID with Inception-v3 weights when a local file is given; otherwise **pixel-FD**
                (:func:`pixel_fd`), a Frechet distance in a fixed, hand-made feature space. It is
                *not* FID and is never called FID: its numbers are comparable only with each other
                (same feature space, same number of images), lower is better as for FID.

pixel-FD features of an image (uint8, 3 x S x S), 75 numbers, all in [0, 1]:

    27  joint colour histogram: each channel quantised to 3 levels (0..84, 85..169, 170..255), the
        fraction of pixels in each of the 3^3 colour cells. The synthetic palette (black background,
        red, green, blue, yellow, purple, white) falls into 7 distinct cells; smudged or wrong
        colours land in the others.
    48  the image average-pooled to 4 x 4 (per channel, divided by 255): where the colour mass is.

The reference set holds the ground-truth render of each generated image's prompt (one per image,
as ``tools/evaluate.py --fid`` does). With N images the covariance of 75 features is estimated
from N samples (the toy budget of ``tools/ablate.py`` has N = 96, the full one 1152): compare only
runs with the same N and the same prompts and noise (tools/ablate.py keeps both fixed across
variants), since the Frechet distance of finite samples is biased upward by O(tr(S)/N) terms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from raphael_ref.evaluation.metrics import frechet_distance, gaussian_statistics

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_T_CS",
    "GUIDANCE_WEIGHTS",
    "MODULE_VARIANTS",
    "PIXEL_FD_LEVELS",
    "PIXEL_FD_POOL",
    "Variant",
    "ablation_plan",
    "alignment_se",
    "best_guidance",
    "combine_seeds",
    "seeds_markdown",
    "t_critical_95",
    "markdown_report",
    "paired_bootstrap_fd",
    "paper_orderings",
    "pixel_fd",
    "pixel_features",
    "result_row",
    "rows_by_variant",
    "toy_clip_rows",
    "toy_clip_table",
]

GUIDANCE_WEIGHTS: tuple[float, ...] = (1.5, 3.0, 4.5, 6.0, 7.5, 9.0)  # Sec. 4.2, Fig. 6b
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.4)  # Fig. 6a around Table 2's alpha = 0.2
DEFAULT_T_CS: tuple[int, ...] = (250, 500, 750)  # Fig. 6a around Table 2's T_c = 500 (0-based t < T_c)
PIXEL_FD_LEVELS = 3  # quantisation levels per channel of the joint colour histogram
PIXEL_FD_POOL = 4  # side of the average-pooled image


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the study: config overrides trained into ``run`` (a folder name under the study).

    group: "module" (Fig. 6b curves), "alpha" or "t_c" (Fig. 6a sweeps).
    value: the swept value (alpha or T_c), None for module variants.
    run:   the training run it reads; sweep points equal to the base config reuse ``"full"``.
    """

    name: str
    group: str
    overrides: tuple[tuple[str, Any], ...] = ()
    value: float | None = None
    run: str = ""

    def __post_init__(self) -> None:
        if self.group not in ("module", "alpha", "t_c"):
            raise ValueError(f"Variant {self.name!r}: group must be 'module', 'alpha' or 't_c'; got {self.group!r}")
        if not self.run:
            object.__setattr__(self, "run", self.name)

    @property
    def set_args(self) -> list[str]:
        """``FIELD=VALUE`` strings for ``tools/train.py --set`` (JSON literals: true/false, numbers)."""
        return [f"{k}={_literal(v)}" for k, v in self.overrides]


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# Fig. 6b: the complete model and one variant per removed module (a dense FFN of the same width
# takes a removed MoE's place, raphael_ref.models.TransformerBlock).
MODULE_VARIANTS: tuple[Variant, ...] = (
    Variant("full", "module"),
    Variant("no_space_moe", "module", (("model.use_space_moe", False),)),
    Variant("no_time_moe", "module", (("model.use_time_moe", False),)),
    Variant("no_edge", "module", (("model.use_edge", False),)),
    # eDiff-I (seed 003): denoisers split by noise level; here a time-MoE whose route is floor(t n_t / T),
    # a fixed function of t, in place of the learned time gate (not in the paper's Fig. 6; E69)
    Variant("ediff_intervals", "module", (("model.time_router", "intervals"),)),
)


def _fmt_value(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() else f"{v:g}"


def ablation_plan(base_alpha: float, base_t_c: int, *, modules: Sequence[str] | None = None,
                  alphas: Sequence[float] = (), t_cs: Sequence[int] = ()) -> list[Variant]:
    """The variants of a study: module variants (Fig. 6b), then the alpha and T_c sweeps (Fig. 6a).

    base_alpha, base_t_c: ``model.mask_alpha`` and ``model.edge_t_cutoff`` of the base config; a sweep
    point equal to them is the full model and reuses its run (no second training).
    modules: names from MODULE_VARIANTS (default: all five). A sweep needs "full" in the plan only
    when one of its points equals the base value.
    """
    known = {v.name: v for v in MODULE_VARIANTS}
    modules = list(known) if modules is None else list(modules)
    unknown = [m for m in modules if m not in known]
    if unknown:
        raise ValueError(f"ablation_plan: unknown module variants {unknown}; choose from {list(known)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"ablation_plan: module variants listed twice: {modules}")
    plan = [known[m] for m in modules]
    for a in alphas:
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"ablation_plan: alpha values must lie in [0, 1] (Sec. 3.1 threshold); got {a}")
    for tc in t_cs:
        if isinstance(tc, bool) or int(tc) != tc or tc < 0:
            raise ValueError(f"ablation_plan: T_c values must be integers >= 0 (0-based timesteps); got {tc}")
    for group, field, values, base in (("alpha", "model.mask_alpha", alphas, base_alpha),
                                       ("t_c", "model.edge_t_cutoff", t_cs, base_t_c)):
        if len(set(values)) != len(values):
            raise ValueError(f"ablation_plan: {group} values listed twice: {list(values)}")
        for v in values:
            value = float(v) if group == "alpha" else int(v)
            name = f"{group}_{_fmt_value(value)}"
            same = math.isclose(float(value), float(base), rel_tol=0, abs_tol=1e-12)
            plan.append(Variant(name, group, () if same else ((field, value),), float(value), "full" if same else name))
    if any(v.run == "full" for v in plan) and "full" not in [v.name for v in plan]:
        plan.insert(0, known["full"])  # a sweep point equal to the base config needs the full run
    return plan


# ---------------------------------------------------------------------------------------------
# pixel-FD: the offline fidelity proxy
# ---------------------------------------------------------------------------------------------


def _check_uint8_images(images: torch.Tensor, fn: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{fn}: expected uint8 RGB images (N, 3, H, W), as tools/evaluate.py produces; got {got}")


def pixel_features(images: torch.Tensor, levels: int = PIXEL_FD_LEVELS, pool: int = PIXEL_FD_POOL) -> torch.Tensor:
    """RAPHAEL Sec. 4.2 (Fig. 6b fidelity axis, offline stand-in): the pixel-FD features of each image.

    images: uint8 (N, 3, H, W). Returns float64 (N, levels^3 + 3 pool^2): the joint colour histogram
    (fraction of pixels per quantised colour cell, cell = (r, g, b) with c -> floor(c levels / 256))
    followed by the image average-pooled to pool x pool, divided by 255.
    """
    _check_uint8_images(images, "pixel_features")
    if levels < 1 or pool < 1:
        raise ValueError(f"pixel_features: levels and pool must be >= 1; got levels={levels}, pool={pool}")
    N, _, H, W = images.shape
    q = images.long() * levels // 256  # (N, 3, H, W) in 0..levels-1
    cell = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]  # (N, H, W) joint colour cell
    hist = torch.zeros(N, levels**3, dtype=torch.float64)
    hist.scatter_add_(1, cell.reshape(N, -1), torch.ones(N, H * W, dtype=torch.float64))  # (N, levels^3)
    hist /= H * W
    small = F.adaptive_avg_pool2d(images.to(torch.float64) / 255.0, pool)  # (N, 3, pool, pool)
    return torch.cat([hist, small.reshape(N, -1)], dim=1)  # (N, levels^3 + 3 pool^2)


def pixel_fd(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """RAPHAEL Sec. 4.2 (Fig. 6b fidelity axis, offline stand-in): pixel-FD = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2}).

    The Frechet distance of ``metrics.frechet_distance`` between Gaussians fitted to the
    :func:`pixel_features` of the generated and the reference images (uint8 (N, 3, H, W), N >= 2
    each, one image size). Not FID: no Inception network is involved.
    """
    _check_uint8_images(generated, "pixel_fd (generated)")
    _check_uint8_images(reference, "pixel_fd (reference)")
    if generated.shape[0] < 2 or reference.shape[0] < 2:
        raise ValueError(f"pixel_fd: need >= 2 images per set to fit a covariance; got {generated.shape[0]} "
                         f"generated and {reference.shape[0]} reference images")
    mu_g, s_g = gaussian_statistics(pixel_features(generated))  # (d,), (d, d)
    mu_r, s_r = gaussian_statistics(pixel_features(reference))  # (d,), (d, d)
    return float(frechet_distance(mu_g, s_g, mu_r, s_r))


def paired_bootstrap_fd(features_a: torch.Tensor, features_b: torch.Tensor, reference: torch.Tensor, *,
                        n_boot: int = 300, seed: int = 0) -> dict[str, float]:
    """FD(a, reference) - FD(b, reference) and its paired bootstrap standard error over the evaluation images.

    Row i of ``features_a``, ``features_b`` and ``reference`` (each (N, d), N >= 3) belongs to the same
    evaluation index i: one prompt and noise seed, which an ablation study gives every variant (and the
    ground-truth render of that prompt). Each of ``n_boot`` resamples draws N indices with replacement and
    applies them to all three sets; ``se`` is the standard deviation of the resampled differences. It measures
    the sampling noise over images of one study (one training seed), not the spread over training seeds.
    Returns ``{"diff", "se", "n", "n_boot"}``; ``diff`` is the difference on the full sets.
    """
    shapes = {tuple(x.shape) for x in (features_a, features_b, reference)}
    if len(shapes) != 1 or features_a.ndim != 2 or features_a.shape[0] < 3:
        raise ValueError("paired_bootstrap_fd: features_a, features_b and reference must be (N >= 3, d) with the "
                         f"same N (row i: one evaluation index in all three); got "
                         f"{[tuple(x.shape) for x in (features_a, features_b, reference)]}")
    if n_boot < 2:
        raise ValueError(f"paired_bootstrap_fd: n_boot must be >= 2 for a standard error; got {n_boot}")

    def diff(i: torch.Tensor | slice) -> float:  # FD(a, ref) - FD(b, ref) on the rows i of all three sets
        ref = gaussian_statistics(reference[i])
        return float(frechet_distance(*gaussian_statistics(features_a[i]), *ref)
                     - frechet_distance(*gaussian_statistics(features_b[i]), *ref))

    n = features_a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    diffs = [diff(torch.randint(0, n, (n,), generator=gen)) for _ in range(n_boot)]  # one resample of the indices each
    return {"diff": diff(slice(None)),
            "se": float(torch.tensor(diffs, dtype=torch.float64).std()), "n": int(n), "n_boot": int(n_boot)}


# ---------------------------------------------------------------------------------------------
# results, tables and the paper's orderings
# ---------------------------------------------------------------------------------------------


def result_row(variant: Variant, guidance: float, summary: Mapping[str, Any], fidelity: float,
               fidelity_name: str, **extra: Any) -> dict[str, Any]:
    """One (variant, guidance) result: alignment = ``summary["overall"]`` (tools/evaluate.py ``summarize``)."""
    if "overall" not in summary or "categories" not in summary:
        raise ValueError("result_row: summary must be tools/evaluate.py's summarize() output "
                         "({'categories': ..., 'overall': ...})")
    return {"variant": variant.name, "group": variant.group, "value": variant.value, "run": variant.run,
            "guidance": float(guidance), "alignment": float(summary["overall"]),
            "alignment_se": alignment_se(summary),
            "categories": {c: v["accuracy"] for c, v in summary["categories"].items()},
            "fidelity": float(fidelity), "fidelity_name": fidelity_name, **extra}


def alignment_se(summary: Mapping[str, Any]) -> float | None:
    """Standard error of the overall accuracy (the mean of K category accuracies p_c, each over n_c
    independent images): sqrt(sum_c p_c (1 - p_c) / n_c) / K, the binomial plug-in estimate. None
    when the summary has no image counts. Images of one prompt share the prompt, so this is a lower
    bound when prompts differ in difficulty."""
    cats = list(summary.get("categories", {}).values())
    if not cats or any("n" not in c or not c["n"] for c in cats):
        return None
    var = sum(c["accuracy"] * (1.0 - c["accuracy"]) / c["n"] for c in cats)
    return math.sqrt(var) / len(cats)


def rows_by_variant(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by variant name, each list sorted by guidance weight."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {k: sorted(v, key=lambda r: r["guidance"]) for k, v in out.items()}


def best_guidance(rows: Sequence[Mapping[str, Any]], key: str = "fidelity") -> float:
    """The guidance weight of the lowest fidelity score (key="fidelity") or highest alignment."""
    if not rows:
        raise ValueError("best_guidance: no rows")
    if key == "fidelity":
        return min(rows, key=lambda r: (r["fidelity"], r["guidance"]))["guidance"]
    if key == "alignment":
        return max(rows, key=lambda r: (r["alignment"], -r["guidance"]))["guidance"]
    raise ValueError(f"best_guidance: key must be 'fidelity' or 'alignment'; got {key!r}")


def _beats(x: float, y: float, higher: bool) -> bool:
    """x strictly better than y; values within 1e-9 (relative) are a tie, which is no win."""
    if abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)):
        return False
    return x > y if higher else x < y


def _wins(a: Sequence[Mapping], b: Sequence[Mapping], key: str, higher: bool) -> tuple[int, int, float]:
    """At how many common guidance weights ``a`` beats ``b``, out of how many, and the mean of a - b."""
    bg = {r["guidance"]: r[key] for r in b}
    common = [(r[key], bg[r["guidance"]]) for r in a if r["guidance"] in bg]
    mean = sum(x - y for x, y in common) / len(common) if common else float("nan")
    return sum(_beats(x, y, higher) for x, y in common), len(common), mean


def _diff_se(a: Sequence[Mapping], b: Sequence[Mapping]) -> float | None:
    """The typical standard error of one alignment difference a - b (root mean square over the common
    guidance weights of sqrt(se_a^2 + se_b^2)); None without standard errors."""
    bg = {r["guidance"]: r.get("alignment_se") for r in b}
    pairs = [(r.get("alignment_se"), bg[r["guidance"]]) for r in a if r["guidance"] in bg]
    if not pairs or any(x is None or y is None for x, y in pairs):
        return None
    return math.sqrt(sum(x * x + y * y for x, y in pairs) / len(pairs))


FLAT_SPREAD = 0.01  # fidelity varying by less than 1% over the guidance weights has no meaningful best weight


def _flat(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the fidelity scores vary by less than FLAT_SPREAD (relative to their mean) over the guidance weights."""
    f = [r["fidelity"] for r in rows]
    mean = sum(f) / len(f)
    return len(f) < 2 or (max(f) - min(f)) <= FLAT_SPREAD * abs(mean)


def _verdict(wins: int, n: int) -> str:
    if n == 0:
        return "n/a"
    return "yes" if wins == n else ("no" if wins == 0 else "partly")


def paper_orderings(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the orderings Sec. 4.2 reports against ``rows``: one dict per claim with a verdict.

    Claims (Fig. 6b, 6a): the full model beats each ablated variant in alignment and in fidelity
    at equal guidance; without space-MoE the best guidance (lowest fidelity score) is lower than
    with it (3.0 -> 4.5 in the paper); alpha = 0.2 and T_c = 500 are the best sweep points.
    Verdict "yes" (at every common guidance weight), "partly", "no", or "n/a" (missing runs; for the
    guidance shift also a fidelity curve that is flat, spread < FLAT_SPREAD of its mean). The
    comparisons are of single estimates, without error bars: read small margins as ties.
    """
    by = rows_by_variant(rows)
    out: list[dict[str, Any]] = []
    full = by.get("full", [])
    for name, what in (("no_space_moe", "space-MoE"), ("no_time_moe", "time-MoE"), ("no_edge", "edge supervision")):
        other = by.get(name, [])
        for key, higher, label in (("alignment", True, "alignment (higher)"), ("fidelity", False, "fidelity (lower)")):
            w, n, mean = _wins(full, other, key, higher)
            se = _diff_se(full, other) if key == "alignment" and n else None
            out.append({"claim": f"{what} helps {label}: full beats {name}", "verdict": _verdict(w, n),
                        "detail": f"{w}/{n} guidance weights" + (f", mean full - {name} = {mean:+.4g}" if n else "")
                                  + (f" (standard error of one difference ~{se:.3f})" if se is not None else "")})
    if full and by.get("no_space_moe"):
        g_full, g_no = best_guidance(full), best_guidance(by["no_space_moe"])
        flat = [n for n, rs in (("full", full), ("no_space_moe", by["no_space_moe"])) if _flat(rs)]
        out.append({"claim": "space-MoE shifts the best guidance up (paper: 3.0 -> 4.5)",
                    "verdict": "n/a" if flat else ("yes" if g_full > g_no else "no"),
                    "detail": f"best guidance (lowest fidelity score): no_space_moe {g_no}, full {g_full}"
                              + (f"; fidelity flat over guidance (spread < {FLAT_SPREAD:.0%}) for {', '.join(flat)}"
                                 if flat else "")})
    for group, best_value, label in (("alpha", 0.2, "alpha = 0.2"), ("t_c", 500.0, "T_c = 500")):
        pts = [r for r in rows if r["group"] == group]
        if not pts:
            continue
        values = sorted({r["value"] for r in pts})
        if best_value not in values or len(values) < 2:
            out.append({"claim": f"{label} is the best sweep point", "verdict": "n/a",
                        "detail": f"swept values {values}"})
            continue
        for key, higher in (("alignment", True), ("fidelity", False)):
            wins = n = 0
            for g in sorted({r["guidance"] for r in pts}):
                at = {r["value"]: r[key] for r in pts if r["guidance"] == g}
                if best_value not in at or len(at) < 2:
                    continue
                n += 1
                others = [v for k, v in at.items() if k != best_value]
                wins += all(_beats(at[best_value], v, higher) for v in others)
            out.append({"claim": f"{label} is the best sweep point in {key}", "verdict": _verdict(wins, n),
                        "detail": f"best at {wins}/{n} guidance weights"})
    return out


def _cell(r: Mapping[str, Any]) -> str:
    se = r.get("alignment_se")
    return f"{r['alignment']:.3f}" + (f" \u00b1 {se:.3f}" if se is not None else "") + f" / {r['fidelity']:.4g}"


def markdown_report(rows: Sequence[Mapping[str, Any]], plan: Sequence[Variant], guidance: Sequence[float],
                    header: Sequence[str] = (), fidelity_name: str = "pixel-FD") -> str:
    """The study as markdown: per table (module variants, then each sweep) variant x guidance cells
    ``alignment / fidelity``, the best guidance per variant, and the paper's orderings checked."""
    by = rows_by_variant(rows)
    lines = [*header, "", f"Cells: alignment (detector accuracy, higher is better) \u00b1 its standard error "
                          f"(binomial, per category) / {fidelity_name} (lower is better). Empty: not evaluated.", ""]
    groups = [("module", "Fig. 6b: module ablation"), ("alpha", "Fig. 6a: mask threshold alpha"),
              ("t_c", "Fig. 6a: edge cut-off T_c")]
    for group, title in groups:
        variants = [v for v in plan if v.group == group]
        if not variants:
            continue
        lines += [f"### {title}", "",
                  "| variant | overrides | " + " | ".join(f"g = {g:g}" for g in guidance)
                  + " | best g (fidelity) | best g (alignment) |",
                  "|---|---|" + "---:|" * len(guidance) + "---:|---:|"]
        for v in variants:
            got = {r["guidance"]: r for r in by.get(v.name, [])}
            cells = [_cell(got[g]) if g in got else "" for g in guidance]
            rs = list(got.values())
            bf = f"{best_guidance(rs, 'fidelity'):g}" if rs else ""
            ba = f"{best_guidance(rs, 'alignment'):g}" if rs else ""
            over = ", ".join(f"{k}={_literal(x)}" for k, x in v.overrides) or ("(base config)" if v.run == v.name
                                                                               else f"(= run {v.run})")
            lines.append(f"| {v.name} | {over} | " + " | ".join(cells) + f" | {bf} | {ba} |")
        lines.append("")
    checks = paper_orderings(rows)
    if checks:
        lines += ["### The paper's orderings at this scale", "",
                  "Strict comparisons of single estimates from one training seed: a margin within about two "
                  "standard errors of a difference is a tie.", "",
                  "| claim (Sec. 4.2) | holds here | detail |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['verdict']} | {c['detail']} |" for c in checks]
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Fig. 6b's own axes at toy scale: the toy CLIP score and a Frechet distance in its image features
# ---------------------------------------------------------------------------------------------


def toy_clip_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows re-keyed for the toy-CLIP trade-off: alignment = toy CLIP score (its standard error as
    ``alignment_se``), fidelity = FD in the toy CLIP's image features. Rows without toy-CLIP values
    (another image size or an older evaluation) are left out."""
    out = []
    for r in rows:
        tc = r.get("toy_clip")
        if not tc:
            continue
        out.append({**r, "alignment": tc["clip_score"], "alignment_se": tc.get("clip_score_se"),
                    "fidelity": tc["fd_toy_clip"], "fidelity_name": "FD (toy CLIP)"})
    return out


def toy_clip_table(rows: Sequence[Mapping[str, Any]], plan: Sequence[Variant], guidance: Sequence[float]) -> str:
    """Markdown: variant x guidance cells "CLIP score +- se / FD" of :func:`toy_clip_rows`."""
    cell = {(r["variant"], float(r["guidance"])): r for r in rows}
    lines = ["## Toy CLIP axes (Fig. 6b as printed: FD against CLIP score)", "",
             "Toy CLIP score (100 x cosine of the shipped toy CLIP's image and text embeddings, +- one "
             "standard error over images) / Frechet distance in its 64-d image-embedding space against "
             "ground-truth renders (lower is better).", "",
             "| variant | " + " | ".join(f"g = {g:g}" for g in guidance) + " |",
             "|---|" + "---:|" * len(guidance)]
    for v in plan:
        cells = []
        for g in guidance:
            r = cell.get((v.name, float(g)))
            if r is None:
                cells.append("")
            else:
                se = r.get("alignment_se")
                cells.append(f"{r['alignment']:.2f}" + (f" +- {se:.2f}" if se is not None else "")
                             + f" / {r['fidelity']:.3g}")
        if any(cells):
            lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ several training seeds

# (metric, higher is better, label): the axes of Fig. 6b at toy scale
SEED_METRICS: tuple[tuple[str, bool, str], ...] = (
    ("alignment", True, "detector accuracy"),
    ("clip_score", True, "toy CLIP score"),
    ("fidelity", False, "pixel-FD / FID"),
    ("fd_toy_clip", False, "FD in toy-CLIP features"),
)
# settings of a study that may differ between the seeds of one combined table
_PER_SEED_SETTINGS = {"train_seed", "out", "jobs", "threads", "only_run", "dry_run", "train_only", "device"}
# settings that only choose which cells a study has (variants, sweep points, guidance weights); a cell is measured
# the same way whichever others exist beside it, so the studies of a combined table may differ in these
_CELL_SET_SETTINGS = {"variants", "alphas", "t_cs", "no_sweeps", "guidance", "sweep_guidance"}


def _metric(row: Mapping[str, Any], key: str) -> float | None:
    v = (row.get("toy_clip") or {}).get(key) if key in ("clip_score", "fd_toy_clip") else row.get(key)
    return None if v is None else float(v)


def mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for fewer than 2 values."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _shared_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide how a cell is trained and measured (equal across a combined table)."""
    return {k: v for k, v in settings.items() if k not in _PER_SEED_SETTINGS | _CELL_SET_SETTINGS}


def combine_seeds(studies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine one ablation study repeated with different training seeds (``ablation.json`` dicts).

    Per (variant, guidance) and metric: the mean over the seeds, the seed-to-seed standard deviation
    and the standard error of the mean (sd / sqrt(n_seeds)). Per ablated variant, guidance and metric:
    the *paired* difference full - variant (same seed, same evaluation prompts and noise), its mean,
    standard error over seeds and t = mean / se, read as "full better" / "variant better" when |t|
    exceeds the two-sided 95% Student-t value for n_seeds - 1 degrees of freedom (12.7 for 2 seeds,
    4.30 for 3, 3.18 for 4; :func:`t_critical_95`), else "tie". This standard error holds the
    training-seed spread and the evaluation noise together.
    ``over_guidance``: where a variant was compared at 2 or more guidance weights on the same seeds, the same
    paired test on each seed's mean difference over those weights (one reading per variant and metric).
    Sweep points (Fig. 6a, groups "alpha" and "t_c") are compared with the full model the same way: the full
    model is the base value of each sweep (the paper's alpha = 0.2, T_c = 500); a sweep point equal to the base
    (its plan entry reuses the full run) is listed but not compared with itself.
    The studies may differ in which cells they have (variants, sweep points, guidance weights: e.g. the sweeps
    run on fewer seeds than the module variants): each row lists the seeds it has, and a paired comparison needs
    at least 2 seeds that have both cells. Everything that decides how a cell is trained and measured (preset,
    budget, config, prompts, sampler, ...) must be equal.
    Raises ValueError when the studies differ in anything else but the seed (or repeat a seed).
    """
    if len(studies) < 2:
        raise ValueError(f"combine_seeds needs at least 2 studies (one per training seed), got {len(studies)}")
    seeds = [s["settings"]["train_seed"] for s in studies]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the studies repeat a training seed: {seeds}; combine one study per seed")
    ref = _shared_settings(studies[0]["settings"])
    for s in studies[1:]:
        other = _shared_settings(s["settings"])
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if diff:
            raise ValueError(f"the studies differ in more than the training seed: {diff} "
                             f"(seed {s['settings']['train_seed']} vs {seeds[0]})")
    # sweep points equal to the base config reuse the full run (``Variant.run == "full"``): no comparison with it
    same_as_full = {p["name"] for s in studies for p in s.get("plan", ()) if p["name"] != "full" and p["run"] == "full"}
    cells: dict[tuple[str, float], dict[int, Mapping[str, Any]]] = {}
    for seed, s in zip(seeds, studies):
        for r in s["rows"]:
            cells.setdefault((r["variant"], float(r["guidance"])), {})[seed] = r
    rows = []
    for (variant, g), by_seed in cells.items():
        first = next(iter(by_seed.values()))
        row: dict[str, Any] = {"variant": variant, "guidance": g, "seeds": sorted(by_seed),
                               "group": first["group"], "value": first.get("value")}
        for key, _, _ in SEED_METRICS:
            xs = [_metric(by_seed[k], key) for k in sorted(by_seed)]
            if any(x is None for x in xs):
                continue
            m, sd = mean_sd(xs)
            row[key] = {"mean": m, "sd": sd, "se": None if sd is None else sd / math.sqrt(len(xs)), "per_seed": xs}
        rows.append(row)
    comparisons = []
    for (variant, g), by_seed in cells.items():
        full = cells.get(("full", g))
        if variant == "full" or variant in same_as_full or full is None:
            continue
        common = sorted(set(full) & set(by_seed))
        if len(common) < 2:
            continue
        for key, higher, label in SEED_METRICS:
            a = [_metric(full[k], key) for k in common]
            b = [_metric(by_seed[k], key) for k in common]
            if any(x is None for x in a + b):
                continue
            comparisons.append({"variant": variant, "guidance": g, **_paired([x - y for x, y in zip(a, b)], common,
                                                                              key, label, higher, variant)})
    # the same test on each seed's mean over the guidance weights: one reading per variant and metric, with
    # the evaluation noise of the six points averaged (the guidance weights share the seed's checkpoints, so
    # their six readings are not independent tests; this one is)
    over_guidance = []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for c in comparisons:
        groups.setdefault((c["variant"], c["metric"]), []).append(c)
    for (variant, key), cs in groups.items():
        seeds_of = {tuple(c["seeds"]) for c in cs}
        if len(cs) < 2 or len(seeds_of) != 1:  # one guidance weight, or not the same seeds at every weight
            continue
        common = list(cs[0]["seeds"])
        d = [sum(c["full_minus_variant"][i] for c in cs) / len(cs) for i in range(len(common))]
        over_guidance.append({"variant": variant, "guidance": sorted(c["guidance"] for c in cs),
                              **_paired(d, common, key, cs[0]["label"], cs[0]["higher_is_better"], variant)})
    return {"seeds": seeds, "settings": ref, "rows": rows, "comparisons": comparisons, "over_guidance": over_guidance}


def with_base_model(study: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep-only study (Fig. 6a points trained without the full model) completed with its base point.

    study: one training seed's ``ablation.json`` without a ``full`` row (``tools/ablate.py --variants`` with
    no name). base: a combined table (:func:`combine_seeds`, another study's ``seeds.json``) whose ``full``
    rows were measured with the same preset, budget, config and evaluation; its per-seed values of this
    study's ``train_seed`` become this study's full rows, at each guidance weight the study's sweep rows
    have. Each sweep also gets its base point (``alpha_<mask_alpha>`` / ``t_c_<edge_t_cutoff>`` of the
    study's base config, plan run ``"full"``), so the result holds what a study with ``full`` in its plan
    would hold and :func:`combine_seeds` pairs every sweep point with the full model of the same seed.
    When ``base`` records its studies' settings (``settings``: what :func:`combine_seeds` requires to be
    equal), they must equal this study's; an older table without them cannot be checked (the caller says so).
    Raises ValueError when the settings differ, the study already has full rows, has no sweep rows, or
    ``base`` lacks this seed's full model at one of the guidance weights.
    """
    seed = study["settings"]["train_seed"]
    if base.get("settings") is not None:
        mine = _shared_settings(study["settings"])
        diff = sorted(k for k in set(mine) | set(base["settings"]) if mine.get(k) != base["settings"].get(k))
        if diff:
            raise ValueError(f"seed {seed}: the base table was measured with other settings: {diff}")
    rows = list(study["rows"])
    if any(r["variant"] == "full" for r in rows):
        raise ValueError(f"seed {seed}: the study has its own full model; combine it without a base table")
    sweep = [r for r in rows if r.get("group") in ("alpha", "t_c")]
    if not sweep:
        raise ValueError(f"seed {seed}: the study has no sweep rows (alpha, t_c) to pair with a base model")
    full = {float(r["guidance"]): r for r in base["rows"] if r["variant"] == "full"}
    model = study["base_config"]["model"]
    base_value = {"alpha": float(model["mask_alpha"]), "t_c": float(model["edge_t_cutoff"])}
    plan = list(study.get("plan", ()))
    for g in sorted({float(r["guidance"]) for r in sweep}):
        b = full.get(g)
        if b is None or seed not in b["seeds"]:
            raise ValueError(f"seed {seed}: the base table has no full model of this seed at guidance {g:g} "
                             f"(its full rows: {[(x, full[x]['seeds']) for x in sorted(full)]})")
        i = b["seeds"].index(seed)
        value = {k: b[k]["per_seed"][i] for k, _, _ in SEED_METRICS if k in b}
        metrics = {"alignment": value.get("alignment"), "fidelity": value.get("fidelity"),
                   "toy_clip": {k: value[k] for k in ("clip_score", "fd_toy_clip") if k in value}}
        rows.append({"variant": "full", "group": "module", "value": None, "run": "full", "guidance": g, **metrics})
        for group in sorted({r["group"] for r in sweep if float(r["guidance"]) == g}):
            name = f"{group}_{_fmt_value(base_value[group])}"
            if any(r["variant"] == name and float(r["guidance"]) == g for r in rows):
                continue
            rows.append({"variant": name, "group": group, "value": base_value[group], "run": "full", "guidance": g,
                         **metrics})
            if not any(p["name"] == name for p in plan):
                plan.append({"name": name, "group": group, "value": base_value[group], "run": "full", "overrides": {}})
    return {**study, "rows": rows, "plan": plan}


def paired_t(d: Sequence[float]) -> dict[str, Any]:
    """Paired differences d (one per training seed, n >= 2): their mean, standard error, t = mean / se and the
    two-sided 95% critical value of Student's t with n - 1 degrees of freedom. se and t are None when the
    differences do not spread (equal up to float round-off, e.g. 0.5 - 0.4 vs 0.4 - 0.3): no t to read."""
    if len(d) < 2:
        raise ValueError(f"paired_t needs at least 2 paired differences, got {len(d)}")
    m, sd = mean_sd(list(d))
    if sd <= 1e-9 * max(1.0, max(abs(x) for x in d)):
        sd = 0.0
    se = sd / math.sqrt(len(d)) if sd else None
    return {"mean": m, "se": se, "t": m / se if se else None, "t_critical_95": t_critical_95(len(d) - 1)}


def _paired(d: Sequence[float], seeds: Sequence[int], key: str, label: str, higher: bool, variant: str) -> dict:
    """One paired comparison: the per-seed differences full - variant, their mean, se, t and 95% reading."""
    pt = paired_t(d)
    m, se, t, crit = pt["mean"], pt["se"], pt["t"], pt["t_critical_95"]
    better = None if t is None or abs(t) <= crit else ("full" if (m > 0) == higher else variant)
    return {"metric": key, "label": label, "higher_is_better": higher, "seeds": list(seeds),
            "full_minus_variant": list(d), "mean": m, "se": se, "t": t, "t_critical_95": crit,
            "reading": "tie" if better is None else f"{better} better",
            "full_wins_seeds": sum(((x > 0) if higher else (x < 0)) for x in d)}


# two-sided 95% quantiles of Student's t, by degrees of freedom (1..10); beyond, the normal 1.96 is close enough
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical_95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else 1.96 if df > 30 else 2.0


def _pm(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not cell:
        return "-"
    se = cell.get("se")
    return f"{cell['mean']:.{digits}g}" + ("" if se is None else f" ± {se:.2g}")


_GROUP_ORDER = {"module": 0, "alpha": 1, "t_c": 2}


def _snap(x: float) -> float:
    """A mean of differences that cancel (e.g. +1/96, -1/96, 0) prints as 0, not as float round-off (1.9e-17)."""
    return 0.0 if abs(x) < 1e-12 else x


def _row_order(r: Mapping[str, Any]) -> tuple:
    """Module variants (full first), then each sweep by its value (so T_c 250 comes before 1000), then guidance."""
    v = r.get("value")
    return (_GROUP_ORDER.get(r["group"], 3), r["variant"] != "full", float("inf") if v is None else float(v),
            r["variant"], r["guidance"])


def _test_cells(c: Mapping[str, Any]) -> str:
    """The table cells of one paired test: per-seed differences | mean ± se | t | t95 | seeds won | reading."""
    t = "-" if c["t"] is None else f"{c['t']:+.1f}"
    se = "" if c["se"] is None else f" ± {c['se']:.2g}"
    return (", ".join(f"{x:+.3g}" for x in c["full_minus_variant"]) + f" | {_snap(c['mean']):+.3g}{se} | {t} | "
            f"{c['t_critical_95']:.3g} | {c['full_wins_seeds']}/{len(c['seeds'])} | {c['reading']}")


def seeds_markdown(combined: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """Tables of :func:`combine_seeds`: mean ± standard error over seeds, and the paired comparisons."""
    some = any(r["seeds"] != sorted(combined["seeds"]) for r in combined["rows"])  # cells not run on every seed
    lines = [*header, "", f"Training seeds: {combined['seeds']} (one study each). Cells: mean ± standard error over "
             "the seeds" + (" (the seeds column: those that ran the cell)." if some else "."), "",
             "| variant | guidance | " + ("seeds | " if some else "") + " | ".join(lab for _, _, lab in SEED_METRICS)
             + " |", "|---|---:|" + ("---|" if some else "") + "---:|" * len(SEED_METRICS)]
    for r in sorted(combined["rows"], key=_row_order):
        seeds = (",".join(str(x) for x in r["seeds"]) + " | ") if some else ""
        lines.append(f"| {r['variant']} | {r['guidance']:g} | {seeds}"
                     + " | ".join(_pm(r.get(k)) for k, _, _ in SEED_METRICS) + " |")
    order = {r["variant"]: _row_order(r)[:3] for r in combined["rows"]}
    gs = sorted({c["guidance"] for c in combined["comparisons"]})
    if len(gs) > 1:  # one line per variant and metric, one column per guidance weight
        lines += ["", "Summary: the paired difference full - variant, mean over seeds (t), per guidance weight; **bold**: "
                  "|t| > t95, a difference at 95%; no t: the seeds' differences are equal (no spread to test); positive is "
                  "the paper's direction for the alignment axes, negative for the Fréchet distances.", "",
                  "| variant | metric | " + " | ".join(f"g = {g:g}" for g in gs) + " |",
                  "|---|---|" + "---:|" * len(gs)]
        cmp = {(c["variant"], c["metric"], c["guidance"]): c for c in combined["comparisons"]}
        for v in sorted({c["variant"] for c in combined["comparisons"]}, key=lambda v: (order.get(v, (9, 0, 0)), v)):
            for key, _, label in SEED_METRICS:
                cells = []
                for g in gs:
                    c = cmp.get((v, key, g))
                    if c is None:
                        cells.append("")
                        continue
                    cell = f"{_snap(c['mean']):+.3g}" + ("" if c["t"] is None else f" ({c['t']:+.1f})")
                    cells.append(f"**{cell}**" if c["reading"] != "tie" else cell)
                if any(cells):
                    lines.append(f"| {v} | {label} | " + " | ".join(cells) + " |")
    if combined.get("over_guidance"):
        lines += ["", "Averaged over the guidance weights: each seed's mean of full - variant over the weights it was "
                  "compared at, then the same paired test over seeds (one test per variant and metric; the weights "
                  "share each seed's checkpoints, so the per-weight readings above are not independent tests).", "",
                  "| variant | metric | weights | per seed | mean ± se | t | t95 | seeds where full is better | reading |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for c in sorted(combined["over_guidance"], key=lambda c: (order.get(c["variant"], (9, 0, 0)), c["variant"],
                                                                  [k for k, _, _ in SEED_METRICS].index(c["metric"]))):
            lines.append(f"| {c['variant']} | {c['label']} | {len(c['guidance'])} | {_test_cells(c)} |")
    lines += ["", "Paired by seed, full - variant (the paper's direction: full higher in alignment and CLIP score, "
              "lower in the Fréchet distances). t = mean / se over seeds, read as a difference when |t| exceeds the "
              "two-sided 95% Student-t value for n_seeds - 1 degrees of freedom (t95), else a tie.",
              "", "| variant | guidance | metric | full - variant per seed | mean ± se | t | t95 | seeds where full "
              "is better | reading |", "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for c in sorted(combined["comparisons"], key=lambda c: (order.get(c["variant"], (9, 0, 0)), c["variant"],
                                                             c["guidance"], c["metric"])):
        lines.append(f"| {c['variant']} | {c['guidance']:g} | {c['label']} | {_test_cells(c)} |")
    return "\n".join(lines) + "\n"
