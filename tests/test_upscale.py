"""Super-resolution through spandrel (issue 12 item 3, the paper's SR-GAN path): a randomly initialised
ESRGAN (RRDBNet) state dict written to disk stands in for Real-ESRGAN's weights (none ship in a package
reachable here); the real loading code reads it, detects the architecture and scale, and upscales."""

from __future__ import annotations

import pytest
import torch

from raphael_ref.upscale import Upscaler, tile_cores, upscale_tiled

pytest.importorskip("spandrel")


def _write_rrdbnet(path, scale: int = 4, seed: int = 0, fmt: str = "safetensors"):
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    return Upscaler.from_file(_write_rrdbnet(tmp_path_factory.mktemp("sr") / "rrdb_x4.safetensors"))


def test_tile_cores_partition_the_axis():
    assert tile_cores(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert tile_cores(8, 8) == [(0, 8)] and tile_cores(3, 8) == [(0, 3)]
    with pytest.raises(ValueError, match="tile"):
        tile_cores(8, 0)


def test_reads_the_file_detects_architecture_and_scale(up, tmp_path):
    assert up.scale == 4 and up.architecture == "ESRGAN"
    x2 = Upscaler.from_file(_write_rrdbnet(tmp_path / "x2.pth", scale=2, fmt="pth"))
    assert x2.scale == 2
    out = x2(torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0)), tile=None)
    assert out.shape == (1, 3, 24, 20) and 0 <= out.min() and out.max() <= 1


def test_tiled_equals_untiled_when_the_context_covers_the_receptive_field(up):
    """RRDBNet with 1 block: 17 convolutions at the input resolution, then 4 more after upsampling, a
    receptive radius of under 19 input pixels; pad = 24 covers it, so every output pixel of a tile sees
    the input it sees untiled. float32, different conv sizes: rounding only (atol 1e-5 on [0, 1])."""
    x = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(1))
    full = up(x, tile=None)
    tiled = up(x, tile=16, pad=24)
    assert tiled.shape == full.shape == (2, 3, 160, 208)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
    # without context the tile borders differ: the tiling is not a no-op that the check above would miss
    assert (up(x, tile=16, pad=0) - full).abs().max() > 1e-3


def test_upscale_tiled_writes_every_pixel_once_and_checks_the_scale():
    calls = []

    def nearest(t):  # a known upscaler: nearest neighbour x3, plus a marker of the call
        calls.append(tuple(t.shape[-2:]))
        return t.repeat_interleave(3, -2).repeat_interleave(3, -1)

    x = torch.arange(2 * 1 * 7 * 9, dtype=torch.float32).reshape(2, 1, 7, 9)
    out = upscale_tiled(nearest, x, 3, tile=4, pad=2)
    assert torch.equal(out, nearest(x)) and len(calls) == 2 * 3 + 1  # 2 x 3 tiles, then the reference
    assert calls[0] == (6, 6)  # core 4 x 4 plus 2 pixels of context on the two inner sides
    with pytest.raises(ValueError, match="expected x2"):
        upscale_tiled(nearest, x, 2, tile=4)


def test_clear_errors(up, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Upscaler.from_file(tmp_path / "RealESRGAN_x4plus.pth")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="not a super-resolution model"):
        Upscaler.from_file(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        up(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="uint8"):
        up(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        up(torch.rand(3, 8, 8))


def test_upscale_tool_writes_pngs_and_names_errors(tmp_path, capsys):
    from PIL import Image

    from raphael_ref.testing import load_tool

    tool = load_tool("upscale")
    weights = _write_rrdbnet(tmp_path / "rrdb.pth", scale=2, fmt="pth")
    src = tmp_path / "in"
    src.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(12, 10), (7, 9)]):
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(src / f"img{i}.png")
    written = tool.main([str(src), "--weights", str(weights), "--out", str(tmp_path / "out"), "--tile", "4",
                         "--pad", "2", "--device", "cpu"])
    assert [p.name for p in written] == ["img0_x2.png", "img1_x2.png"]
    assert Image.open(written[0]).size == (24, 20) and Image.open(written[1]).size == (14, 18)
    assert "ESRGAN x2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main([str(tmp_path / "nope.png"), "--weights", str(weights), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nothing is downloaded"):
        tool.main([str(src), "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")])
