#!/bin/bash
# Installs everything hako needs to build, run and test on Debian 12, as root. Skips what is
# already there, so a second run is fast.
#
#   scripts/setup.sh
#
# - Debian packages: QEMU, build dependencies of virtiofsd, busybox, kmod, cpio, iproute2,
#   protoc (the CRI client in the tests), the CNI plugins (CRI pod networking), nftables (the
#   port-forwarding tests read the shim's rule with `nft`) and iptables (the CNI portmap
#   plugin), and the guest kernel's source (linux-source-6.12, from bookworm-security) with
#   what building it needs.
# - virtiofsd, built with `cargo install` into /usr/local/bin (the vsock device, hako-vsock, is
#   hako's own and built with it).
# - containerd 1.7 (Debian 13) and 2.x (Debian unstable) unpacked side by side under
#   /opt/hako/containerd/<version>/ without touching the system's packages; the end-to-end
#   tests run against each.
# - Docker Engine 26 (Debian 13) and the newest (Debian unstable, 28 or later) unpacked the same
#   way under /opt/hako/docker/<version>/.
# - Prometheus (Debian 12's and unstable's) with promtool, unpacked the same way under
#   /opt/hako/prometheus/<version>/, for the metrics tests.
set -euo pipefail

VIRTIOFSD_VERSION=1.14.0
CONTAINERD_ROOT=/opt/hako/containerd
DOCKER_ROOT=/opt/hako/docker
PROMETHEUS_ROOT=/opt/hako/prometheus
APT_PACKAGES=(qemu-system-x86 libcap-ng-dev libseccomp-dev pkg-config busybox-static cpio
    iproute2 kmod ca-certificates file procps curl lz4 zstd xz-utils protobuf-compiler
    containernetworking-plugins binutils runc nftables iptables
    podman conmon netavark aardvark-dns catatonit
    linux-source-6.12 make gcc flex bison bc libelf-dev libssl-dev)

step() { echo "setup: $*"; }
fail() {
    echo "setup: error: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "run as root (it installs packages and mounts filesystems)"
export DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null || fail "apt-get update failed: check the Debian mirror"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]} failed"
else
    step "Debian packages present"
fi

# The kernel build and the newer containerd come from the same mirror: make sure the package
# lists are there (apt-get download needs them).
if [[ -z "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v none)" ]]; then
    step "refreshing package lists"
    apt-get update -q >/dev/null || fail "apt-get update failed"
fi

cargo_install() {
    local crate="$1" version="$2" bin="$3"
    if [[ -x /usr/local/bin/$bin ]] && /usr/local/bin/"$bin" --version 2>/dev/null | grep -q "$version"; then
        step "$bin $version present"
        return
    fi
    command -v cargo >/dev/null || fail "cargo is not installed (install Rust with rustup)"
    step "building $crate $version with cargo install (several minutes on 2 cores)"
    cargo install --locked --quiet --root /usr/local "$crate" --version "$version" ||
        fail "cargo install $crate $version failed"
}
cargo_install virtiofsd "$VIRTIOFSD_VERSION" virtiofsd

# containerd from Debian 13 (1.7) and unstable (2.x): fetched as .deb files and unpacked, so the
# system's own packages stay as they are. The extra suites are pinned to priority 1.
sources=/etc/apt/sources.list.d/hako-containerd.sources
if [[ ! -f $sources ]]; then
    step "adding the trixie and sid package lists (pinned low; used only to download containerd and docker)"
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    uri="${uri:-http://deb.debian.org/debian}"
    cat >"$sources" <<EOF
Types: deb
URIs: $uri
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >/etc/apt/preferences.d/hako-containerd <<'EOF'
Package: *
Pin: release n=trixie
Pin-Priority: 1

Package: *
Pin: release n=sid
Pin-Priority: 1
EOF
    apt-get update -q >/dev/null || fail "apt-get update with trixie/sid failed"
fi

# Unpacks the .deb files of one suite's version of `package` (and of `extra` packages of the
# same source version) into <root>/<version>/.
fetch_debs() {
    local root="$1" suite="$2" package="$3" check="$4" extra="${5:-}" version
    version="$(apt-cache madison "$package" | awk -v s="$suite" '$0 ~ s"/main" {print $3; exit}')"
    [[ -n "$version" ]] || fail "no $package in $suite"
    local dir="$root/$version"
    if [[ -x "$dir/$check" ]]; then
        step "$package $version ($suite) present"
        return
    fi
    step "fetching $package $version from $suite"
    local tmp pkgs=("$package=$version")
    [[ -n $extra ]] && pkgs+=("$extra=$version")
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "${pkgs[@]}") >/dev/null ||
        fail "apt-get download ${pkgs[*]} failed"
    mkdir -p "$dir.tmp"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dir.tmp"; done
    rm -rf "$tmp" "$dir"
    mv "$dir.tmp" "$dir"
}
fetch_debs "$CONTAINERD_ROOT" trixie containerd usr/bin/containerd
fetch_debs "$CONTAINERD_ROOT" sid containerd usr/bin/containerd
# Docker Engine 26 (Debian 13) with its client: the first with `--runtime io.containerd.<x>.v2`
# (Debian 12's 20.10 only knows runc); it networks containers through a prestart hook. And the
# newest Docker (Debian unstable, 28 or later), which networks the task's namespace after Create
# instead. Tests run each dockerd against each containerd above.
fetch_debs "$DOCKER_ROOT" trixie docker.io usr/sbin/dockerd docker-cli
fetch_debs "$DOCKER_ROOT" sid docker.io usr/sbin/dockerd docker-cli
# Prometheus for the metrics tests: Debian 12's (2.42, with promtool) and the newest (Debian
# unstable's 3.x, promtool packaged apart). Unpacked, not installed: the package would make a
# user and start a server on 0.0.0.0:9090.
fetch_debs "$PROMETHEUS_ROOT" bookworm prometheus usr/bin/promtool
fetch_debs "$PROMETHEUS_ROOT" sid prometheus usr/bin/promtool promtool

step "done"
