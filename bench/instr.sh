#!/usr/bin/env bash
# Count the server's user-space instructions per operation with callgrind:
# per churn connection (connect, 64 B echo, close) and per 64 B round trip,
# native tokio echo and wasm-sockserver side by side.
#
#   bash bench/instr.sh                  → bench/results/instr.md
#   --conns N        churn connections measured (default 800)
#   --round-trips N  64 B round trips measured (default 8000)
#   --server PATH    measure this wasm-sockserver binary as well (an A/B
#                    against a build of another commit); repeatable
#   --module PATH    the handler (default: the echo component)
#   --skip-build     reuse the binaries already built
#
# Unlike bench/run.sh this does not depend on how busy the machine is: the
# same binaries and the same client give the same counts to within about
# 1% from run to run, so a change of a few percent can be seen on a shared,
# noisy machine. It counts instructions, not time: kernel work (system
# calls) is not counted, and a `rep movsb`/`rep stosb` copy counts one
# instruction per byte. Use it to compare builds; use run.sh for speeds.
# It misjudges changes to what a read finds waiting: the server runs ~50x
# slower under valgrind than its clients (bench/README.md).
# Installs valgrind (Debian package) when it is missing. Each server runs
# about 5 s under callgrind.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
unset CARGO_TARGET_DIR

conns=800
round_trips=8000
clients=8
build=1
module=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns="$2"; shift ;;
    --round-trips) round_trips="$2"; shift ;;
    --server) extra+=("$2"); shift ;;
    --module) module="$2"; shift ;;
    --skip-build) build=0 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "instr.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf 'instr: %s\n' "$*" >&2; }

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  say "installing valgrind"
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
# shellcheck source=bench/common.sh
. "$root/bench/common.sh"
if [ "$build" = 1 ]; then
  say "building bench/, the server and the guests"
  build_all
fi
module="${module:-$echo_wasm_default}"
require instr.sh "$loadgen" "$native" "$root/target/release/wasm-sockserver" "$module" "${extra[@]}"

srv_pin=(); lg_pin=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  srv_pin=(taskset -c 0); lg_pin=(taskset -c 1)
fi

work=$(mktemp -d)
VG_PID=""
cleanup() {
  if [ -n "$VG_PID" ]; then kill -KILL "$VG_PID" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The instruction total of a callgrind dump.
total() { sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$1" | head -1; }

# measure LABEL CMD...: prints "LABEL instr_per_conn instr_per_round_trip".
measure() {
  local label=$1; shift
  local out="$work/$label"
  mkdir -p "$out"
  RUST_LOG=warn "${srv_pin[@]}" valgrind --tool=callgrind --smc-check=all-non-file \
    --callgrind-out-file="$out/cg" "$@" --listen 127.0.0.1:0 >"$out/stdout" 2>"$out/stderr" &
  VG_PID=$!
  local addr="" i
  for i in $(seq 1 1200); do
    addr=$(sed -n 's/^listening on //p' "$out/stdout" 2>/dev/null | head -1)
    [ -n "$addr" ] && break
    kill -0 "$VG_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "instr.sh: $label did not start under valgrind: $(tail -3 "$out/stderr")" >&2
    exit 1
  fi
  local lg=("${lg_pin[@]}" "$loadgen" exact --addr "$addr" --clients "$clients")
  # Warm up (code paths, pool slots, allocator), then count each phase.
  "${lg[@]}" --kind churn --ops $((clients * 8)) >/dev/null
  "${lg[@]}" --kind pingpong --ops $((clients * 8)) >/dev/null
  callgrind_control -z "$VG_PID" >/dev/null 2>&1
  "${lg[@]}" --kind churn --ops "$conns" >/dev/null
  callgrind_control -d "$VG_PID" >/dev/null 2>&1
  callgrind_control -z "$VG_PID" >/dev/null 2>&1
  "${lg[@]}" --kind pingpong --ops "$round_trips" >/dev/null
  callgrind_control -d "$VG_PID" >/dev/null 2>&1
  kill -KILL "$VG_PID" 2>/dev/null || true
  wait "$VG_PID" 2>/dev/null || true
  VG_PID=""
  local churn pp
  churn=$(total "$out/cg.1")
  pp=$(total "$out/cg.2")
  echo "$label $((churn / conns)) $((pp / round_trips))"
}

(( conns % clients == 0 && round_trips % clients == 0 )) \
  || { echo "instr.sh: --conns and --round-trips must be multiples of $clients" >&2; exit 2; }

say "native"
rows=("$(measure native "$native")")
say "wasm-sockserver"
rows+=("$(measure wasm-sockserver "$root/target/release/wasm-sockserver" --module "$module" --max-connections 64)")
n=0
for server in "${extra[@]}"; do
  n=$((n + 1))
  say "$server"
  rows+=("$(measure "extra-$n" "$server" --module "$module" --max-connections 64)")
done

read -r _ base_conn base_rt <<<"${rows[0]}"
mkdir -p "$root/bench/results"
report="$root/bench/results/instr.md"
{
  echo "Instructions counted by callgrind in the server process (user space only), $(date -u '+%Y-%m-%d %H:%M UTC'):"
  echo "$conns churn connections and $round_trips 64 B round trips, $clients concurrent clients, after a warm-up."
  echo
  echo "| server | instructions per churn connection | vs native | per 64 B round trip | vs native |"
  echo "|---|--:|--:|--:|--:|"
  for row in "${rows[@]}"; do
    read -r label c r <<<"$row"
    case "$label" in extra-*) label="${extra[${label#extra-} - 1]#"$root/"}" ;; esac
    awk -v l="$label" -v c="$c" -v r="$r" -v bc="$base_conn" -v br="$base_rt" \
      'BEGIN { printf "| %s | %d | %.2f× | %d | %.2f× |\n", l, c, c / bc, r, r / br }'
  done
} >"$report"
cat "$report"
