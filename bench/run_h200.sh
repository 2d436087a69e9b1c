#!/usr/bin/env bash
# Every GPU measurement of the kernel work in one run (about 5 minutes on one H200), from the
# repository root:
#
#     bash bench/run_h200.sh OUT_DIR            # PYTHONPATH is set to src (+ /tmp/site)
#
# 1. the GPU kernel tests (tensor-core kernel, CUDA GEMVs incl. 3-bit, transform, decode
#    loop), while the sweep's Triton kernels compile in 8 processes;
# 2. end-to-end decode of a Llama-3-8B-shaped model (bench_e2e.py): bf16, int4, two mixed plans;
# 3. peers side by side (peer_gemv.py): mixq's dispatcher, bf16 cuBLAS, tinygemm, gemlite;
# 4. the tensor-core / CUDA-GEMV sweep (bench_tc.py --quick) and the transform costs;
# 5. Markdown tables of all of it (kernel_tables.py) to stdout and OUT_DIR/tables.md.
# gemlite is installed from $GEMLITE_SDIST (default whl/gemlite-*.tar.gz) when present: the GPU
# machine has no network (`pip download gemlite==0.6.0.post2 --no-deps -d whl`).
# Step time limits: T_TEST, T_E2E, T_PEERS, T_TC, T_TF seconds (defaults fit a 300 s lease).
set -u
OUT=${1:-h200_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/mixq_triton_cache}
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
GEMLITE_SDIST=${GEMLITE_SDIST:-$(ls whl/gemlite-*.tar.gz 2>/dev/null | head -1)}
if [ -n "$GEMLITE_SDIST" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site "$GEMLITE_SDIST" \
    >"$OUT/log.txt" 2>&1 || echo "gemlite install failed" >>"$OUT/log.txt"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$OUT/log.txt" 2>&1
date -u >>"$OUT/log.txt"
(timeout "${T_TEST:-105}" python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_kernels_tc_gpu.py \
   tests/test_kernels_triton.py tests/test_kernels_cuda.py >"$OUT/pytest.log" 2>&1
 echo "pytest rc=$?" >>"$OUT/pytest.log") &
timeout 100 python3 bench/bench_tc.py --quick --workers 8 --phase precompile >>"$OUT/log.txt" 2>&1
wait
if grep -q "FAILED.*int3" "$OUT/pytest.log"; then  # measure without a 3-bit GEMV that failed its tests
  export MIXQ_CUDA_GEMV3=0
  echo "3-bit CUDA GEMV failed its tests: measured with MIXQ_CUDA_GEMV3=0" >>"$OUT/log.txt"
fi
timeout "${T_E2E:-55}" python3 bench/bench_e2e.py --steps 32 --out "$OUT/e2e.json" >>"$OUT/log.txt" 2>&1
timeout "${T_PEERS:-55}" python3 bench/peer_gemv.py --batches 1,8,16,64,128 --peers mixq,bf16,tinygemm,gemlite \
  --shapes 14336x4096,4096x4096,4096x14336,6144x4096,28672x4096,128256x4096 --out "$OUT/peers.json" \
  >"$OUT/peers.log" 2>&1
timeout "${T_TC:-45}" python3 bench/bench_tc.py --quick --workers 0 --phase time --out "$OUT/tc.json" >>"$OUT/log.txt" 2>&1
timeout "${T_TF:-20}" python3 bench/bench_transforms.py --out "$OUT/transforms.json" >>"$OUT/log.txt" 2>&1
grep -E "passed|failed|rc=" "$OUT/pytest.log" | tail -3
python3 bench/kernel_tables.py --tc "$OUT/tc.json" --peers "$OUT/peers.json" --e2e "$OUT/e2e.json" | tee "$OUT/tables.md"
grep -E "q/k/v|gate/up|^ +[0-9]+ x" "$OUT/log.txt" | tail -12
