#!/usr/bin/env bash
# What a GPU machine runs (one without network access): build the native
# extension in place with the machine's nvcc, run the whole suite on the GPU, then the
# benchmark. Results and logs go to ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mode=${1:-all}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu_env.txt"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"} python3 setup.py -q build_ext --inplace 2>&1 | tail -3
echo "build_s=$(( $(date +%s) - start ))" | tee -a "$OUT/gpu_env.txt"
python3 -c "import fused_opt; print(fused_opt.build_info(), fused_opt.backend_availability('cuda'))" | tee -a "$OUT/gpu_env.txt"
# The peers (fused_opt/bench/peers.py) from wheels carried beside the repository (`make peer-wheels`
# here, then carry build/peer-wheels): the machine cannot download them.
if ls build/peer-wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index build/peer-wheels/*.whl 2>&1 | tail -3
fi
if [ "$mode" = all ] || [ "$mode" = test ]; then
  # The packaging test fills a fresh venv from PyPI: the GPU machine has no network.
  timeout 420 python3 -m pytest -q -rs -n 8 tests -k "not sdist_and_wheel" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$mode" = all ] || [ "$mode" = bench ]; then
  timeout ${BENCH_TIMEOUT:-500} python3 -m fused_opt.bench ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tail -80
  timeout ${TRAIN_TIMEOUT:-200} python3 -m fused_opt.bench --train --out "$OUT" 2>&1 | tail -20
fi
if [ "$mode" = all ] || [ "$mode" = peers ]; then  # every peer, FlashOptim and TE included where installed
  timeout ${PEERS_TIMEOUT:-300} python3 -m fused_opt.bench --peers-only --out "$OUT" 2>&1 | tail -40
fi
if [ "$mode" = all ] || [ "$mode" = muon ]; then  # Muon and MuSGD (CUDA stage kernels), GPT-2 small and the detector
  timeout ${MUON_TIMEOUT:-240} python3 -m fused_opt.bench --muon-only --full --out "$OUT" 2>&1 | tail -20
fi
