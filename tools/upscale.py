#!/usr/bin/env python
"""Upscale PNG images with an ESRGAN-family model (RAPHAEL Sec. 4.1: Real-ESRGAN to 4096 x 6144).

    python tools/upscale.py out/*.png --weights RealESRGAN_x4plus.pth --out out_x4/
    python tools/upscale.py out/ --weights RealESRGAN_x4plus.pth --out out_x4/ --tile 256 --pad 32 --device cuda

Reads PNG files (or every PNG of a folder), writes ``<name>_x<scale>.png`` into --out. The weights are a
local file that ``spandrel`` recognises (Real-ESRGAN x4plus / x2plus, ESRGAN, ...); nothing downloads.
Large images are upscaled tile by tile (``raphael_ref.upscale.upscale_tiled``: ``--tile`` core pixels with
``--pad`` pixels of context, no seams); ``--tile 0`` runs each image whole. User errors (missing weights or
inputs, a file spandrel cannot read, an --out that takes no files) are one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="PNG files or folders of PNG files")
    p.add_argument("--weights", required=True, help="local ESRGAN-family weight file (.pth / .safetensors)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile", type=int, default=256, help="tile core in input pixels (0: whole image at once)")
    p.add_argument("--pad", type=int, default=32, help="context pixels around each tile")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    if args.tile < 0 or args.pad < 0:
        p.error("--tile and --pad must be >= 0")
    return args


def input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        path = Path(s)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() == ".png")
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"error: input {path} does not exist")
    if not files:
        raise SystemExit(f"error: no PNG file in {inputs}")
    return files


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    from PIL import Image
    from tqdm import tqdm

    from raphael_ref.upscale import Upscaler

    files = input_files(args.inputs)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create the folder ({e.strerror})") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        up = Upscaler.from_file(args.weights, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{up.architecture} x{up.scale} from {args.weights} on {device}; {len(files)} image(s), "
          + (f"tiles of {args.tile} px with {args.pad} px of context" if args.tile else "whole images"))
    written = []
    for f in tqdm(files, unit="image", disable=len(files) < 2):
        img = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        x = torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
        y = up(x, tile=args.tile or None, pad=args.pad, out_device="cpu")[0]  # (3, sH, sW)
        arr = (y.permute(1, 2, 0).float().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        dest = out / f"{f.stem}_x{up.scale}.png"
        Image.fromarray(arr).save(dest)
        written.append(dest)
        print(f"{f} ({x.shape[-1]} x {x.shape[-2]}) -> {dest} ({arr.shape[1]} x {arr.shape[0]})")
    return written


if __name__ == "__main__":
    main()
