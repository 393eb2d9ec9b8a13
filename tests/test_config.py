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
        C.get_preset("toy", {"model.attend_padding": False, "model.count_padding": True})
    with pytest.raises(ValueError, match="model.count_padding"):
        C.get_preset("small", {"model.attend_padding": False})  # small keeps the paper's count_padding=true
    cfg = C.get_preset("small", {"model.attend_padding": False, "model.count_padding": False})
    assert not cfg.model.attend_padding


# ---------------------------------------------------------------- hardening (issue 10)


@pytest.mark.parametrize(
    "assignment,field",
    [
        ("train.lr=NaN", "train.lr"),
        ("train.lr=Infinity", "train.lr"),
        ("train.grad_clip=NaN", "train.grad_clip"),  # NaN > 0 is False: clipping silently off
        ("train.weight_decay=Infinity", "train.weight_decay"),
        ("train.focal_alpha=2", "train.focal_alpha"),
        ("train.focal_gamma=-3", "train.focal_gamma"),
        ("train.focal_gamma=NaN", "train.focal_gamma"),
        ("train.aesthetic_min=NaN", "train.aesthetic_min"),
        ("train.bucket_factor=Infinity", "train.bucket_factor"),
        ("train.seed=-1", "train.seed"),
        ("train.source=", "train.source"),
        ("model.dropout=-1", "model.dropout"),
        ("model.dropout=1", "model.dropout"),
        ("model.gate_noise_std=-0.5", "model.gate_noise_std"),
        ("model.head_dim=0", "model.head_dim"),  # ZeroDivisionError inside validate() before
        ("model.norm_groups=0", "model.norm_groups"),
        ("model.sample_size=0", "model.sample_size"),
        ("model.channel_mult=[]", "model.channel_mult"),
        ("model.transformer_down=[2, -1, 2, 0]", "model.transformer_down"),
        ("model.text_encoder=", "model.text_encoder"),
        ("model.expert_mult=0", "model.expert_mult"),
        ("diffusion.schedule=bogus", "diffusion.schedule"),
        ("diffusion.zero_terminal_snr=true", "diffusion.zero_terminal_snr"),  # with T = 1 below
        ("sample.guidance=NaN", "sample.guidance"),
        ("sample.seed=-2", "sample.seed"),
        ("model.gate_noise_std=true", "model.gate_noise_std"),
        ("train.lr=1e999", "train.lr"),
        ("name=", "name"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(assignment, field):
    extra = ["diffusion.T=1", "sample.steps=1", "model.edge_t_cutoff=1"] if "zero_terminal" in assignment else []
    with pytest.raises(ValueError, match=re.escape(field)):
        C.load_config("toy", overrides=[*extra, assignment])


def test_optional_string_fields_stay_strings():
    """``--set train.hed_weights=123`` is a file named 123, not the JSON number 123 (was parsed as one)."""
    assert C.load_config("toy", overrides=["train.hed_weights=123"]).train.hed_weights == "123"
    assert C.load_config("toy", overrides=["model.vae_path=1e3"]).model.vae_path == "1e3"
    assert C.load_config("toy", overrides=["model.vae_path=null"]).model.vae_path is None


@pytest.mark.parametrize(
    "field,value",
    [("model.head_dim", "64"), ("model.channel_mult", 2), ("train.adam_betas", (0.9, "a")),
     ("train.adam_betas", (0.9,)), ("sample.prompts", ("a", 3)), ("train.multiscale", 1),
     ("train.lr", True), ("diffusion.T", 10.0), ("model.vae_path", 3), ("name", None)],
)
def test_wrong_types_set_in_code_are_named(field, value):
    """A value assigned directly (not through apply_overrides) of the wrong type: ValueError, not TypeError."""
    cfg = C.get_preset("toy")
    *path, leaf = field.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)
    with pytest.raises(ValueError, match=re.escape(field)):
        cfg.validate()


def test_paper_preset_uses_hed_as_printed():
    """Sec. 3.2 (erratum E63): I_edge from HED in the paper preset; the one-GPU preset and the toy keep Canny."""
    assert C.get_preset("paper").train.edge_detector == "hed"
    assert C.get_preset("paper").train.hed_weights is None  # a local file, never downloaded
    assert C.get_preset("toy").train.edge_detector == "canny"


def _hed_error(cfg) -> str:
    from raphael_ref import training as T

    with pytest.raises(ValueError) as info:
        T.build_edge_detector(cfg)
    return str(info.value)


def test_paper_preset_without_hed_weights_says_how_to_get_them():
    msg = _hed_error(C.get_preset("paper"))
    assert "train.hed_weights" in msg and "is not set" in msg
    assert "bash tools/fetch_hed_weights.sh" in msg
    assert "python tools/convert_hed.py" in msg
    assert "--set train.hed_weights=" in msg and "hed_bsds500.safetensors" in msg
    assert "--set train.edge_detector=canny" in msg


def test_missing_hed_weights_file_names_it_and_the_way_out(tmp_path):
    missing = tmp_path / "nowhere" / "hed.safetensors"
    msg = _hed_error(C.get_preset("paper", {"train.hed_weights": str(missing)}))
    assert str(missing) in msg and "does not exist" in msg
    assert "bash tools/fetch_hed_weights.sh" in msg
    # the Canny way out must also drop the weights path, or build_edge_detector refuses the pair
    assert "--set train.edge_detector=canny --set train.hed_weights=null" in msg
    cfg = C.load_config("paper", overrides=[f"train.hed_weights={missing}", "train.edge_detector=canny",
                                           "train.hed_weights=null"])
    from raphael_ref import training as T

    assert T.build_edge_detector(cfg).describe().startswith("canny")


def test_train_stops_on_missing_hed_weights_before_the_run_folder(tmp_path, capsys):
    """tools/train.py reports the HED error at start: exit code 2, no run folder, no model built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_tool", ROOT / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "run"
    assert tool.main(["--out", str(out), "--device", "cpu", "--set", "train.edge_detector=hed"]) == 2
    err = capsys.readouterr().err
    assert "bash tools/fetch_hed_weights.sh" in err and "train.edge_detector=canny" in err
    assert not out.exists()


def test_scene_mix_fields():
    cfg = C.load_config("toy", overrides=["train.scene_count_prob=0.1", "train.scene_distinct_shapes=true"])
    assert cfg.train.scene_count_prob == 0.1 and cfg.train.scene_distinct_shapes is True
    for preset in ("toy", "small", "paper"):  # the data every earlier run trained on
        assert C.get_preset(preset).train.scene_count_prob == 0.2 and not C.get_preset(preset).train.scene_distinct_shapes
    with pytest.raises(ValueError, match="train.scene_count_prob"):
        C.load_config("toy", overrides=["train.scene_count_prob=1.2"])
    with pytest.raises(ValueError, match="train.scene_distinct_shapes"):
        C.load_config("toy", overrides=["train.scene_distinct_shapes=2"])
    with pytest.raises(ValueError, match="train.scene_distinct_shapes.*train.source='synthetic'"):
        C.load_config("toy", overrides=["train.scene_distinct_shapes=true", "train.source=/data/shards"])
    with pytest.raises(ValueError, match="train.scene_count_prob.*train.source='synthetic'"):
        C.load_config("toy", overrides=["train.scene_count_prob=0", "train.source=/data/shards"])


def test_toy_binding_preset_is_the_toy_plus_two_options():
    """E87: `--preset toy-binding` (train.py's default) is the toy preset with phrases apart (E85) and the
    position-word token loss (E82) at weight 0.05 (the v output's weight, toy_v_prediction.md section 7), nothing
    else; `toy` itself keeps neither. A run on other data must switch the loss off, and the error says how."""
    toy, tb = C.get_preset("toy"), C.get_preset("toy-binding")
    assert tb.name == "toy-binding" and tb.model.text_phrases_apart is True
    assert tb.train.token_loss == 0.05 and tuple(tb.train.token_words) == ("position",)
    assert toy.model.text_phrases_apart is False and toy.train.token_loss == 0.0
    a, b = C._flatten(toy.to_dict()), C._flatten(tb.to_dict())
    assert {k for k in a if a[k] != b[k]} == {"name", "model.text_phrases_apart", "train.token_loss", "train.token_words"}
    assert toy.model.prediction == tb.model.prediction == "v"
    with pytest.raises(ValueError, match="train.token_loss.*train.source='synthetic'.*set it to 0.*--preset toy"):
        C.load_config("toy-binding", overrides=["train.source=/data/shards"])
    assert C.load_config("toy-binding", overrides=["train.source=/data/shards", "train.token_loss=0"]).train.token_loss == 0


def test_lr_decay_fields():
    """E86: a decay that could never start, or a start without a decay, is refused with what to change."""
    cfg = C.load_config("toy", overrides=["train.lr_decay=cosine", "train.lr_decay_start=0.5"])
    assert (cfg.train.lr_decay, cfg.train.lr_decay_start) == ("cosine", 0.5)
    assert all(C.get_preset(p).train.lr_decay == "none" for p in C.PRESETS)
    with pytest.raises(ValueError, match="train.lr_decay.*never happens.*train.warmup_steps"):
        C.load_config("toy", overrides=["train.lr_decay=linear", "train.warmup_steps=800"])  # toy: 800 steps
    with pytest.raises(ValueError, match="train.lr_decay_start.*train.lr_decay='none'"):
        C.load_config("toy", overrides=["train.lr_decay_start=0.5"])
    with pytest.raises(ValueError, match="train.lr_decay"):
        C.load_config("toy", overrides=["train.lr_decay=step"])
    with pytest.raises(ValueError, match="train.lr_decay_start"):
        C.load_config("toy", overrides=["train.lr_decay=linear", "train.lr_decay_start=nan"])


def test_text_phrases_apart_field():
    cfg = C.load_config("toy", overrides=["model.text_phrases_apart=true"])
    assert cfg.model.text_phrases_apart is True
    for preset in ("toy", "small", "paper"):  # the paper's E_theta reads the whole prompt
        assert C.get_preset(preset).model.text_phrases_apart is False
    with pytest.raises(ValueError, match="model.text_phrases_apart"):
        C.load_config("toy", overrides=["model.text_phrases_apart=2"])
    with pytest.raises(ValueError, match="model.text_phrases_apart.*CLIP text tower only"):
        C.load_config("toy", overrides=["model.text_phrases_apart=true", "model.text_encoder=t5",
                                        "model.text_layer=last", "model.text_encoder_weights=/x/t5"])
