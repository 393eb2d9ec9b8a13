"""RaphaelPipeline (raphael_ref/pipeline.py): loading a run, one call to PIL images, paths and masks,
negative prompts, clear errors, the light package import, the README's Python block and the new options
of tools/sample.py, all on a micro random-weights run (raphael_ref.testing.tiny_run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from raphael_ref import RaphaelPipeline, RaphaelPipelineOutput
from raphael_ref.testing.tiny_run import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("pipe") / "run")


@pytest.fixture(scope="module")
def pipe(run_dir) -> RaphaelPipeline:
    return RaphaelPipeline.from_run(run_dir)


def _call(pipe, prompts=PROMPTS, **kw):
    kw = {"num_inference_steps": 2, "generator": 3, **kw}
    return pipe(prompts, **kw)


def test_one_call_gives_pil_images_equal_to_generate_images(pipe):
    from PIL import Image

    from raphael_ref import training

    out = _call(pipe)
    assert isinstance(out, RaphaelPipelineOutput) and out.paths is None and out.masks is None
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    # the same sampler, noise stream and decode as training.generate_images (tools/sample.py before the pipeline)
    ref, _ = training.generate_images(pipe.model, pipe.schedule, pipe.text_encoder, pipe.codec, PROMPTS, size=(16, 16),
                                      steps=2, guidance=pipe.config.sample.guidance,
                                      generator=torch.Generator().manual_seed(3))
    pix = training.to_uint8(ref)  # (B, H, W, 3)
    assert all(torch.equal(torch.from_numpy(np.array(im)), pix[i]) for i, im in enumerate(out.images))
    tensors = _call(pipe, output_type="pt").images
    assert torch.equal(tensors, ref)


def test_paths_masks_sizes_and_seeds(pipe):
    out = _call(pipe, return_paths=True, return_masks=True, height=16, width=32)
    assert out.images[0].size == (32, 16)
    assert out.paths.space_routes.shape == (2, 16, 2, pipe.text_encoder.n_y)
    assert len(out.masks) == 16 and out.masks[0].shape == (2, 16 * 32, pipe.text_encoder.n_y)
    assert torch.equal(out.masks[0], out.paths.masks[-1][0])  # the last step's masks
    again = _call(pipe, sampler="unipc", output_type="pt").images
    assert torch.equal(again, _call(pipe, sampler="unipc", output_type="pt").images)
    assert not torch.equal(again, _call(pipe, sampler="unipc", generator=4, output_type="pt").images)
    only_masks = _call(pipe, ["a"], return_masks=True)
    assert only_masks.paths is None and only_masks.masks[0].shape[0] == 1


def test_negative_prompt(pipe):
    base = _call(pipe, output_type="pt").images
    assert torch.equal(_call(pipe, negative_prompt=["", ""], output_type="pt").images, base)  # "" is the default
    neg = _call(pipe, negative_prompt="a green triangle", output_type="pt").images
    assert not torch.equal(neg, base)
    assert torch.equal(_call(pipe, negative_prompt=["a green triangle"] * 2, output_type="pt").images, neg)
    with pytest.raises(ValueError, match="one per prompt"):
        _call(pipe, negative_prompt=["a", "b", "c"])


def test_clear_errors(pipe):
    with pytest.raises(ValueError, match="unknown sampler"):
        _call(pipe, sampler="plms")
    with pytest.raises(ValueError, match="multiple of 8"):  # toy U-Net: 3 downsamplings, identity codec
        _call(pipe, height=20)
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        _call(pipe, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="all T = 1000 steps"):
        _call(pipe, sampler="ddpm")
    with pytest.raises(ValueError, match="num_inference_steps"):
        _call(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match="non-empty list"):
        _call(pipe, [])
    long = " ".join(["red circle"] * 60)  # 120 BPE tokens > 75
    with pytest.raises(ValueError, match="BPE tokens"):
        _call(pipe, [long], truncate=False)
    from raphael_ref.text_encoder import PromptTruncatedWarning

    with pytest.warns(PromptTruncatedWarning):  # the default: the text encoder's warning (errata E41)
        _call(pipe, [long], num_inference_steps=1)


def test_from_pretrained_and_from_objects(run_dir, pipe):
    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    ema = RaphaelPipeline.from_pretrained(ckpt)  # "auto": the EMA weights, as from_run
    raw = RaphaelPipeline.from_pretrained(ckpt, weights="raw")
    objects = RaphaelPipeline(pipe.model, pipe.text_encoder, config=pipe.config)
    base = _call(pipe, output_type="pt").images
    assert torch.equal(_call(ema, output_type="pt").images, base)
    assert torch.equal(_call(objects, output_type="pt").images, base)
    assert not torch.equal(_call(raw, output_type="pt").images, base)
    with pytest.raises(FileNotFoundError, match="from_run"):
        RaphaelPipeline.from_pretrained(run_dir / "checkpoints")


def test_import_stays_light():
    code = ("import sys, raphael_ref; assert 'torch' not in sys.modules; "
            "from raphael_ref import RaphaelPipeline, SAMPLERS; "
            "assert 'diffusers' not in sys.modules and 'open_clip' not in sys.modules, 'heavy import'; print(SAMPLERS)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "dpmpp_2m" in proc.stdout


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_section_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")  # the block uses dpmpp_2m
    make_tiny_run(tmp_path / "runs" / "toy")
    monkeypatch.chdir(tmp_path)
    block = _readme_python_block().replace("num_inference_steps=10", "num_inference_steps=2")  # keep the test fast
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert sorted(p.name for p in tmp_path.glob("sample_*.png")) == ["sample_0.png", "sample_1.png"]
    assert "torch.Size([2, 16, 2, 77])" in capsys.readouterr().out


def test_sample_cli_sampler_and_negative_prompt(run_dir, tmp_path, capsys):
    from raphael_ref.testing import load_tool

    main = load_tool("sample").main
    argv = [str(run_dir), "--prompt", PROMPTS[0], "--steps", "2", "--save-paths", "--sampler", "dpmpp_2m"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--negative-prompt", "a green triangle"]) == 0
    assert "dpmpp_2m 2 steps" in capsys.readouterr().out
    rec = (tmp_path / "a").glob("000_*.paths.json")
    assert '"negative_prompt": "a green triangle"' in next(rec).read_text()
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    a, b = ((tmp_path / d / "grid.png").read_bytes() for d in "ab")
    assert a != b  # the negative prompt changes the image
    assert main(argv + ["--out", str(tmp_path / "c"), "--eta", "0.5"]) == 2
    assert "eta applies to sampler='ddim' only" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit):  # argparse: an unknown sampler is a usage error
            main(argv[:-1] + ["plms", "--out", str(tmp_path / "d")])
