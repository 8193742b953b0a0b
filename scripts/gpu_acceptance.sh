#!/usr/bin/env bash
# Device calls: GPU tests, sanitizers, profiles, the committed benchmarks, logs under $OUT.
# Usage on the lent GPU machine: bash scripts/gpu_acceptance.sh [checks|tests|sanitize|ncu|stalls|bench|e2e|profile]...
# BENCH_PRESETS picks bench presets (default: llama-7b ideal ideal-s1 llama-70b), BENCH_RUNGS the rungs
# of the llama-7b and ideal presets, E2E_RUNS the e2e runs.
# `checks` runs `tests` and `sanitize` side by side (separate processes; NVRTC compiles on the CPUs).
# Logs go to $LOGS (default $OUT); the device tool brings back at most 8 files, so a call that
# runs many parts points LOGS elsewhere and packs it. KCACHE=DIR keeps CuPy's kernel cache
# (and the first-run verdicts) in DIR, so a later call can start from it.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; export LOGS=${LOGS:-$OUT}; mkdir -p "$OUT" "$LOGS"
[ -n "${KCACHE:-}" ] && export CUPY_CACHE_DIR=$KCACHE
stamp=$(date -u +%Y-%m-%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests sanitize ncu bench)
# profile NAME METRICS [RUNG...]: one Nsight Compute CSV per M (16, 64) of scripts/ncu_ladder.py's launches.
profile() {
  local name=$1 metrics=$2 M; shift 2
  for M in 16 64; do
    timeout 150 ncu --profile-from-start off --clock-control none --csv --metrics "$metrics" \
      python3 scripts/ncu_ladder.py $M "$@" > "$OUT/${stamp}_${gpu}_${name}_m$M.csv" 2> "$OUT/${name}_m$M.err"
  done
}
for part in "${parts[@]}"; do
  case $part in
    tests)
      # The GPU tests in groups run side by side (each compiles its own kernel variants);
      # TESTS_TIMEOUT bounds each group. One log per group, then the summary lines.
      groups=("tests/test_steps.py -k s8_hopper" "tests/test_steps.py -k s6_marlin"
              "tests/test_steps.py -k s4_marlin_layout or s5_async_pipeline"
              "tests/test_steps.py -k not (s8_hopper or s6_marlin or s4_marlin_layout or s5_async_pipeline)"
              "tests/test_torch_layer.py tests/test_checkpoint.py tests/test_padding.py tests/test_tp.py"
              "tests/test_sparse_marlin.py tests/test_decode_attention.py"
              "tests/test_first_run.py tests/test_streams.py")
      for i in "${!groups[@]}"; do
        read -r -a files <<< "${groups[$i]%% -k *}"
        k=(); [[ ${groups[$i]} == *" -k "* ]] && k=(-k "${groups[$i]#* -k }")
        timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -rfEP -m gpu -p no:cacheprovider --durations=10 \
          "${files[@]}" "${k[@]}" > "$LOGS/pytest_gpu_$i.txt" 2>&1 &
      done
      wait
      for i in "${!groups[@]}"; do echo "[${groups[$i]}] $(tail -1 "$LOGS/pytest_gpu_$i.txt")"; done | tee "$LOGS/pytest_gpu.txt" ;;
    sanitize)
      # Every CUDA rung under each tool, the three tools side by side.
      for tool in memcheck racecheck synccheck; do
        timeout "${SANITIZE_TIMEOUT:-400}" compute-sanitizer --tool $tool --error-exitcode 1 python3 scripts/sanitize_small.py \
          > "$LOGS/sanitize_$tool.txt" 2>&1 &
      done
      wait
      for tool in memcheck racecheck synccheck; do
        grep -E "SUMMARY|Error|error/bound" "$LOGS/sanitize_$tool.txt" | sed "s/^/$tool: /" | tail -40
      done | tee "$LOGS/sanitize.txt" ;;
    checks)
      bash "$0" tests & bash "$0" sanitize & wait ;;
    ncu)
      metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
      metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
      metrics+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
      metrics+=,launch__registers_per_thread,launch__grid_size
      profile ncu_ideal $metrics ;;
    stalls)
      # Why s6 and s7 wait: warps stalled per issued instruction, by reason (docs/results/tuning/).
      metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__cycles_active.avg
      metrics+=,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active
      metrics+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
      for reason in barrier branch_resolving dispatch_stall drain imc_miss lg_throttle long_scoreboard math_pipe_throttle \
          membar mio_throttle misc no_instruction not_selected selected short_scoreboard sleeping tex_throttle wait; do
        metrics+=,smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio
      done
      profile stalls_s6_s7 $metrics s6_marlin s7_sparse_marlin ;;
    bench)
      rungs=${BENCH_RUNGS:-"s2_smem_tiling s3_tensor_cores s4_marlin_layout s5_async_pipeline s6_marlin s7_sparse_marlin s8_hopper"}
      bench() { timeout "${BENCH_TIMEOUT:-200}" python3 -m steps bench --quiet --json "$OUT/${stamp}_${gpu}_$1.jsonl" --shapes "${@:2}" 2>&1 | tee -a "$OUT/bench.txt"; }
      for preset in ${BENCH_PRESETS:-llama-7b ideal ideal-s1 llama-70b}; do
        case $preset in
          llama-7b) bench llama-7b llama-7b --batch 1 16 64 --rungs s1_numba_naive $rungs ;;
          ideal)  # two runs, so a run cut short by its timeout still leaves the small batches' rows
            bench ideal ideal --batch 1 2 4 8 16 --rungs $rungs
            bench ideal ideal --batch 32 64 128 256 --rungs $rungs ;;
          ideal-s1) bench ideal-s1 ideal --batch 16 --rungs s1_numba_naive ;;
          llama-70b) bench llama-70b llama-70b --batch 1 16 64 --rungs s3_tensor_cores s4_marlin_layout s5_async_pipeline s6_marlin s7_sparse_marlin s8_hopper ;;
        esac
      done ;;
    e2e)
      # One device call runs at most 10 minutes: pick runs with E2E_RUNS (default: all, which
      # needs several calls). Each batch's rows are written as soon as they are measured, so a
      # run cut short keeps its finished batches: the batches that matter most go first.
      # Measured per call (H100, build and check included): 7B dims, compiled, batches 2 32 64 128
      # about 275 s; 70B dims with 32 layers, 5 batches 408 s, batches 32-128 304 s.
      mkdir -p "$OUT/e2e"
      e2e() { timeout "$2" python3 -m steps e2e --json "$OUT/e2e/${stamp}_${gpu}_$1.jsonl" "${@:3}" 2>&1 | tee -a "$OUT/e2e.txt"; }
      for run in ${E2E_RUNS:-7b 70b-8layers 7b-sparse 7b-fused-small 7b-fused-large 70b-fused-small 70b-fused-large}; do
        case $run in
          7b) e2e 7b 330 --dims 7b ;;
          70b-8layers) e2e 70b-8layers 200 --dims 70b --layers 8 --batch 1 4 16 64 ;;
          7b-sparse) e2e 7b-sparse 200 --dims 7b --sparse --batch 1 4 16 64 ;;
          7b-fused-small) e2e 7b-compiled-fused-triton 570 --dims 7b --compile --fuse --batch 16 1 8 4 2 ;;
          7b-fused-large) e2e 7b-compiled-fused-triton 570 --dims 7b --compile --fuse --batch 32 64 128 ;;
          70b-fused-small) e2e 70b-32layers-compiled-fused-triton 570 --dims 70b --layers 32 --compile --fuse --batch 16 8 1 4 2 ;;
          70b-fused-large) e2e 70b-32layers-compiled-fused-triton 570 --dims 70b --layers 32 --compile --fuse --batch 32 64 128 ;;
        esac
      done ;;
    profile)
      for dims in 70b 7b; do
        python3 scripts/profile_e2e_step.py $dims 2 16 > "$OUT/${stamp}_${gpu}_profile_${dims}-2layers-fused-triton-compiled_b16.txt" 2>&1
      done ;;
  esac
done
