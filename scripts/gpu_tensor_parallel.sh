#!/usr/bin/env bash
# What one lent GPU can measure of tensor parallelism (the multi-GPU kinds were not lent). One device
# call per part; everything lands in $OUT.
#   bash scripts/gpu_tensor_parallel.sh lite   # GPU tests; V2-Lite shape: TP=1 now and before (.bench-old),
#                                              # and rank 0 of TP=2 alone
#   bash scripts/gpu_tensor_parallel.sh v2     # GPU tests of the TP path; full DeepSeek-V2 shape: rank 0 of
#                                              # TP=8 alone (WITH_EP=1: and of EP=8), KV capacity per GPU
#                                              # at gpu_memory_utilization 0.9
# "Rank 0 alone" (`kvsplice bench --one-rank`): one GPU's shard, its collectives no-ops: that GPU's
# compute and memory in the group, without the communication.
# .bench-old: the tree before tensor parallelism, for the side-by-side TP=1 rows, made here with
#   rm -rf .bench-old && mkdir .bench-old && git archive 76837e4 server kvsplice |
#     tar -x -C .bench-old --exclude='*.safetensors'
# and carried (it is in .git/info/exclude).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "=== $* ($(date +%T))"; }
bench() { timeout "${BENCH_TIMEOUT:-300}" python3 -m server.bench --skip-transformers --workload "${BENCH_WORKLOAD:-512:128:1,64,256}" "$@" \
    2>&1 | grep -v "^Loading\|it/s\]" ; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)' | tee -a "$OUT/env.txt"

case "${1:-lite}" in
lite)
    step "GPU tests"
    timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
    tail -8 "$OUT/gpu_tests.log"
    lite=(--shape deepseek-v2-lite --kv-cache-memory-fraction 0.5 --ratios 1.0,0.5)
    step "V2-Lite, TP=1"
    bench "${lite[@]}" --out "$OUT/lite_tp1.json" | tail -6
    step "V2-Lite, rank 0 of TP=2 alone"
    bench "${lite[@]}" --tensor-parallel-size 2 --one-rank --out "$OUT/lite_tp2_rank0.json" | tail -6
    if [ -d .bench-old ]; then
        step "V2-Lite, TP=1, the tree before tensor parallelism"
        (cd .bench-old && bench "${lite[@]}" --out "$OUT/lite_tp1_before.json" | tail -6)
    fi
    ;;
v2)
    step "GPU tests of the tensor-parallel path (one-rank NCCL group in graphs), graphs vs eager"
    [ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
        -k "nccl or graph_decode or two_ranks" > "$OUT/gpu_tests.log" 2>&1
    [ -f "$OUT/gpu_tests.log" ] && tail -6 "$OUT/gpu_tests.log"
    v2=(--shape deepseek-v2 --gpu-memory-utilization 0.9 --tensor-parallel-size 8 --one-rank)
    step "DeepSeek-V2, rank 0 of TP=8 alone"
    bench "${v2[@]}" --ratios "${V2_RATIOS:-1.0,0.5}" --out "$OUT/v2_tp8_rank0.json" | tail -6
    if [ -n "${WITH_EP:-}" ]; then
        step "DeepSeek-V2, rank 0 of EP=8 alone"
        bench "${v2[@]}" --enable-expert-parallel --ratios 0.5 --out "$OUT/v2_ep8_rank0.json" | tail -4
    fi
    ;;
esac
step done
