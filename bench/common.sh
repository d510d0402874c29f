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

# need_gvisor: gVisor's runsc, Debian's package from the suite HAKO_BENCH_GVISOR_SUITE names
# (default trixie), unpacked under /opt/hako/gvisor/<version>/ (not installed system-wide;
# fetched once). Not sid's by default: sid has the same gVisor release (20240729) built with
# Go 1.26, and that build's Sentry panics at random ("running on goroutine N (task goroutine
# for kernel.Task ... is 0)"; half the containers of a simple test died, none of trixie's,
# built with Go 1.24), which leaves `ctr run` hanging. Also writes the wrappers containerd's
# runc shim runs in runc's place (`ctr run --runc-binary`, see runtime_args): $work/runsc-none
# (`--network=none`, for containers given no network: ctr's default, a fresh empty namespace),
# $work/runsc-sandbox (runsc's default `--network=sandbox`: gVisor's own network stack,
# netstack, takes over the interfaces of the namespace the container joins) and
# $work/runsc-host (`--network=host`: the Sentry passes socket calls through to the host
# kernel's stack in that namespace). Sets $runsc and $gvisor_package.
gvisor_root=/opt/hako/gvisor
runsc=""
gvisor_package=""
need_gvisor() {
    [[ -n "$runsc" ]] && return
    local suite="${HAKO_BENCH_GVISOR_SUITE:-trixie}" version dir tmp deb
    version="$(apt-cache madison runsc 2>/dev/null | awk -v s="$suite" '$0 ~ " " s "/main" {print $3; exit}')"
    [[ -n "$version" ]] || {
        echo "bench: no runsc (gVisor) from Debian $suite in the apt lists: add $suite to the apt sources (pinned low, as for scripts/setup.sh) and run apt-get update" >&2
        exit 1
    }
    dir="$gvisor_root/$version"
    if [[ -x "$dir/usr/bin/runsc" ]]; then
        echo "bench: gVisor: runsc $version ($suite) present"
    else
        echo "bench: fetching gVisor: runsc $version from Debian $suite into $dir"
        tmp="$(mktemp -d)"
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "runsc=$version") >"$tmp/download.log" 2>&1 || {
            echo "bench: apt-get download runsc=$version failed (network, or stale apt lists: run apt-get update): $(tail -n3 "$tmp/download.log")" >&2
            rm -rf "$tmp"
            exit 1
        }
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        for deb in "$tmp"/*.deb; do
            dpkg-deb -x "$deb" "$dir.tmp" || { echo "bench: dpkg-deb -x $deb failed" >&2; rm -rf "$tmp" "$dir.tmp"; exit 1; }
        done
        rm -rf "$tmp" "$dir"
        mv "$dir.tmp" "$dir"
        [[ -x "$dir/usr/bin/runsc" ]] || { echo "bench: the runsc package $version holds no usr/bin/runsc" >&2; exit 1; }
    fi
    runsc="$dir/usr/bin/runsc"
    "$runsc" --version >/dev/null 2>&1 || { echo "bench: $runsc does not run: $("$runsc" --version 2>&1 | tail -n2)" >&2; exit 1; }
    # Which Go built it matters: gVisor reads the goroutine id at a fixed offset in Go's
    # runtime, which a newer Go than the release was made for can move.
    gvisor_package="Debian $suite $version, built with $(grep -a -o -m1 'go1\.[0-9]*\.[0-9]*' "$runsc" | head -n1)"
    printf '#!/bin/sh\nexec "%s" --network=none "$@"\n' "$runsc" >"$work/runsc-none"
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$runsc" >"$work/runsc-sandbox"
    printf '#!/bin/sh\nexec "%s" --network=host "$@"\n' "$runsc" >"$work/runsc-host"
    chmod 755 "$work/runsc-none" "$work/runsc-sandbox" "$work/runsc-host"
}

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

# The arguments that run a container with RUNTIME: "runc", "gvisor[:NETWORK]" (runsc through
# containerd's runc shim, after need_gvisor; NETWORK "none", the default, for containers given
# no network, or, for containers joining a namespace with an interface, "sandbox" (gVisor's
# network stack) or "host" (the host kernel's, see need_gvisor)), "hako[:CONFIG]", or another
# containerd runtime by name,
# "io.containerd.<name>.v2[:CONFIG]" (such as an older hako build installed as
# containerd-shim-<name>-v2, to compare builds in one run).
runtime_args() {
    case "$1" in
        runc) echo "--runtime io.containerd.runc.v2" ;;
        gvisor | gvisor:none | gvisor:sandbox | gvisor:host)
            local wrapper="$work/runsc-none"
            [[ $1 == gvisor:* ]] && wrapper="$work/runsc-${1#gvisor:}"
            [[ -x "$wrapper" ]] || { echo "bench: gvisor is not set up: the script must call need_gvisor first" >&2; exit 1; }
            echo "--runtime io.containerd.runc.v2 --runc-binary $wrapper" ;;
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

# gvisor_default FLAG: the default of one of runsc's flags, as `runsc flags` prints it
# ("(default X)" or "(default "X")" at the end of the flag's description).
gvisor_default() {
    "$runsc" flags 2>&1 | awk -v f="-$1" '
        $1 == f {on = 1; next}
        on && /^  -/ {exit}
        on && match($0, /\(default [^)]*\)/) {v = substr($0, RSTART + 9, RLENGTH - 10); gsub(/"/, "", v); print v; exit}'
}

# gVisor's platform (how the sandbox intercepts the application's system calls).
gvisor_platform() { gvisor_default platform; }

# A markdown line with the run's conditions (call it after hako ran at least once).
conditions() { # [guest description [gVisor description]]
    local cpu qemu runc_version gvisor="" platform
    cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    qemu="$(qemu-system-x86_64 --version | awk 'NR == 1 {print $4}')"
    runc_version="$(runc --version 2>/dev/null | awk 'NR == 1 {print $3}')"
    if [[ -n "$runsc" ]]; then
        platform="$(gvisor_platform)"
        case "$platform" in
            systrap) platform="systrap (system calls trapped by seccomp and served by the Sentry; no KVM)" ;;
            ptrace) platform="ptrace (system calls intercepted with ptrace; no KVM)" ;;
            kvm) platform="kvm (the Sentry runs as a guest kernel on /dev/kvm)" ;;
        esac
        gvisor="; gVisor: runsc $("$runsc" --version 2>/dev/null | awk 'NR == 1 {print $3}') ($gvisor_package) through containerd's runc shim, platform ${platform:-?}, ${2:-no network (\`--network=none\`)}"
    fi
    printf '%s; %s cores (%s), %s GiB, host kernel %s; containerd %s, runc %s; hako: QEMU %s under %s, %s%s\n' \
        "$(date -u +%Y-%m-%d)" "$(nproc)" "$cpu" "$(awk '/^MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)" \
        "$(uname -r)" "$(containerd_version)" "${runc_version:-?}" "$qemu" "$(accelerator)" \
        "${1:-1 vCPU, 512 MiB guest, virtio-fs cache auto}" "$gvisor"
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

# shims_of ID_PREFIX: the pids of the shims this benchmark's containerd started for containers
# whose id starts with ID_PREFIX (runc's and gVisor's are both containerd-shim-runc-v2; the
# command line names the container and the containerd).
shims_of() {
    local p
    for p in $(pids_of containerd-shim); do
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null |
            grep -q -- "-id $1.* -address $work/containerd.sock\|-address $work/containerd.sock.* -id $1" && echo "$p"
    done
    return 0
}

# descendants PID...: the processes below them (children, theirs, and so on), not them.
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        {parent[$1] = $2}
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mark[r[i]] = 1
            do {
                more = 0
                for (p in parent) if (!(p in mark) && (parent[p] in mark)) {mark[p] = 2; more = 1}
            } while (more)
            for (p in mark) if (mark[p] == 2) print p
        }'
}

# argv0 PID: the name a process was started under (gVisor's runsc re-executes itself, so its
# processes' comm is "exe"; argv[0] says runsc-gofer or runsc-sandbox).
argv0() { tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | head -n1; }

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
    local i
    for i in $(seq 1 300); do
        ctr task delete "$1" >/dev/null 2>&1 && break
        ctr task ls -q 2>/dev/null | grep -qx "$1" || break
        # A gVisor task whose start failed stays "created": runsc will not signal it, so
        # containerd can neither kill nor delete it. runsc removes it by force (the runc shim's
        # root, for ctr's namespace), after which containerd's delete goes through.
        if ((i == 10)) && [[ -n "$runsc" ]] &&
            "$runsc" --root /run/containerd/runc/default state "$1" >/dev/null 2>&1; then
            "$runsc" --root /run/containerd/runc/default delete --force "$1" >/dev/null 2>&1 || true
        fi
        sleep 0.05
    done
    ctr container delete "$1" >/dev/null 2>&1 || true
}

ms_since() { # start (an $EPOCHREALTIME)
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", (b - a) * 1000}'
}
