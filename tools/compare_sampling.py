#!/usr/bin/env python
"""Compare sampling options on one checkpoint, image by image, from `tools/evaluate.py` results.

    python tools/compare_sampling.py --base plain runs/dsC/eval_3200_g7.5 \\
        --variant "A&E 50" runs/dsC/eval_3200_excite50 --variant "phrases apart" runs/dsC/eval_3200_phrases_apart \\
        --out docs/results/toy_excite_dsC

Two evaluations of one checkpoint with the same prompts, seeds and ``--per-prompt`` start every image from the same
noise (``evaluate.image_seed``), so an option's effect can be read per image: for each category that all of them
score, each variant's accuracy and the mean of its per-image difference from the base (1 - 0, 0 - 1 or 0) with the
standard error of that mean (sd / sqrt(n)), which is smaller than the unpaired binomial one when the option changes
few images. Also, over the two-object categories, which named shapes are drawn (``prompts.named_shapes_drawn``:
both / first only / second only / neither and the first-only share) and the share of clean backgrounds
(``evaluate.background_summary``: RMS < 8 of 255).
Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raphael_ref.evaluation.prompts import shape_order_summary  # noqa: E402
from raphael_ref.testing import load_tool  # noqa: E402

# tools/evaluate.py's definitions (background_summary: clean = RMS < CLEAN_BACKGROUND_RMS over all images)
E = load_tool("evaluate")


def load(path: str) -> dict:
    p = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run tools/evaluate.py first)")
    return json.loads(p.read_text())


def _key(r: dict) -> tuple:
    return (r["uid"], r["prompt"], r["seed"], r["sample"])


def compare(base: dict, variants: dict[str, dict], base_label: str = "base") -> dict:
    """{categories, rows: {label: {category: {...}, "shape_order": ..., "clean_fraction": ...}}} (see the module)."""
    runs = {base_label: base, **variants}
    cats = [c for c in base["summary"]["categories"]
            if all(c in r["summary"]["categories"] for r in variants.values())]
    if not cats:
        raise ValueError("the evaluations share no category")
    ref = {_key(r): r for r in base["records"]}
    rows: dict[str, dict] = {}
    for label, run in runs.items():
        recs = [r for r in run["records"] if r["category"] in cats]
        row: dict = {}
        for c in cats:
            xs = [r for r in recs if r["category"] == c]
            if not xs:
                raise ValueError(f"{label}: category {c} has no image records")
            missing = [_key(r) for r in xs if _key(r) not in ref]
            if missing or len(xs) != sum(1 for r in base["records"] if r["category"] == c):
                raise ValueError(f"{label}: category {c} does not hold the base's images (same prompts, seeds and "
                                 f"--per-prompt are needed to pair them); e.g. {missing[:1]}")
            d = [int(r["correct"]) - int(ref[_key(r)]["correct"]) for r in xs]
            n = len(d)
            m = sum(d) / n
            se = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1) / n) if n > 1 else float("nan")
            row[c] = {"correct": sum(int(r["correct"]) for r in xs), "n": n, "accuracy": sum(int(r["correct"]) for r in xs) / n,
                      "paired_diff": m, "paired_se": se, "changed": sum(1 for v in d if v)}
        # evaluate.py records the split since E83; older evaluations of the benchmark prompts are re-scored
        saved = run.get("shape_order")
        row["shape_order"] = ({c: v for c, v in saved.items() if c in cats} if saved is not None
                              else shape_order_summary(recs))
        clean = E.background_summary(recs)["clean_fraction"]  # as tools/evaluate.py reports it
        row["clean_fraction"] = None if math.isnan(clean) else clean
        rows[label] = row
    return {"categories": cats, "base": base_label, "rows": rows}


def markdown(res: dict, title: str) -> str:
    cats, rows = res["categories"], res["rows"]
    lines = [f"# {title}", "",
             f"Each cell: accuracy, then (for the variants) the mean per-image difference from `{res['base']}` ± its "
             "standard error (the same initial noise per image). Clean: background RMS < 8 of 255 over these "
             "categories.", "",
             "| sampling | " + " | ".join(cats) + " | clean |", "|---|" + "---:|" * (len(cats) + 1)]
    for label, row in rows.items():
        cells = []
        for c in cats:
            x = row[c]
            cell = f"{x['accuracy']:.2f} ({x['correct']}/{x['n']})"
            if label != res["base"]:
                cell += f" {x['paired_diff']:+.2f} ± {x['paired_se']:.2f}"
            cells.append(cell)
        clean = "n/a" if row["clean_fraction"] is None else f"{row['clean_fraction']:.0%}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {clean} |")
    order_cats = sorted({c for row in rows.values() for c in row["shape_order"]})
    if order_cats:
        lines += ["", "Named shapes drawn (both / first only / second only / neither; first-only share of the one-shape "
                  "images, 0.5 if either were lost alike):", "",
                  "| sampling | " + " | ".join(order_cats) + " |", "|---|" + "---|" * len(order_cats)]
        for label, row in rows.items():
            cells = []
            for c in order_cats:
                o = row["shape_order"].get(c)
                fs = o.get("first_share") if o else None
                cells.append("" if not o else f"{o['both']}/{o['first_only']}/{o['second_only']}/{o['neither']} "
                             f"({'n/a' if fs is None else f'{fs:.2f}'})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", nargs=2, metavar=("LABEL", "EVAL"), required=True, help="the reference sampling")
    p.add_argument("--variant", nargs=2, metavar=("LABEL", "EVAL"), action="append", required=True,
                   help="an evaluation of the same checkpoint, prompts and seeds with another sampling option")
    p.add_argument("--title", default="Sampling options, image by image")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    labels = [a.base[0]] + [v[0] for v in a.variant]
    if len(set(labels)) != len(labels):
        p.error(f"labels must differ, got {labels}")
    try:
        res = compare(load(a.base[1]), {lab: load(path) for lab, path in a.variant}, a.base[0])
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({**res, "sources": {a.base[0]: a.base[1], **dict(a.variant)}},
                                              indent=1) + "\n")
    md = markdown(res, a.title)
    Path(f"{out}.md").write_text(md)  # not with_suffix: an --out such as runs/cmp_g7.5 keeps its name
    print(md)
    return res


if __name__ == "__main__":
    main()
