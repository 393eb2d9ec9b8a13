"""One comparison of a state dict against the shapes a module expects (checkpoints, text tower, HED)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def state_dict_mismatches(expected: Mapping[str, Sequence[int]], given: Mapping[str, torch.Tensor]
                          ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """``(missing, unexpected, wrong)``: keys absent from ``given``, keys it has in excess, and
    ``(key, expected shape, given shape)`` for every shared key whose shape differs; all sorted."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [(k, tuple(expected[k]), tuple(given[k].shape)) for k in sorted(set(expected) & set(given))
             if tuple(expected[k]) != tuple(given[k].shape)]
    return missing, unexpected, wrong
