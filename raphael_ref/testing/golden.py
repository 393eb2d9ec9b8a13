"""Golden tensors: fixed-seed inputs and float64 reference outputs for every numeric spec entry.

A :class:`GoldenCase` says how to draw the inputs of one equation (on the CPU, from a seeded
``torch.Generator``, in float64) and how to evaluate the equation on inputs of any dtype/device.
``tools/make_golden.py`` evaluates every case once in float64 and stores inputs and outputs in
``golden/<id>.safetensors``; ``tests/test_golden.py`` re-evaluates each case in float32, bf16 and
fp16 (CPU, and CUDA under ``-m gpu``) and compares with the stored float64 outputs using the
per-dtype tolerances the case states.

Cases live in ``raphael_ref/testing/cases_*.py`` modules, each exposing ``CASES: list[GoldenCase]``.

Across CPUs. torch picks its CPU kernels by the vector width of the machine (``ATEN_CPU_CAPABILITY``:
default, AVX2, AVX-512): vectorised ``exp`` (Sleef) and scalar libm ``exp`` differ in the last bit,
reductions add in a different order, and the AVX2/AVX-512 kernels contract ``a * x + b`` into one
fused multiply-add (so even ``torch.empty(n).uniform_(-1, 1)`` and every float32 weight initialiser
differ by an ulp). A float64 re-evaluation on another CPU therefore reproduces a golden to a few
ulps, not bit for bit: :func:`reproduction_errors` compares within :data:`INPUT_REPRODUCE_RTOL`
(inputs) and :func:`reference_tol` (outputs), the tolerances ``tests/test_golden.py`` and
``tools/make_golden.py --check`` use. Integer and boolean tensors must reproduce exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Callable, Mapping

import torch

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "golden"
MANIFEST = "MANIFEST.json"

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class GoldenCase:
    """One golden: inputs drawn by ``make_inputs``, outputs computed by ``compute``.

    id:          the spec id (``spec/equations.toml``), also the file stem under ``golden/``.
    make_inputs: ``(generator) -> {name: tensor}``; float tensors in float64, drawn on the CPU
                 from the given generator only (so the golden does not depend on the device).
    compute:     ``(inputs) -> {name: tensor}``; evaluates the function under test on inputs
                 that the harness has already cast (floating tensors -> compute dtype) and moved
                 to the device. Must not draw random numbers.
    tol:         ``{dtype_name: (rtol, atol)}`` for each dtype the case is checked in; the key
                 set is the list of dtypes checked. Each value is justified in the case's comment.
    seed:        seed of the generator handed to ``make_inputs``.
    keep_float64: names of inputs that stay float64 whatever the compute dtype (e.g. schedule
                 tables, which the spec keeps in float64 by design).
    cpu_skip:    ``{dtype_name: reason}`` for dtypes checked on CUDA only (e.g. an op with no
                 CPU fp16 kernel). Use sparingly; the reason is printed in the skip.
    float32_reference: why the "float64" reference passes through float32 by design (e.g. a gate
                 softmax the spec runs in float32, weights made by torch's float32 initialisers),
                 or "" (default) if it is float64 throughout. Such a reference is only known to
                 float32 rounding on another CPU, so its re-evaluation is compared with the case's
                 float32 tolerance (:func:`reference_tol`); the reason is printed on failure.
    """

    id: str
    make_inputs: Callable[[torch.Generator], Tensors]
    compute: Callable[[Tensors], Tensors]
    tol: Mapping[str, tuple[float, float]]
    seed: int = 0
    keep_float64: tuple[str, ...] = ()
    cpu_skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
    float32_reference: str = ""

    @property
    def filename(self) -> str:
        return f"{self.id}.safetensors"

    def cast_inputs(self, inputs: Tensors, dtype: torch.dtype, device: str | torch.device) -> Tensors:
        out = {}
        for name, x in inputs.items():
            if x.is_floating_point() and name not in self.keep_float64:
                x = x.to(dtype)
            out[name] = x.to(device)
        return out


def all_cases() -> list[GoldenCase]:
    """Every registered case, from each ``raphael_ref.testing.cases_*`` module, sorted by id."""
    import raphael_ref.testing as pkg

    cases: list[GoldenCase] = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"{pkg.__name__}.{mod.name}").CASES)
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise RuntimeError(f"duplicate golden case ids: {sorted(dup)}")
    return sorted(cases, key=lambda c: c.id)


def compute_reference(case: GoldenCase) -> tuple[Tensors, Tensors]:
    """Draw the case's inputs and evaluate it in float64 on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    inputs = case.make_inputs(gen)
    for name, x in inputs.items():
        if x.is_floating_point() and x.dtype != torch.float64:
            raise TypeError(f"{case.id}: input {name!r} must be float64, got {x.dtype}")
    outputs = case.compute({k: v.clone() for k, v in inputs.items()})
    outputs = {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in outputs.items()}
    return inputs, outputs


def golden_path(case: GoldenCase, root: Path = GOLDEN_DIR) -> Path:
    return root / case.filename


def missing_message(case: GoldenCase) -> str:
    return (
        f"golden file {case.filename} is missing; generate it with\n"
        f"    python tools/make_golden.py --only {case.id}\n"
        f"and commit it."
    )


def load_golden(case: GoldenCase, root: Path = GOLDEN_DIR) -> tuple[Tensors, Tensors]:
    """Stored ``(inputs, outputs)`` of a case; fails with the regeneration command if absent."""
    from safetensors.torch import load_file

    path = golden_path(case, root)
    if not path.exists():
        raise FileNotFoundError(missing_message(case))
    flat = load_file(str(path))
    inputs = {k[3:]: v for k, v in flat.items() if k.startswith("in.")}
    outputs = {k[4:]: v for k, v in flat.items() if k.startswith("out.")}
    return inputs, outputs


def save_golden(case: GoldenCase, inputs: Tensors, outputs: Tensors, root: Path = GOLDEN_DIR) -> Path:
    from safetensors.torch import save_file

    flat = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    flat.update({f"out.{k}": v.contiguous() for k, v in outputs.items()})
    path = golden_path(case, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"id": case.id, "seed": str(case.seed)})
    return path


def diff_report(old: Tensors, new: Tensors) -> list[str]:
    """Human-readable lines describing how two tensor dicts differ (empty if identical)."""
    lines = []
    for k in sorted(set(old) | set(new)):
        if k not in old:
            lines.append(f"  + {k}: new tensor {tuple(new[k].shape)}")
        elif k not in new:
            lines.append(f"  - {k}: removed")
        elif old[k].shape != new[k].shape or old[k].dtype != new[k].dtype:
            lines.append(f"  ~ {k}: {tuple(old[k].shape)} {old[k].dtype} -> {tuple(new[k].shape)} {new[k].dtype}")
        elif not torch.equal(old[k], new[k]):
            a, b = old[k].double(), new[k].double()
            abs_err = (a - b).abs().max().item()
            rel_err = ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
            lines.append(f"  ~ {k}: max abs change {abs_err:.3e}, max rel change {rel_err:.3e}")
    return lines


# Golden inputs are standard draws (exact on every CPU: randn/rand in float64 with mean 0, std 1,
# range [0, 1)) followed by a few float64 operations; some of those are vectorised kernels (the
# softmax of edge.predictor and smoe.threshold_mask: exp, a sum over n = 8 entries, a division).
# Between CPUs, exp differs by <= 2 ulp (Sleef u10 vs libm, each within 1 ulp), the sum by <= n-1
# roundings in another order, the division by 1 ulp: ~(n + 3) ulp = 11 ulp relative for n = 8,
# and the post-processing of smoe.threshold_mask (ratio to the column max and back) adds ~3 ulp.
# Measured: 2 ulp (AVX-512 vs AVX2 vs default). 32 ulp bounds that with a factor ~2. The bound is
# relative to each entry, or to the tensor's largest entry where an entry is near 0.
INPUT_REPRODUCE_RTOL = 32 * torch.finfo(torch.float64).eps  # 7.1e-15


def reference_tol(case: GoldenCase) -> tuple[float, float]:
    """(rtol, atol) within which a fresh float64 reference of ``case`` must reproduce its stored outputs.

    1e-12: float64 kernels differ by a few ulps between CPUs, BLAS builds and thread counts, and a
    chain of O(100) operations on O(1) values keeps that far below 1e-12. Looser where the case's own
    float64 tolerance is looser (and justified there: the eigh-based Frechet distances vary at ~1e-10
    of the value with LAPACK's thread count). A ``float32_reference`` case uses its float32 tolerance:
    its reference carries float32 rounding (~u32 = 6e-8 relative per float32 step) that differs across
    CPUs, and that tolerance bounds a whole float32 evaluation, a superset of those steps.
    """
    tol = [max(1e-12, v) for v in case.tol.get("float64", (1e-12, 1e-12))]
    if case.float32_reference:
        if "float32" not in case.tol:
            raise ValueError(f"{case.id}: float32_reference needs a float32 tolerance in tol")
        tol = [max(a, b) for a, b in zip(tol, case.tol["float32"])]
    return tol[0], tol[1]


def _close(stored: torch.Tensor, fresh: torch.Tensor, rtol: float, atol: float) -> str:
    """'' if fresh reproduces stored (floats within rtol/atol, others exactly), else what differs."""
    if stored.shape != fresh.shape or stored.dtype != fresh.dtype:
        return f"{tuple(stored.shape)} {stored.dtype} -> {tuple(fresh.shape)} {fresh.dtype}"
    if not stored.is_floating_point():
        n = int((stored != fresh).sum())
        return f"{n} of {stored.numel()} integer/bool entries differ (compared exactly)" if n else ""
    a, b = stored.double(), fresh.double()
    if torch.equal(a, b):
        return ""
    err = (a - b).abs()
    bad = ~(err <= atol + rtol * a.abs()) & ~(a == b) & ~(a.isnan() & b.isnan())  # a == b: matching infinities
    if not bool(bad.any()):
        return ""
    return (f"max abs change {err[bad].max().item():.3e} at {int(bad.sum())} of {a.numel()} entries "
            f"(allowed: atol {atol:.1e} + rtol {rtol:.1e} x |value|)")


def reproduction_errors(case: GoldenCase, stored: tuple[Tensors, Tensors], fresh: tuple[Tensors, Tensors]) -> list[str]:
    """Lines naming each tensor of a fresh ``(inputs, outputs)`` that does not reproduce the stored one
    within the cross-CPU tolerances (inputs: :data:`INPUT_REPRODUCE_RTOL`; outputs: :func:`reference_tol`).
    Empty when the golden is reproduced."""
    lines = []
    rtol_out, atol_out = reference_tol(case)
    for prefix, old, new in (("in", stored[0], fresh[0]), ("out", stored[1], fresh[1])):
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                lines.append(f"  {'+' if k not in old else '-'} {prefix}.{k}: {'new' if k not in old else 'removed'}")
                continue
            if prefix == "in":
                scale = old[k].double().abs().max().item() if old[k].is_floating_point() and old[k].numel() else 0.0
                rtol, atol = INPUT_REPRODUCE_RTOL, INPUT_REPRODUCE_RTOL * scale
            else:
                rtol, atol = rtol_out, atol_out
            msg = _close(old[k], new[k], rtol, atol)
            if msg:
                lines.append(f"  ~ {prefix}.{k}: {msg}")
    if lines and case.float32_reference:
        lines.append(f"  (the reference passes through float32: {case.float32_reference})")
    return lines


def manifest_entry(case: GoldenCase, inputs: Tensors, outputs: Tensors) -> dict:
    return {
        "file": case.filename,
        "seed": case.seed,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in inputs.items()},
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in outputs.items()},
        "tolerance": {k: {"rtol": v[0], "atol": v[1]} for k, v in case.tol.items()},
    }


def write_manifest(entries: dict, versions: dict, root: Path = GOLDEN_DIR) -> None:
    doc = {"generated_with": versions, "cases": dict(sorted(entries.items()))}
    (root / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")


def read_manifest(root: Path = GOLDEN_DIR) -> dict:
    path = root / MANIFEST
    if not path.exists():
        return {"generated_with": {}, "cases": {}}
    return json.loads(path.read_text())
