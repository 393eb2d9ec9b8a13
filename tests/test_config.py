"""Presets, config validation and the Table 2 mapping in spec/hyperparameters.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raphael_ref import config as C

ROOT = Path(__file__).resolve().parents[1]


def _table_rows():
    rows = []
    for line in (ROOT / "spec" / "hyperparameters.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].startswith("`"):
            rows.append((cells[0], cells[2].strip("`"), cells[3]))
    return rows


def test_table2_rows_present():
    rows = _table_rows()
    assert len(rows) >= 16, rows


@pytest.mark.parametrize("row,field,value", _table_rows())
def test_paper_preset_matches_table2(row, field, value):
    cfg = C.get_preset("paper")
    obj = cfg
    for part in field.split("."):
        obj = getattr(obj, part)
    expected = json.loads(value)
    got = list(obj) if isinstance(obj, tuple) else obj
    assert got == expected, f"Table 2 row {row!r}: {field} = {got!r}, spec says {expected!r}"


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_validate_and_have_16_blocks(name):
    cfg = C.get_preset(name)
    assert cfg.n_transformer_blocks == 16


def test_json_round_trip(tmp_path):
    cfg = C.get_preset("toy", {"model.n_space_experts": 3})
    cfg.to_json(tmp_path / "c.json")
    back = C.RaphaelConfig.from_json(tmp_path / "c.json")
    assert back == cfg


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"model.n_space_experts": 0}, "model.n_space_experts"),
        ({"model.mask_alpha": 1.5}, "model.mask_alpha"),
        ({"model.nonexistent": 1}, "model.nonexistent"),
        ({"model.n_space_experts": "six"}, "model.n_space_experts"),
        ({"model.head_dim": 7}, "model.head_dim"),
        ({"model.transformer_down": [2, 2]}, "model.transformer_down"),
        ({"train.lr": -1}, "train.lr"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_fields_are_named(overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        C.get_preset("toy", overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="toy"):
        C.get_preset("huge")


def test_ignored_padding_cannot_be_counted_in_the_space_moe():
    with pytest.raises(ValueError, match="model.count_padding"):
        C.get_preset("toy", {"model.attend_padding": False})
    cfg = C.get_preset("toy", {"model.attend_padding": False, "model.count_padding": False})
    assert not cfg.model.attend_padding
