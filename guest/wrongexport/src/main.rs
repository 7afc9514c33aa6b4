//! Test fixture: a WASI command (exports `wasi:cli/run`), which the server
//! must refuse because it does not export the handler interface.

fn main() {
    println!("not a handler");
}
