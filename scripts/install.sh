#!/bin/bash
# Builds hako and installs it in the standard places, as root:
#
#   /usr/local/bin/containerd-shim-hako-v2     the runtime shim (containerd finds it in $PATH)
#   /usr/local/bin/hako                        the CLI (hako check, hako env)
#   /usr/share/hako/guest/                     guest kernel (bzImage and vmlinux) and initramfs
#   /usr/share/defaults/hako/configuration.toml  the default configuration
#
#   scripts/install.sh [--no-build] [--uninstall]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=/usr/local/bin
GUEST=/usr/share/hako/guest
DEFAULTS=/usr/share/defaults/hako

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --uninstall)
            rm -f "$BIN/containerd-shim-hako-v2" "$BIN/hako"
            rm -rf /usr/share/hako "$DEFAULTS"
            echo "install: hako removed (configuration in /etc/hako, if any, is left alone)"
            exit 0
            ;;
        *)
            echo "usage: $0 [--no-build] [--uninstall]" >&2
            exit 2
            ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "install: run as root" >&2; exit 1; }

if ((build)); then
    echo "install: building the shim and CLI (release)"
    (cd "$repo" && cargo build --release --locked -q -p hako-shim)
    echo "install: building the guest image"
    "$repo/guest-image/build.sh" "$repo/build/guest"
fi

install -D -m 0755 "$repo/target/release/containerd-shim-hako-v2" "$BIN/containerd-shim-hako-v2"
install -D -m 0755 "$repo/target/release/hako" "$BIN/hako"
install -D -m 0644 "$repo/build/guest/vmlinuz" "$GUEST/vmlinuz"
install -D -m 0644 "$repo/build/guest/vmlinux" "$GUEST/vmlinux"
install -D -m 0644 "$repo/build/guest/initramfs.cpio" "$GUEST/initramfs.cpio"
install -D -m 0644 "$repo/build/guest/kernel-release" "$GUEST/kernel-release"
install -D -m 0644 "$repo/configs/configuration.toml" "$DEFAULTS/configuration.toml"
echo "install: installed containerd-shim-hako-v2 and hako in $BIN, the guest in $GUEST"
