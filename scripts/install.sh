#!/bin/bash
# Builds hako and installs it in the standard places, as root:
#
#   /usr/local/bin/containerd-shim-hako-v2     the runtime shim (containerd finds it in $PATH)
#   /usr/local/bin/hako                        the CLI (hako check, hako env)
#   /usr/local/bin/hako-vsock                  the vsock device of QEMU guests (the agent channel)
#   /usr/local/bin/hako-runtime                hako as an OCI runtime, for podman and conmon
#   /usr/share/hako/guest/                     guest kernel (bzImage and vmlinux) and initramfs
#   /usr/share/defaults/hako/configuration.toml  the default configuration
#   /usr/local/lib/systemd/system/hako-monitor.service  the node's metrics for Prometheus
#
#   scripts/install.sh [--no-build] [--configure] [--monitor] [--print-config] [--uninstall]
#
# --print-config prints what to add to containerd's config (version 2 for containerd 1.x,
# version 3 for 2.x), Docker's daemon.json, podman's containers.conf drop-in and a Kubernetes
# RuntimeClass. --configure adds the containerd, Docker and podman entries itself (between
# "# BEGIN hako" and "# END hako" in containerd's config; daemon.json only when there is none
# yet) and creates /etc/hako/configuration.toml from the defaults; --uninstall removes what
# --configure added. --monitor enables and starts hako-monitor.service (docs/metrics.md) where
# systemd runs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# DESTDIR puts everything under another root (the install test uses it).
root="${DESTDIR:-}"
BIN="$root/usr/local/bin"
GUEST="$root/usr/share/hako/guest"
DEFAULTS="$root/usr/share/defaults/hako"
ETC_HAKO="$root/etc/hako"
CONTAINERD_CONFIG="$root/etc/containerd/config.toml"
DAEMON_JSON="$root/etc/docker/daemon.json"
PODMAN_CONF="$root/etc/containers/containers.conf.d/hako.conf"
MONITOR_UNIT="$root/usr/local/lib/systemd/system/hako-monitor.service"

# systemctl only on the live system where systemd runs, never under DESTDIR.
have_systemd() { [[ -z $root && -d /run/systemd/system ]]; }

start_monitor() {
    if have_systemd; then
        systemctl daemon-reload
        systemctl enable --now hako-monitor.service
        echo "install: hako-monitor serves the node's metrics on 127.0.0.1:8095/metrics"
    else
        echo "install: systemd is not running here; start the monitor with: hako monitor &"
    fi
}

# The containerd config snippet for the containerd in $PATH (2.x: version 3; else version 2).
containerd_snippet() {
    local major=1
    if command -v containerd >/dev/null; then
        major="$(containerd --version | grep -oE ' v?[0-9]+\.' | head -n1 | tr -dc '0-9')"
    fi
    if ((major >= 2)); then
        echo "$repo/configs/containerd-config-v3.toml"
    else
        echo "$repo/configs/containerd-config-v2.toml"
    fi
}

print_config() {
    local snippet
    snippet="$(containerd_snippet)"
    echo "# --- $CONTAINERD_CONFIG ($(basename "$snippet"))"
    cat "$snippet"
    echo
    echo "# --- $DAEMON_JSON (Docker Engine 23 or later; then: docker run --runtime hako ...)"
    cat "$repo/configs/docker-daemon.json"
    echo
    echo "# --- $PODMAN_CONF (podman; then: podman --runtime hako run ...)"
    cat "$repo/configs/podman-hako.conf"
    echo
    echo "# --- Kubernetes (kubectl apply -f -)"
    cat "$repo/configs/runtimeclass.yaml"
}

configure() {
    mkdir -p "$ETC_HAKO"
    if [[ ! -f $ETC_HAKO/configuration.toml ]]; then
        install -m 0644 "$repo/configs/configuration.toml" "$ETC_HAKO/configuration.toml"
        echo "install: created $ETC_HAKO/configuration.toml (the defaults; edit it to taste)"
    fi
    if grep -q '^# BEGIN hako' "$CONTAINERD_CONFIG" 2>/dev/null; then
        echo "install: $CONTAINERD_CONFIG already has hako's runtime entry"
    else
        local snippet version=2
        snippet="$(containerd_snippet)"
        [[ $snippet == *v3.toml ]] && version=3
        mkdir -p "$(dirname "$CONTAINERD_CONFIG")"
        [[ -s $CONTAINERD_CONFIG ]] || echo "version = $version" >"$CONTAINERD_CONFIG"
        { echo; echo "# BEGIN hako (scripts/install.sh --configure)"; cat "$snippet"; echo "# END hako"; } \
            >>"$CONTAINERD_CONFIG"
        echo "install: added the hako runtime to $CONTAINERD_CONFIG; restart containerd to use it"
    fi
    if [[ ! -f $DAEMON_JSON ]]; then
        install -D -m 0644 "$repo/configs/docker-daemon.json" "$DAEMON_JSON"
        echo "install: wrote $DAEMON_JSON; restart dockerd to use --runtime hako"
    elif grep -q 'io.containerd.hako.v2' "$DAEMON_JSON"; then
        echo "install: $DAEMON_JSON already names io.containerd.hako.v2"
    else
        echo "install: $DAEMON_JSON exists; merge this into it by hand:"
        cat "$repo/configs/docker-daemon.json"
    fi
    if cmp -s "$PODMAN_CONF" "$repo/configs/podman-hako.conf"; then
        echo "install: $PODMAN_CONF already names hako-runtime"
    else
        install -D -m 0644 "$repo/configs/podman-hako.conf" "$PODMAN_CONF"
        echo "install: wrote $PODMAN_CONF; podman --runtime hako now runs containers in VMs"
    fi
}

unconfigure() {
    if grep -q '^# BEGIN hako' "$CONTAINERD_CONFIG" 2>/dev/null; then
        sed -i '/^# BEGIN hako/,/^# END hako/d' "$CONTAINERD_CONFIG"
        echo "install: removed the hako runtime from $CONTAINERD_CONFIG"
    fi
    if cmp -s "$DAEMON_JSON" "$repo/configs/docker-daemon.json"; then
        rm -f "$DAEMON_JSON"
        echo "install: removed $DAEMON_JSON (it held only hako's entry)"
    fi
    if [[ -f $PODMAN_CONF ]]; then
        rm -f "$PODMAN_CONF"
        echo "install: removed $PODMAN_CONF"
    fi
}

build=1
configure=0
monitor=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --configure) configure=1 ;;
        --monitor) monitor=1 ;;
        --print-config)
            print_config
            exit 0
            ;;
        --uninstall)
            [[ $(id -u) -eq 0 ]] || { echo "install: run as root" >&2; exit 1; }
            if have_systemd && [[ -f $MONITOR_UNIT ]]; then
                systemctl disable --now hako-monitor.service || true
            fi
            rm -f "$BIN/containerd-shim-hako-v2" "$BIN/hako" "$BIN/hako-vsock" "$BIN/hako-runtime"
            rm -f "$MONITOR_UNIT"
            rm -rf "$root/usr/share/hako" "$DEFAULTS"
            unconfigure
            echo "install: hako removed (configuration in $ETC_HAKO, if any, is left alone)"
            exit 0
            ;;
        *)
            echo "usage: $0 [--no-build] [--configure] [--monitor] [--print-config] [--uninstall]" >&2
            exit 2
            ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "install: run as root" >&2; exit 1; }

if ((build)); then
    echo "install: building the shim, the CLI, hako-runtime and hako-vsock (release)"
    (cd "$repo" && cargo build --release --locked -q -p hako-shim -p hako-vsock)
    echo "install: building the guest image"
    "$repo/guest-image/build.sh" "$repo/build/guest"
fi

# cargo's output directory: CARGO_TARGET_DIR when set (a second checkout building apart).
target="${CARGO_TARGET_DIR:-$repo/target}"
install -D -m 0755 "$target/release/containerd-shim-hako-v2" "$BIN/containerd-shim-hako-v2"
install -D -m 0755 "$target/release/hako" "$BIN/hako"
install -D -m 0755 "$target/release/hako-vsock" "$BIN/hako-vsock"
install -D -m 0755 "$target/release/hako-runtime" "$BIN/hako-runtime"
install -D -m 0644 "$repo/build/guest/vmlinuz" "$GUEST/vmlinuz"
install -D -m 0644 "$repo/build/guest/vmlinux" "$GUEST/vmlinux"
install -D -m 0644 "$repo/build/guest/initramfs.cpio" "$GUEST/initramfs.cpio"
install -D -m 0644 "$repo/build/guest/kernel-release" "$GUEST/kernel-release"
install -D -m 0644 "$repo/configs/configuration.toml" "$DEFAULTS/configuration.toml"
install -D -m 0644 "$repo/configs/hako-monitor.service" "$MONITOR_UNIT"
echo "install: installed containerd-shim-hako-v2, hako, hako-vsock and hako-runtime in $BIN, the guest in $GUEST"
if ((monitor)); then
    start_monitor
fi
if ((configure)); then
    configure
else
    echo "install: for CRI/Kubernetes, 'docker run --runtime hako' and 'podman --runtime hako', see $0 --print-config (or --configure)"
fi
