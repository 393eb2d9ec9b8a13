"""The spec registry (spec/equations.toml) is complete and every entry points at real code, tests and goldens."""

from __future__ import annotations

import ast
import importlib
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from raphael_ref.testing import golden as G

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "spec" / "equations.toml"
REQUIRED_KEYS = ("id", "section", "as_printed", "decision", "function", "tests", "golden")
FIXED_IDS = (
    "schedule.betas", "schedule.alphas_cumprod", "ddpm.q_sample", "ddpm.loss_eps",
    "ddpm.posterior_step", "ddim.timesteps", "ddim.step", "cfg.combine", "attn.cross_map",
    "smoe.threshold_mask", "gate.text_route", "gate.time_route", "moe.expert_ffn", "smoe.output",
    "tmoe.output", "edge.predictor", "edge.focal_loss", "loss.total", "data.bucket_nearest",
    "data.caption_clean",
)


@lru_cache(maxsize=None)
def entries() -> tuple[dict, ...]:
    with open(REGISTRY, "rb") as f:
        return tuple(tomllib.load(f)["equation"])


@lru_cache(maxsize=None)
def tagged_ids() -> dict[str, list[str]]:
    """spec ids named in ``spec_id("...")`` decorators of the test files (golden harness excluded)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_golden.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name == "spec_id":
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            found.setdefault(arg.value, []).append(path.name)
    return found


def _node_exists(nodeid: str) -> bool:
    file, _, rest = nodeid.partition("::")
    path = ROOT / file
    if not path.exists() or not rest:
        return False
    names = rest.split("[")[0].split("::")
    scope = ast.parse(path.read_text()).body
    for name in names:
        match = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        if not match:
            return False
        scope = match[0].body if isinstance(match[0], ast.ClassDef) else []
    return True


def _resolve(path: str):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_registry_has_every_fixed_id_once():
    ids = [e.get("id") for e in entries()]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted({i for i in ids if ids.count(i) > 1})}"
    missing = [i for i in FIXED_IDS if i not in ids]
    assert not missing, f"spec/equations.toml lacks required ids: {missing}"


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.get("id", "?"))
def test_entry_is_complete(entry):
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    assert not missing, f"{entry.get('id')}: missing keys {missing}"
    for k in ("section", "as_printed", "decision", "function"):
        assert str(entry[k]).strip(), f"{entry['id']}: key {k!r} is empty"
    assert isinstance(entry["tests"], list) and entry["tests"], f"{entry['id']}: 'tests' must list node ids"


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.get("id", "?"))
def test_entry_function_imports(entry):
    obj = _resolve(entry["function"])
    assert callable(obj), f"{entry['id']}: {entry['function']} is not callable"


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.get("id", "?"))
def test_entry_tests_exist_and_carry_id(entry):
    bad = [t for t in entry["tests"] if not _node_exists(t)]
    assert not bad, f"{entry['id']}: test node ids not found: {bad}"
    assert entry["id"] in tagged_ids(), (
        f"{entry['id']}: no test carries @pytest.mark.spec_id({entry['id']!r}) (outside the golden harness)"
    )


@pytest.mark.parametrize("entry", entries(), ids=lambda e: e.get("id", "?"))
def test_numeric_entry_has_golden(entry):
    cases = {c.id: c for c in G.all_cases()}
    if not entry["golden"]:
        assert entry.get("numeric", True) is False, (
            f"{entry['id']}: numeric entries need a golden; set numeric = false if it has no numbers"
        )
        return
    assert entry["golden"] == f"golden/{entry['id']}.safetensors", f"{entry['id']}: golden path {entry['golden']!r}"
    assert entry["id"] in cases, f"{entry['id']}: no GoldenCase registered in raphael_ref/testing/cases_*.py"
    assert (ROOT / entry["golden"]).exists(), G.missing_message(cases[entry["id"]])


def test_every_golden_case_is_registered():
    ids = {e["id"] for e in entries()}
    orphans = [c.id for c in G.all_cases() if c.id not in ids]
    assert not orphans, f"golden cases with no spec entry: {orphans}"


def test_errata_and_hyperparameters_exist():
    errata = (ROOT / "spec" / "errata.md").read_text()
    assert "q_sample" in errata and "posterior" in errata
    assert (ROOT / "spec" / "hyperparameters.md").exists()
