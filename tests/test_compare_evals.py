"""tools/compare_evals.py: two training settings compared over paired seeds from tools/evaluate.py results."""

from __future__ import annotations

import json
import math

import pytest

from raphael_ref.testing import load_tool

ce = load_tool("compare_evals")


def _write(folder, cats):
    folder.mkdir(parents=True)
    summary = {"categories": {c: {"accuracy": k / n, "correct": k, "n": n, "n_prompts": 8} for c, (k, n) in cats.items()},
               "overall": 0.0}
    (folder / "results.json").write_text(json.dumps({"summary": summary}))
    return str(folder)


def test_paired_mean_se_t_and_reading_by_hand():
    p = ce.paired([0.5, 0.4, 0.6], [0.6, 0.6, 0.7])  # differences 0.1, 0.2, 0.1
    assert p["b_minus_a"] == pytest.approx([0.1, 0.2, 0.1])
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 * 2 + (0.2 - 0.4 / 3) ** 2) / 2)
    assert p["mean"] == pytest.approx(0.4 / 3) and p["se"] == pytest.approx(sd / math.sqrt(3))
    assert p["t"] == pytest.approx((0.4 / 3) / (sd / math.sqrt(3)))  # 4.0 < t95(2) = 4.303
    assert p["t_critical_95"] == 4.303 and p["reading"] == "tie" and p["b_wins"] == 3
    strong = ce.paired([0.1, 0.2, 0.3], [0.5, 0.61, 0.69])
    assert strong["reading"] == "b better" and ce.paired([0.5, 0.61, 0.69], [0.1, 0.2, 0.3])["reading"] == "a better"
    same = ce.paired([0.5, 0.4], [0.6, 0.5])  # equal differences up to round-off: no spread, no t
    assert same["se"] is None and same["t"] is None and same["reading"] == "tie"


def test_tool_joins_folders_pairs_seeds_and_writes_the_control_margin(tmp_path):
    a0 = _write(tmp_path / "a0", {"colors": (48, 96), "position": (5, 96), "single_position": (50, 96)})
    a1 = _write(tmp_path / "a1", {"colors": (60, 96), "position": (4, 96), "single_position": (55, 96)})
    b0 = _write(tmp_path / "b0", {"colors": (90, 96), "position": (12, 96)})
    b0r = _write(tmp_path / "b0r", {"single_position": (65, 96), "counting": (30, 96)})  # counting: not in every run
    b1 = _write(tmp_path / "b1", {"colors": (91, 96), "position": (7, 96), "single_position": (71, 96)})
    ctl = _write(tmp_path / "ctl", {"colors": (16, 96), "position": (19, 96), "single_position": (19, 96)})
    out = tmp_path / "res" / "cmp"
    assert ce.main(["--seeds", "0", "1", "--a", "last", a0, a1, "--b", "pen", f"{b0}+{b0r}", b1,
                    "--control", "no-text", ctl, "--out", str(out)]) == 0
    res = json.loads((tmp_path / "res" / "cmp.json").read_text())
    assert list(res["categories"]) == ["colors", "position", "single_position"]  # counting is not in every run
    col = res["categories"]["colors"]
    assert [c["accuracy"] for c in col["b"]] == pytest.approx([90 / 96, 91 / 96])
    assert col["a"][0]["se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 96))
    assert col["paired"]["b_minus_a"] == pytest.approx([42 / 96, 31 / 96])
    # overall leaves single_position out: mean of colors and position
    assert res["overall"]["categories"] == ["colors", "position"]
    assert res["overall"]["b"][0] == pytest.approx((90 / 96 + 12 / 96) / 2)
    pc, pb = 16 / 96, 90 / 96
    margin = (pb - pc) / math.sqrt(pb * (1 - pb) / 96 + pc * (1 - pc) / 96)
    assert col["b_over_control_in_se"][0] == pytest.approx(margin)
    assert res["categories"]["position"]["b_over_control_in_se"][0] < 0  # below the control: a negative margin
    md = (tmp_path / "res" / "cmp.md").read_text()
    assert "| colors |" in md and "**overall**" in md and "pen against no-text" in md
    assert not (tmp_path / "res" / "cmp.png").exists()  # the plot only when asked


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_write(tmp_path / f"r{i}", {"colors": (40 + 10 * i, 96), "position": (5 + i, 96)}) for i in range(4)]
    ctl = _write(tmp_path / "ctl", {"colors": (16, 96), "position": (2, 96)})
    out = tmp_path / "cmp"
    assert ce.main(["--seeds", "0", "1", "--a", "A", *runs[:2], "--b", "B", *runs[2:], "--control", "none", ctl,
                    "--out", str(out), "--plot"]) == 0
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_clear_errors(tmp_path):
    a = _write(tmp_path / "a", {"colors": (1, 2)})
    with pytest.raises(SystemExit, match="2 seeds but 1 runs"):
        ce.main(["--seeds", "0", "1", "--a", "x", a, "--b", "y", a, a, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no results.json"):
        ce.main(["--seeds", "0", "1", "--a", "x", a, str(tmp_path / "missing"), "--b", "y", a, a,
                 "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="appears twice"):
        ce.main(["--seeds", "0", "1", "--a", "x", f"{a}+{a}", a, "--b", "y", a, a, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # argparse: one seed has no spread
        ce.main(["--seeds", "0", "--a", "x", a, "--b", "y", a, "--out", str(tmp_path / "o")])
