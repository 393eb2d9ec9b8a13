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



def test_last_bit_changes_of_another_cpu_are_not_changes(tool, tmp_path, capsys, monkeypatch):
    """A re-run on a CPU whose kernels round the last bit differently keeps the stored golden, even
    with --force, and --check passes; a change beyond the cross-CPU tolerance still fails (above)."""
    mod, case = tool
    mod.main(["--root", str(tmp_path)])
    before = (tmp_path / "demo.double.safetensors").read_bytes()
    eps = torch.finfo(torch.float64).eps
    other_cpu = G.GoldenCase(id=case.id, tol=case.tol,
                             make_inputs=lambda g: {k: v * (1 + 2 * eps) for k, v in case.make_inputs(g).items()},
                             compute=lambda inp: {"y": 2 * inp["x"] * (1 + 4 * eps)})
    monkeypatch.setattr(mod.G, "all_cases", lambda: [other_cpu])
    capsys.readouterr()
    assert mod.main(["--root", str(tmp_path), "--check"]) == 0
    assert mod.main(["--root", str(tmp_path), "--force"]) == 0
    out = capsys.readouterr().out
    assert "within the cross-CPU tolerance" in out and "in.x: max abs change" in out and "CHANGED" not in out
    assert (tmp_path / "demo.double.safetensors").read_bytes() == before
