#!/bin/bash
# Runs every test tier, on a fresh Debian 12 machine as root: installs what is needed, builds
# and installs hako, checks the code's form (rustfmt, clippy), then runs the unit tests and the
# end-to-end tests (real containerd 1.7 and 2.x, Docker Engine 26 and 28, real QEMU, virtiofsd,
# vhost-device-vsock and guest; Cloud Hypervisor where the host can run it).
#
#   scripts/test.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

scripts/setup.sh

echo "test: formatting and lints"
cargo fmt --all --check || { echo "test: run 'cargo fmt' and commit the result" >&2; exit 1; }
cargo clippy --workspace --all-targets --locked -q -- -D warnings -D clippy::undocumented_unsafe_blocks
cargo clippy -p hako-agent --all-targets --features hostile --locked -q -- -D warnings -D clippy::undocumented_unsafe_blocks

scripts/install.sh
echo "test: the guest with Debian's generic kernel, for the virtio-9p test"
HAKO_KERNEL_META=linux-image-amd64 guest-image/build.sh build/guest-generic
echo "test: a hostile guest (the agent built with --features hostile), for the hostile-guest tests"
CARGO_TARGET_DIR="$repo/target/hostile" CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -q -p hako-agent --features hostile --target x86_64-unknown-linux-gnu
HAKO_AGENT_BIN="$repo/target/hostile/x86_64-unknown-linux-gnu/release/hako-agent" \
    guest-image/build.sh build/guest-hostile

echo "test: unit tests"
cargo test --workspace --locked

# Every file in tests/tests is a test binary; all but the Cloud Hypervisor one run here.
e2e=()
for file in tests/tests/*.rs; do
    name="$(basename "$file" .rs)"
    [[ $name == cloud_hypervisor ]] || e2e+=(--test "$name")
done
echo "test: end-to-end tests (each boots VMs; one at a time): ${e2e[*]}"
# What a test could not check here it records (tests/src/lib.rs, report_skip): shown after the
# run, since a passing test's own output is not.
rm -f target/e2e-skipped.txt
cargo test --locked --no-fail-fast -p hako-tests "${e2e[@]}" -- --ignored --test-threads=1
if [[ -s target/e2e-skipped.txt ]]; then
    sort -u target/e2e-skipped.txt
fi

# Cloud Hypervisor is not packaged and needs hardware KVM to boot guests: each of its tests runs
# only where what it needs is present, and is reported as SKIPPED, not passed, elsewhere.
echo "test: Cloud Hypervisor"
ch="${HAKO_CLOUD_HYPERVISOR:-$(command -v cloud-hypervisor || true)}"
# The API tests need only the binary; saving a VM needs the vCPUs' state, which only hardware
# KVM gives (kvm-pvm answers GetNestedState with EINVAL), so the save-and-restore test goes
# with the container tests.
api_tests=(a_real_cloud_hypervisor_takes_the_vm_hako_defines
    a_real_cloud_hypervisor_runs_the_template_vm_and_a_save_it_refuses_leaves_nothing)
container_tests=(a_container_runs_on_cloud_hypervisor
    a_real_cloud_hypervisor_saves_a_template_vm_and_restores_it_with_the_pods_devices
    a_container_starts_from_a_template_on_cloud_hypervisor)
if [[ -n $ch && -x $ch ]]; then
    HAKO_CLOUD_HYPERVISOR="$ch" cargo test --locked -p hako-tests --test cloud_hypervisor \
        -- --ignored --exact --test-threads=1 "${api_tests[@]}"
else
    for t in "${api_tests[@]}"; do
        echo "SKIPPED cloud_hypervisor::$t: no cloud-hypervisor binary (set HAKO_CLOUD_HYPERVISOR; docs/hypervisors.md)"
    done
fi
if [[ -n $ch && -x $ch ]] && HAKO_CLOUD_HYPERVISOR="$ch" hako check | grep -q '^ok   cloud-hypervisor'; then
    HAKO_CLOUD_HYPERVISOR="$ch" cargo test --locked -p hako-tests --test cloud_hypervisor \
        -- --ignored --exact --test-threads=1 "${container_tests[@]}"
else
    for t in "${container_tests[@]}"; do
        echo "SKIPPED cloud_hypervisor::$t: needs a cloud-hypervisor binary and hardware KVM ($(hako check | grep 'accelerator' | cut -c29-))"
    done
fi
