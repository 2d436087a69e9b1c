#!/usr/bin/env bash
# Issue-9 scale measurements on the lent H200, in one go (run from the repository root):
#   bash bench/run_scale_h200.sh OUT_DIR [WORK_DIR]
# 1. the GPU placement tests; 2. Llama-3-8B shape: Fisher-only analysis, `mixq run` at 4.25 and
# 3.25 bpw, `mixq quantize` of the 3.25-bit plan (128 x 2048 calibration tokens), `mixq eval`
# of the checkpoint, one resident float forward+backward; 3. Llama-3-70B width at 4, 8 and 16
# blocks: analyze and quantize. Every stage prints one JSON line as it completes; results land
# in OUT_DIR/scale_8b.json and OUT_DIR/scale_70b_scaling.json. Needs MIXQ_DATA_DIR (WikiText-2).
set -euo pipefail
out=${1:?usage: run_scale_h200.sh OUT_DIR [WORK_DIR]}
work=${2:-/tmp/mixq-scale}
mkdir -p "$out" "$work"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q tests/test_walk.py -k gpu 2>&1 | tail -3 || true
python3 bench/bench_scale.py 8b --layers 32 --samples 8 --seqlen 512 --windows 8 --checks 3 \
    --calib-samples 128 --calib-seqlen 2048 --reference --cleanup --out "$out/8b" --work "$work"
python3 bench/bench_scale.py 70b --layers 4,8,16 --samples 8 --seqlen 512 \
    --candidates int3:g128,int4:g128,int8:ch --calib-samples 16 --calib-seqlen 2048 --out "$out/70b" --work "$work"
echo "scale runs done"
