//! Bad input on the command line: one line on stderr naming the problem, a
//! non-zero exit, and never a panic.

use std::os::fd::FromRawFd;

use crate::util::{guest, run_binary, tempdir};

/// Run with `args`; assert a non-zero exit and exactly one stderr line
/// containing every one of `needles`.
async fn refuses(args: &[&str], needles: &[&str]) {
    let (code, stderr) = run_binary(args).await;
    assert_ne!(code, 0, "{args:?} exited 0; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?} printed {} lines: {stderr}",
        lines.len()
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{args:?}: {:?} does not mention {needle:?}",
            lines[0]
        );
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

fn module(name: &str) -> String {
    guest(name).to_str().unwrap().to_string()
}

/// Ensure a missing module file is named with the OS reason.
#[tokio::test]
async fn missing_file() {
    refuses(
        &["--module", "/nonexistent/handler.wasm"],
        &["/nonexistent/handler.wasm", "No such file"],
    )
    .await;
}

/// Ensure a directory (unreadable as a file) is refused.
#[tokio::test]
async fn unreadable_file() {
    refuses(&["--module", "/"], &["cannot read module /"]).await;
}

/// Ensure a device that never ends is refused without being read.
#[tokio::test]
async fn device_file() {
    refuses(
        &["--module", "/dev/zero"],
        &["cannot read module /dev/zero", "not a regular file"],
    )
    .await;
}

/// Ensure a FIFO is refused at once: opening it for reading would otherwise
/// wait for a writer that never comes.
#[tokio::test]
async fn fifo() {
    let dir = tempdir();
    let path = dir.join("handler.wasm");
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    refuses(
        &["--module", path.to_str().unwrap()],
        &["not a regular file"],
    )
    .await;
}

/// Ensure a component whose initial memory is larger than --max-memory is
/// refused at load, naming both sizes, even when the limit is not a whole
/// number of 64 KiB pages (the pool's reservation is rounded up to one, so
/// only this check stands between such a component and a server on which
/// every connection fails).
#[tokio::test]
async fn initial_memory_beyond_limit() {
    // The echo starts with 17 pages (1088 KiB): Rust's 1 MiB stack and data.
    refuses(
        &["--module", &module("echo"), "--max-memory", "1100000"],
        &[
            "needs 1088KiB of initial linear memory",
            "more than --max-memory (1100000B)",
        ],
    )
    .await;
}

/// Ensure a file that is not wasm at all is called that.
#[tokio::test]
async fn not_wasm() {
    let dir = tempdir();
    let path = dir.join("notes.wasm");
    std::fs::write(&path, b"this is not webassembly").unwrap();
    refuses(
        &["--module", path.to_str().unwrap()],
        &["is not a WebAssembly binary"],
    )
    .await;
}

/// Ensure a handler in the text format (`.wat`, in any case) with a
/// mistake is refused on one line naming where the mistake is; one that
/// assembles but does not validate like any invalid component; a core
/// module in text as such; the file's own names in either kind of message
/// escaped; and columns counted in characters, not bytes.
#[tokio::test]
async fn wat_with_a_mistake() {
    let dir = tempdir();
    let cases: [(&str, &[u8], &[&str]); 8] = [
        (
            "handler.wat",
            b"(component\n  (core module (oops)))\n",
            &["handler.wat is not valid component text: line 2, column 17"],
        ),
        (
            "upper.WAT",
            b"(component\n  \xff)",
            &["upper.WAT is not valid component text: line 2, column 3: not UTF-8"],
        ),
        (
            "accents.wat",
            "(component\n  (; éé ;) (core module (oops)))\n".as_bytes(),
            &["accents.wat is not valid component text: line 2, column 26"],
        ),
        (
            "accent-then-bad-byte.wat",
            b"(component\n  \xc3\xa9\xff)",
            &["is not valid component text: line 2, column 4: not UTF-8"],
        ),
        (
            "names.wat",
            b"(component (core module (func (call $\"x\\1b[2J\"))))",
            &["is not valid component text: line 1", "x\\u{1b}[2J"],
        ),
        (
            "exports.wat",
            b"(component (core module (func (export \"a\\1b[2J\")) (func (export \"a\\1b[2J\"))))",
            &["exports.wat is not a valid component", "a\\u{1b}[2J"],
        ),
        (
            "invalid.wat",
            b"(component (core module (func (result i32) i64.const 1)))",
            &["invalid.wat is not a valid component", "type mismatch"],
        ),
        (
            "core.wat",
            b"(module (func))",
            &["core.wat holds a core module, not a `(component ...)`"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        refuses(&["--module", path.to_str().unwrap()], needles).await;
    }
    // Text beyond 16 MiB is refused before it is parsed: its syntax tree
    // would take many times as much.
    let path = dir.join("huge.wat");
    let mut huge = b"(component".to_vec();
    huge.resize((16 << 20) + 1, b' ');
    std::fs::write(&path, huge).unwrap();
    refuses(
        &["--module", path.to_str().unwrap()],
        &["cannot read module", "huge.wat: larger than 16MiB"],
    )
    .await;
}

/// Ensure a core module is recognised as such, with how to make a
/// component.
#[tokio::test]
async fn core_module() {
    let dir = tempdir();
    let path = dir.join("core.wasm");
    std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
    refuses(
        &["--module", path.to_str().unwrap()],
        &["core wasm module, not a component", "wasm32-wasip2"],
    )
    .await;
}

/// Ensure a component without the handler export is refused, naming what
/// it does export.
#[tokio::test]
async fn missing_handler_export() {
    refuses(
        &["--module", &module("wrongexport")],
        &[
            "does not export sockserver:handler/handler@0.1.0",
            "wasi:cli/run@0.2",
        ],
    )
    .await;
}

/// Ensure a component importing something the host lacks is refused,
/// naming the import.
#[tokio::test]
async fn missing_import() {
    refuses(
        &["--module", &module("badimport")],
        &["sockserver-test:badimport/missing"],
    )
    .await;
}

/// Ensure a port already in use is reported as such.
#[tokio::test]
async fn address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    refuses(
        &["--module", &module("echo"), "--listen", &addr],
        &[&addr, "in use"],
    )
    .await;
}

/// Ensure a metrics port already in use is refused before serving, and
/// named as the metrics port.
#[tokio::test]
async fn metrics_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    refuses(
        &[
            "--module",
            &module("echo"),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &addr,
        ],
        &["metrics", &addr, "in use"],
    )
    .await;
}

/// Ensure an unparsable listen address is refused.
#[tokio::test]
async fn invalid_address() {
    refuses(
        &["--module", &module("echo"), "--listen", "localhost:seven"],
        &["--listen", "localhost:seven"],
    )
    .await;
}

/// Ensure `--max-connections 0` is refused.
#[tokio::test]
async fn zero_connections() {
    refuses(
        &["--module", &module("echo"), "--max-connections", "0"],
        &["--max-connections", "0"],
    )
    .await;
}

/// Ensure a missing --module is one line too.
#[tokio::test]
async fn no_module() {
    refuses(&[], &["--module"]).await;
}

/// Ensure `--help` and `--version` work and exit 0.
#[tokio::test]
async fn help_and_version() {
    let (code, _) = run_binary(&["--help"]).await;
    assert_eq!(code, 0);
    let out = crate::util::binary()
        .arg("--version")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wasm-sockserver 0.1.0"));
}

/// Ensure the exit code still says what happened when stderr is a pipe
/// nobody reads any more (the reader exited): 2 for a bad flag, 1 for a
/// bad module, not the 101 of a panic while printing the reason.
#[tokio::test]
async fn closed_stderr_keeps_the_exit_code() {
    for (args, expected) in [
        (&["--bogus"][..], 2),
        (&["--module", "/nonexistent/handler.wasm"][..], 1),
    ] {
        let mut fds = [0; 2];
        // Close-on-exec, so that no server another test starts meanwhile
        // inherits the read end and keeps the pipe open.
        // SAFETY: pipe2 writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are ours and open; the read end is
        // closed at once, the write end owned by the child's Stdio.
        let write_end = unsafe {
            libc::close(fds[0]);
            std::os::fd::OwnedFd::from_raw_fd(fds[1])
        };
        let status = tokio::time::timeout(
            crate::util::PATIENCE,
            crate::util::binary()
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::from(write_end))
                .status(),
        )
        .await
        .expect("binary exits")
        .unwrap();
        assert_eq!(status.code(), Some(expected), "{args:?}");
    }
}

/// Ensure an unusable cache directory adds no warning to a bad module's
/// one-line error: the cache speaks only about a handler that loads.
#[tokio::test]
async fn unusable_cache_with_a_bad_module() {
    refuses(
        &[
            "--module",
            &module("wrongexport"),
            "--cache-dir",
            "/dev/null",
        ],
        &["does not export"],
    )
    .await;
}
