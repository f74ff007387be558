#!/usr/bin/env bash
# One device call that checks and benchmarks the accelerated path on a lent GPU (H100/H200).
# Run from the repository root on the device machine, with torch-pruning carried as a wheel in .whl/:
#   here:   echo /.whl/ >> .git/info/exclude
#           python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torch-pruning==1.6.1
#   there:  bash benchmarks/gpu_session.sh        (carry: .whl)
# The three steps fit one 10-minute call (120 + 270 + 180 s at most). Writes CUDA test logs and benchmark results to benchmarks/results/ and copies them to $OUT when it is set.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
results=benchmarks/results
mkdir -p "$results"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$results/gpu_device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$results/gpu_device.txt"
date -u +%F | tee -a "$results/gpu_device.txt"

# 1. every kernel test on CUDA (tf32 tolerances apply there)
timeout 120 python3 -m pytest tests/kernels -q -x 2>&1 | tail -n 30 | tee "$results/gpu_kernel_tests.log"
# 2. population scoring: reference / batched / compact / triton, ceilings measured in the same run
timeout 270 python3 benchmarks/gpu_energies.py 2>&1 | tail -n 60
# 3. fused update bandwidth, evolution step time, iteration overhead vs plain training
timeout 180 python3 benchmarks/gpu_iteration.py 2>&1 | tail -n 40
if [ -n "${OUT:-}" ]; then cp "$results"/gpu_* "$OUT"/ 2>/dev/null; fi
