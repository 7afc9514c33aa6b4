#!/usr/bin/env bash
# Benchmark wasm-sockserver (echo handler) against a native tokio echo
# server, side by side, over loopback, and write the report.
#
#   bash bench/run.sh            full battery, 15 s per load test (about 3
#                                minutes after the builds) → BENCHMARKS.md
#   bash bench/run.sh --quick    ~3 s per test (~1 minute) → bench/results/quick.md
#   bash bench/run.sh --smoke    ~1 s per test, tiny counts, proves the
#                                harness works → bench/results/smoke.md
#   --out FILE                   write the report elsewhere
#   --skip-build                 reuse the binaries already built
#   --module PATH                the handler wasm-sockserver and the micro
#                                benchmark run (default: the echo component;
#                                it must echo)
#   --idle "N ..."               idle test sizes (default: 10000 50000 100000
#                                in full, 10000 in quick, 200 in smoke)
#
# Builds bench/ (loadgen, native-echo), the server and the guests first. With
# 2+ CPUs the server runs on CPU 0 and the load generator on CPU 1
# (taskset). JSON results and logs go to bench/results/. Exits non-zero when
# a test failed or a client saw an error (the report is written anyway).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The binaries are looked for in target/ and bench/target/.
unset CARGO_TARGET_DIR

mode=full
out=""
idle_override=""
module_override=""
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke ;;
    --quick) mode=quick ;;
    --full) mode=full ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --skip-build) build=0 ;;
    --module) module_override="$2"; shift ;;
    --module=*) module_override="${1#--module=}" ;;
    --idle) idle_override="$2"; shift ;;
    --idle=*) idle_override="${1#--idle=}" ;;
    -h|--help) sed -n '2,21p' "$root/bench/run.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$mode" in
  full)
    warmup=2s; dur=15s; idle_ns="10000 50000 100000"; startup_runs=10; micro_iters=20000
    default_out="$root/BENCHMARKS.md" ;;
  quick)
    warmup=500ms; dur=3s; idle_ns="10000"; startup_runs=5; micro_iters=5000
    default_out="$root/bench/results/quick.md" ;;
  smoke)
    warmup=200ms; dur=1s; idle_ns="200"; startup_runs=2; micro_iters=200
    default_out="$root/bench/results/smoke.md" ;;
esac
out="${out:-$default_out}"
idle_ns="${idle_override:-$idle_ns}"
churn_clients=64
if [ "$mode" = smoke ]; then churn_clients=16; fi

started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
loadavg_start=$(cat /proc/loadavg)
ncpu=$(nproc)
t_start=$(date +%s)

# Open-file soft limit up to the hard limit (the servers inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile_hard=$(ulimit -Hn)
[ "$nofile_hard" = unlimited ] && nofile_hard=1048576
max_map_count=$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 65530)

if [ "$ncpu" -ge 2 ] && command -v taskset >/dev/null; then
  srv_pin=(taskset -c 0); lg_pin=(taskset -c 1)
  pinning="server on CPU 0, load generator on CPU 1 (taskset)"
else
  srv_pin=(); lg_pin=()
  pinning="none (fewer than 2 CPUs or no taskset): server and load generator share the CPUs"
fi

say() { printf 'bench: %s\n' "$*" >&2; }

# The smoke run only proves the harness works, so it uses the server's dev
# build (the one the test suite already built) instead of building wasmtime
# again in release mode, and leaves the micro benchmark to `cargo test`,
# which runs it in smoke mode.
server_profile=release
[ "$mode" = smoke ] && server_profile=debug
# shellcheck source=bench/common.sh
. "$root/bench/common.sh"
if [ "$build" = 1 ]; then
  say "building bench/ (loadgen, native-echo), the server and the guests"
  build_all "$server_profile"
  if [ "$server_profile" = release ]; then
    # The micro benchmark builds with dev-dependencies: build it now, unpinned.
    cargo bench --quiet --no-run --bench instantiate
  fi
fi
server="$root/target/$server_profile/wasm-sockserver"
echo_wasm="${module_override:-$echo_wasm_default}"
require run.sh "$loadgen" "$native" "$server" "$echo_wasm"

results_dir="$root/bench/results"
logs="$results_dir/logs-$mode"
results="$results_dir/$mode.jsonl"
mkdir -p "$results_dir" "$logs"
rm -f "$logs"/*.log "$logs"/*.stdout
: >"$results"
lglog="$logs/loadgen.log"

note() { "$loadgen" note "$@" >>"$results"; }

SRV_PID=""
SRV_ADDR=""
cleanup() {
  if [ -n "$SRV_PID" ] && kill -0 "$SRV_PID" 2>/dev/null; then
    kill -KILL "$SRV_PID" 2>/dev/null || true
  fi
  if [ -n "${cache_dir:-}" ]; then rm -rf "$cache_dir"; fi
}
trap cleanup EXIT

# start_server KIND MAX_CONNECTIONS NAME: start it pinned, wait for its
# `listening on` line; sets SRV_PID and SRV_ADDR.
start_server() {
  local kind=$1 maxc=$2 name=$3
  local stdout="$logs/$name.stdout" stderr="$logs/$name.log"
  local cmd
  if [ "$kind" = native ]; then
    cmd=("$native" --listen 127.0.0.1:0)
  else
    cmd=("$server" --module "$echo_wasm" --listen 127.0.0.1:0
         --max-connections "$maxc" --shutdown-timeout 2s)
  fi
  RUST_LOG=warn "${srv_pin[@]}" "${cmd[@]}" >"$stdout" 2>"$stderr" &
  SRV_PID=$!
  local i
  for i in $(seq 1 1200); do
    if grep -q '^listening on ' "$stdout" 2>/dev/null; then
      SRV_ADDR=$(sed -n 's/^listening on //p' "$stdout" | head -1)
      return 0
    fi
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
  return 1
}

stop_server() {
  [ -n "$SRV_PID" ] || return 0
  kill -TERM "$SRV_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 100); do
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

# A server log that mentions a mapping or pool failure gets the sysctl hint.
check_log() {
  local test=$1 kind=$2 log="$logs/$1-$2.log"
  if grep -qiE 'max_map_count|mmap|cannot allocate memory|out of memory|pool' "$log" 2>/dev/null; then
    note --text "$test, $kind: the server logged a memory-mapping or pool failure ($(grep -iE 'max_map_count|mmap|cannot allocate memory|out of memory|pool' "$log" | head -1 | cut -c1-300)); raise the limit with \`sysctl -w vm.max_map_count=1048576\`"
  fi
}

# run_pair TEST MAX_CONNECTIONS SUBCOMMAND ARGS...: the same load against
# native, then wasm-sockserver.
run_pair() {
  local test=$1 maxc=$2
  shift 2
  local kind
  for kind in native wasm; do
    say "$test: $kind"
    if start_server "$kind" "$maxc" "$test-$kind"; then
      if ! "${lg_pin[@]}" "$loadgen" "$@" --addr "$SRV_ADDR" --pid "$SRV_PID" \
            --server "$kind" --test "$test" >>"$results" 2>>"$lglog"; then
        note --test "$test" --server "$kind" --failed "the load generator failed: $(tail -1 "$lglog")"
      fi
      stop_server
      check_log "$test" "$kind"
    else
      local why
      why=$(grep -v '^\s*$' "$logs/$test-$kind.log" 2>/dev/null | tail -1 | cut -c1-300)
      note --test "$test" --server "$kind" --failed "the server did not start: ${why:-no output}"
      check_log "$test" "$kind"
    fi
  done
}

t_battery=$(date +%s)

run_pair churn 1000 churn --clients "$churn_clients" --warmup "$warmup" --duration "$dur" --sources 4
run_pair pingpong-64 1000 pingpong --conns 100 --size 64 --warmup "$warmup" --duration "$dur"
run_pair pingpong-16384 1000 pingpong --conns 100 --size 16384 --warmup "$warmup" --duration "$dur"
run_pair bulk 1000 bulk --conns 10 --chunk 65536 --warmup "$warmup" --duration "$dur"

for n in $idle_ns; do
  test="idle-$n"
  maxc=$((n + 100))
  sources=$((n / 10000 + 2))
  need_fd=$((n + 1000))
  if [ "$nofile_hard" -lt "$need_fd" ]; then
    hint="to run it, as root: \`ulimit -Hn 1048576 && ulimit -n 1048576\` in the shell that runs bench/run.sh (fs.nr_open must allow it: \`sysctl -w fs.nr_open=1048576\`), or \`bash bench/hold.sh --conns $n\` to hold them across several --reuse-port processes within the current limits"
    for kind in native wasm; do
      note --test "$test" --server "$kind" \
        --skipped "the open-file hard limit is $nofile_hard, below the $need_fd needed" --hint "$hint"
    done
    say "$test: skipped (open-file hard limit $nofile_hard < $need_fd)"
    continue
  fi
  # The pool maps about 2 regions per connection slot up front, and a live
  # instance about 4 more (measured with the echo component).
  need_maps=$(( 2 * maxc + 4 * n + 2000 ))
  kinds="native wasm"
  if [ "$n" -gt 10000 ] && [ "$max_map_count" -lt "$need_maps" ]; then
    note --test "$test" --server wasm \
      --skipped "vm.max_map_count is $max_map_count, below the ~$need_maps mappings $n connections need" \
      --hint "to run it: \`sysctl -w vm.max_map_count=1048576\`"
    say "$test: wasm skipped (vm.max_map_count $max_map_count < ~$need_maps)"
    kinds="native"
  fi
  for kind in $kinds; do
    say "$test: $kind"
    if start_server "$kind" "$maxc" "$test-$kind"; then
      if ! "${lg_pin[@]}" "$loadgen" idle --conns "$n" --sources "$sources" --settle 1s \
            --addr "$SRV_ADDR" --pid "$SRV_PID" --server "$kind" --test "$test" \
            >>"$results" 2>>"$lglog"; then
        note --test "$test" --server "$kind" --failed "the load generator failed: $(tail -1 "$lglog")"
      fi
      stop_server
    else
      why=$(grep -v '^\s*$' "$logs/$test-$kind.log" 2>/dev/null | tail -1 | cut -c1-300)
      note --test "$test" --server "$kind" --failed "the server did not start: ${why:-no output}"
    fi
    check_log "$test" "$kind"
  done
done

# Start-up. When the server keeps compiled code on disk, measure both a warm
# cache (a private cache dir, primed by one unmeasured start) and --no-cache.
startup() {
  local test=$1 kind=$2 warm=$3
  shift 3
  say "$test: $kind"
  if ! RUST_LOG=warn "${lg_pin[@]}" "$loadgen" startup --runs "$startup_runs" --warmup-runs "$warm" \
        --server "$kind" --test "$test" -- "${srv_pin[@]}" "$@" >>"$results" 2>>"$lglog"; then
    note --test "$test" --server "$kind" --failed "the load generator failed: $(tail -1 "$lglog")"
  fi
}
wasm_cmd=("$server" --module "$echo_wasm" --listen 127.0.0.1:0 --max-connections 1000)
if "$server" --help 2>/dev/null | grep -q -- '--no-cache'; then
  cache_dir=$(mktemp -d)
  startup startup native 1 "$native" --listen 127.0.0.1:0
  startup startup wasm 1 "${wasm_cmd[@]}" --cache-dir "$cache_dir"
  startup startup-compile native 1 "$native" --listen 127.0.0.1:0
  startup startup-compile wasm 0 "${wasm_cmd[@]}" --no-cache
else
  startup startup native 1 "$native" --listen 127.0.0.1:0
  startup startup wasm 0 "${wasm_cmd[@]}"
fi

# Micro: instantiate + empty handle, in-process.
if [ "$mode" = smoke ]; then
  note --test instantiate --server wasm --skipped "smoke run: \`cargo test --all-targets\` runs the micro benchmark in smoke mode"
else
say "instantiate: cargo bench --bench instantiate -- --iters $micro_iters --module ${echo_wasm#"$root/"}"
if "${srv_pin[@]}" cargo bench --quiet --bench instantiate -- --iters "$micro_iters" \
      --module "$echo_wasm" >"$logs/instantiate.stdout" 2>"$logs/instantiate.log"; then
  grep '^{' "$logs/instantiate.stdout" >>"$results" \
    || note --test instantiate --server wasm --failed "no JSON line from the benchmark"
else
  note --test instantiate --server wasm --failed "cargo bench failed: $(tail -1 "$logs/instantiate.log")"
fi
fi

t_end=$(date +%s)
case "$mode" in
  full|quick) durations="warm-up $warmup + $dur measured per load test; churn $churn_clients clients; ping-pong 100 connections; bulk 10 connections; idle $idle_ns connections; start-up $startup_runs runs; micro $micro_iters iterations" ;;
  smoke) durations="smoke: warm-up $warmup + $dur per load test; churn $churn_clients clients; idle $idle_ns connections; start-up $startup_runs runs; micro $micro_iters iterations" ;;
esac
rc=0
"$loadgen" report --results "$results" --out "$out" --mode "$mode" \
  --started "$started_at" --loadavg "$loadavg_start" --nproc "$ncpu" \
  --pinning "$pinning" --durations "$durations" \
  --servers "\`bench/target/release/native-echo\`; \`target/$server_profile/wasm-sockserver --module ${echo_wasm#"$root/"}\` with default limits and \`RUST_LOG=warn\` (the default \`info\` logs one line per connection); the micro benchmark runs the same component" \
  --elapsed "$((t_end - t_battery)) s for the tests (builds excluded)" || rc=$?
# The hand-written analysis (goals, per-language figures, tuning
# experiments) follows the generated tables in the full report.
if [ "$mode" = full ] && [ -f "$root/bench/ANALYSIS.md" ]; then
  { echo; cat "$root/bench/ANALYSIS.md"; } >>"$out"
fi
cat "$out"
say "report: $out (tests took $((t_end - t_battery)) s, $((t_end - t_start)) s with builds)"
if [ "$rc" -ne 0 ]; then
  say "some tests failed or saw client errors: see the report and $logs/"
fi
exit "$rc"
