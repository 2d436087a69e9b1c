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
# gemlite is installed from $GEMLITE_SDIST (default whl/gemlite-*.tar.gz) when present (whl/ is
# not tracked: pass it to the GPU machine with the device tool's carry). On sm_90 the sweep
# includes the Hopper (wgmma) kernel's launches.
# 4. with E2E=1, the decode loop (bench_e2e.py), with E2E_PDL=1 each quantized plan again
#    without programmatic dependent launch (MIXQ_PDL=0; on by default on sm_90+);
# 5. with PROFILE=1, Nsight Compute sections of the GEMV (batch 1) and the GEMM (16, 64);
#    PROFILE_SOURCE=1 adds the sampled stall reasons per source line.
# Step time limits: T_TEST (SKIP_TESTS=1: none), T_GEMM, T_PEERS (0: no peers), T_E2E seconds; GEMM_ARGS: options of
# bench_gemm.py (e.g. "--lean --quick --batches 1,16,64").
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
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${T_TEST:-120}" python3 -m pytest -q --maxfail=5 -n 8 -p no:cacheprovider tests/test_kernels_cuda_gemm.py \
    tests/test_kernels_cuda.py >"$OUT/pytest.log" 2>&1
  echo "pytest rc=$?" >>"$OUT/pytest.log"
else
  echo "tests skipped (SKIP_TESTS)" >"$OUT/pytest.log"
fi
grep -E "^(FAILED|ERROR)|Error|assert|passed|failed|rc=" "$OUT/pytest.log" | head -30
timeout "${T_GEMM:-200}" python3 bench/bench_gemm.py ${GEMM_ARGS:-} --out "$OUT/gemm.json" >"$OUT/gemm.log" 2>&1
grep -E "^int4|gemv best" "$OUT/gemm.log" | tail -50
python3 bench/kernel_tables.py --gemm "$OUT/gemm.json" >"$OUT/tables.md" 2>&1
[ "${T_PEERS:-60}" != 0 ] && timeout "${T_PEERS:-60}" python3 bench/peer_gemv.py --batches ${PEER_BATCHES:-16,64} --peers mixq,bf16,tinygemm,gemlite \
  --shapes 14336x4096,4096x4096,4096x14336 --out "$OUT/peers.json" >"$OUT/peers.log" 2>&1
[ -f "$OUT/peers.log" ] && tail -12 "$OUT/peers.log" && python3 bench/kernel_tables.py --peers "$OUT/peers.json" >>"$OUT/tables.md"
if [ -n "${E2E:-}" ]; then  # the decode loop with and without programmatic dependent launch
  timeout "${T_E2E:-150}" python3 bench/bench_e2e.py --steps 32 --plans bf16,int4,mixed-4.25,mixed-3.5 \
    ${E2E_PDL:+--variants MIXQ_PDL=0} --out "$OUT/e2e.json" >"$OUT/e2e.log" 2>&1
  grep -E "ms/token" "$OUT"/e2e*.log
fi
if [ -n "${PROFILE:-}" ] && command -v ncu >/dev/null; then  # stall reasons of the GEMV and the GEMM
  for case in "gemv --m 1" "gemm --m 16" "gemm --m 64"; do
    timeout "${T_PROFILE:-60}" ncu -k regex:gem[mv]_int4 --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
      ${PROFILE_SOURCE:+--section SourceCounters --import-source yes} \
      python3 bench/profile_kernels.py --kernel $case >"$OUT/ncu_${case// /_}.txt" 2>&1
    grep -E "Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Stall|ERR" \
      "$OUT/ncu_${case// /_}.txt" | head -12
  done
fi
