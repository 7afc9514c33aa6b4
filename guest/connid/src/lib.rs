//! Test fixture: writes `ID PEER LOCAL\n` from the connection resource,
//! prints a line to stdout and one to stderr (which the host logs tagged
//! with the connection id), then returns `err` if the client sent `fail`.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct ConnId;

impl Handler for ConnId {
    fn handle(conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        let line = format!(
            "{} {} {}\n",
            conn.id(),
            conn.peer_address(),
            conn.local_address()
        );
        sockserver_guest::write_all(&output, line.as_bytes()).map_err(|e| e.to_string())?;
        output
            .blocking_flush()
            .map_err(|e| format!("flush failed: {e:?}"))?;
        println!("hello from connection {}", conn.id());
        eprintln!("stderr line one\nstderr line two");
        let request = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())?;
        if request.as_deref() == Some(&b"fail"[..]) {
            return Err("client asked for failure".into());
        }
        Ok(())
    }
}

export_handler!(ConnId);
