//! The one `bindgen!` for the `sockserver` world: host-side types for the
//! handler export and the `types` interface the host implements.
//!
//! All of `wasi:*` is remapped onto wasmtime-wasi's own bindings, so the
//! guest's standard-library imports (clocks, random, stdio, and the
//! `wasi:io` streams the handler receives) are served by wasmtime-wasi's
//! implementations and there is exactly one copy of every WASI type.

wasmtime::component::bindgen!({
    path: "wit",
    world: "sockserver:handler/sockserver",
    imports: { default: trappable },
    exports: { default: async },
    with: {
        "wasi": wasmtime_wasi::p2::bindings,
        "sockserver:handler/types.connection": crate::connection::ConnectionInfo,
    },
    require_store_data_send: true,
});

pub use sockserver::handler::types::{Host as TypesHost, HostConnection};
