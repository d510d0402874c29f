# Shared by the benchmarks: a private containerd (1.7 by default; HAKO_BENCH_CONTAINERD=2 for
# 2.x) under a temporary directory, `ctr` on it, hako configurations to compare, the run's
# conditions, statistics, result files and plots. Sourced, not run. Needs root and
# scripts/install.sh done.
#
# Results go to $HAKO_BENCH_OUT (default build/bench/<date>-<time>): each benchmark writes
# <name>.tsv (raw figures), <name>.md (its tables, with the conditions) and, where a picture
# helps, <name>.png.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
containerd_dir="$(ls -d /opt/hako/containerd/"${HAKO_BENCH_CONTAINERD:-1.7}"* 2>/dev/null | head -n1)"
[[ -n "$containerd_dir" ]] || { echo "bench: no containerd under /opt/hako/containerd: run scripts/setup.sh" >&2; exit 1; }
bin="$containerd_dir/usr/bin"
work="$(mktemp -d /tmp/hako-bench-XXXXXX)"
out="${HAKO_BENCH_OUT:-$repo/build/bench/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
cleanups=()
on_exit() {
    local i
    for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[i]}" || true; done
    rm -rf "$work"
}
trap on_exit EXIT

need_package() { # command package
    command -v "$1" >/dev/null && return
    echo "bench: installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null
}

ctr() { "$bin/ctr" --address "$work/containerd.sock" "$@"; }

start_containerd() {
    cat >"$work/config.toml" <<TOML
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
TOML
    PATH="/usr/local/bin:$bin:$PATH" "$bin/containerd" --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
    local pid=$!
    cleanups+=("kill $pid 2>/dev/null; wait $pid 2>/dev/null")
    for _ in $(seq 1 100); do ctr version >/dev/null 2>&1 && return; sleep 0.1; done
    echo "bench: containerd did not start: $(tail -n5 "$work/containerd.log")" >&2
    exit 1
}

# The busybox image (with extra host programs, see tests/images/busybox-image.sh) under REF.
import_image() { # ref [binary...]
    "$repo/tests/images/busybox-image.sh" "$work/image.tar" "$@" >/dev/null
    ctr image import "$work/image.tar" >/dev/null
    rm -f "$work/image.tar"
}

# hako_config LABEL [TOML...]: writes a hako configuration holding only the given lines (the
# rest are the built-in defaults) and prints its path, for `ctr run --runtime-config-path`.
hako_config() {
    local file="$work/hako-$1.toml"
    shift
    printf '%s\n' "$@" >"$file"
    echo "$file"
}

# The arguments that run a container with RUNTIME: "runc", "hako[:CONFIG]", or another
# containerd runtime by name, "io.containerd.<name>.v2[:CONFIG]" (such as an older hako build
# installed as containerd-shim-<name>-v2, to compare builds in one run).
runtime_args() {
    case "$1" in
        runc) echo "--runtime io.containerd.runc.v2" ;;
        hako) echo "--runtime io.containerd.hako.v2" ;;
        hako:*) echo "--runtime io.containerd.hako.v2 --runtime-config-path ${1#hako:}" ;;
        io.containerd.*:*) echo "--runtime ${1%%:*} --runtime-config-path ${1#*:}" ;;
        io.containerd.*) echo "--runtime $1" ;;
        *) echo "bench: unknown runtime $1" >&2; exit 1 ;;
    esac
}

containerd_version() { "$bin/containerd" --version | awk '{print $3}'; }

# What hako's shim said it booted with: "TCG" or "KVM", from its log line "qemu pid N (TCG...".
accelerator() {
    grep -o 'qemu pid [0-9]* ([A-Z]*' "$work/containerd.log" | head -n1 | awk '{print $4}' | tr -d '(' || true
}

# A markdown line with the run's conditions (call it after hako ran at least once).
conditions() { # [guest description]
    local cpu qemu runc_version
    cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    qemu="$(qemu-system-x86_64 --version | awk 'NR == 1 {print $4}')"
    runc_version="$(runc --version 2>/dev/null | awk 'NR == 1 {print $3}')"
    printf '%s; %s cores (%s), %s GiB, host kernel %s; containerd %s, runc %s; hako: QEMU %s under %s, %s\n' \
        "$(date -u +%Y-%m-%d)" "$(nproc)" "$cpu" "$(awk '/^MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)" \
        "$(uname -r)" "$(containerd_version)" "${runc_version:-?}" "$qemu" "$(accelerator)" \
        "${1:-1 vCPU, 512 MiB guest, virtio-fs cache auto}"
}

# pct SORTED_FILE P: the P-th percentile (nearest rank) of a sorted one-number-per-line file.
pct() {
    local count; count=$(wc -l <"$1")
    ((count > 0)) || { echo "-"; return; }
    sed -n "$(( (count * $2 + 99) / 100 ))p" "$1"
}

# column TSV KEY_COLUMN KEY VALUE_COLUMN: the values of the rows whose KEY_COLUMN is KEY,
# sorted numerically.
column() {
    awk -F'\t' -v k="$2" -v want="$3" -v v="$4" '$k == want {print $v}' "$1" | sort -g
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }

# tee_md FILE: prints stdin and appends it to the benchmark's markdown.
tee_md() { tee -a "$1"; }

# plot NAME: renders $out/NAME.gp (a gnuplot script that sets no terminal) to $out/NAME.png.
plot() {
    need_package gnuplot gnuplot-nox
    (cd "$out" && gnuplot -e "set terminal pngcairo size 1100,700 font 'sans,10'; set output '$1.png'" "$1.gp") &&
        echo "bench: plot $out/$1.png"
}

# pids_of COMM_PREFIX: the processes whose name starts with it.
pids_of() {
    local p
    for p in /proc/[0-9]*; do
        if [[ "$(cat "$p/comm" 2>/dev/null)" == "$1"* ]]; then echo "${p#/proc/}"; fi
    done
}

# hako_shims: the pids of hako's shims (runc's have another binary name).
hako_shims() {
    local p
    for p in $(pids_of containerd-shim); do
        if grep -q hako "/proc/$p/cmdline" 2>/dev/null; then echo "$p"; fi
    done
}

# smaps FIELD PID...: the sum of a smaps_rollup field (Pss, Rss) in KiB.
smaps() {
    local field="$1" total=0 p
    shift
    for p in "$@"; do
        total=$((total + $(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# ticks PID...: user + system CPU time in clock ticks.
ticks() {
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

mem_available_kib() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }

# stop_task ID: kills a container's task, deletes it and the container; waits for each step.
stop_task() {
    ctr task kill -s KILL "$1" >/dev/null 2>&1 || true
    local _
    for _ in $(seq 1 300); do
        ctr task delete "$1" >/dev/null 2>&1 && break
        ctr task ls -q 2>/dev/null | grep -qx "$1" || break
        sleep 0.05
    done
    ctr container delete "$1" >/dev/null 2>&1 || true
}

ms_since() { # start (an $EPOCHREALTIME)
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", (b - a) * 1000}'
}
