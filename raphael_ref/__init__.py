"""raphael_ref: reference implementation of RAPHAEL (Xue et al., 2023, arXiv:2305.18295).

Each equation of the paper lives in one small module; ``spec/equations.toml`` maps every
equation id to its function, tests and golden tensors.

The public names below are imported on first use (PEP 562), so ``import raphael_ref`` stays
instant and never imports torch's optional companions (diffusers, open_clip):

    from raphael_ref import RaphaelPipeline
    pipe = RaphaelPipeline.from_run("runs/<run>")
    pipe("a red circle on the left").images[0].save("circle.png")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RaphaelPipeline": "raphael_ref.pipeline",
    "RaphaelPipelineOutput": "raphael_ref.pipeline",
    "SAMPLERS": "raphael_ref.pipeline",
    "RaphaelConfig": "raphael_ref.config",
    "get_preset": "raphael_ref.config",
    "RaphaelUNet": "raphael_ref.models",
    "RaphaelControlNet": "raphael_ref.controlnet",
    "SRStage": "raphael_ref.sr",
    "TextEncoder": "raphael_ref.text_encoder",
    "NoiseSchedule": "raphael_ref.diffusion",
    "cfg_combine": "raphael_ref.diffusion",
    "DiffusionPaths": "raphael_ref.sampling",
    "sample": "raphael_ref.sampling",
    "sample_with_scheduler": "raphael_ref.schedulers",
    "make_scheduler": "raphael_ref.schedulers",
    "load_model": "raphael_ref.checkpoint",
    "save_model": "raphael_ref.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    """Import a public name's module on first access (``raphael_ref.RaphaelPipeline`` etc.)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raphael_ref' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
