#!/usr/bin/env bash
# tools-relay.sh - Hermod measured with Postfix's own tools, beside the
# direct path of the same tools, alternated in one run:
#
#   direct: smtp-source --> 127.0.0.2:2526 smtp-sink
#   hermod: smtp-source --> 127.0.0.1:2525 hermod (spool fsynced)
#                       --> MX of d0001.test = 127.0.0.2:2526 smtp-sink
#
# This is the calibration of issue 5 ("smtp-source straight into smtp-sink
# reaches 8,000-13,000 msg/s reusing connections"): the ratio hermod/direct
# with the same source and sink, and hermod's CPU per message.
#
# Usage: tools-relay.sh [N] [SESSIONS] [ROUNDS]   (defaults 50000 50 2)
# Needs `make build` and smtp-source/smtp-sink (../shared/peers/postfix-setup.sh
# or apt-get install postfix). Every run is bounded by N and by MAX_S (120 s);
# everything listens on loopback only. Postfix itself is not started.
set -uo pipefail
N=${1:-50000}
S=${2:-50}
ROUNDS=${3:-2}
L=${L:-1024}
MAX_S=${MAX_S:-120}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${HERMOD_BIN:-$ROOT/bin}
WORK=${WORK:-$(mktemp -d /tmp/tools-relay.XXXXXX)}
SINK=127.0.0.2:2526
HERMOD=127.0.0.1:2525
DNS=127.0.0.1:5399
HTTP=127.0.0.1:8025
hz=$(getconf CLK_TCK)

command -v smtp-source >/dev/null || { echo "smtp-source missing: run ../shared/peers/postfix-setup.sh or apt-get install postfix" >&2; exit 1; }
[ -x "$B/hermod" ] && [ -x "$B/hermod-bench" ] || { echo "run make build first" >&2; exit 1; }
for a in $SINK $HERMOD $DNS $HTTP; do
  if ss -ltnu | grep -q " $a "; then echo "$a already in use" >&2; exit 1; fi
done

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT INT TERM

timeout $((MAX_S * ROUNDS * 4 + 300)) "$B/hermod-bench" dns -listen "$DNS" -mx 127.0.0.2 -domains 1 >"$WORK/dns.log" 2>&1 &
PIDS+=($!)

now() { date +%s.%N; }
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12+$13}'; }
sink_count() { tail -c 200 "$1" 2>/dev/null | tr '\r' '\n' | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1 | awk '{print $1+0} END{if(NR==0)print 0}'; }
busy_pct() {
  local a b; a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat); sleep "$1"
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  echo "$a $b" | awk '{printf "%d", 100*($3-$1)/($4-$2)}'
}
# wait up to QUIET_MAX_S for the machine to be under 15% busy
wait_quiet() { local end=$(( $(date +%s) + ${QUIET_MAX_S:-180} )); while [ "$(busy_pct 2)" -ge 15 ] && [ "$(date +%s)" -lt "$end" ]; do sleep 3; done; }

# start_sink TAG: smtp-sink counting messages (-c), PIPELINING announced.
start_sink() {
  timeout $((MAX_S * 2 + 60)) smtp-sink -c -u nobody "$SINK" 1024 >"$WORK/$1.sink.out" 2>&1 &
  SINK_PID=$!
  PIDS+=($SINK_PID)
  for _ in $(seq 50); do ss -ltn | grep -q " $SINK " && break; sleep 0.1; done
  SINK_CHILD=$(ps --ppid "$SINK_PID" -o pid= | tr -d ' ')
}
stop_sink() { kill "$SINK_PID" 2>/dev/null; wait "$SINK_PID" 2>/dev/null; }

source_opts=(-d -s "$S" -m "$N" -l "$L" -N -f sender@sender.test -t rcpt@d0001.test)

run_direct() {
  local tag=direct-$1
  wait_quiet
  start_sink "$tag"
  local k0 t0 t1 k1
  k0=$(ticks "$SINK_CHILD"); t0=$(now)
  /usr/bin/time -o "$WORK/$tag.time" -f '%U %S' timeout "$MAX_S" smtp-source "${source_opts[@]}" "$SINK" >"$WORK/$tag.src" 2>&1
  t1=$(now); k1=$(ticks "$SINK_CHILD")
  local got; got=$(sink_count "$WORK/$tag.sink.out")
  stop_sink
  read -r su ss <"$WORK/$tag.time" || { su=0; ss=0; }
  awk -v n="$N" -v got="$got" -v t0="$t0" -v t1="$t1" -v su="$su" -v ss="$ss" -v k="$((k1 - k0))" -v hz="$hz" 'BEGIN {
    e = t1 - t0
    printf "direct  round %s: %6.0f msg/s (%d at the sink in %.2fs) | source %.0f us/msg, sink %.0f us/msg\n", "'"$1"'", got/e, got, e, (su+ss)*1e6/n, k/hz*1e6/n }' | tee -a "$WORK/results.txt"
  echo "$got $t0 $t1" >"$WORK/$tag.fig"
}

run_hermod() {
  local tag=hermod-$1
  rm -rf "$WORK/spool"
  cat >"$WORK/hermod.toml" <<EOT
[server]
hostname = "relay.bench.test"
[smtp]
listen = ["$HERMOD"]
max_connections_per_ip = 500
[spool]
dir = "$WORK/spool"
[dns]
resolvers = ["$DNS"]
[delivery]
port = 2526
tls = "disabled"
[http]
listen = "$HTTP"
[log]
delivery_log = "$WORK/delivery.log"
level = "warn"
EOT
  wait_quiet
  start_sink "$tag"
  "$B/hermod" serve -config "$WORK/hermod.toml" >"$WORK/$tag.log" 2>&1 &
  local hp=$!
  PIDS+=($hp)
  for _ in $(seq 100); do curl -sf "http://$HTTP/healthz" >/dev/null && break; sleep 0.1; done
  local h0 k0 t0 ta t1 h1 k1 deadline
  h0=$(ticks "$hp"); k0=$(ticks "$SINK_CHILD"); t0=$(now)
  /usr/bin/time -o "$WORK/$tag.time" -f '%U %S' timeout "$MAX_S" smtp-source "${source_opts[@]}" "$HERMOD" >"$WORK/$tag.src" 2>&1
  ta=$(now)
  deadline=$(awk -v t="$ta" -v m="$MAX_S" 'BEGIN{printf "%.3f", t+m}')
  while [ "$(sink_count "$WORK/$tag.sink.out")" -lt "$N" ]; do
    if awk -v d="$deadline" -v n="$(now)" 'BEGIN{exit !(n>d)}'; then break; fi
    sleep 0.02
  done
  t1=$(now); h1=$(ticks "$hp"); k1=$(ticks "$SINK_CHILD")
  local got; got=$(sink_count "$WORK/$tag.sink.out")
  kill "$hp"; wait "$hp" 2>/dev/null
  stop_sink
  read -r su ss <"$WORK/$tag.time" || { su=0; ss=0; }
  awk -v n="$N" -v got="$got" -v t0="$t0" -v ta="$ta" -v t1="$t1" -v su="$su" -v ss="$ss" -v h="$((h1 - h0))" -v k="$((k1 - k0))" -v hz="$hz" 'BEGIN {
    printf "hermod  round %s: %6.0f msg/s end to end (%d at the sink in %.2fs; accepted in %.2fs) | hermod %.0f us/msg, source %.0f us/msg, sink %.0f us/msg\n", "'"$1"'", got/(t1-t0), got, t1-t0, ta-t0, h/hz*1e6/n, (su+ss)*1e6/n, k/hz*1e6/n }' | tee -a "$WORK/results.txt"
  echo "$got $t0 $t1" >"$WORK/$tag.fig"
}

echo "N=$N sessions=$S size=$L rounds=$ROUNDS work=$WORK" | tee "$WORK/results.txt"
for r in $(seq "$ROUNDS"); do
  run_direct "$r"
  run_hermod "$r"
  read -r dg d0 d1 <"$WORK/direct-$r.fig"
  read -r hg h0 h1 <"$WORK/hermod-$r.fig"
  awk -v dg="$dg" -v d0="$d0" -v d1="$d1" -v hg="$hg" -v h0="$h0" -v h1="$h1" 'BEGIN {
    printf "ratio   round %s: hermod / direct = %.2f\n", "'"$r"'", (hg/(h1-h0)) / (dg/(d1-d0)) }' | tee -a "$WORK/results.txt"
done
