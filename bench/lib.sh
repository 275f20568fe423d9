# bench/lib.sh — helpers shared by Stowage's own bench sections (sourced, not
# run). Results go to $OUT_TSV in peers.sh's format, one row per figure:
#   section, test, unit, median, min, max, note
# so that bench/cmd/benchreport reads them with the peers' rows.
# The sourcing script sets OUT_TSV, RUNS, SETTLE, W (its scratch directory)
# and LOGF (command output), and may add PIDs it starts to BG_PIDS.

now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
log() { printf '[%s] %s: %s\n' "$(date +%T)" "${LOGTAG:-bench}" "$*" >&2; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep "${SETTLE:-3}"; }
alloc_mib() { du -m "$1" | awk '{ print $1 }'; }

# stats V...: median, min and max, tab-separated
stats() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { n = NR
        m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        printf "%.3f\t%.3f\t%.3f", m, v[1], v[n] }'
}

# pct P V...: the P-th percentile (0..100, nearest rank) of V...
pct() {
    local p=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v p="$p" '{ v[NR] = $1 } END {
        i = int(p / 100 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.3f", v[i] }'
}

# emit SEC TEST UNIT NOTE V...: one result row
emit() {
    local sec=$1 name=$2 unit=$3 note=$4
    shift 4
    printf '%s\t%s\t%s\t%s\t%s\n' "$sec" "$name" "$unit" "$(stats "$@")" "$note" >>"$OUT_TSV"
    log "$sec | $name | $(stats "$@" | cut -f1) $unit | $note"
}
emit_fail() { # emit_fail SEC TEST UNIT WHY
    printf '%s\t%s\t%s\t-\t-\t-\tFAILED: %s\n' "$1" "$2" "$3" "$4" >>"$OUT_TSV"
    log "$1 | $2 | FAILED: $4"
    FAILS=$((${FAILS:-0} + 1))
}

# timed BYTES PREP CMD: RUNS times PREP (untimed) then CMD (timed, then
# `sync` inside the timing when SYNC=1); sets VALS to MiB/s of BYTES (or ms
# when BYTES=0). Returns 1 (and sets ERR) when a command fails.
timed() {
    local bytes=$1 prep=$2 cmd=$3 i t0 t1
    VALS=() ERR=
    for ((i = 0; i < RUNS; i++)); do
        if ! eval "$prep" >>"$LOGF" 2>&1; then ERR="prep failed: $(tail -n 1 "$LOGF")"; return 1; fi
        t0=$(now_us)
        if ! eval "$cmd" >>"$LOGF" 2>&1; then ERR="$(tail -n 1 "$LOGF" | tr '\t' ' ' | cut -c1-160)"; return 1; fi
        [[ ${SYNC:-0} == 1 ]] && sync
        t1=$(now_us)
        if ((bytes > 0)); then
            VALS+=("$(awk -v b="$bytes" -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", b / 1048576 / (us / 1e6) }')")
        else
            VALS+=("$(awk -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", us / 1000 }')")
        fi
    done
}

# bench SEC TEST BYTES PREP CMD [NOTE]: timed, then one row
bench() {
    local sec=$1 name=$2 bytes=$3 prep=$4 cmd=$5 note=${6:-} unit=MiB/s
    ((bytes > 0)) || unit=ms
    echo "### $sec / $name" >>"$LOGF"
    if timed "$bytes" "$prep" "$cmd"; then emit "$sec" "$name" "$unit" "$note" "${VALS[@]}"
    else emit_fail "$sec" "$name" "$unit" "$ERR"; fi
}

# bg CMD...: start a background process (output to LOGF); sets BG
bg() {
    "$@" >>"$LOGF" 2>&1 &
    BG=$!
    BG_PIDS+=("$BG")
}
# stop PID: stop one process this script started
stop() {
    local p=$1 q keep=()
    [[ -n $p ]] || return 0
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    for q in "${BG_PIDS[@]}"; do [[ $q == "$p" ]] || keep+=("$q"); done
    BG_PIDS=("${keep[@]}")
}
stop_all() { local p; for p in "${BG_PIDS[@]}"; do stop "$p"; done; }
BG_PIDS=()

# wait_nbd URI PID: until the NBD server answers (or PID died)
wait_nbd() {
    local i
    for ((i = 0; i < 400; i++)); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# freeport: a TCP port nothing listens on (a few tries among 20000-40000)
freeport() {
    local p
    for p in $(shuf -i 20000-40000 -n 50); do
        [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]] && { echo "$p"; return 0; }
    done
    return 1
}
