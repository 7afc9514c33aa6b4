# Sourced by the bench/ scripts (after they set $root): the binaries they
# run, how to build them, and the check that they exist.
loadgen="$root/bench/target/release/loadgen"
native="$root/bench/target/release/native-echo"
echo_wasm_default="$root/guest/target/wasm32-wasip2/release/echo.wasm"

# build_all [release|debug]: bench/ (release), the server in the given
# profile (default release) and the guest components.
build_all() {
  cargo build --quiet --release --manifest-path "$root/bench/Cargo.toml"
  if [ "${1:-release}" = release ]; then
    cargo build --quiet --release --manifest-path "$root/Cargo.toml"
  else
    cargo build --quiet --manifest-path "$root/Cargo.toml"
  fi
  bash "$root/scripts/build-guests.sh"
}

# require SCRIPT FILE...: exit 1 naming the first FILE that is missing.
require() {
  local script=$1 f
  shift
  for f in "$@"; do
    [ -e "$f" ] || { echo "$script: $f is missing (run without --skip-build)" >&2; exit 1; }
  done
}
