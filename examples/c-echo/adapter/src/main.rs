//! `write-adapter OUT`: write the wasi_snapshot_preview1 reactor adapter of
//! wasmtime 48.0.8 to OUT.
use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .expect("usage: write-adapter OUT");
    std::fs::write(&out, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER).expect("write the adapter");
}
