#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA mapper and Triton kernel tests
# (which skip, visibly, everywhere else), then benchmarks/xtensor_gpu.py. Needs torch,
# triton, cuda-python, pytest and hypothesis; not vLLM, so the repository's conftest (which
# starts engines) is left out, and so is the Triton-interpreter test: it checks no GPU
# and runs in CI, while Triton 3.6's interpreter failed on the GPU machine under NumPy 2.5
# (int() of a 1-d array). Logs and results are copied to $OUT (default /tmp/gpu_check).
# Arguments go to the benchmark, e.g. scripts/gpu_check.sh --contexts 1024 --batches 1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/device.txt"
python3 -c 'import numpy, torch, triton; from cuda import bindings
print("torch", torch.__version__, "triton", triton.__version__, "cuda-bindings", bindings.__version__,
      "numpy", numpy.__version__)' \
    | tee -a "$out/device.txt"
python3 -m pytest --noconftest -p no:cacheprovider -q -rs -k "not interpreter" \
    tests/memory/test_xtensor_mapping.py tests/kernels/test_contiguous_attention.py \
    2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/xtensor_gpu.py "$@" 2>&1 | tee "$out/xtensor_gpu.log"
bench_rc=${PIPESTATUS[0]}
cp benchmarks/results/xtensor_gpu.{json,md,png} "$out/" 2>/dev/null
echo "tests rc=$tests_rc benchmark rc=$bench_rc"
exit $((tests_rc || bench_rc))
