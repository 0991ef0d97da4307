#!/usr/bin/env bash
# Call set-up rate through the real `patchbay` binary against sipp on the same machine.
#
# Reproduce (from the repository root):
#
#   runtime/patchbay/benches/callrate.sh                 # rates 200 500 1000 1500 cps
#   runtime/patchbay/benches/callrate.sh 1000 1200       # chosen rates
#
# For each rate R, two runs of sipp's built-in UAC (INVITE → 100/180/200 → ACK → BYE → 200,
# no pause: `-d 0`), each placing 10·R calls at R calls per second:
#
#   1. against `patchbay run` (release build) serving the stock `echo` flow, which answers
#      and waits for the caller's BYE — a fresh Patchbay per rate;
#   2. against sipp's built-in UAS (`sipp -sn uas`), the baseline the ratio is taken against.
#
# Reported per run, from sipp's own statistics (`-trace_stat` CSV, last row, and the final
# `-trace_screen` dump): calls created, successful, failed (with the non-zero failure
# counters), retransmissions, sipp's cumulative call rate, the achieved rate (successful calls
# divided by sipp's total run time, tail included) and the peak of simultaneous calls; and
# the CPU time Patchbay used during each run (from /proc/PID/stat, all threads).
#
# Environment: CARGO_TARGET_DIR (where the release binary is built), CALLRATE_OUT (where
# sipp's logs and the summary go; default $TARGET/callrate), CALLS_PER_RATE (calls = this × rate;
# default 10), RUST_LOG (passed to Patchbay; unset means its default, `info`),
# CALLRATE_SKIP_BUILD=1 (use the binary already built).
#
# Every run is bounded: sipp gets `-timeout 90` and an outer `timeout 100`.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${CALLRATE_OUT:-$TARGET/callrate}
CALLS_PER_RATE=${CALLS_PER_RATE:-10}
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(200 500 1000 1500)

if [ "${CALLRATE_SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -p patchbay --bin patchbay)
fi
BIN=$TARGET/release/patchbay
[ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 1; }
command -v sipp >/dev/null || { echo "sipp not found (Debian package sip-tester)" >&2; exit 1; }

mkdir -p "$OUT"
WORK=$(mktemp -d)
STARTED=()
cleanup() {
    for pid in "${STARTED[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STARTED=()
    rm -rf "$WORK"
}
trap cleanup EXIT

free_udp_port() {
    python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts Patchbay on a free port; sets PB_PID and PB_PORT once it says it is ready.
start_patchbay() {
    local dir=$WORK/patchbay-$1
    mkdir -p "$dir"
    PB_PORT=$(free_udp_port)
    cat >"$dir/patchbay.toml" <<EOF
[sip]
listen = ["udp:127.0.0.1:$PB_PORT"]
[flows]
cache_dir = "$WORK/flow-cache"
[[tenant]]
id = "bench"
domains = ["127.0.0.1"]
[[tenant.flow]]
name = "echo"
stock = "echo"
EOF
    "$BIN" run --config "$dir/patchbay.toml" >"$dir/stdout" 2>"$OUT/patchbay-$1.log" &
    PB_PID=$!
    STARTED+=("$PB_PID")
    # Wait (at most 60 s) for the readiness line.
    local deadline=$((SECONDS + 60))
    until grep -q "Press Ctrl-C" "$dir/stdout" 2>/dev/null; do
        kill -0 "$PB_PID" 2>/dev/null || { echo "patchbay exited; see $OUT/patchbay-$1.log" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "patchbay did not start in 60 s" >&2; exit 1; }
        sleep 0.2
    done
}

# Stops a process this script started and forgets it (so cleanup never signals a reused pid).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local kept=() pid
    for pid in "${STARTED[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
    STARTED=("${kept[@]}")
}

# Runs sipp's UAC against 127.0.0.1:$2 at rate $3; $1 names the run. Prints one table row.
run_uac() {
    local name=$1 port=$2 rate=$3 calls=$(($3 * CALLS_PER_RATE))
    local dir=$OUT/$name
    rm -rf "$dir"
    mkdir -p "$dir"
    local rc=0
    (cd "$dir" && timeout 100 sipp -sn uac -s echo "127.0.0.1:$port" -r "$rate" -m "$calls" -d 0 \
        -i 127.0.0.1 -p "$(free_udp_port)" -mp "$(free_udp_port)" -nostdin \
        -trace_stat -stf stat.csv -trace_screen -trace_err -timeout 90 -timeout_error \
        >sipp.out 2>&1) || rc=$?
    local screen
    screen=$(ls "$dir"/*_screen.log 2>/dev/null | head -1)
    local total_time peak
    total_time=$(sed -n 's/^ *[0-9.]*([0-9]* ms)\/[0-9.]*s *[0-9]* *\([0-9.]*\) s .*/\1/p' "$screen" | head -1)
    peak=$(sed -n 's/.*Peak was \([0-9]*\) calls.*/\1/p' "$screen" | head -1)
    awk -F';' -v name="$name" -v rate="$rate" -v calls="$calls" -v total_time="$total_time" \
        -v peak="$peak" -v rc="$rc" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        { for (i = 1; i <= NF; i++) last[i] = $i }
        END {
            ok = last[col["SuccessfulCall(C)"]]; failed = last[col["FailedCall(C)"]]
            created = last[col["TotalCallCreated"]]
            why = ""
            for (c in col) if (c ~ /^Failed.*\(C\)$/ && c != "FailedCall(C)" && last[col[c]] + 0 > 0)
                why = why " " c "=" last[col[c]]
            achieved = (total_time > 0) ? sprintf("%.0f", ok / total_time) : "?"
            fail_pct = (created > 0) ? sprintf("%.3f%%", 100 * (created - ok) / created) : "?"
            printf "| %s | %d | %d | %d | %d | %d | %s | %s | %s | %s s | %s | %s |%s\n", name, rate, calls,
                created, ok, failed, fail_pct, last[col["Retransmissions(C)"]], last[col["CallRate(C)"]],
                total_time, achieved, peak, (rc != 0 ? " sipp exit " rc : "") (why != "" ? " " why : "")
        }' "$dir/stat.csv" | tee -a "$OUT/summary.md"
}

# user and system CPU of a process so far, in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

{
    echo
    echo "callrate.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) rates: ${RATES[*]}, calls per run: ${CALLS_PER_RATE}×rate, RUST_LOG=${RUST_LOG:-<unset>}"
    echo
    echo "| run | target cps | calls | created | successful | failed | not successful | retrans | sipp CallRate(C) | total time | achieved cps | peak calls | notes"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---"
} | tee -a "$OUT/summary.md"

CPU_LINES=()
for rate in "${RATES[@]}"; do
    start_patchbay "$rate"
    cpu_before=$(cpu_ticks "$PB_PID")
    run_uac "patchbay-$rate" "$PB_PORT" "$rate"
    cpu_after=$(cpu_ticks "$PB_PID")
    stop "$PB_PID"

    uas_port=$(free_udp_port)
    sipp -sn uas -i 127.0.0.1 -p "$uas_port" -mp "$(free_udp_port)" -nostdin >/dev/null 2>&1 &
    uas_pid=$!
    STARTED+=("$uas_pid")
    sleep 0.5
    run_uac "sipp-uas-$rate" "$uas_port" "$rate"
    stop "$uas_pid"
    CPU_LINES+=("patchbay-$rate: $(((cpu_after - cpu_before) * 1000 / $(getconf CLK_TCK))) ms of CPU (user + system, all threads) during the run")
done
{
    echo
    for line in "${CPU_LINES[@]}"; do echo "- $line"; done
} | tee -a "$OUT/summary.md"
echo "logs: $OUT"
