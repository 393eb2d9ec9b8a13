#!/usr/bin/env python
"""Why two-object prompts fail: the binding outcomes of several `tools/evaluate.py` results, one table.

    python tools/binding_table.py --out docs/results/toy_binding \\
        "800 steps=runs/default_v3/eval_g7.5" "3200 steps=runs/budget_x4_pen/eval_3200_g7.5" \\
        "no text=runs/notext_penult/eval_uncond"

Each argument is LABEL=EVAL (an output folder of tools/evaluate.py, or its results.json). For the categories that bind
an attribute to each of two shapes (position: a cell, color_attribution: a colour), each image is bound / swapped /
one_shape / other (``raphael_ref.evaluation.prompts.binding_outcome``; evaluations made before it was recorded are
rescored from their detections). The binding rate bound / (bound + swapped) is 0.5 when a model draws both shapes and
both attributes but pairs them at random; its standard error is binomial over those images. A second table splits
the two-object prompts (two_objects, position, color_attribution) by which named shapes are drawn: both, only the
first named, only the second, neither (``prompts.named_shapes_drawn``); its first share first / (first + second) is
0.5 when the lost shape does not depend on the caption order. Writes OUT.md and OUT.json (with --out); prints both
tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raphael_ref.evaluation.prompts import (  # noqa: E402
    BINDING_CATEGORIES, BINDING_OUTCOMES, SHAPE_ORDER_OUTCOMES, binding_summary, rescore_binding, shape_order_summary)


def load(arg: str) -> tuple[str, dict, dict]:
    label, sep, where = arg.partition("=")
    if not sep or not label or not where:
        raise SystemExit(f"error: {arg!r}: give LABEL=EVAL (an output folder of tools/evaluate.py)")
    path = Path(where) / "results.json" if Path(where).is_dir() else Path(where)
    if not path.is_file():
        raise SystemExit(f"error: no results.json at {where!r} (an output folder of tools/evaluate.py)")
    records = json.loads(path.read_text())["records"]
    summary = binding_summary(rescore_binding(records))
    if not summary:
        raise SystemExit(f"error: {where!r} has no {' or '.join(BINDING_CATEGORIES)} images; evaluate with "
                         f"--categories {' '.join(BINDING_CATEGORIES)}")
    for v in summary.values():
        paired = v["bound"] + v["swapped"]
        p = v["binding_rate"]
        v["binding_rate_se"] = math.sqrt(p * (1 - p) / paired) if paired else float("nan")
    return label, summary, shape_order_summary(records)


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = ["| run | category | " + " | ".join(k.replace("_", " ") for k in BINDING_OUTCOMES)
             + " | n | bound / (bound + swapped) |", "|---|---|" + "---:|" * (len(BINDING_OUTCOMES) + 2)]
    for label, summary, _ in rows:
        for cat, v in summary.items():
            rate = "-" if v["binding_rate"] != v["binding_rate"] else f"{v['binding_rate']:.2f} ± {v['binding_rate_se']:.2f}"
            lines.append(f"| {label} | {cat} | " + " | ".join(str(v[k]) for k in BINDING_OUTCOMES) + f" | {v['n']} | {rate} |")
    lines += ["", "Which named shapes are drawn (first: the shape named first in the prompt):", "",
              "| run | category | " + " | ".join(k.replace("_", " ") for k in SHAPE_ORDER_OUTCOMES)
              + " | n | first / (first + second) |", "|---|---|" + "---:|" * (len(SHAPE_ORDER_OUTCOMES) + 2)]
    for label, _, order in rows:
        for cat, v in order.items():
            share = "-" if v["first_share"] != v["first_share"] else f"{v['first_share']:.2f} ± {v['first_share_se']:.2f}"
            lines.append(f"| {label} | {cat} | " + " | ".join(str(v[k]) for k in SHAPE_ORDER_OUTCOMES)
                         + f" | {v['n']} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("evals", nargs="+", metavar="LABEL=EVAL")
    p.add_argument("--out", help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    rows = [load(a) for a in args.evals]
    md = table(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        out.with_suffix(".json").write_text(json.dumps(
            {"evals": args.evals, "rows": {label: b for label, b, _ in rows},
             "shape_order": {label: o for label, _, o in rows}}, indent=2) + "\n")
    print(md, end="")
    return {label: b for label, b, _ in rows}


if __name__ == "__main__":
    main()
