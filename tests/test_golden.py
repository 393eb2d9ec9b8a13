"""Every golden case re-evaluated per dtype (CPU; CUDA under -m gpu) against its float64 golden."""

from __future__ import annotations

import pytest
import torch

from raphael_ref.testing import golden as G

CASES = G.all_cases()
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _params(device_marks=()):
    out = []
    for case in CASES:
        for dtype in case.tol:
            out.append(pytest.param(case, dtype, id=f"{case.id}-{dtype}", marks=[pytest.mark.spec_id(case.id), *device_marks]))
    return out


def _check(case: G.GoldenCase, dtype_name: str, device: str) -> None:
    inputs, expected = G.load_golden(case)
    got = case.compute(case.cast_inputs(inputs, DTYPES[dtype_name], device))
    assert set(got) == set(expected), f"{case.id}: outputs {sorted(got)} != golden {sorted(expected)}"
    rtol, atol = case.tol[dtype_name]
    for name, exp in expected.items():
        g = got[name].detach().cpu()
        if exp.is_floating_point():
            assert g.is_floating_point(), f"{case.id}.{name}: expected floating output"
            assert torch.isfinite(g.double()).all() == torch.isfinite(exp).all(), f"{case.id}.{name}: non-finite values"
            torch.testing.assert_close(g.double(), exp, rtol=rtol, atol=atol, msg=lambda m: f"{case.id}.{name} [{dtype_name}, {device}]: {m}")
        else:
            assert torch.equal(g, exp), f"{case.id}.{name} [{dtype_name}, {device}]: integer/bool output differs"


@pytest.mark.parametrize("case,dtype_name", _params())
def test_golden_cpu(case, dtype_name):
    if dtype_name in case.cpu_skip:
        pytest.skip(f"{dtype_name} is not run on the CPU for this op: {case.cpu_skip[dtype_name]}")
    _check(case, dtype_name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype_name", _params())
def test_golden_cuda(case, dtype_name):
    _check(case, dtype_name, "cuda")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.spec_id(c.id)) for c in CASES])
def test_golden_inputs_reproducible(case):
    """The generator still draws the stored inputs and float64 evaluation still gives the stored outputs,
    on any CPU: within a few float64 ulps for inputs, 1e-12 (or the case's justified float64 / float32-
    reference tolerance) for outputs, integers and booleans exactly (golden.reproduction_errors)."""
    stored, fresh = G.load_golden(case), G.compute_reference(case)
    errors = G.reproduction_errors(case, stored, fresh)
    assert not errors, f"{case.id} is not reproduced:\n" + "\n".join(errors)


def _perturb(t: torch.Tensor, ulps: float) -> torch.Tensor:
    """t moved by `ulps` float64 ulps of each entry (relative), away from zero."""
    return t + t.sign() * t.abs() * ulps * torch.finfo(torch.float64).eps


def test_reproduction_tolerance_can_fail():
    """The cross-CPU tolerances accept the measured last-bit changes and reject real ones."""
    case = next(c for c in CASES if c.id == "smoe.threshold_mask")
    (inp, out) = G.load_golden(case)
    assert G.reproduction_errors(case, (inp, out), (inp, out)) == []
    # 2 ulp (what AVX-512 vs AVX2 vs default measure) passes; 100 ulp on the inputs does not
    assert G.reproduction_errors(case, (inp, out), ({"M": _perturb(inp["M"], 2)}, out)) == []
    errs = G.reproduction_errors(case, (inp, out), ({"M": _perturb(inp["M"], 100)}, out))
    assert len(errs) == 1 and errs[0].startswith("  ~ in.M: max abs change")
    # a flipped mask entry (booleans compare exactly)
    flipped = {k: v.clone() for k, v in out.items()}
    key = sorted(flipped)[0]
    flipped[key].view(-1)[0] ^= True
    assert any("integer/bool entries differ" in e for e in G.reproduction_errors(case, (inp, out), (inp, flipped)))
    # float32-reference cases: 1 ulp32 is accepted, a change at the float32 tolerance is not
    gate = next(c for c in CASES if c.id == "gate.text_route")
    assert gate.float32_reference
    (gi, go) = G.load_golden(gate)
    one_ulp32 = {**go, "probs": go["probs"] * (1 + 2.0**-23)}
    assert G.reproduction_errors(gate, (gi, go), (gi, one_ulp32)) == []
    rtol, atol = G.reference_tol(gate)
    off = {**go, "probs": go["probs"] + 2 * (atol + rtol)}
    errs = G.reproduction_errors(gate, (gi, go), (gi, off))
    assert any(e.startswith("  ~ out.probs") for e in errs) and "float32" in errs[-1]
    # a float64 case keeps 1e-12: the float32-reference allowance is not applied to it
    assert G.reference_tol(case) == (1e-12, 1e-12)
