#!/usr/bin/env bash
# Run the whole test suite: build the guest fixtures, then the host's unit
# tests and its one integration-test binary. Installs what it needs
# (the wasm32-wasip2 target) on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build-guests.sh
cargo test --all-targets
