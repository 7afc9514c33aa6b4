#!/usr/bin/env bash
# Build the Rust guest components (guest/): the echo handler and the test
# fixtures. Installs the wasm32-wasip2 target when it is missing; safe to run
# again and again (cargo rebuilds only what changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$root/guest/Cargo.toml"
