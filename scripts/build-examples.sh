#!/usr/bin/env bash
# Build the handlers in other languages (examples/js-echo, python-echo,
# c-echo) into examples/build/: js-echo.wasm, js-crash.wasm,
# python-echo.wasm, python-crash.wasm, c-echo.wasm, c-crash.wasm.
#
#   bash scripts/build-examples.sh            # all three languages
#   bash scripts/build-examples.sh js c       # a subset: js, python, c
#
# Installs each toolchain when it is missing or the wrong version (Debian
# packages with apt-get, componentize-js with npm ci, componentize-py in a
# venv under .tools/, wit-bindgen and wasm-tools with cargo install --root
# .tools/cargo), and rebuilds a component only when one of its inputs is
# newer than it. Safe to run again and again. Versions are pinned here and
# in examples/js-echo/package-lock.json and examples/c-echo/adapter.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1
WIT_BINDGEN_VERSION=0.60.0
WASM_TOOLS_VERSION=1.254.2

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
out="$root/examples/build"
world=sockserver:handler/sockserver
script="$root/scripts/build-examples.sh"

langs=("$@")
if [ ${#langs[@]} -eq 0 ]; then
  langs=(js python c)
fi
for lang in "${langs[@]}"; do
  case "$lang" in
    js | python | c) ;;
    *)
      echo "build-examples: unknown language '$lang' (expected js, python or c)" >&2
      exit 2
      ;;
  esac
done

mkdir -p "$out"

log() { echo "build-examples: $*" >&2; }

# apt_need PKG...: install the Debian packages that are not installed yet
# (apt-get update first, once per run).
apt_updated=
apt_need() {
  local missing=() pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    apt-get update -qq >&2
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# stale OUTPUT INPUT...: true when OUTPUT is missing or older than any input
# file (directories are searched).
stale() {
  local output="$1"
  shift
  [ -e "$output" ] || return 0
  [ -n "$(find "$@" -type f -newer "$output" -print -quit)" ]
}

# cargo_tool BIN CRATE VERSION [cargo install flags]: install CRATE@VERSION
# into .tools/cargo unless .tools/cargo/bin/BIN reports that version.
cargo_tool() {
  local bin="$1" crate="$2" version="$3"
  shift 3
  if "$tools/cargo/bin/$bin" --version 2>/dev/null | grep -qE "^($crate|$bin) $version( |\$)"; then
    return 0
  fi
  log "cargo install $crate@$version (a few minutes)"
  cargo install --quiet --locked --force --root "$tools/cargo" \
    --target-dir "$tools/cargo-build" "$crate@$version" "$@" >&2
}

now() { date +%s%N; }
report() {
  # report LANG START FILE...: the one timing line of a language.
  local lang="$1" ms=$((($(now) - $2) / 1000000)) sizes="" f
  shift 2
  for f in "$@"; do
    sizes+=" $(basename "$f")=$(stat -c %s "$f")"
  done
  printf '%s: %d.%03ds;%s bytes\n' "$lang" $((ms / 1000)) $((ms % 1000)) "$sizes"
}

build_js() {
  local dir="$root/examples/js-echo" start
  start=$(now)
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_need nodejs npm
  fi
  # componentize-js's dependencies (commander 14, jco) need Node.js 20 or
  # newer; Debian 12's own nodejs is 18.
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    echo "build-examples: js needs Node.js >= 20, found $(node --version)" >&2
    exit 1
  fi
  # npm ci only when node_modules does not match package-lock.json.
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.sockserver-lock"; then
    log "npm ci in examples/js-echo"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    cp "$dir/package-lock.json" "$dir/node_modules/.sockserver-lock"
  fi
  local name src
  for name in echo crash; do
    src="$dir/$name.js"
    if stale "$out/js-$name.wasm" "$dir"/*.js "$dir/package-lock.json" "$root/wit" "$script"; then
      # -d takes several values; the source file therefore comes first.
      (cd "$dir" && node_modules/.bin/componentize-js "$src" -w "$root/wit" -n "$world" \
        -d http fetch-event -o "$out/js-$name.wasm.tmp" >&2)
      mv "$out/js-$name.wasm.tmp" "$out/js-$name.wasm"
    fi
  done
  report js "$start" "$out/js-echo.wasm" "$out/js-crash.wasm"
}

build_python() {
  local dir="$root/examples/python-echo" venv="$tools/python" start
  start=$(now)
  if ! command -v python3 >/dev/null; then
    apt_need python3 python3-venv
  fi
  local cpy="$venv/bin/componentize-py"
  if ! "$cpy" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
    if [ ! -x "$venv/bin/pip" ]; then
      python3 -m venv "$venv" 2>/dev/null || {
        rm -rf "$venv"
        apt_need python3-venv
        python3 -m venv "$venv"
      }
    fi
    log "pip install componentize-py==$COMPONENTIZE_PY_VERSION"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
  fi
  local name module
  for name in echo crash; do
    module=$([ "$name" = echo ] && echo app || echo crash)
    if stale "$out/python-$name.wasm" "$dir"/*.py "$cpy" "$root/wit" "$script"; then
      (cd "$dir" && PYTHONDONTWRITEBYTECODE=1 "$cpy" -q -d "$root/wit" -w "$world" \
        componentize "$module" -o "$out/python-$name.wasm.tmp" >&2)
      mv "$out/python-$name.wasm.tmp" "$out/python-$name.wasm"
    fi
  done
  report python "$start" "$out/python-echo.wasm" "$out/python-crash.wasm"
}

build_c() {
  local dir="$root/examples/c-echo" work="$out/c" start
  start=$(now)
  apt_need clang lld wasi-libc libclang-rt-dev-wasm32
  cargo_tool wit-bindgen wit-bindgen-cli "$WIT_BINDGEN_VERSION" --no-default-features --features c
  cargo_tool wasm-tools wasm-tools "$WASM_TOOLS_VERSION" \
    --no-default-features --features component,validate,print,parse
  mkdir -p "$work"
  local bindgen="$tools/cargo/bin/wit-bindgen" wasm_tools="$tools/cargo/bin/wasm-tools"

  # The wasi_snapshot_preview1 reactor adapter of wasmtime 48.0.8, from the
  # crate wasi-preview1-component-adapter-provider.
  local adapter="$work/wasi_snapshot_preview1.reactor.wasm"
  if stale "$adapter" "$dir/adapter/Cargo.toml" "$dir/adapter/Cargo.lock" "$dir/adapter/src"; then
    cargo run --quiet --locked --release --manifest-path "$dir/adapter/Cargo.toml" \
      --target-dir "$tools/adapter-target" -- "$adapter" >&2
  fi

  if stale "$work/gen/sockserver.h" "$root/wit" "$bindgen" "$script"; then
    rm -rf "$work/gen"
    # wit-bindgen names every file it writes; show that only on failure.
    local said
    if ! said=$("$bindgen" c "$root/wit" -w "$world" --out-dir "$work/gen" 2>&1); then
      echo "$said" >&2
      exit 1
    fi
  fi

  local name
  for name in echo crash; do
    if stale "$out/c-$name.wasm" "$dir"/*.c "$dir"/*.h "$work/gen" "$adapter" "$wasm_tools" "$script"; then
      clang --target=wasm32-wasi -O2 -Wall -Wextra -Werror -mexec-model=reactor \
        -I "$work/gen" "$dir/$name.c" "$work/gen/sockserver.c" \
        "$work/gen/sockserver_component_type.o" -o "$work/$name.core.wasm"
      "$wasm_tools" component new "$work/$name.core.wasm" \
        --adapt "wasi_snapshot_preview1=$adapter" -o "$out/c-$name.wasm.tmp"
      "$wasm_tools" validate "$out/c-$name.wasm.tmp"
      mv "$out/c-$name.wasm.tmp" "$out/c-$name.wasm"
    fi
  done
  report c "$start" "$out/c-echo.wasm" "$out/c-crash.wasm"
}

for lang in "${langs[@]}"; do
  "build_$lang"
done
