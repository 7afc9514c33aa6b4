//! Test fixture: echoes until a chunk contains `resflood` or `droporder`.
//! - `resflood`: creates pollables forever and keeps every one, until the
//!   host's table cap stops it;
//! - `droporder`: drops the input stream while a pollable made from it is
//!   still alive, which traps (the resource has children): a guest bug,
//!   not a limit.

use sockserver_guest::{Connection, Handler, InputStream, OutputStream, export_handler};

struct ResFlood;

impl Handler for ResFlood {
    fn handle(_conn: Connection, input: InputStream, output: OutputStream) -> Result<(), String> {
        while let Some(chunk) = sockserver_guest::read_chunk(&input).map_err(|e| e.to_string())? {
            let has = |word: &[u8]| chunk.windows(word.len()).any(|w| w == word);
            if has(b"resflood") {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(input.subscribe());
                }
            }
            if has(b"droporder") {
                let pollable = input.subscribe();
                drop(input);
                drop(pollable);
                return Err("dropping a stream before its pollable did not trap".into());
            }
            sockserver_guest::send(&output, &chunk).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

export_handler!(ResFlood);
