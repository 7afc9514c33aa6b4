#!/usr/bin/env bash
# Hold many idle connections at once (the issue's 100k) with several server
# processes sharing one port through `--reuse-port`, so that no single
# process needs more descriptors or memory mappings than its limits allow.
#
#   bash bench/hold.sh                 100000 connections, native then wasm
#   --conns N                          connections to hold (default 100000)
#   --per-proc N                       connections per server process (default
#                                      8000: within the default
#                                      vm.max_map_count of 65530)
#   --kinds "native wasm"              which servers to run
#   --settle DURATION                  how long every load generator holds its
#                                      connections before checking them again
#                                      (default 20s; the peak column shows
#                                      whether all were open at once)
#   --out FILE                         report (default bench/results/hold.md)
#   --skip-build                       reuse the binaries already built
#
# For each kind: start P server processes on one 127.0.0.1 port, open the
# connections from L load generator processes (`loadgen idle`: connect, one
# 64 B echo, hold), sample the server-side ESTABLISHED sockets (`ss`) and the
# servers' summed RSS while they are held, then every connection must echo
# once more before it is closed. Nothing is pinned: every process shares the
# CPUs. Exits non-zero when a connection failed or the peak fell short.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
unset CARGO_TARGET_DIR

conns=100000
per_proc=8000
kinds="native wasm"
settle=20s
out="$root/bench/results/hold.md"
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns="$2"; shift ;;
    --per-proc) per_proc="$2"; shift ;;
    --kinds) kinds="$2"; shift ;;
    --settle) settle="$2"; shift ;;
    --out) out="$2"; shift ;;
    --skip-build) build=0 ;;
    -h|--help) sed -n '2,24p' "$root/bench/hold.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "hold.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
say() { printf 'hold: %s\n' "$*" >&2; }

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] && nofile=1048576
max_map_count=$(cat /proc/sys/vm/max_map_count)
if [ "$((per_proc + 1000))" -gt "$nofile" ]; then
  echo "hold.sh: --per-proc $per_proc needs an open-file limit of $((per_proc + 1000)); it is $nofile (lower --per-proc, or raise it: ulimit -Hn 1048576 && ulimit -n 1048576)" >&2
  exit 2
fi
procs=$(( (conns + per_proc - 1) / per_proc ))
each=$(( (conns + procs - 1) / procs ))
# The kernel hashes clients over the listeners, so one process can get a few
# percent more than its share: leave headroom under --max-connections.
max_conns=$(( each + each / 10 + 100 ))
need_maps=$(( 2 * max_conns + 4 * (each + each / 10) + 2000 ))
if [ "$need_maps" -gt "$max_map_count" ]; then
  echo "hold.sh: $each connections per process need about $need_maps memory mappings, above vm.max_map_count ($max_map_count): lower --per-proc, or sysctl -w vm.max_map_count=1048576" >&2
  exit 2
fi
lg_each=$(( nofile - 1000 < 15000 ? nofile - 1000 : 15000 ))
lgs=$(( (conns + lg_each - 1) / lg_each ))
lg_each=$(( (conns + lgs - 1) / lgs ))
# Each source address gives about 28k client ports toward one server port.
sources=$(( conns / 20000 + 1 ))

for tool in ss python3; do
  command -v "$tool" >/dev/null || { echo "hold.sh: needs $tool (apt-get install iproute2 python3)" >&2; exit 2; }
done
# shellcheck source=bench/common.sh
. "$root/bench/common.sh"
if [ "$build" = 1 ]; then
  say "building bench/, the server and the guests"
  build_all
fi
server="$root/target/release/wasm-sockserver"
echo_wasm=$echo_wasm_default
require hold.sh "$loadgen" "$native" "$server" "$echo_wasm"

work="$root/bench/results/hold"
mkdir -p "$work"
rm -f "$work"/*
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# status_sum FIELD PID...: a /proc/PID/status field (kB) summed over PIDs.
status_sum() {
  local field=$1 pid total=0 kb
  shift
  for pid in "$@"; do
    kb=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}
rss_sum() { status_sum VmRSS "$@"; }
# Page tables are not in RSS; a sandbox's slots each touch their own.
pte_sum() { status_sum VmPTE "$@"; }

# wait_listening FILE PID: the server's `listening on` address.
wait_listening() {
  local i
  for i in $(seq 1 1200); do
    if grep -q '^listening on ' "$1" 2>/dev/null; then
      sed -n 's/^listening on //p' "$1" | head -1
      return 0
    fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
loadavg=$(cat /proc/loadavg)
rows=()
rc=0
for kind in $kinds; do
  say "$kind: $procs server processes, $conns connections from $lgs load generators"
  servers=()
  addr=127.0.0.1:0
  for i in $(seq 1 "$procs"); do
    if [ "$kind" = native ]; then
      cmd=("$native" --listen "$addr" --reuse-port)
    else
      cmd=("$server" --module "$echo_wasm" --listen "$addr" --reuse-port
           --max-connections "$max_conns" --shutdown-timeout 2s)
    fi
    RUST_LOG=warn "${cmd[@]}" >"$work/$kind-$i.stdout" 2>"$work/$kind-$i.log" &
    pid=$!
    pids+=("$pid")
    servers+=("$pid")
    if ! got=$(wait_listening "$work/$kind-$i.stdout" "$pid"); then
      echo "hold.sh: $kind server $i did not start: $(tail -1 "$work/$kind-$i.log")" >&2
      exit 1
    fi
    addr=$got
  done
  port=${addr##*:}
  rss_before=$(rss_sum "${servers[@]}")
  pte_before=$(pte_sum "${servers[@]}")

  lg_pids=()
  for i in $(seq 1 "$lgs"); do
    n=$(( conns - (i - 1) * lg_each < lg_each ? conns - (i - 1) * lg_each : lg_each ))
    "$loadgen" idle --conns "$n" --sources "$sources" --settle "$settle" --concurrency 64 \
      --addr "$addr" --server "$kind" --test "hold-$conns" \
      >"$work/$kind-lg-$i.json" 2>"$work/$kind-lg-$i.log" &
    lg_pids+=("$!")
    pids+=("$!")
  done
  # Sample until every load generator is done: the peak of server-side
  # ESTABLISHED sockets, and the servers' RSS when it was reached.
  peak=0 rss_peak=$rss_before pte_peak=$pte_before
  while :; do
    running=0
    for pid in "${lg_pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ "$running" = 1 ] || break
    est=$(ss -Htn state established "( sport = :$port )" | wc -l)
    if [ "$est" -gt "$peak" ]; then
      peak=$est
      rss_peak=$(rss_sum "${servers[@]}")
      pte_peak=$(pte_sum "${servers[@]}")
    elif [ "$est" -eq "$peak" ] && [ "$est" -gt 0 ]; then
      # Instances settle after their sockets are counted: take the later RSS.
      rss_peak=$(rss_sum "${servers[@]}")
      pte_peak=$(pte_sum "${servers[@]}")
    fi
    sleep 0.5
  done
  lg_rc=0
  for pid in "${lg_pids[@]}"; do wait "$pid" || lg_rc=1; done
  for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${servers[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done

  row=$(python3 - "$kind" "$conns" "$procs" "$lgs" "$peak" "$rss_before" "$rss_peak" \
        "$pte_before" "$pte_peak" "$lg_rc" "$work"/"$kind"-lg-*.json <<'EOF'
import json, sys
kind, conns, procs, lgs, peak, before, at_peak, pte_before, pte_peak, lg_rc = sys.argv[1:11]
runs = []
for path in sys.argv[11:]:
    with open(path) as f:
        runs += [json.loads(l) for l in f if l.startswith("{")]
est = sum(r.get("conns", 0) for r in runs)
alive = sum(r.get("alive", 0) for r in runs)
errors = sum(r.get("errors", 0) for r in runs)
setup = max((r.get("setup_s", 0) for r in runs), default=0)
ok = len(runs) == int(lgs) and lg_rc == "0" and est == alive == int(conns) == int(peak) and errors == 0
per = (int(at_peak) - int(before)) / int(peak) if int(peak) else 0
pte = (int(pte_peak) - int(pte_before)) / int(peak) if int(peak) else 0
print(f"| {kind} | {procs} | {int(conns):,} | {int(peak):,} | {alive:,} | {errors} | "
      f"{setup:.1f} s | {int(before) / 1024:.0f} MiB | {int(at_peak) / 1024:.0f} MiB | {per:.1f} KiB | "
      f"{pte:.1f} KiB | {'yes' if ok else 'NO'} |")
EOF
)
  rows+=("$row")
  case "$row" in *"| NO |") rc=1 ;; esac
  say "$row"
done

mkdir -p "$(dirname "$out")"
{
  echo "## Holding $conns connections with \`--reuse-port\` (\`bench/hold.sh\`)"
  echo
  echo "Started $started_at; load average at start: $loadavg; $(nproc) CPUs, nothing pinned."
  echo "$procs server processes per kind on one port ($each connections each,"
  echo "\`--max-connections $max_conns\` for wasm), $lgs load generator processes,"
  echo "$sources source addresses, settle $settle; open-file limit $nofile per process,"
  echo "vm.max_map_count $max_map_count."
  echo
  echo "| server | processes | connections | peak ESTABLISHED (server side) | answered again after the hold | client errors | slowest set-up | RSS before (all processes) | RSS held | RSS per connection | page tables per connection (VmPTE, not in RSS) | all held at once |"
  echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
exit "$rc"
