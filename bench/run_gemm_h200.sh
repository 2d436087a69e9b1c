#!/usr/bin/env bash
# The CUDA int4 tensor-core GEMM on one GPU, in one run (about 7 minutes on one H200), from the
# repository root:
#
#     bash bench/run_gemm_h200.sh OUT_DIR
#
# 1. builds the CUDA extension once (GEMV + GEMM; MAX_JOBS parallel compiles);
# 2. the GPU tests of both kernels (tests/test_kernels_cuda_gemm.py, tests/test_kernels_cuda.py);
# 3. the launch-shape sweep against the Triton tensor-core kernel, the GEMV and bf16
#    (bench_gemm.py), then the peers at batch 16 and 64 (peer_gemv.py: tinygemm, gemlite).
# gemlite is installed from $GEMLITE_SDIST (default whl/gemlite-*.tar.gz) when present.
# Step time limits: T_TEST, T_GEMM, T_PEERS seconds.
set -u
OUT=${1:-gemm_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mixq_ext}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/mixq_triton_cache}
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
GEMLITE_SDIST=${GEMLITE_SDIST:-$(ls whl/gemlite-*.tar.gz 2>/dev/null | head -1)}
if [ -n "$GEMLITE_SDIST" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site "$GEMLITE_SDIST" \
    >"$OUT/pip.log" 2>&1 || echo "gemlite install failed" >>"$OUT/pip.log"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/log.txt" 2>&1
t0=$(date +%s)
python3 -c "from mixq.kernels import cuda_gemv as c; print('extension', c.extension() is not None, c.build_error())" \
  >"$OUT/build.log" 2>&1
echo "build $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/build.log" | cut -c1-300)"
timeout "${T_TEST:-120}" python3 -m pytest -q --maxfail=5 -n 8 -p no:cacheprovider tests/test_kernels_cuda_gemm.py \
  tests/test_kernels_cuda.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >>"$OUT/pytest.log"
grep -E "^(FAILED|ERROR)|Error|assert|passed|failed|rc=" "$OUT/pytest.log" | head -30
timeout "${T_GEMM:-200}" python3 bench/bench_gemm.py --out "$OUT/gemm.json" >"$OUT/gemm.log" 2>&1
grep -v "^  " "$OUT/gemm.log" | tail -40
timeout "${T_PEERS:-60}" python3 bench/peer_gemv.py --batches 16,64 --peers mixq,bf16,tinygemm,gemlite \
  --shapes 14336x4096,4096x4096,4096x14336 --out "$OUT/peers.json" >"$OUT/peers.log" 2>&1
tail -12 "$OUT/peers.log"
