"""LoRA through peft (raphael_ref/lora.py, spec lora.update; RAPHAEL Sec. 4.1 / App. 7.8, Hu et al. 2021):
peft's layer equals the literal update, merge equals the adapter forward, unmerge gives the base back, an
untrained adapter leaves the U-Net unchanged, adapter files round-trip with clear errors, and
tools/finetune_lora.py trains only the adapter of a tiny random-init base run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raphael_ref import lora as L
from raphael_ref.checkpoint import save_model
from raphael_ref.config import get_preset
from raphael_ref.models import RaphaelUNet
from raphael_ref.testing import load_tool
from raphael_ref.testing.tiny_run import MICRO_2LEVEL, micro_inputs, micro_model
from raphael_ref.testing.cases_lora import peft_linear

MICRO = MICRO_2LEVEL
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32, 6.0e-8


def _micro_model(seed: int = 0, **overrides) -> RaphaelUNet:
    """The micro U-Net with its zero-initialised layers given small random weights (every block reaches the output)."""
    return micro_model(seed, **overrides)


_inputs = micro_inputs


def _train_adapter(model: RaphaelUNet, seed: int = 3) -> None:
    """Give every lora_B a nonzero value (a 'trained' adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)[0]


# ------------------------------------------------------------------------------ the equation


@pytest.mark.spec_id("lora.update")
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_peft_layer_equals_the_literal_form(scale):
    """peft's lora.Linear == x W^T + b + s (alpha / r) (x A^T) B^T, in float32 and float64.

    float32 tolerance rtol = atol = 16 u = 9.5e-7: each output is a 24-term dot product (W) plus a 4-term and a
    4-term one (A, B) on O(1) values; peft (F.linear: addmm) and the literal (matmul, then + b) may round the
    same sums in another order, a few u apart (measured <= 4 u over the golden's seeds). float64: 1e-12.
    """
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r, alpha = 24, 20, 4, 8.0
    W = (torch.rand(d_out, d_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    b = (torch.rand(d_out, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    A = (torch.rand(r, d_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(3, 7, d_in, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 16 * U32)):
        args = [v.to(dtype) for v in (W, b, A, B)]
        layer = peft_linear(*args, alpha, scale)
        with torch.no_grad():
            got = layer(x.to(dtype))
        want = L.lora_linear_literal(x.to(dtype), *args, alpha, r, scale=scale)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        # and the update is the printed one: W' = W + s (alpha / r) B A
        torch.testing.assert_close(L.lora_delta_weight(args[2], args[3], alpha, r, scale), (scale * alpha / r) * args[3] @ args[2])
    if scale == 0.0:
        torch.testing.assert_close(got, x.float() @ W.float().T + b.float(), rtol=16 * U32, atol=16 * U32)


@pytest.mark.spec_id("lora.update")
def test_merged_forward_equals_the_unmerged_adapter_forward():
    """merge (one matmul with W + Delta W) == the adapter forward, on the whole micro U-Net, at scale 1 and 0.6.

    float32 tolerance atol = rtol = 1e-5: merging rounds W + Delta W once per entry (<= u relative) instead of
    adding two rounded products; through the U-Net (2 transformer blocks, ~10 layers, LayerNorms and softmaxes
    on O(1) activations) those ~u differences grow to ~1e-6 at most (measured 4e-7); 1e-5 leaves a margin of 10x.
    """
    model = _micro_model()
    inputs = _inputs(model)
    L.add_lora(model, r=4, alpha=4, seed=0)
    _train_adapter(model)
    for scale in (1.0, 0.6):
        L.set_lora_scale(model, scale)
        unmerged = _forward(model, inputs)
        L.merge_lora(model)
        assert all(m.merged for _, m in L.lora_layers(model))
        merged = _forward(model, inputs)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="merged"):
            L.set_lora_scale(model, 0.3)
        L.unmerge_lora(model)
    base = _forward(_micro_model(), inputs)
    assert (unmerged - base).abs().max() > 1e-3, "a trained adapter must change the output"


@pytest.mark.spec_id("lora.update")
def test_unmerge_restores_the_base_weights():
    """merge then unmerge gives W back up to the two roundings of fl(fl(W + D) - D): |W'' - W| <= 2 u max(|W|, |W + D|)
    entrywise in float32 (exact in exact arithmetic; peft recomputes D identically for both). Biases and every
    other parameter are untouched bit for bit; remove_lora leaves the base model's state-dict keys."""
    model = _micro_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    L.add_lora(model, r=4, alpha=8, seed=0)
    _train_adapter(model)
    L.set_lora_scale(model, 0.9)
    L.merge_lora(model)
    merged = {n: m.get_base_layer().weight.detach().clone() for n, m in L.lora_layers(model)}
    L.unmerge_lora(model)
    worst = 0.0
    for n, m in L.lora_layers(model):
        W, W2 = base[f"{n}.weight"], m.get_base_layer().weight.detach()
        bound = 2 * U32 * torch.maximum(W.abs(), merged[n].abs())
        assert bool(((W2 - W).abs() <= bound).all()), n
        assert not torch.equal(merged[n], W), f"{n}: merging a trained adapter must change W"
        worst = max(worst, float((W2 - W).abs().max()))
    assert worst < 1e-7
    L.remove_lora(model)
    state = model.state_dict()
    assert set(state) == set(base)
    for k, v in state.items():
        if not any(k == f"{n}.weight" for n in merged):
            assert torch.equal(v, base[k]), k


@pytest.mark.spec_id("lora.update")
def test_untrained_adapter_leaves_the_unet_output_unchanged():
    """B = 0 at init: the adapted U-Net's output and routes are bit-identical to the base's (any scale, merged too)."""
    model = _micro_model()
    inputs = _inputs(model)
    with torch.no_grad():
        base_out, base_aux = model(*inputs)
    L.add_lora(model, r=8, alpha=16, dropout=0.1, targets="attention+proj", seed=0)
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if ".lora_B." in n)
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if ".lora_A." in n)
    with torch.no_grad():
        out, aux = model(*inputs)
    assert torch.equal(out, base_out)
    assert all(torch.equal(a.space_routes, b.space_routes) and torch.equal(a.time_routes, b.time_routes)
               for a, b in zip(aux, base_aux))
    L.set_lora_scale(model, 3.0)
    L.merge_lora(model)
    assert torch.equal(_forward(model, inputs), base_out)


@pytest.mark.spec_id("lora.update")
def test_adapter_targets_the_attention_projections():
    """Default targets: each block's self-attention qkv/out and cross-attention to_q/to_k/to_v/to_out, all frozen
    nn.Linear under peft; nothing else (no expert, gate, ResBlock or proj layer) is wrapped."""
    model = _micro_model()
    n_blocks = len(model.transformer_blocks())
    L.add_lora(model, r=2)
    names = [n for n, _ in L.lora_layers(model)]
    suffixes = sorted({n.split(".block.")[1] for n in names})
    assert suffixes == sorted(L.TARGET_SETS["attention"]) and len(names) == 6 * n_blocks
    L.check_base_frozen(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    # r (d_in + d_out) parameters per layer
    expect = sum(2 * (m.in_features + m.out_features) for _, m in L.lora_layers(model))
    assert L.trainable_summary(model)["adapter"] == expect
    other = _micro_model()
    L.add_lora(other, r=2, targets="attention+proj")
    assert len(L.lora_layers(other)) == 8 * n_blocks
    other = _micro_model()
    L.add_lora(other, r=2, targets=["to_k", "to_v"])
    assert sorted({n.rsplit(".", 1)[1] for n, _ in L.lora_layers(other)}) == ["to_k", "to_v"]
    with pytest.raises(ValueError, match="already carries"):
        L.add_lora(other, r=2)


@pytest.mark.spec_id("lora.update")
def test_expert_banks_are_not_a_peft_target():
    """The experts are stacked parameter banks (ExpertBank), not nn.Linear: lora.py refuses them with the reason, and
    peft's own route for such banks (target_parameters -> ParamWrapper) cannot work in this U-Net, whose blocks hand
    the bank to space_moe (which refuses a wrapper in its place) instead of calling ExpertBank.forward."""
    from peft import LoraConfig, inject_adapter_in_model

    for targets in ("experts", ["to_q", "space_experts.w1"]):
        with pytest.raises(ValueError, match="stacked parameter banks"):
            L.lora_config(r=2, targets=targets)
    model = _micro_model()
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if "experts" in n or "_ffn" in n)
    if "target_parameters" not in LoraConfig.__dataclass_fields__:  # peft < 0.17 has no parameter wrapper at all
        return
    inject_adapter_in_model(LoraConfig(r=2, target_modules=[], target_parameters=["block.space_experts.w1"]), model)
    with pytest.raises(ValueError, match="bank must be a raphael_ref.experts.ExpertBank"):
        _forward(model, _inputs(model))


def test_rank_and_config_errors():
    for r in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
            L.lora_config(r=r)
    with pytest.raises(ValueError, match="alpha"):
        L.lora_config(r=2, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        L.lora_config(r=2, dropout=1.0)
    with pytest.raises(ValueError, match="unknown LoRA target set"):
        L.lora_config(r=2, targets="everything")
    with pytest.raises(ValueError, match="layer names"):
        L.lora_config(r=2, targets=["conv_in"])
    with pytest.raises(ValueError, match="rank r"):
        L.lora_linear_literal(torch.zeros(1, 3), torch.zeros(2, 3), None, torch.zeros(0, 3), torch.zeros(2, 0), 1.0, 0)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        L.set_lora_scale(_micro_model(), 1.0)


# ------------------------------------------------------------------------------ files


def test_save_load_roundtrip_scale_and_apply(tmp_path):
    """save_lora writes only A and B (+ JSON with the config and base); load_lora on a fresh base reproduces the
    adapted output exactly; lora_scale s gives the base at 0 and the same model as scaling B by s; apply_lora
    (the sampler's one-line hook) merges; merge_and_unload gives the base model's keys back."""
    model = _micro_model()
    inputs = _inputs(model)
    base_out = _forward(model, inputs)
    L.add_lora(model, r=4, alpha=8, seed=0)
    _train_adapter(model)
    adapted = _forward(model, inputs)
    path = L.save_lora(model, tmp_path / "a" / "adapter.safetensors", base={"run": "runs/x", "sha256": "0" * 64})
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert stored and all(".lora_A." in k or ".lora_B." in k for k in stored)
    doc = json.loads(L.adapter_json_path(path).read_text())
    assert (doc["r"], doc["alpha"], doc["targets"], doc["base"]["run"]) == (4, 8.0, "attention", "runs/x")
    assert doc["n_parameters"] == sum(v.numel() for v in stored.values())

    fresh = L.load_lora(_micro_model(), path)
    assert torch.equal(_forward(fresh, inputs), adapted)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    L.set_lora_scale(fresh, 0.0)
    assert torch.equal(_forward(fresh, inputs), base_out)
    half = L.load_lora(_micro_model(), path, scale=0.5)
    twin = L.load_lora(_micro_model(), path)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".lora_B." in n:
                p.mul_(0.5)
    torch.testing.assert_close(_forward(half, inputs), _forward(twin, inputs), rtol=1e-6, atol=1e-6)

    applied = L.apply_lora(_micro_model(), path, scale=1.0)  # merged by default
    assert all(m.merged for _, m in L.lora_layers(applied))
    torch.testing.assert_close(_forward(applied, inputs), adapted, rtol=1e-5, atol=1e-5)
    assert L.apply_lora(_micro_model(), None) is not None  # no --lora: the model unchanged
    other_base = save_model(tmp_path / "other", _micro_model(seed=5), get_preset("toy", MICRO))
    with pytest.warns(UserWarning, match="was trained on base weights 000000000000"):
        L.apply_lora(_micro_model(), path, base_checkpoint=other_base, base_weights="model.safetensors")
    plain = L.merge_and_unload(applied)
    assert not L.has_lora(plain) and set(plain.state_dict()) == set(_micro_model().state_dict())
    torch.testing.assert_close(_forward(plain, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_problem(tmp_path):
    model = _micro_model()
    with pytest.raises(FileNotFoundError, match="no LoRA adapter file .*missing.safetensors"):
        L.load_lora(model, tmp_path / "missing.safetensors")
    assert not L.has_lora(model)
    L.add_lora(model, r=4, seed=0)
    path = L.save_lora(model, tmp_path / "adapter.safetensors")
    # an adapter of another architecture (wider blocks): shapes differ, the model is left without adapter
    wide = _micro_model(**{"model.model_channels": 32, "model.norm_groups": 8})
    with pytest.raises(ValueError, match="(?s)does not fit this model.*shape mismatches"):
        L.load_lora(wide, path)
    assert not L.has_lora(wide)
    # more blocks: adapter tensors missing from the file
    deeper = _micro_model(**{"model.num_res_blocks": 2, "model.transformer_down": [2, 1]})
    with pytest.raises(ValueError, match="(?s)does not fit this model.*missing from the file"):
        L.load_lora(deeper, path)
    # no JSON beside it
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="no LoRA config .*lone.json"):
        L.load_lora(_micro_model(), lone)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        L.save_lora(model, tmp_path / "adapter.pt")


# ------------------------------------------------------------------------------ tools/finetune_lora.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny random-init base: a checkpoint folder (config.json + model.safetensors) as checkpoint.save_model writes.
    Its zero-initialised output layers (proj_out, conv_out) get small random weights, as after some training:
    otherwise no gradient of L_denoise reaches the attention layers and only the edge loss moves to_q / to_k."""
    return save_model(tmp_path_factory.mktemp("base"), _micro_model(), get_preset("toy", MICRO))


def test_finetune_lora_trains_only_the_adapter(base_run, tmp_path):
    """A few steps on the synthetic scenes: the base weights file is unchanged, the adapter moved (B != 0), the run
    folder holds log.jsonl, the adapter + JSON (naming the base), loss.png and a sample grid; the adapter loads
    onto the base and changes its output."""
    from raphael_ref.checkpoint import load_model

    tool = load_tool("finetune_lora")
    weights = base_run / "model.safetensors"
    before = weights.read_bytes()
    base_model, _ = load_model(base_run)
    fp_before = tool.base_fingerprint(base_model)
    out = tmp_path / "lora"
    rc = tool.main(["--base", str(base_run), "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                    "--log-every", "1", "--threads", "1", "--rank", "2", "--ema-decay", "0.5"])
    assert rc == 0
    assert weights.read_bytes() == before
    assert tool.base_fingerprint(base_model) == fp_before
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["lora_B_norm"] > 0
    for name in ("adapter.safetensors", "adapter.json", "adapter_raw.safetensors", "loss.png", "config.json",
                 "finetune.json", "samples/final.png"):
        assert (out / name).exists(), name
    doc = json.loads((out / "adapter.json").read_text())
    assert doc["base"]["checkpoint"] == str(base_run) and doc["r"] == 2
    adapted = L.load_lora(load_model(base_run)[0].eval(), out / "adapter.safetensors", base_checkpoint=base_run,
                          base_weights="model.safetensors")
    assert any(float(p.detach().abs().max()) > 0 for n, p in adapted.named_parameters() if ".lora_B." in n)
    for _, layer in L.lora_layers(adapted):  # every adapted layer now computes something else than its base
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            assert not torch.equal(layer(x), layer.get_base_layer()(x))


def test_finetune_lora_user_errors(base_run, tmp_path, capsys):
    tool = load_tool("finetune_lora")
    assert tool.main(["--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert tool.main(["--base", str(base_run), "--out", str(tmp_path / "o"), "--rank", "0"]) == 2
    assert "rank r must be an integer >= 1" in capsys.readouterr().err
    assert tool.main(["--base", str(base_run), "--out", str(tmp_path / "o"), "--targets", "experts"]) == 2
    assert "stacked parameter banks" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sample_tool_and_pipeline_apply_an_adapter(base_run, tmp_path):
    """tools/sample.py --lora FILE [--lora-scale s] (RaphaelPipeline.load_lora): the adapter changes the images,
    scale 0 gives the base's images byte for byte, and a missing adapter file is an error line."""
    from raphael_ref.checkpoint import load_model

    model = load_model(base_run)[0]
    L.add_lora(model, r=2, seed=0)
    _train_adapter(model)
    adapter = L.save_lora(model, tmp_path / "adapter.safetensors")
    sample = load_tool("sample")
    common = [str(base_run), "--raw", "--prompt", "a red circle on the left", "--steps", "2", "--seed", "0",
              "--device", "cpu"]
    outs = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(adapter)]),
                        ("zero", ["--lora", str(adapter), "--lora-scale", "0"])):
        assert sample.main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        outs[name] = (tmp_path / name / "grid.png").read_bytes()
    assert outs["lora"] != outs["base"] and outs["zero"] == outs["base"]
    assert sample.main([*common, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
