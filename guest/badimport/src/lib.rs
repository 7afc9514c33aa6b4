//! Test fixture: exports the handler but also imports
//! `sockserver-test:badimport/missing`, which no host provides; the server
//! must refuse to load it and name the import.

wit_bindgen::generate!({
    path: ["../../wit", "wit"],
    world: "sockserver-test:badimport/badimport",
    generate_all,
});

use exports::sockserver::handler::handler::Guest;
use sockserver::handler::types::Connection;
use wasi::io::streams::{InputStream, OutputStream};

struct BadImport;

impl Guest for BadImport {
    fn handle(_conn: Connection, _input: InputStream, output: OutputStream) -> Result<(), String> {
        let n = sockserver_test::badimport::missing::frob();
        output
            .blocking_write_and_flush(format!("{n}\n").as_bytes())
            .map_err(|e| format!("{e:?}"))
    }
}

export!(BadImport);
