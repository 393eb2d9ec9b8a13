#!/usr/bin/env python
"""Regenerate the golden tensors under golden/ (float64 references of every numeric spec entry).

    python tools/make_golden.py                 # write missing goldens; refuse to change existing ones
    python tools/make_golden.py --only ddpm.q_sample
    python tools/make_golden.py --check         # exit 1 if any stored golden differs from a fresh run
    python tools/make_golden.py --force         # overwrite changed goldens (prints what changed)

A golden whose stored values differ from the freshly computed ones is never overwritten without
--force: the command prints which tensors changed and by how much, and exits non-zero. Changes
within the cross-CPU tolerance (a few float64 ulps; raphael_ref/testing/golden.py, "Across CPUs")
are reported but are not changes: the stored golden is kept, even with --force.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raphael_ref.testing import golden as G  # noqa: E402


def versions() -> dict:
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="case ids to (re)generate")
    ap.add_argument("--force", action="store_true", help="overwrite goldens whose values changed")
    ap.add_argument("--check", action="store_true", help="only compare, write nothing")
    ap.add_argument("--root", type=Path, default=G.GOLDEN_DIR, help="golden directory (default: golden/)")
    args = ap.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    cases = G.all_cases()
    if args.only:
        known = {c.id for c in cases}
        unknown = sorted(set(args.only) - known)
        if unknown:
            ap.error(f"unknown case id(s) {unknown}; known: {sorted(known)}")
        cases = [c for c in cases if c.id in args.only]

    manifest = G.read_manifest(args.root)
    entries = dict(manifest.get("cases", {}))
    status = 0
    for case in cases:
        inputs, outputs = G.compute_reference(case)
        path = G.golden_path(case, args.root)
        if path.exists():
            old_in, old_out = G.load_golden(case, args.root)
            changes = G.diff_report({**{f"in.{k}": v for k, v in old_in.items()}, **{f"out.{k}": v for k, v in old_out.items()}},
                                    {**{f"in.{k}": v for k, v in inputs.items()}, **{f"out.{k}": v for k, v in outputs.items()}})
            if not changes:
                print(f"unchanged  {case.id}")
                entries[case.id] = G.manifest_entry(case, inputs, outputs)
                continue
            if not G.reproduction_errors(case, (old_in, old_out), (inputs, outputs)):
                # last-bit changes of another CPU's kernels (golden.py, "Across CPUs"): not a change
                print(f"unchanged  {case.id} (within the cross-CPU tolerance; the stored golden is kept)")
                print("\n".join(changes))
                entries[case.id] = G.manifest_entry(case, old_in, old_out)
                continue
            print(f"CHANGED    {case.id}")
            print("\n".join(changes))
            if args.check or not args.force:
                status = 1
                if not args.check:
                    print("  not overwritten: rerun with --force to accept these changes")
                continue
        elif args.check:
            print(f"MISSING    {case.id}")
            status = 1
            continue
        G.save_golden(case, inputs, outputs, args.root)
        entries[case.id] = G.manifest_entry(case, inputs, outputs)
        print(f"written    {case.id} -> {path.relative_to(args.root.parent) if args.root.parent in path.parents else path}")
    if not args.check:
        G.write_manifest(entries, versions(), args.root)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
