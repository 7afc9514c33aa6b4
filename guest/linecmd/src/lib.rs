//! Example handler: a tiny line protocol written as ordinary `std::io` code
//! (a `BufReader` line loop and `writeln!`), one connection per instance.
//!
//! ```text
//! SET key value   -> OK
//! GET key         -> the value, or (nil)
//! UPPER text      -> TEXT
//! TIME            -> seconds since the Unix epoch
//! QUIT            -> BYE, then the server closes the connection
//! ```
//!
//! The store lives in the instance, so it is per connection: a fresh
//! sandbox starts empty.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use sockserver_guest::{
    Connection, Handler, InputStream, OutputStream, Reader, Writer, export_handler,
};

struct LineCmd;

impl Handler for LineCmd {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        serve(BufReader::new(Reader::new(input)), Writer::new(output)).map_err(|e| e.to_string())
    }
}

fn serve(input: impl BufRead, mut out: impl Write) -> std::io::Result<()> {
    let mut store = HashMap::new();
    for line in input.lines() {
        let line = line?;
        let (command, rest) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.trim_end(), ""));
        match command.to_ascii_uppercase().as_str() {
            "SET" => match rest.split_once(' ') {
                Some((key, value)) => {
                    store.insert(key.to_string(), value.to_string());
                    writeln!(out, "OK")?;
                }
                None => writeln!(out, "ERR usage: SET key value")?,
            },
            "GET" => match store.get(rest) {
                Some(value) => writeln!(out, "{value}")?,
                None => writeln!(out, "(nil)")?,
            },
            "UPPER" => writeln!(out, "{}", rest.to_uppercase())?,
            "TIME" => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                writeln!(out, "{}", now.as_secs())?;
            }
            "QUIT" => {
                writeln!(out, "BYE")?;
                return out.flush();
            }
            "" => continue,
            other => writeln!(out, "ERR unknown command {other}")?,
        }
        out.flush()?;
    }
    Ok(())
}

export_handler!(LineCmd);
