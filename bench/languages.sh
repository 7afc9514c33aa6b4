#!/usr/bin/env bash
# Per-language comparison: connection churn, 64 B ping-pong and idle memory
# for the echo handler in Rust, JavaScript, Python, C and the component text
# format (written by hand), each served by the
# release server pinned to CPU 0 with the load generator on CPU 1. Prints a
# Markdown table (ratios are to the Rust echo, measured in the same run).
#
#   bash bench/languages.sh [DURATION]     (default 5s per test)
#
# Needs the components (scripts/build-guests.sh, scripts/build-examples.sh),
# the release server and bench/ built (bench/run.sh builds both).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dur="${1:-5s}"
loadgen=bench/target/release/loadgen
server=target/release/wasm-sockserver
pin_srv=(); pin_lg=()
if [ "$(nproc)" -ge 2 ]; then pin_srv=(taskset -c 0); pin_lg=(taskset -c 1); fi
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT

field() { python3 -c "import json,sys; print(json.loads(sys.stdin.readline())['$1'])"; }

run() { # NAME MODULE [SERVER FLAGS...]
  local name="$1" module="$2" out port pid
  shift 2
  out="$(mktemp)"
  RUST_LOG=warn "${pin_srv[@]}" "$server" --module "$module" --listen 127.0.0.1:0 \
    --max-connections 2000 --cache-dir "$cache" "$@" >"$out" 2>/dev/null &
  pid=$!
  for _ in $(seq 1 600); do grep -q listening "$out" && break; sleep 0.1; done
  port="$(sed 's/.*://' "$out")"
  local churn pp idle
  churn="$("${pin_lg[@]}" "$loadgen" churn --addr "127.0.0.1:$port" --pid "$pid" --warmup 1s --duration "$dur")"
  pp="$("${pin_lg[@]}" "$loadgen" pingpong --addr "127.0.0.1:$port" --pid "$pid" --size 64 --warmup 1s --duration "$dur")"
  idle="$("${pin_lg[@]}" "$loadgen" idle --addr "127.0.0.1:$port" --pid "$pid" --conns 1000)"
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$(stat -c %s "$module")" \
    "$(echo "$churn" | field conns_per_s)" "$(echo "$churn" | field cpu_us_per_op)" \
    "$(echo "$pp" | field rt_per_s)" "$(echo "$pp" | field p99_us)" \
    "$(echo "$idle" | field rss_per_conn_kb)" \
    "$(( $(echo "$churn" | field errors) + $(echo "$pp" | field errors) + $(echo "$idle" | field errors) ))"
}

rows="$(
  run rust guest/target/wasm32-wasip2/release/echo.wasm
  run javascript examples/build/js-echo.wasm
  run python examples/build/python-echo.wasm
  run c examples/build/c-echo.wasm
  run wat examples/wat-echo/echo.wat
)"
echo "| language | component size | churn conn/s | vs Rust | server CPU µs/conn | 64 B ping-pong rt/s | vs Rust | p99 µs | idle RSS KiB/conn | client errors |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
echo "$rows" | python3 -c '
import sys
rows=[l.split("\t") for l in sys.stdin.read().strip().split("\n")]
rust=rows[0]
for r in rows:
    name,size,cps,cpu,rts,p99,idle,err=r
    print(f"| {name} | {int(size):,} B | {float(cps):,.0f} | {float(cps)/float(rust[2]):.2f}× | {float(cpu):.1f} | {float(rts):,.0f} | {float(rts)/float(rust[4]):.2f}× | {float(p99):,.0f} | {float(idle):.1f} | {err} |")
'
