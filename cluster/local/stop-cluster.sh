#!/usr/bin/env bash
# Stop the local cluster started by start-cluster.sh (give it the same RAY_PORT / RAY_TEMP_DIR).
#
# Only the processes that start-cluster.sh started are stopped, by PID (checked against the start
# time recorded with it, so a PID the system has since given to another process is left alone,
# and refused if the folder is not private to us): SIGTERM to each
# `ray start --block` (workers first, then the head), which shuts its Ray processes down; after
# STOP_TIMEOUT seconds, SIGKILL to whatever of that process tree is left. Other Ray clusters on
# the machine are left alone (`ray stop` would stop them all).
#
# Parameters (environment variables):
#   RAY_PORT      as for start-cluster.sh (default 6390)
#   RAY_TEMP_DIR  as for start-cluster.sh (default /tmp/distillsweep-ray-$UID-$RAY_PORT)
#   STOP_TIMEOUT  seconds to wait for a graceful stop (default 30)
#   REMOVE_TEMP   1: delete RAY_TEMP_DIR (Ray's logs) afterwards (default 0)
set -euo pipefail

RAY_PORT="${RAY_PORT:-6390}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/distillsweep-ray-$UID-$RAY_PORT}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
REMOVE_TEMP="${REMOVE_TEMP:-0}"
STATE_DIR="$RAY_TEMP_DIR/launcher"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[local-cluster] %s\n' "$*" >&2; }

# shellcheck source=private-dir.sh
source "$HERE/private-dir.sh"

alive() { kill -0 "$1" 2>/dev/null; }

started_here() {
    # started_here PID STARTED: the process is the one start-cluster.sh recorded (same start time,
    # so not a recycled PID) and still a `ray start ... --block`.
    local cmdline
    [[ "$1" =~ ^[0-9]+$ && -n "$2" && "$(start_time "$1" 2>/dev/null)" == "$2" ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ "$cmdline" == *" start "*"--block"* ]]
}

descendants() {
    # Every process below $1 in the process tree (children first level, then theirs, ...).
    ps -eo pid=,ppid= | awk -v root="$1" '
        {parent[$1] = $2}
        END {
            found[root] = 1
            do {
                added = 0
                for (p in parent) if (!(p in found) && (parent[p] in found)) {found[p] = 1; added = 1}
            } while (added)
            for (p in found) if (p != root) print p
        }'
}

private_dir "$RAY_TEMP_DIR" check || exit 1
if [[ ! -d "$STATE_DIR" ]]; then
    log "no cluster state in $STATE_DIR: nothing to stop"
    exit 0
fi

shopt -s nullglob
pidfiles=("$STATE_DIR"/worker-*.pid)
[[ -f "$STATE_DIR/head.pid" ]] && pidfiles+=("$STATE_DIR/head.pid")

declare -a roots=() tree=()
for f in "${pidfiles[@]}"; do
    read -r pid started <"$f" || true
    if started_here "${pid:-}" "${started:-}"; then
        roots+=("$pid")
        mapfile -t -O "${#tree[@]}" tree < <(descendants "$pid")
    fi
done

if ((${#roots[@]} == 0)); then
    log "no running node found in $STATE_DIR"
else
    log "stopping ${#roots[@]} node(s): ${roots[*]}"
    for pid in "${roots[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    for pid in "${roots[@]}"; do
        while alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.2
        done
    done
    # Whatever outlived its `ray start` (or the timeout) goes now.
    left=()
    for pid in "${roots[@]}" "${tree[@]}"; do
        alive "$pid" && left+=("$pid")
    done
    if ((${#left[@]} > 0)); then
        sleep 1
        for pid in "${left[@]}"; do
            if alive "$pid"; then
                log "killing leftover process $pid"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
    fi
    log "stopped"
fi

rm -f "${pidfiles[@]}"
if [[ "$REMOVE_TEMP" == 1 ]]; then
    rm -rf "$RAY_TEMP_DIR"
fi
