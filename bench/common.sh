# Shared by the benchmarks: a private containerd 1.7 under a temporary directory, `ctr` on it,
# and percentiles. Sourced, not run. Needs root and scripts/install.sh done.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
containerd_dir="$(ls -d /opt/hako/containerd/1.7* | head -n1)"
bin="$containerd_dir/usr/bin"
work="$(mktemp -d /tmp/hako-bench-XXXXXX)"
cleanups=()
on_exit() {
    local i
    for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[i]}" || true; done
    rm -rf "$work"
}
trap on_exit EXIT

need_package() { # command package
    command -v "$1" >/dev/null && return
    echo "bench: installing $2 for the comparison"
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

containerd_version() { "$bin/containerd" --version | awk '{print $3}'; }

pct() { # sorted-file percentile
    local count; count=$(wc -l <"$1")
    sed -n "$(( (count * $2 + 99) / 100 ))p" "$1"
}
