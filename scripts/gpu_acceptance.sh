#!/usr/bin/env bash
# One device call: GPU tests, sanitizers and the committed benchmarks, logs under $OUT.
# Usage on the lent GPU machine: bash scripts/gpu_acceptance.sh [tests|sanitize|bench]...
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests sanitize bench)
for part in "${parts[@]}"; do
  case $part in
    tests)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt" ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        timeout 100 compute-sanitizer --tool $tool --error-exitcode 1 python3 scripts/sanitize_small.py 2>&1 \
          | grep -E "SUMMARY|error/bound|Error" | tee -a "$OUT/sanitize.txt"
      done ;;
    bench)
      dense="s2_smem_tiling s3_tensor_cores s4_marlin_layout s5_async_pipeline s6_marlin"
      bench() { timeout 300 python3 -m steps bench --quiet --json "$OUT/${stamp}_${gpu}_$1.jsonl" --shapes "${@:2}" 2>&1 | tee -a "$OUT/bench.txt"; }
      bench llama-7b llama-7b --batch 1 16 64 --rungs s1_numba_naive $dense
      bench ideal ideal --batch 1 2 4 8 16 32 64 128 --rungs $dense
      bench ideal-s1 ideal --batch 16 --rungs s1_numba_naive ;;
  esac
done
