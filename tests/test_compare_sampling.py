"""tools/compare_sampling.py: per-image paired differences between sampling options of one checkpoint."""

from __future__ import annotations

import json
import math

import pytest

from raphael_ref.evaluation.prompts import evaluation_prompts
from raphael_ref.testing import load_tool


def _result(correct: dict[str, list[int]], detected=None, rms=0.0) -> dict:
    """A results.json-like dict: the benchmark's first prompts, one seed, len(correct[c]) images per category."""
    specs = evaluation_prompts(list(correct), 1)
    records = []
    for cat, flags in correct.items():
        spec = specs[cat][0]
        for i, ok in enumerate(flags):
            det = detected[i] if detected is not None and cat == "two_objects" else []
            records.append({"uid": spec.uid, "category": cat, "prompt": spec.prompt, "seed": 0, "sample": i,
                            "correct": bool(ok), "detected": det, "background_rms": rms})
    summary = {"categories": {c: {"correct": sum(f), "n": len(f)} for c, f in correct.items()}}
    return {"summary": summary, "records": records}


def test_paired_differences_and_shape_order(tmp_path):
    T = load_tool("compare_sampling")
    spec = evaluation_prompts(["two_objects"], 1)["two_objects"][0]
    s1, s2 = (r.shape for r in spec.requirements)
    first_only = [[s1, "red", "left"]]
    both = [[s1, "red", "left"], [s2, "blue", "top"]]
    base = _result({"two_objects": [1, 0, 0, 1], "colors": [1, 1, 0, 0]}, detected=[both, first_only, first_only, both])
    var = _result({"two_objects": [1, 1, 1, 0], "colors": [1, 1, 0, 0]}, detected=[both, both, both, first_only],
                  rms=20.0)
    res = T.compare(base, {"v": var}, "plain")
    assert res["categories"] == ["two_objects", "colors"]
    two = res["rows"]["v"]["two_objects"]
    # differences +1, +1, -1, 0 over the same four images: mean 0.25, sd sqrt(11/12), se sd / 2
    assert two["paired_diff"] == 0.25 and two["changed"] == 3
    assert math.isclose(two["paired_se"], math.sqrt(11 / 12) / 2, rel_tol=1e-12)
    assert res["rows"]["v"]["colors"]["paired_diff"] == 0 and res["rows"]["v"]["colors"]["paired_se"] == 0
    assert res["rows"]["plain"]["shape_order"]["two_objects"]["first_only"] == 2
    assert res["rows"]["v"]["shape_order"]["two_objects"]["both"] == 3
    assert res["rows"]["plain"]["clean_fraction"] == 1.0 and res["rows"]["v"]["clean_fraction"] == 0.0
    # the tool writes both files; an evaluation of other images cannot be paired
    for name, r in (("base", base), ("var", var)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    T.main(["--base", "plain", str(tmp_path / "base"), "--variant", "v", str(tmp_path / "var"),
            "--out", str(tmp_path / "cmp_g7.5")])  # a dot in the name is kept
    md = (tmp_path / "cmp_g7.5.md").read_text()
    assert "| v | 0.75 (3/4) +0.25 ± 0.48 |" in md
    assert json.loads((tmp_path / "cmp_g7.5.json").read_text())["base"] == "plain"
    short = _result({"two_objects": [1, 0, 0]}, detected=[both, both, both])
    with pytest.raises(ValueError, match="does not hold the base's images"):
        T.compare(base, {"short": short})
    with pytest.raises(SystemExit):
        T.main(["--base", "a", str(tmp_path / "base"), "--variant", "a", str(tmp_path / "var"), "--out",
                str(tmp_path / "x")])
