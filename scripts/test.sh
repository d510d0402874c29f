#!/bin/bash
# Runs every test tier, on a fresh Debian 12 machine as root: installs what is needed, builds
# and installs hako, then runs the unit tests and the end-to-end tests (real containerd 1.7 and
# 2.x, real QEMU, virtiofsd, vhost-device-vsock and guest).
#
#   scripts/test.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

scripts/setup.sh
scripts/install.sh

echo "test: unit tests"
cargo test --workspace --locked

echo "test: end-to-end tests (each boots VMs; one at a time)"
cargo test --locked -p hako-tests --test containerd --test docker --test network --test pods_and_volumes --test task_api \
    -- --ignored --test-threads=1
