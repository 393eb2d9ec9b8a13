#!/bin/bash
# The GPU checks of raphael_ref in one prepared command (one H100/H200; about 9 minutes):
#   1. tools/bench.py gpu: training step / MFU of small and paper, the toy step, MoE vs dense-FFN forward,
#      50-step DDIM + CFG against SD 1.5's U-Net, compiled vs eager (JSON rewritten after every section);
#   2. the GPU smoke tests (pytest -m gpu): training, evaluation, ablation and sampling tools on CUDA.
#
#   bash tools/gpu_check.sh [OUT_DIR]        # default OUT_DIR: bench_out/gpu
#
# Time limits (seconds; environment): BENCH_BUDGET (sections start only before it, default 300),
# BENCH_TIMEOUT (hard stop of the bench, default 420), SMOKE_TIMEOUT (default 110); BENCH_ARGS: more options of
# `tools/bench.py gpu` (e.g. --no-compile). Needs the package
# importable (pip install -e ".[test,eval]", or PYTHONPATH set to the repository) and a CUDA build of torch.
set -u
cd "$(dirname "$0")/.."
out="${1:-bench_out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 2
timeout "${BENCH_TIMEOUT:-420}" python3 tools/bench.py gpu --budget-s "${BENCH_BUDGET:-300}" --out "$out/bench_gpu.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$out/bench.log" | grep -v -i warning
bench_rc=${PIPESTATUS[0]}
echo "bench exit code: $bench_rc (124: stopped at BENCH_TIMEOUT; the JSON keeps every finished section)"
timeout "${SMOKE_TIMEOUT:-110}" python3 -m pytest -m gpu tests/test_gpu_smoke.py -x -q -p no:cacheprovider \
    --durations=5 2>&1 | tee "$out/smoke.log" | tail -25
smoke_rc=${PIPESTATUS[0]}
echo "smoke exit code: $smoke_rc"
[ "$bench_rc" = 0 ] && [ "$smoke_rc" = 0 ]
