#!/usr/bin/env python
"""Compare two training settings over paired seeds from their `tools/evaluate.py` results.

    python tools/compare_evals.py --seeds 0 1 2 \\
        --a last runs/s0/eval runs/s1/eval runs/s2/eval \\
        --b penultimate runs/p0/eval+runs/p0/eval_rest runs/p1/eval runs/p2/eval \\
        --control no-text runs/notext/eval_uncond --out docs/results/toy_text_layer

``--a`` and ``--b`` each take a label, then one evaluation per training seed (in ``--seeds`` order);
``A+B`` joins the categories of several evaluation folders of one run (a category may appear in one
of them only). For every category read by all runs: each run's accuracy with its binomial standard
error, the per-seed difference B - A, its mean, standard error over seeds, t and the two-sided 95%
critical value (Student's t, n - 1 degrees of freedom), and how many seeds B wins. ``overall`` is the
mean over those categories without ``single_position`` (as ``tools/evaluate.py``'s overall). With
``--control`` (e.g. the no-text twin), each B run's margin over it in standard errors of the
difference, sqrt(se_B^2 + se_control^2), binomial. Writes OUT.md and OUT.json, and with ``--plot`` OUT.png
(per category: each setting's seeds as dots, their mean as a bar with ± se over seeds, the control as a line).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raphael_ref.evaluation.ablation import mean_sd, paired_t  # noqa: E402

NOT_IN_OVERALL = ("single_position",)


def load_eval(spec: str) -> dict[str, dict]:
    """Categories of one run: {category: {"correct": k, "n": n}} from one or more '+'-joined evaluation folders."""
    cats: dict[str, dict] = {}
    for part in spec.split("+"):
        path = Path(part) / "results.json" if Path(part).is_dir() else Path(part)
        if not path.is_file():
            raise SystemExit(f"error: no results.json at {part!r} (an output folder of tools/evaluate.py)")
        summary = json.loads(path.read_text())["summary"]["categories"]
        for name, c in summary.items():
            if name in cats:
                raise SystemExit(f"error: category {name!r} appears twice in {spec!r}; give each category once")
            cats[name] = {"correct": int(c["correct"]), "n": int(c["n"])}
    return cats


def cell(c: dict) -> dict:
    p = c["correct"] / c["n"]
    return {"accuracy": p, "se": math.sqrt(p * (1 - p) / c["n"]), "correct": c["correct"], "n": c["n"]}


def paired(a: list[float], b: list[float]) -> dict:
    """b - a per seed, with ablation.paired_t's mean, se, t and 95% critical value, the wins and the reading."""
    d = [y - x for x, y in zip(a, b)]
    pt = paired_t(d)
    t = pt["t"]
    return {"b_minus_a": d, **pt, "b_wins": sum(x > 0 for x in d), "a_wins": sum(x < 0 for x in d),
            "reading": "tie" if t is None or abs(t) <= pt["t_critical_95"] else ("b better" if t > 0 else "a better")}


def compare(a_runs: list[dict], b_runs: list[dict], seeds: list[int], control: dict | None = None) -> dict:
    if not (len(a_runs) == len(b_runs) == len(seeds)):
        raise SystemExit(f"error: {len(seeds)} seeds but {len(a_runs)} runs for --a and {len(b_runs)} for --b; "
                         "give one evaluation per seed to each")
    common = set.intersection(*(set(r) for r in a_runs + b_runs))
    if not common:
        raise SystemExit("error: no category is read by every run")
    order = [c for c in a_runs[0] if c in common]
    rows = {}
    for cat in order:
        a = [cell(r[cat]) for r in a_runs]
        b = [cell(r[cat]) for r in b_runs]
        rows[cat] = {"a": a, "b": b, "paired": paired([x["accuracy"] for x in a], [x["accuracy"] for x in b])}
        if control is not None and cat in control:
            c = cell(control[cat])
            rows[cat]["control"] = c
            rows[cat]["b_over_control_in_se"] = [
                (x["accuracy"] - c["accuracy"]) / math.sqrt(x["se"] ** 2 + c["se"] ** 2)
                if x["se"] or c["se"] else None for x in b]
    in_overall = [c for c in order if c not in NOT_IN_OVERALL]
    overall = None
    if in_overall:
        oa = [sum(cell(r[c])["accuracy"] for c in in_overall) / len(in_overall) for r in a_runs]
        ob = [sum(cell(r[c])["accuracy"] for c in in_overall) / len(in_overall) for r in b_runs]
        overall = {"categories": in_overall, "a": oa, "b": ob, "paired": paired(oa, ob)}
    return {"seeds": seeds, "categories": rows, "overall": overall}


def _f(x: float | None, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _mean_se(xs: list[float]) -> str:
    """mean ± standard error over the seeds' values (one cell of the table)."""
    m, sd = mean_sd(xs)
    return _f(m) if sd is None else f"{m:.3f} ± {sd / math.sqrt(len(xs)):.3f}"


def markdown(res: dict, la: str, lb: str, lc: str | None) -> str:
    seeds = res["seeds"]
    out = [f"# {lb} vs {la}, paired by training seed ({', '.join(map(str, seeds))})", "",
           f"Accuracy per run (± binomial se); difference {lb} - {la} per seed, its mean ± se over seeds, t and the "
           f"two-sided 95% critical value (t95, {len(seeds) - 1} degrees of freedom); reading 'tie' unless |t| > t95.",
           "", f"| category | {la} per seed | {lb} per seed | {la} mean | {lb} mean | {lb} - {la} per seed | mean ± se "
           f"| t | t95 | seeds {lb} ahead | reading |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|"]

    def row(name, a, b, p):
        per = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        se = "" if p["se"] is None else f" ± {p['se']:.3f}"
        return (f"| {name} | {per(a)} | {per(b)} | {_mean_se(a)} | {_mean_se(b)} | "
                f"{' / '.join(f'{x:+.2f}' for x in p['b_minus_a'])} | {p['mean']:+.3f}{se} | {_f(p['t'], 2)} | "
                f"{_f(p['t_critical_95'], 2)} | {p['b_wins']} of {len(seeds)} | {p['reading'].replace('b better', lb + ' better').replace('a better', la + ' better')} |")

    for cat, r in res["categories"].items():
        out.append(row(cat, [x["accuracy"] for x in r["a"]], [x["accuracy"] for x in r["b"]], r["paired"]))
    if res["overall"]:
        o = res["overall"]
        out.append(row("**overall**", o["a"], o["b"], o["paired"]))
        out += ["", f"overall: the mean of {', '.join(o['categories'])} (single_position left out, as in "
                    "tools/evaluate.py)."]
    if lc and any("control" in r for r in res["categories"].values()):
        out += ["", f"## {lb} against {lc}", "",
                f"| category | {lc} | {lb} per seed | margin per seed, in se of the difference |", "|---|---:|---|---|"]
        for cat, r in res["categories"].items():
            if "control" in r:
                c = r["control"]
                accs = " / ".join(f"{x['accuracy']:.2f}" for x in r["b"])
                margins = " / ".join(_f(z, 1) for z in r["b_over_control_in_se"])
                out.append(f"| {cat} | {c['accuracy']:.3f} ± {c['se']:.3f} | {accs} | {margins} |")
    return "\n".join(out) + "\n"


def plot(res: dict, la: str, lb: str, lc: str | None, path: Path) -> None:
    """Grouped bars: per category, A and B's mean over seeds (± se over seeds), each seed a dot, the control a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(res["categories"])
    groups = [(c, [x["accuracy"] for x in res["categories"][c]["a"]], [x["accuracy"] for x in res["categories"][c]["b"]],
               res["categories"][c].get("control")) for c in cats]
    if res["overall"]:
        groups.append(("overall", res["overall"]["a"], res["overall"]["b"], None))
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2, 3.6))
    w = 0.38
    for k, (label, off, color) in enumerate(((la, -w / 2, "tab:gray"), (lb, w / 2, "tab:blue"))):
        for i, g in enumerate(groups):
            vals = g[1 + k]
            m, sd = mean_sd(vals)
            err = None if sd is None else sd / math.sqrt(len(vals))
            ax.bar(i + off, m, w, yerr=err, color=color, alpha=0.55, capsize=3, label=label if i == 0 else None)
            ax.scatter([i + off] * len(vals), vals, s=10, color="k", zorder=3)
    for i, g in enumerate(groups):
        if g[3] is not None:
            ax.hlines(g[3]["accuracy"], i - w, i + w, colors="tab:red", linestyles="--",
                      label=lc if lc and i == next(j for j, h in enumerate(groups) if h[3] is not None) else None)
    ax.set_xticks(range(len(groups)), [g[0].replace("_", "\n") for g in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{lb} vs {la}: mean ± se over seeds {', '.join(map(str, res['seeds']))}; dots: seeds", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", required=True, metavar="LABEL_THEN_EVALS", help="label, then one evaluation per seed")
    p.add_argument("--b", nargs="+", required=True, metavar="LABEL_THEN_EVALS", help="label, then one evaluation per seed")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds, in the order of the evaluations")
    p.add_argument("--control", nargs=2, metavar=("LABEL", "EVAL"), help="a control run (e.g. the no-text twin)")
    p.add_argument("--out", required=True, help="output stem: writes OUT.md and OUT.json")
    p.add_argument("--plot", action="store_true", help="also write OUT.png (needs matplotlib, the [eval] extra)")
    args = p.parse_args(argv)
    for flag, v in (("--a", args.a), ("--b", args.b)):
        if len(v) < 2:
            p.error(f"{flag} takes a label and then at least one evaluation folder")
    if len(args.seeds) < 2:
        p.error("give at least 2 seeds: one seed has no spread to test against")
    la, lb = args.a[0], args.b[0]
    a_runs, b_runs = [load_eval(s) for s in args.a[1:]], [load_eval(s) for s in args.b[1:]]
    control = load_eval(args.control[1]) if args.control else None
    res = compare(a_runs, b_runs, args.seeds, control)
    res.update({"a": {"label": la, "evals": args.a[1:]}, "b": {"label": lb, "evals": args.b[1:]},
                "control": None if not args.control else {"label": args.control[0], "eval": args.control[1]}})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res, la, lb, args.control[0] if args.control else None)
    Path(f"{out}.md").write_text(md)
    if args.plot:
        plot(res, la, lb, args.control[0] if args.control else None, Path(f"{out}.png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
