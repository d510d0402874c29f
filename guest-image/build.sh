#!/bin/bash
# Builds the hako guest: a kernel and an initramfs holding the static hako-agent (as /init).
#
#   guest-image/build.sh [OUT_DIR]        (default: build/guest)
#
# The kernel is hako's own by default: guest-image/build-kernel.sh builds it from Debian's kernel
# source package and the fragment guest-image/kernel/hako.config, with everything built in (no
# modules to load), and caches it under /var/cache/hako/kernel. A Debian kernel package is used
# instead, with the modules the agent loads in the initramfs, when HAKO_KERNEL_META names its
# meta package (linux-image-cloud-amd64, the cloud kernel; linux-image-amd64, the generic kernel,
# which has the 9p modules a virtio-9p share needs) or HAKO_KERNEL_PACKAGE the package itself.
#
# Reproducible: the same kernel and agent binary give byte-identical output (sorted cpio
# entries, fixed timestamps and owners). The work is skipped when none of the inputs changed.
# HAKO_AGENT_BIN uses a prebuilt agent.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/build/guest}"
cache="$repo/build/cache"
mkdir -p "$out" "$cache"

# "hako": the purpose-built kernel; "debian": a Debian kernel package and its modules.
kernel_kind=hako
if [[ -n "${HAKO_KERNEL_META:-}" || -n "${HAKO_KERNEL_PACKAGE:-}" ]]; then
    kernel_kind=debian
fi

step=0
steps=6
[[ $kernel_kind == hako ]] && steps=4
progress() {
    step=$((step + 1))
    echo "guest-image [$step/$steps] $*"
}
fail() {
    echo "guest-image: error: $*" >&2
    exit 1
}

# Modules the agent loads from a Debian kernel, in this order (dependencies first). Missing ones
# are built in.
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    fuse virtiofs
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    failover net_failover virtio_net
)
# Loaded by the agent only for a virtio-9p share (hypervisor.shared_fs = "virtio-9p").
MODULES_9P=(9pnet 9pnet_virtio 9p)

if [[ $kernel_kind == hako ]]; then
    progress "building hako's guest kernel"
    # Its progress goes to stderr; its output, the build's directory, to stdout.
    kbuild="$("$here/build-kernel.sh")" || fail "building the guest kernel failed (see above)"
    kbuild="$(tail -n1 <<<"$kbuild")"
    [[ -s "$kbuild/vmlinux" && -s "$kbuild/vmlinuz" && -s "$kbuild/kernel-release" ]] ||
        fail "guest-image/build-kernel.sh left no kernel in '$kbuild'"
    kver="$(cat "$kbuild/kernel-release")"
    vmlinuz="$kbuild/vmlinuz"
    kernel_inputs=("$kbuild/vmlinux" "$kbuild/vmlinuz" "$kbuild/kernel-release")
else
    progress "resolving the kernel package"
    pkg="${HAKO_KERNEL_PACKAGE:-}"
    if [[ -z "$pkg" ]]; then
        meta="${HAKO_KERNEL_META:-linux-image-cloud-amd64}"
        pkg="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    fi
    [[ -n "$pkg" ]] || fail "cannot find the kernel package; run 'apt-get update' first"
    version="$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
    [[ -n "$version" && "$version" != "(none)" ]] || fail "no candidate version for $pkg; run 'apt-get update'"
    deb="$cache/${pkg}_${version}_amd64.deb"
    if [[ ! -s "$deb" ]]; then
        echo "  downloading $pkg $version"
        # -o APT::Sandbox::User=root: _apt cannot write into the build tree.
        (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version") >/dev/null ||
            fail "apt-get download $pkg=$version failed: check the Debian mirror in /etc/apt/sources.list*"
        mv -f "$cache/${pkg}_"*"_amd64.deb" "$deb" 2>/dev/null || true
    fi
    [[ -s "$deb" ]] || fail "the kernel package $deb is missing after download"
    echo "  $pkg $version"
    kernel_inputs=("$deb")
fi

progress "building the static agent"
agent="${HAKO_AGENT_BIN:-}"
if [[ -z "$agent" ]]; then
    (cd "$repo" && CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked -q -p hako-agent --target x86_64-unknown-linux-gnu) ||
        fail "building hako-agent failed (see the cargo output above)"
    agent="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/hako-agent"
fi
[[ -x "$agent" ]] || fail "agent binary $agent is missing"
if file "$agent" 2>/dev/null | grep -q 'dynamically linked'; then
    fail "$agent is dynamically linked; the guest has no libc"
fi

command -v strip >/dev/null || fail "strip missing: apt-get install binutils"
stamp_inputs="$(sha256sum "${kernel_inputs[@]}" "$agent" "${BASH_SOURCE[0]}" | awk '{print $1}' | tr '\n' ' ')"
if [[ -f "$out/.inputs" && "$(cat "$out/.inputs")" == "$stamp_inputs" &&
      -s "$out/vmlinuz" && -s "$out/vmlinux" && -s "$out/initramfs.cpio" ]]; then
    echo "guest-image: up to date in $out (inputs unchanged)"
    exit 0
fi

if [[ $kernel_kind == debian ]]; then
    progress "unpacking the kernel"
    kdir="$cache/$pkg-$version"
    if [[ ! -d "$kdir/boot" ]]; then
        rm -rf "$kdir.tmp"
        dpkg-deb -x "$deb" "$kdir.tmp"
        mv "$kdir.tmp" "$kdir"
    fi
    vmlinuz="$(ls "$kdir"/boot/vmlinuz-* | head -n1)"
    kver="${vmlinuz##*/vmlinuz-}"
    moddir="$kdir/lib/modules/$kver"
    if [[ ! -f "$moddir/modules.dep" ]]; then
        # The package leaves modules.dep to the installer's depmod.
        command -v depmod >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
        depmod -b "$kdir" "$kver" || fail "depmod failed for $kver (is the kmod package installed?)"
    fi

    # Cloud Hypervisor boots an ELF vmlinux (through its PVH entry point), not a bzImage: take
    # the compressed kernel out of the bzImage. The setup header says where it is (setup_sects
    # at 0x1f1, payload_offset and payload_length at 0x248 and 0x24c) and its magic says how it
    # is compressed.
    progress "extracting vmlinux for Cloud Hypervisor"
    header_u() { od -An -tu"$1" -j "$2" -N"$1" "$vmlinuz" | tr -d ' '; }
    payload_start=$(( ($(header_u 1 $((0x1f1))) + 1) * 512 + $(header_u 4 $((0x248))) ))
    payload_length=$(header_u 4 $((0x24c)))
    case "$(od -An -tx1 -j "$payload_start" -N4 "$vmlinuz" | tr -d ' ')" in
        02214c18) decompress=(lz4 -dc) ;;
        28b52ffd) decompress=(zstd -dc) ;;
        fd377a58) decompress=(xz -dc) ;;
        1f8b*) decompress=(gzip -dc) ;;
        *) fail "unknown compression of the kernel in $vmlinuz" ;;
    esac
    command -v "${decompress[0]}" >/dev/null || fail "${decompress[0]} is missing: run scripts/setup.sh"
    # The decompressors may complain about the size trailer after the stream; the ELF check
    # below is what counts.
    tail -c +$((payload_start + 1)) "$vmlinuz" | head -c "$payload_length" |
        "${decompress[@]}" >"$out/vmlinux.tmp" 2>/dev/null || true
    [[ "$(od -An -c -N4 "$out/vmlinux.tmp" | tr -d ' ')" == '177ELF' ]] ||
        fail "could not extract an ELF vmlinux from $vmlinuz"
    mv "$out/vmlinux.tmp" "$out/vmlinux"
else
    # hako's kernel comes as an ELF already (build-kernel.sh checked its PVH note).
    install -m 0644 "$kbuild/vmlinux" "$out/vmlinux.tmp"
    mv "$out/vmlinux.tmp" "$out/vmlinux"
fi

progress "assembling the initramfs"
root="$(mktemp -d "$cache/initramfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{proc,sys,dev,run,tmp,etc/hako}
install -m 0755 "$agent" "$root/init"
# module_file NAME: its path in modules.dep, empty when it is built in; fails when it is
# neither (modules.dep names files with '-' or '_' interchangeably with the module name).
module_file() {
    local pattern="/(${1}|${1//_/-})\\.ko(\\.xz|\\.zst)?:"
    local rel
    rel="$(grep -E "$pattern" "$moddir/modules.dep" | head -n1 | cut -d: -f1 || true)"
    if [[ -z "$rel" ]]; then
        grep -qE "/(${1}|${1//_/-})\\.ko" "$moddir/modules.builtin" || return 1
    fi
    echo "$rel"
}
declare -A included=()
# add_module NAME LIST: copies the module and what it depends on into the image and appends
# them to LIST in load order (modules.dep lists every dependency, the deepest last).
add_module() {
    local rel deps dep i
    rel="$(module_file "$1")" || fail "kernel module $1 is neither a module nor built into $kver"
    [[ -z "$rel" ]] && return 0
    read -r -a deps <<<"$(grep -E "^$rel:" "$moddir/modules.dep" | cut -d: -f2)"
    for ((i = ${#deps[@]} - 1; i >= -1; i--)); do
        if ((i >= 0)); then dep="${deps[i]}"; else dep="$rel"; fi
        [[ -n "${included[$dep]:-}" ]] && continue
        case "$dep" in
            *.ko) ;;
            *) fail "module $dep is compressed; the agent loads plain .ko files" ;;
        esac
        mkdir -p "$root/lib/modules/$(dirname "$dep")"
        # Without Debian's signatures: checking them costs the guest half of its module loading
        # time under TCG (docs/performance.md), and protects nothing, since the modules come in
        # the same host-provided image as the kernel (which does not enforce signatures).
        strip --strip-debug -o "$root/lib/modules/$dep" "$moddir/$dep" ||
            fail "strip failed on $dep (is binutils installed?)"
        chmod 0644 "$root/lib/modules/$dep"
        echo "$dep" >>"$2"
        included[$dep]=1
    done
}
if [[ $kernel_kind == hako ]]; then
    # Everything is built in: no module list, which the agent takes as nothing to load (and a
    # virtio-9p share is refused: this kernel has no 9p).
    echo "  $kver has everything built in: no modules; virtio-fs shares only"
else
    mkdir -p "$root/lib/modules"
    : >"$root/etc/hako/modules"
    for name in "${MODULES[@]}"; do
        add_module "$name" "$root/etc/hako/modules"
    done
    # The 9p modules go in only when the kernel has them all (Debian's cloud kernel has none).
    have_9p=1
    for name in "${MODULES_9P[@]}"; do
        module_file "$name" >/dev/null || have_9p=0
    done
    if ((have_9p)); then
        : >"$root/etc/hako/modules-9p"
        for name in "${MODULES_9P[@]}"; do
            add_module "$name" "$root/etc/hako/modules-9p"
        done
        echo "  $(wc -l <"$root/etc/hako/modules-9p") modules for virtio-9p shares"
    else
        echo "  $kver has no 9p: this guest serves virtio-fs shares only"
    fi
    echo "  $(wc -l <"$root/etc/hako/modules") modules for $kver"
fi

progress "writing $out"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --reproducible -R 0:0) >"$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
install -m 0644 "$vmlinuz" "$out/vmlinuz"
echo "$kver" >"$out/kernel-release"
echo "$stamp_inputs" >"$out/.inputs"
ls -l "$out/vmlinuz" "$out/vmlinux" "$out/initramfs.cpio" | awk '{printf "  %-40s %8.1f MiB\n", $NF, $5/1048576}'
echo "guest-image: done"
