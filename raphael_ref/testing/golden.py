"""Golden tensors: fixed-seed inputs and float64 reference outputs for every numeric spec entry.

A :class:`GoldenCase` says how to draw the inputs of one equation (on the CPU, from a seeded
``torch.Generator``, in float64) and how to evaluate the equation on inputs of any dtype/device.
``tools/make_golden.py`` evaluates every case once in float64 and stores inputs and outputs in
``golden/<id>.safetensors``; ``tests/test_golden.py`` re-evaluates each case in float32, bf16 and
fp16 (CPU, and CUDA under ``-m gpu``) and compares with the stored float64 outputs using the
per-dtype tolerances the case states.

Cases live in ``raphael_ref/testing/cases_*.py`` modules, each exposing ``CASES: list[GoldenCase]``.
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
    """

    id: str
    make_inputs: Callable[[torch.Generator], Tensors]
    compute: Callable[[Tensors], Tensors]
    tol: Mapping[str, tuple[float, float]]
    seed: int = 0
    keep_float64: tuple[str, ...] = ()
    cpu_skip: Mapping[str, str] = dataclasses.field(default_factory=dict)

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
