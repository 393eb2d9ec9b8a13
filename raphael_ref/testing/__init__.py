"""Test support shipped with the library: golden-tensor cases and per-dtype tolerances.

Like ``torch.testing``, this lives in the package so that ``tools/make_golden.py``, the test
suite and downstream users share one definition of every golden.
"""

# Default (rtol, atol) per compute dtype for a short chain of elementwise ops and one reduction
# over O(100) terms on O(1)-scaled inputs. Unit roundoff u: float32 6.0e-8, float16 4.9e-4,
# bfloat16 3.9e-3. Rounding the float64 inputs alone costs ~u relative; a reduction of n terms
# adds ~sqrt(n)*u in practice. Cases with longer chains state their own, larger values.
DEFAULT_TOL = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-5, 1e-6),  # ~ 150 u: covers O(100)-term reductions with margin
    "float16": (5e-3, 5e-3),  # ~ 10 u
    "bfloat16": (3e-2, 3e-2),  # ~ 8 u
}


def load_tool(name: str):
    """Import ``tools/<name>.py`` of this checkout as a module (for tests of the command-line tools).

    The module is registered in ``sys.modules`` under ``raphael_tool_<name>`` (dataclasses look their
    module up while the file executes); loading again returns a fresh module.
    """
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"no tool {path}: load_tool needs a source checkout with tools/")
    spec = importlib.util.spec_from_file_location(f"raphael_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
