# Sourced by start-cluster.sh and stop-cluster.sh: the cluster's private folder, and how a PID is
# told apart from a later process that got the same number.

private_dir() {
    # private_dir DIR [check]: make DIR (mode 0700) unless it exists; then accept it only if it is
    # a real folder (not a link), owned by us and writable by us alone. With `check`, an absent
    # DIR is accepted and not made. A folder someone else made first (a name in /tmp is easy to
    # guess) would give them Ray's sockets, logs and our pid files.
    local dir=$1 mode
    if [[ ! -e "$dir" && ! -L "$dir" ]]; then
        [[ "${2:-}" == check ]] && return 0
        mkdir -p -- "$(dirname -- "$dir")"
        mkdir -m 0700 -- "$dir" || true   # if someone made it meanwhile, the checks below decide
    fi
    if [[ -L "$dir" || ! -d "$dir" ]]; then
        log "error: $dir is not a folder (or is a symbolic link): choose another RAY_TEMP_DIR"
        return 1
    fi
    if [[ ! -O "$dir" ]]; then
        log "error: $dir belongs to another user ($(stat -c %U -- "$dir" 2>/dev/null || echo unknown)):" \
            "it is not safe to use; choose another RAY_TEMP_DIR or RAY_PORT"
        return 1
    fi
    mode=$(stat -c %a -- "$dir" 2>/dev/null || stat -f %Lp -- "$dir")
    if (((8#$mode & 8#022) != 0)); then
        log "error: $dir is writable by other users (mode $mode): run chmod 700 on it, or choose another RAY_TEMP_DIR"
        return 1
    fi
    if (((8#$mode & 8#077) != 0)); then
        chmod 0700 -- "$dir"   # ours: Ray's logs inside hold secrets, so close it to others
    fi
}

start_time() {
    # start_time PID: the process's start time (clock ticks since boot), field 22 of /proc/PID/stat.
    local stat fields
    stat=$(<"/proc/$1/stat") || return 1
    stat=${stat##*) }   # drop "pid (comm) ": comm may hold spaces
    read -r -a fields <<<"$stat"
    printf '%s\n' "${fields[19]}"
}
