#!/usr/bin/env bash
# Online transforms in the decode step on one GPU, in one run (about 5 minutes on one H200),
# from the repository root:
#
#     bash bench/run_transform_h200.sh OUT_DIR
#
# 1. builds the CUDA extension once;
# 2. the GPU tests of the Triton kernels (transform, decode step, RMSNorm with a transform,
#    argmax), the decode loop and the transformed checkpoints;
# 3. bench_transforms.py --chain-only: RMSNorm -> [transform] -> matmul chains under PDL, with
#    the CUDA transform kernels and again with the Triton ones (MIXQ_CUDA_TRANSFORM=0);
# 4. bench_e2e.py: bf16, int4 and int4 with transforms (the transform in the RMSNorm kernel,
#    and again with MIXQ_NORM_TRANSFORM=0: its own kernel, and with MIXQ_CUDA_TRANSFORM=0: the
#    Triton kernels), with kernel profiles.
# Step time limits: T_TEST, T_CHAIN, T_E2E seconds; PLANS: bench_e2e.py --plans; TESTS: the test files
# (none: no tests); VARIANTS: bench_e2e.py --variants; SKIP_CHAIN=1, SKIP_E2E=1 leave those steps out.
set -u
OUT=${1:-transform_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mixq_ext}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/mixq_triton_cache}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
python3 -c "from mixq.kernels import cuda_gemv as c; print('extension', c.extension() is not None, c.build_error())" \
  >"$OUT/build.log" 2>&1
echo "build $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/build.log" | cut -c1-300)"
TESTS=${TESTS:-tests/test_kernels_triton.py tests/test_kernels_cuda.py tests/test_decoder.py tests/test_generate.py \
  tests/test_checkpoint_transforms.py tests/test_qlinear.py}
if [ "$TESTS" != none ]; then
  timeout "${T_TEST:-150}" python3 -m pytest -q --maxfail=5 -n 8 -p no:cacheprovider $TESTS >"$OUT/pytest.log" 2>&1
  echo "pytest rc=$?" >>"$OUT/pytest.log"
  grep -E "^(FAILED|ERROR)|Error|assert|passed|failed|rc=" "$OUT/pytest.log" | head -30
fi
[ -n "${SKIP_CHAIN:-}" ] || {
timeout "${T_CHAIN:-90}" python3 bench/bench_transforms.py --chain-only --out "$OUT/chain.json" >"$OUT/chain.log" 2>&1
tail -5 "$OUT/chain.log"
MIXQ_CUDA_TRANSFORM=0 timeout "${T_CHAIN:-90}" python3 bench/bench_transforms.py --chain-only --out "$OUT/chain_triton.json" \
  >"$OUT/chain_triton.log" 2>&1
echo "Triton transform kernels (MIXQ_CUDA_TRANSFORM=0):"; tail -5 "$OUT/chain_triton.log"
}
[ -n "${SKIP_E2E:-}" ] && exit 0
timeout "${T_E2E:-240}" python3 bench/bench_e2e.py --steps 32 --plans ${PLANS:-bf16,int4,int4+smooth+rotate,int4+rotate} \
  --variants "${VARIANTS:-MIXQ_NORM_TRANSFORM=0;MIXQ_CUDA_TRANSFORM=0}" --profile --out "$OUT/e2e.json" >"$OUT/e2e.log" 2>&1
grep -E "ms/token|kernels/token|Error" "$OUT/e2e.log"
