#!/usr/bin/env bash
# One device call on the lent H200: two `kvsplice serve` on the DeepSeek-V2-Lite shape with random
# weights (ratio 1.0 on :8000, ratio 0.5 on :8001, the same KV budget), then `kvsplice-loadtest
# compare` with the capacity search. Results (report, JSON, CSV, plots) come back as one tarball.
#   bash scripts/gpu_loadtest.sh NAME -- LOADTEST_ARGS...     e.g.
#   bash scripts/gpu_loadtest.sh decode-heavy -- --input-len 1000 --output-len 512 --start 64
# Needs the server's wheels in .whl (DEVELOPERS.md says how to fetch them).
set -uo pipefail
NAME=$1; shift; [ "${1:-}" = "--" ] && shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/$NAME"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # the GPU machine has no FastAPI / uvicorn / pydantic: carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
KV=${KV:-4GiB}
common=(--model "${MODEL:-deepseek-v2-lite}" --load-format dummy --kv-cache-bytes "$KV" --max-num-seqs 512
        --max-num-batched-tokens 16384 --max-waiting-requests 4096)
# A_FLAGS / B_FLAGS: what differs between the servers (default: ratio 1.0 against ratio 0.5).
# shellcheck disable=SC2086
python3 -m server.cli serve "${common[@]}" --port 8000 ${A_FLAGS:-} > "$OUT/$NAME/server-a.log" 2>&1 &
A=$!
# shellcheck disable=SC2086
python3 -m server.cli serve "${common[@]}" --port 8001 ${B_FLAGS:---compression-ratio 0.5} > "$OUT/$NAME/server-b.log" 2>&1 &
B=$!
for port in 8000 8001; do
    for _ in $(seq 240); do curl -sf "127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
done
echo "servers up at $(date +%T)"; grep -h "KV cache" "$OUT/$NAME"/server-*.log
timeout "${LOADTEST_TIMEOUT:-420}" python3 -m loadtest compare --url-a http://127.0.0.1:8000 --url-b http://127.0.0.1:8001 \
    --concurrency cap-a,cap-b --trial-waves 1 --confirm-waves 1 --no-progress \
    --out "$OUT/$NAME/report" "$@" 2>&1 | tail -40
kill $A $B; wait $A $B
for f in "$OUT/$NAME"/server-*.log; do tail -n 5 "$f"; done
tar -czf "$OUT/$NAME.tar.gz" -C "$OUT" "$NAME" && rm -rf "${OUT:?}/$NAME"
