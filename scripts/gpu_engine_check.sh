#!/usr/bin/env bash
# One device call on the lent H200: GPU tests of the engine, the kernel checks and MoE tile sweep,
# then `kvsplice bench` on the DeepSeek-V2-Lite shape. Everything lands in $OUT (logs and JSON).
#   bash scripts/gpu_engine_check.sh [bench workload flags...]
# SKIP_KERNELS=1 skips the kernel checks and the MoE sweep (their results are committed already).
# SYNC_BASELINE=1 runs the bench a second time with --no-async-scheduling (bench_sync.json), no profile.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)' | tee -a "$OUT/env.txt"

step "GPU tests"
timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_paged_attention.py \
    > "$OUT/gpu_tests.log" 2>&1
tail -25 "$OUT/gpu_tests.log"

step "kernel checks and MoE sweep"
[ -n "${SKIP_KERNELS:-}" ] || timeout 200 python3 scripts/gpu_bench_kernels.py --budget-s 140 --out "$OUT/kernels_bench.json" \
    --config-out "$OUT/fused_moe_h200.json" > "$OUT/kernels_bench.log" 2>&1
[ -f "$OUT/kernels_bench.log" ] && tail -40 "$OUT/kernels_bench.log"
[ -s "$OUT/fused_moe_h200.json" ] && cp "$OUT/fused_moe_h200.json" server/kernels/configs/fused_moe_h200.json

step "bench"
timeout "${BENCH_TIMEOUT:-330}" python3 -m server.bench --shape deepseek-v2-lite --skip-transformers --kv-cache-memory-fraction 0.5 \
    --out "$OUT/bench.json" "$@" 2>&1 | grep -v "^Loading" > "$OUT/bench.log"
tail -60 "$OUT/bench.log"

if [ -n "${SYNC_BASELINE:-}" ]; then
    step "bench without async scheduling"
    args=(); skip=0
    for a in "$@"; do  # the same workloads, without the profile
        if [ $skip = 1 ]; then skip=0; continue; fi
        if [ "$a" = --profile-batch ]; then skip=1; continue; fi
        args+=("$a")
    done
    timeout "${BENCH_TIMEOUT:-330}" python3 -m server.bench --shape deepseek-v2-lite --skip-transformers --kv-cache-memory-fraction 0.5 \
        --no-async-scheduling --out "$OUT/bench_sync.json" "${args[@]}" 2>&1 | grep -v "^Loading" > "$OUT/bench_sync.log"
    tail -30 "$OUT/bench_sync.log"
fi
step done
