"""tools/make_golden.py: writes missing goldens, refuses to overwrite changed ones without --force."""

from __future__ import annotations

import json

import pytest
import torch

from raphael_ref.testing import golden as G, load_tool



@pytest.fixture()
def tool(monkeypatch):
    mod = load_tool("make_golden")
    case = G.GoldenCase(
        id="demo.double",
        make_inputs=lambda g: {"x": torch.randn(4, generator=g, dtype=torch.float64)},
        compute=lambda inp: {"y": 2 * inp["x"]},
        tol={"float32": (1e-6, 1e-6)},
    )
    monkeypatch.setattr(mod.G, "all_cases", lambda: [case])
    return mod, case


def test_writes_then_reports_unchanged(tool, tmp_path, capsys):
    mod, case = tool
    assert mod.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "demo.double.safetensors").exists()
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest["cases"]["demo.double"]["seed"] == 0 and "torch" in manifest["generated_with"]
    assert mod.main(["--root", str(tmp_path)]) == 0
    assert "unchanged  demo.double" in capsys.readouterr().out


def test_refuses_changed_values_without_force(tool, tmp_path, capsys, monkeypatch):
    mod, case = tool
    mod.main(["--root", str(tmp_path)])
    before = (tmp_path / "demo.double.safetensors").read_bytes()
    changed = G.GoldenCase(id=case.id, make_inputs=case.make_inputs, compute=lambda inp: {"y": 2 * inp["x"] + 1e-3},
                           tol=case.tol)
    monkeypatch.setattr(mod.G, "all_cases", lambda: [changed])
    capsys.readouterr()
    assert mod.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and "out.y: max abs change 1.000e-03" in out and "--force" in out
    assert (tmp_path / "demo.double.safetensors").read_bytes() == before
    assert mod.main(["--root", str(tmp_path), "--check"]) == 1
    assert mod.main(["--root", str(tmp_path), "--force"]) == 0
    _, outs = G.load_golden(changed, tmp_path)
    _, ref = G.compute_reference(changed)
    assert torch.equal(outs["y"], ref["y"])


def test_missing_golden_message_names_the_command(tmp_path):
    case = G.GoldenCase(id="demo.none", make_inputs=lambda g: {}, compute=lambda i: {}, tol={})
    with pytest.raises(FileNotFoundError, match="tools/make_golden.py --only demo.none"):
        G.load_golden(case, tmp_path)

