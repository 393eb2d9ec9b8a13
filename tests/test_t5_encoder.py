"""The frozen T5 text encoder (seed 004, Imagen; issue 13 item 5), on a random-init tiny T5 written to disk.

The real loading code (a local folder, ``T5EncoderModel`` + the folder's tokenizer) is what runs here:
``write_tiny_t5`` writes the files a T5 release holds, at tiny sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from raphael_ref.config import get_preset
from raphael_ref.t5_encoder import T5TextEncoder, write_tiny_t5
from raphael_ref.text_encoder import PromptTruncatedWarning

pytest.importorskip("transformers")  # the test extra installs it; a clear skip elsewhere


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), seed=0)


@pytest.fixture(scope="module")
def enc(t5_dir):
    return T5TextEncoder.from_pretrained(t5_dir, n_y=12)


def test_ids_valid_mask_and_pooled_end_of_sequence(enc):
    out = enc(["a red circle", ""])
    assert out.hidden.shape == (2, 12, 32) and enc.d_y == 32 and enc.n_y == 12
    eos, pad = enc.tokenizer.eos_token_id, enc.tokenizer.pad_token_id
    # "a red circle" -> 3 word tokens then </s>; the empty prompt is </s> alone (the unconditional prompt)
    assert out.pooled_index.tolist() == [3, 0]
    assert out.ids[0, 3] == eos and (out.ids[0, 4:] == pad).all() and out.ids[1, 0] == eos
    assert out.valid.sum(1).tolist() == [4, 1] and out.valid[0, :4].all()
    assert torch.equal(out.pooled, out.hidden[torch.arange(2), out.pooled_index])
    assert torch.isfinite(out.hidden).all()


def test_hidden_states_equal_transformers_and_do_not_depend_on_padding(t5_dir, enc):
    from transformers import T5EncoderModel

    ref_model = T5EncoderModel.from_pretrained(str(t5_dir), local_files_only=True).eval()
    out = enc("a blue square on the left")
    n = int(out.pooled_index[0]) + 1
    with torch.no_grad():
        ref = ref_model(input_ids=out.ids[:, :n]).last_hidden_state  # no padding at all
    # same weights, same tokens; only the masked padding differs: float32 rounding of the masked softmax
    torch.testing.assert_close(out.hidden[:, :n], ref, rtol=1e-5, atol=1e-5)
    longer = T5TextEncoder.from_pretrained(t5_dir, n_y=20)("a blue square on the left")
    torch.testing.assert_close(longer.hidden[:, :n], out.hidden[:, :n], rtol=1e-5, atol=1e-5)


def test_frozen_no_graph_and_ids_input(enc):
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # stays in eval mode: no dropout in E_theta
    ids = enc.tokenize(["two green triangles", "a purple circle"])
    out = enc(ids)
    assert not out.hidden.requires_grad and torch.equal(out.ids, ids)
    torch.testing.assert_close(out.hidden, enc(["two green triangles", "a purple circle"]).hidden)


def test_long_prompts_are_truncated_with_a_warning(enc):
    long = " ".join(["red"] * 30)
    with pytest.warns(PromptTruncatedWarning, match="30 T5 tokens but only 11 fit"):
        ids = enc.tokenize([long, "a circle"])
    assert ids[0, -1] == enc.tokenizer.eos_token_id and (ids[0] != enc.tokenizer.pad_token_id).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize("a red circle")  # fits: no warning


def test_bad_inputs_say_what_to_do(t5_dir, enc, tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        T5TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="layer='last' only"):
        T5TextEncoder.from_pretrained(t5_dir, layer="penultimate")
    with pytest.raises(ValueError, match="prompts is empty"):
        enc([])
    with pytest.raises(ValueError, match=r"shape \(B, 12\)"):
        enc(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="end-of-sequence"):
        enc(torch.full((1, 12), 3, dtype=torch.long))


def test_config_and_build_text_encoder(t5_dir):
    from raphael_ref.training import build_text_encoder

    cfg = get_preset("toy", {"model.text_encoder": "t5", "model.text_encoder_weights": str(t5_dir),
                             "model.text_layer": "last"})
    enc = build_text_encoder(cfg)
    assert isinstance(enc, T5TextEncoder) and enc.d_y == cfg.model.d_y == 32 and enc.n_y == 77
    with pytest.raises(ValueError, match="model.text_encoder_weights"):
        get_preset("toy", {"model.text_encoder": "t5", "model.text_layer": "last"})
    with pytest.raises(ValueError, match="model.text_layer"):
        get_preset("toy", {"model.text_encoder": "t5", "model.text_encoder_weights": str(t5_dir),
                           "model.text_layer": "penultimate"})
    wide = get_preset("toy", {"model.text_encoder": "t5", "model.text_encoder_weights": str(t5_dir), "model.d_y": 64,
                              "model.text_layer": "last"})
    with pytest.raises(ValueError, match="set model.d_y=32"):
        build_text_encoder(wide)


def test_a_t5_conditioned_unet_trains_a_step(t5_dir):
    """The U-Net reads T5 tokens as it reads CLIP's: one training step runs and moves the weights."""
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.models import RaphaelUNet
    from raphael_ref.objective import training_losses

    cfg = get_preset("toy", {"model.text_encoder": "t5", "model.text_encoder_weights": str(t5_dir),
                             "model.text_layer": "last", "model.n_y": 16, "model.sample_size": 8, "model.model_channels": 16,
                             "model.head_dim": 8, "model.norm_groups": 4, "model.edge_width": 4})
    enc = T5TextEncoder.from_pretrained(t5_dir, n_y=16)
    torch.manual_seed(0)
    model = RaphaelUNet(cfg.model)
    text = enc(["a red circle on the left", "two blue squares"])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    out = training_losses(model, NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T), x0,
                          torch.tensor([10, 600]), torch.randn(x0.shape, generator=g), text.hidden, text.valid,
                          text.pooled_index, torch.rand(2, 1, 8, 8, generator=g))
    out["total"].mean().backward()
    assert torch.isfinite(out["total"]).all()
    grads = [p.grad for n, p in model.named_parameters() if "to_k" in n and p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)  # the text tokens reach the U-Net
