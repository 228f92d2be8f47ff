#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: one head and NUM_WORKERS worker nodes, each a
# separate `ray start --block` process, so sweeps can be tried against a real `--address` before
# going to a cluster.
#
#   eval "$(cluster/local/start-cluster.sh)"          # exports RAY_ADDRESS and RAY_AUTH_MODE
#   distillsweep sweep search_spaces/quickstart.yaml --address "$RAY_ADDRESS"
#   cluster/local/stop-cluster.sh                       # same RAY_PORT / RAY_TEMP_DIR as here
#
# stdout carries only the `export ...` line; progress goes to stderr.
#
# Parameters (environment variables):
#   RAY_PORT             GCS port of the head (default 6390, away from Ray's default 6379)
#   NUM_WORKERS          worker nodes besides the head (default 1)
#   CPUS_PER_WORKER      CPUs each worker advertises (default 1)
#   GPUS_PER_WORKER      GPUs each worker advertises (default 0)
#   HEAD_CPUS            CPUs the head advertises (default 1; 0 keeps trials off the head)
#   OBJECT_STORE_MEMORY  bytes of object store per node (default 300000000; Ray's own default,
#                        30% of RAM per node, is too much for several nodes on one machine)
#   RAY_TEMP_DIR         this cluster's private folder (default /tmp/distillsweep-ray-$UID-$RAY_PORT):
#                        Ray's sessions in ray/, the pid files and logs of this script in launcher/.
#                        Created 0700; an existing one must be yours and writable by you alone.
#                        Kept short because Ray's socket paths must stay under 107 characters
#   START_TIMEOUT        seconds to wait for all nodes (default 90)
#   RAY_BIN              the `ray` executable (default: `ray` on PATH)
#   RAY_AUTH_MODE        token (default) or disabled; disabled is refused unless
#   ALLOW_UNAUTHENTICATED=1 is set too (then a warning is printed)
#
# Notes for Ray 2.60 on one machine:
# * Each node needs no port of its own: Ray picks free node-manager / object-manager / worker
#   ports when they are not given. Only the head's --port is fixed.
# * `--node-ip-address 127.0.0.1` is replaced by the host's routable address (Ray swaps loopback
#   addresses for it), and Ray listens on all interfaces: the cluster is protected by token
#   authentication, which is why it stays on by default and turning it off takes two variables.
# * Ray makes its temp folder world-writable (mode 0777, no sticky bit): its sockets, logs and
#   session files would be open to every local user. Ray's folder is therefore ray/ inside the
#   private RAY_TEMP_DIR, which nobody else can enter. The folder is per user and per port, in
#   /tmp rather than XDG_RUNTIME_DIR: that is a small tmpfs, removed at logout, and Ray spills
#   objects into its temp folder.
# * `ray start --head` turns token authentication on when ~/.ray/auth_token exists, but
#   `ray start --address` (workers), `ray status` and `ray.init(address=...)` only use it when
#   RAY_AUTH_MODE=token is set: it is exported to every process started here and printed for
#   the shell that runs `distillsweep`.
# * The cluster is stopped by PID (SIGTERM to each `ray start --block`, which takes its Ray
#   processes down with it), never with `ray stop`, which would kill every Ray process on the
#   machine, other users' included.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6390}"
NUM_WORKERS="${NUM_WORKERS:-1}"
CPUS_PER_WORKER="${CPUS_PER_WORKER:-1}"
GPUS_PER_WORKER="${GPUS_PER_WORKER:-0}"
HEAD_CPUS="${HEAD_CPUS:-1}"
OBJECT_STORE_MEMORY="${OBJECT_STORE_MEMORY:-300000000}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/distillsweep-ray-$UID-$RAY_PORT}"
START_TIMEOUT="${START_TIMEOUT:-90}"
RAY_BIN="${RAY_BIN:-ray}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# A stopping node drains for up to 30 s by default; nothing here needs draining.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

STATE_DIR="$RAY_TEMP_DIR/launcher"   # pid files and logs of the `ray start` processes
ADDRESS="127.0.0.1:$RAY_PORT"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[local-cluster] %s\n' "$*" >&2; }

case "$RAY_AUTH_MODE" in
    token) ;;
    disabled)
        if [[ "${ALLOW_UNAUTHENTICATED:-0}" != 1 ]]; then
            log "error: RAY_AUTH_MODE=disabled starts Ray without authentication, listening on all"
            log "  interfaces: anyone who reaches this machine could run code as you. Keep the default"
            log "  (token), or set ALLOW_UNAUTHENTICATED=1 as well on a machine no one else reaches."
            exit 2
        fi
        log "WARNING: ================================================================="
        log "WARNING: Ray authentication is OFF (RAY_AUTH_MODE=disabled, ALLOW_UNAUTHENTICATED=1)."
        log "WARNING: Ray listens on all interfaces: anyone who reaches this machine can run"
        log "WARNING: code as $(id -un) through this cluster until stop-cluster.sh stops it."
        log "WARNING: ================================================================="
        ;;
    *)
        log "error: RAY_AUTH_MODE must be token or disabled, got $(printf %q "$RAY_AUTH_MODE")"
        exit 2
        ;;
esac

for name in RAY_PORT NUM_WORKERS CPUS_PER_WORKER GPUS_PER_WORKER HEAD_CPUS OBJECT_STORE_MEMORY START_TIMEOUT; do
    if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
        log "error: $name must be a whole number, got '${!name}'"
        exit 2
    fi
done
if ! command -v "$RAY_BIN" >/dev/null 2>&1; then
    log "error: '$RAY_BIN' not found: install the project (pip install -e .) or set RAY_BIN"
    exit 2
fi

# shellcheck source=private-dir.sh
source "$HERE/private-dir.sh"
private_dir "$RAY_TEMP_DIR" || exit 1

alive() { [[ "$1" =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null; }

if [[ -f "$STATE_DIR/head.pid" ]] && read -r pid _ <"$STATE_DIR/head.pid" && alive "$pid"; then
    log "error: a cluster started from $STATE_DIR is running; stop it with RAY_PORT=$RAY_PORT $HERE/stop-cluster.sh"
    exit 1
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
    log "error: port $RAY_PORT is in use; choose another RAY_PORT"
    exit 1
fi

if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" \
      && ! -s "$HOME/.ray/auth_token" ]]; then
    log "generating a Ray authentication token in ~/.ray/auth_token"
    "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1
fi

mkdir -p -m 0700 "$STATE_DIR"
rm -f "$STATE_DIR"/*.pid

# On any failure below, take down what was started.
cleanup_on_failure() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -ne 0 ]]; then
        for f in "$STATE_DIR"/*.log; do
            [[ -f "$f" ]] || continue
            log "--- last lines of $f"
            tail -n 15 "$f" >&2 || true
        done
        log "start-up failed; stopping what was started"
        RAY_PORT="$RAY_PORT" RAY_TEMP_DIR="$RAY_TEMP_DIR" "$HERE/stop-cluster.sh" >&2 || true
    fi
    exit "$rc"
}
trap cleanup_on_failure EXIT
trap 'exit 130' INT TERM

active_nodes() {
    # Count the nodes `ray status` lists under "Active:".
    local status
    status=$("$RAY_BIN" status --address "$ADDRESS" 2>/dev/null) || status=""
    awk '/^Active:/ {on = 1; next} /^[A-Z][a-z]+:/ {on = 0} on && /node_/ {n++} END {print n + 0}' <<<"$status"
}

record_pid() {
    # record_pid NAME PID: the PID and its start time, which stop-cluster.sh checks before a kill.
    printf '%s %s\n' "$2" "$(start_time "$2")" >"$STATE_DIR/$1.pid"
}

wait_for_nodes() {
    local want=$1 deadline=$((SECONDS + START_TIMEOUT)) have=0 pid
    while ((SECONDS < deadline)); do
        for f in "$STATE_DIR"/*.pid; do
            read -r pid _ <"$f"
            if ! alive "$pid"; then
                log "error: $(basename "$f" .pid) exited during start-up"
                return 1
            fi
        done
        if (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
            have=$(active_nodes)
            if ((have >= want)); then
                return 0
            fi
        fi
        sleep 1
    done
    log "error: $have of $want nodes active after ${START_TIMEOUT}s"
    return 1
}

log "starting the head on $ADDRESS (temp dir $RAY_TEMP_DIR)"
nohup "$RAY_BIN" start --head --block \
    --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --object-store-memory "$OBJECT_STORE_MEMORY" \
    --include-dashboard false --disable-usage-stats --temp-dir "$RAY_TEMP_DIR/ray" \
    >"$STATE_DIR/head.log" 2>&1 </dev/null &
record_pid head $!
wait_for_nodes 1

for i in $(seq 1 "$NUM_WORKERS"); do
    log "starting worker $i ($CPUS_PER_WORKER CPU, $GPUS_PER_WORKER GPU)"
    nohup "$RAY_BIN" start --block --address "$ADDRESS" \
        --node-ip-address 127.0.0.1 \
        --num-cpus "$CPUS_PER_WORKER" --num-gpus "$GPUS_PER_WORKER" \
        --object-store-memory "$OBJECT_STORE_MEMORY" --disable-usage-stats \
        >"$STATE_DIR/worker-$i.log" 2>&1 </dev/null &
    record_pid "worker-$i" $!
    # One at a time: several raylets starting at once on a busy machine can miss Ray's
    # start-up deadline.
    wait_for_nodes $((i + 1))
done

log "Ray cluster up: head + $NUM_WORKERS worker(s), $((NUM_WORKERS + 1)) nodes active at $ADDRESS"
log "  distillsweep sweep search_spaces/quickstart.yaml --address $ADDRESS   # with RAY_AUTH_MODE=$RAY_AUTH_MODE"
log "  ray status --address $ADDRESS"
log "  RAY_PORT=$RAY_PORT RAY_TEMP_DIR=$(printf %q "$RAY_TEMP_DIR") $(printf %q "$HERE")/stop-cluster.sh"
printf 'export RAY_ADDRESS=%q RAY_AUTH_MODE=%q\n' "$ADDRESS" "$RAY_AUTH_MODE"
