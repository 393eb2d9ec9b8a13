"""Config validation is complete: any value of any field is either usable or a ValueError naming it.

Hypothesis draws a field of any section (and the top-level ``name``) and a value for it: wild ones
(NaN, infinities, 0, negatives, huge numbers, wrong types, empty strings and lists) and plausible
ones near the valid range. It sets the value in code (``validate`` alone) or as a ``--set`` string
(``load_config``), and checks that the result is either a config or a ``ValueError`` whose message
names the field (or a field it is checked against, e.g. ``sample.steps`` for ``diffusion.T``);
any other exception fails. For accepted values, the pieces a run builds from the config at start
are built: the U-Net (on the meta device), the noise schedule, AdamW, dropout, the focal loss
and the seeded generators.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import typing

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from raphael_ref import config as C
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.diffusion.schedule import KNOWN_KINDS
from raphael_ref.focal import sigmoid_focal_loss
from raphael_ref.models import build_on_meta

SECTIONS = ("diffusion", "model", "train", "sample")
# (dotted name, resolved annotation) of every field; a new field joins the fuzz by itself
FIELDS = [("name", str)] + [
    (f"{section}.{f.name}", C._hints(type(getattr(C.RaphaelConfig(), section)))[f.name])
    for section in SECTIONS for f in dataclasses.fields(getattr(C.RaphaelConfig(), section))
]
# a value of the key may be refused by the check of another field it is checked against
RELATED = {
    "diffusion.T": {"model.edge_t_cutoff", "sample.steps", "diffusion.zero_terminal_snr"},
    "model.channel_mult": {"model.transformer_down", "model.transformer_up", "model.head_dim", "model.norm_groups",
                           "model.sample_size"},
    "model.model_channels": {"model.head_dim", "model.norm_groups"},
    "model.num_res_blocks": {"model.transformer_down", "model.transformer_up"},
    "model.codec": {"model.in_channels", "model.codec_factor"},
    "model.codec_factor": {"model.in_channels"},
    "model.attend_padding": {"model.count_padding"},
    # the toy-binding preset's options (E87): its token loss needs the synthetic source, phrases apart a CLIP tower
    "train.source": {"train.token_loss"},
    "model.text_encoder": {"model.text_phrases_apart"},
}
CHOICES = ["tiny", "ViT-g-14", "hed", "canny", "ddim", "ddpm", "cosine", "linear", "scaled_linear", "last",
           "penultimate", "dense", "gather", "vae", "identity", "bf16", "no", "none", "switch", "straight_through",
           "synthetic", "bogus", "", " "]

WILD = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 1, 0.0, -0.0, 0.5, 1e308, 2**63, 10**30, -(10**30),
                     10**400, "", " ", "nan", (), None, True, False, [1], [0.5, 0.5], ["a"], {}]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(CHOICES),
    st.lists(st.one_of(st.integers(-3, 5), st.floats(-2, 2), st.text(max_size=2)), max_size=5).map(tuple),
)
SMALL_INT = {"diffusion.T": (-1, 3000), "sample.steps": (-1, 3000), "model.edge_t_cutoff": (-1, 3000),
             "model.model_channels": (0, 72), "model.sample_size": (0, 64), "model.n_y": (0, 80),
             "model.d_y": (0, 64), "train.seed": (-1, 2**33), "sample.seed": (-1, 2**33),
             "train.batch_size": (-1, 4000)}


def _plausible(key: str, hint):
    """Values near the valid range of the field's type (sizes small enough to build at once)."""
    base, optional = C._optional_base(hint)
    if typing.get_origin(base) is tuple:
        args = base.__args__
        elem = args[0]
        inner = (st.integers(-1, 4) if elem is int else st.one_of(st.floats(-0.2, 1.2), st.just(math.nan)) if elem is float
                 else st.text(max_size=4))
        n = (0, 6) if args[-1] is Ellipsis else (len(args), len(args))
        strat = st.lists(inner, min_size=n[0], max_size=n[1]).map(tuple)
    elif base is bool:
        strat = st.booleans()
    elif base is int:
        strat = st.integers(*SMALL_INT.get(key, (-2, 9)))
    elif base is float:
        strat = st.one_of(st.floats(-0.5, 2.0), st.sampled_from([math.nan, math.inf, 0.0, 1.0]))
    else:
        strat = st.one_of(st.sampled_from(CHOICES), st.text(max_size=4))
    return st.one_of(strat, st.none()) if optional else strat


def _field_and_value(wild_share: bool = True):
    return st.sampled_from(FIELDS).flatmap(
        lambda kh: st.tuples(st.just(kh[0]), st.one_of(WILD, _plausible(*kh)) if wild_share else _plausible(*kh)))


def _set(cfg: C.RaphaelConfig, key: str, value) -> None:
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def _check_error(e: ValueError, key: str) -> None:
    msg = str(e)
    allowed = {key} | RELATED.get(key, set())
    named = set(re.findall(r"config field '?([a-z_]+(?:\.[a-zA-Z_]+)?)", msg))
    assert named & allowed, f"setting {key} raised a ValueError naming {named or 'no field'}: {msg}"


def _as_cli(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):  # pragma: no cover - every WILD value is JSON-able
        return str(value)


# Sizes are not capped by validate (how big a model fits is the machine's business); the U-Net is
# built only where it stays small enough to build in a test (counts of modules, widths of tensors).
BUILD_LIMITS = {"num_res_blocks": 8, "edge_layers": 16, "n_space_experts": 64, "n_time_experts": 64}
MAX_BUILD_SIZE = 4096


def _buildable(m) -> bool:
    sizes = [v for f in dataclasses.fields(m) for v in ([getattr(m, f.name)] if not isinstance(getattr(m, f.name), tuple)
             else getattr(m, f.name)) if isinstance(v, int) and not isinstance(v, bool)]
    return (all(v <= MAX_BUILD_SIZE for v in sizes) and len(m.channel_mult) <= 8
            and all(getattr(m, k) <= v for k, v in BUILD_LIMITS.items()))


def _usable(cfg: C.RaphaelConfig) -> None:
    """What a run builds from the config at start must build."""
    d, m, t, s = cfg.diffusion, cfg.model, cfg.train, cfg.sample
    sched = NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)
    assert sched.T == d.T
    if _buildable(m):
        model = build_on_meta(m)
        assert len(model.transformer_blocks()) == cfg.n_transformer_blocks
    torch.nn.Dropout(m.dropout)
    p = torch.nn.Parameter(torch.zeros(2))
    torch.optim.AdamW([p], lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    loss = sigmoid_focal_loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5), t.focal_alpha, t.focal_gamma)
    assert torch.isfinite(loss)
    torch.Generator().manual_seed(t.seed * 1024 + 1023)  # seed * world + rank (DiT)
    torch.Generator().manual_seed(s.seed)
    assert math.isfinite(s.guidance) and math.isfinite(t.grad_clip) and math.isfinite(t.lr)


PRESETS = sorted(C.PRESETS)
BASES = {name: C.get_preset(name) for name in PRESETS}


@given(preset=st.sampled_from(PRESETS), kv=_field_and_value())
def test_validate_accepts_or_names_the_field(preset, kv):
    key, value = kv
    cfg = copy.deepcopy(BASES[preset])
    _set(cfg, key, value)
    try:
        cfg.validate()
    except ValueError as e:
        _check_error(e, key)


@given(kv=_field_and_value())
def test_set_strings_are_accepted_or_name_the_field(kv):
    key, value = kv
    try:
        cfg = C.load_config("toy", overrides=[f"{key}={_as_cli(value)}"])
    except ValueError as e:
        _check_error(e, key)
        return
    _usable(cfg)


@given(kv=_field_and_value(wild_share=False))
def test_accepted_values_build_the_run(kv):
    key, value = kv
    cfg = C.get_preset("toy")
    _set(cfg, key, value)
    try:
        cfg.validate()
    except ValueError as e:
        _check_error(e, key)
        return
    _usable(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_field_has_a_type_check(preset):
    """Each annotation is one validate() understands, and each preset value fits it."""
    cfg = C.get_preset(preset)
    for key, hint in FIELDS:
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert C._type_problem(hint, obj) is None, key


@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_every_schedule_choice_builds_at_the_smallest_valid_T(kind):
    for T, zero_snr in ((1, False), (2, True)):
        cfg = C.load_config("toy", overrides=[f"diffusion.schedule={kind}", f"diffusion.T={T}", "sample.steps=1",
                                              "model.edge_t_cutoff=1", f"diffusion.zero_terminal_snr={json.dumps(zero_snr)}"])
        _usable(cfg)
