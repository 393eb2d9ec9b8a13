"""raphael_ref: reference implementation of RAPHAEL (Xue et al., 2023, arXiv:2305.18295).

Each equation of the paper lives in one small module; ``spec/equations.toml`` maps every
equation id to its function, tests and golden tensors.
"""

__version__ = "0.1.0"
