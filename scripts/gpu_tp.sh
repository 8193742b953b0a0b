#!/usr/bin/env bash
# Tensor parallel on a multi-GPU machine (issue 23's GPU part), logs and JSON lines under $OUT.
#   tests: tests/test_tp.py's gpu test (two GPUs, NCCL: every shard within its bound, repeats
#          bit-identical, both ranks equal), twice, and the two runs' JSON compared bit for bit.
#   e2e:   decode tokens/s of Llama-2-70B dimensions (all layers unless E2E_LAYERS is set) at
#          TP 2 and 4 (TP_SIZES), the MarlinLinear model against the FP16 twin sharded alike.
# Usage on a machine with 2 or more GPUs: bash scripts/gpu_tp.sh [tests|e2e]...
# NVLink multicast stays off (the lent machines' notes): NCCL NVLS, torch's symmetric-memory
# multicast and NVSHMEM NVLS.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpus=$(nvidia-smi --list-gpus | wc -l)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr 'A-Z' 'a-z')
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests e2e)
for part in "${parts[@]}"; do
  case $part in
    tests)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tp.py 2>&1 | tail -5 | tee "$OUT/pytest_tp_gpu.txt"
      # Bit-identical across runs: the same tiny TP model, twice, the check's logits errors compared exactly.
      for run in 1 2; do
        timeout 300 torchrun --nproc-per-node 2 -m steps e2e --tp 2 --dims tiny --batch 1 --tokens 4 --prompt-len 8 \
          --group-size 32 --json "$OUT/tp_repeat_$run.jsonl" > "$OUT/tp_repeat_$run.txt" 2>&1
      done
      python3 - "$OUT" <<'EOF' | tee "$OUT/tp_repeat.txt"
import json, sys
rows = [[json.loads(l) for l in open(f"{sys.argv[1]}/tp_repeat_{i}.jsonl")] for i in (1, 2)]
keys = ("logits_rel_err", "fp16_logits_rel_err", "max_gemm_error_ratio", "greedy_agreement")
same = all(a[k] == b[k] for a, b in zip(*rows) for k in keys) and len(rows[0]) == len(rows[1]) > 0
print("two TP runs bit-identical in", ", ".join(keys), ":", same)
EOF
      ;;
    e2e)
      layers=()
      [ -n "${E2E_LAYERS:-}" ] && layers=(--layers "$E2E_LAYERS")
      for tp in ${TP_SIZES:-2 4}; do
        if [ "$tp" -gt "$gpus" ]; then echo "TP $tp skipped: $gpus GPUs here"; continue; fi
        timeout 590 torchrun --nproc-per-node "$tp" -m steps e2e --tp "$tp" --dims 70b "${layers[@]}" \
          --batch ${E2E_BATCHES:-1 4 16 64} --json "$OUT/${gpu}_tp$tp.jsonl" 2>&1 | grep -v "^W" | tee "$OUT/e2e_tp$tp.txt"
      done ;;
    *) echo "unknown part $part (tests, e2e)"; exit 2 ;;
  esac
done
