#!/bin/bash
# Runs every test tier, on a fresh Debian 12 machine as root: installs what is needed, builds
# and installs hako, then runs the unit tests and the end-to-end tests (real containerd 1.7 and
# 2.x, Docker Engine, real QEMU, virtiofsd, vhost-device-vsock and guest; Cloud Hypervisor where
# the host can run it).
#
#   scripts/test.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

scripts/setup.sh
scripts/install.sh
echo "test: the guest with Debian's generic kernel, for the virtio-9p test"
HAKO_KERNEL_META=linux-image-amd64 guest-image/build.sh build/guest-generic

echo "test: unit tests"
cargo test --workspace --locked

echo "test: end-to-end tests (each boots VMs; one at a time)"
cargo test --locked -p hako-tests --test containerd --test cri --test docker --test faults --test hostile_guest --test install --test network --test pods_and_volumes --test task_api \
    -- --ignored --test-threads=1

# Cloud Hypervisor is not packaged and needs hardware KVM to boot guests: each of its tests runs
# only where what it needs is present, and is reported as SKIPPED, not passed, elsewhere.
echo "test: Cloud Hypervisor"
ch="${HAKO_CLOUD_HYPERVISOR:-$(command -v cloud-hypervisor || true)}"
if [[ -n $ch && -x $ch ]]; then
    HAKO_CLOUD_HYPERVISOR="$ch" cargo test --locked -p hako-tests --test cloud_hypervisor \
        -- --ignored --exact a_real_cloud_hypervisor_takes_the_vm_hako_defines
else
    echo "SKIPPED cloud_hypervisor::a_real_cloud_hypervisor_takes_the_vm_hako_defines: no cloud-hypervisor binary (set HAKO_CLOUD_HYPERVISOR; docs/hypervisors.md)"
fi
if [[ -n $ch && -x $ch ]] && HAKO_CLOUD_HYPERVISOR="$ch" hako check | grep -q '^ok   cloud-hypervisor'; then
    HAKO_CLOUD_HYPERVISOR="$ch" cargo test --locked -p hako-tests --test cloud_hypervisor \
        -- --ignored --exact a_container_runs_on_cloud_hypervisor --test-threads=1
else
    echo "SKIPPED cloud_hypervisor::a_container_runs_on_cloud_hypervisor: needs a cloud-hypervisor binary and hardware KVM ($(hako check | grep 'accelerator' | cut -c29-))"
fi
