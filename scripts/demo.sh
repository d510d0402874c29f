#!/bin/bash
# The main job, on a fresh Debian 12 machine as root: installs what hako needs, builds and
# installs it, starts a private containerd with hako available as a runtime, imports a locally
# built busybox image and runs a command in a VM. Ends by printing what the VM printed.
#
#   scripts/demo.sh
#
# HAKO_DEMO_KEEP=1 leaves containerd running afterwards (its socket is printed).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state=/run/hako-demo
data=/var/lib/hako-demo
log=/var/log/hako-demo

"$repo/scripts/setup.sh"
"$repo/scripts/install.sh"

containerd_dir="$(ls -d /opt/hako/containerd/1.7* | head -n1)"
bin="$containerd_dir/usr/bin"
mkdir -p "$state" "$data" "$log"
cat >"$state/config.toml" <<TOML
version = 2
root = "$data"
state = "$state/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$state/containerd.sock"
[ttrpc]
  address = "$state/containerd.sock.ttrpc"
TOML
ctr() { "$bin/ctr" --address "$state/containerd.sock" "$@"; }

echo "demo: starting containerd $("$bin/containerd" --version | awk '{print $3}') (log: $log/containerd.log)"
PATH="/usr/local/bin:$PATH" "$bin/containerd" --config "$state/config.toml" >"$log/containerd.log" 2>&1 &
containerd_pid=$!
stop_containerd() {
    if [[ "${HAKO_DEMO_KEEP:-}" == 1 ]]; then
        echo "demo: containerd keeps running (pid $containerd_pid); use: $bin/ctr --address $state/containerd.sock ..."
        return
    fi
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
}
trap stop_containerd EXIT
for _ in $(seq 1 300); do
    [[ -S "$state/containerd.sock" ]] && ctr version >/dev/null 2>&1 && break
    kill -0 "$containerd_pid" 2>/dev/null || { echo "demo: containerd exited; see $log/containerd.log" >&2; exit 1; }
    sleep 0.1
done

image="$data/busybox.tar"
"$repo/tests/images/busybox-image.sh" "$image" hako.local/busybox:latest >/dev/null
ctr image import "$image" >/dev/null
echo "demo: imported hako.local/busybox:latest (built locally from Debian's busybox-static)"

run() {
    echo
    echo "\$ ctr run --rm --runtime io.containerd.hako.v2 hako.local/busybox:latest $*"
    ctr run --rm --runtime io.containerd.hako.v2 hako.local/busybox:latest "$@"
}
run demo-mounts sh -c 'grep " / " /proc/mounts'
echo
echo "demo: host kernel $(uname -r); the container below runs on the guest kernel:"
run demo-uname uname -r
