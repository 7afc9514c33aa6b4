#!/usr/bin/env bash
# Run the whole test suite: build the Rust guest fixtures and the handlers
# in other languages (installing their toolchains on a fresh machine), then
# the host's unit tests, its one integration-test binary, and the
# benchmark's smoke run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build-guests.sh
bash scripts/build-examples.sh
cargo test --all-targets
bash bench/run.sh --smoke
