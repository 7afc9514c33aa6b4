//! Shared test helpers: building the guest fixtures once, an in-process
//! server on port 0, the binary on port 0, and socket clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use wasm_sockserver::{Config, OutcomeKind, Reloader, Server, Stats};

/// Generous bound for things that should take milliseconds: a failure here
/// is a hang, not a slow machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The path of guest fixture `name`, building every guest (once per test
/// run) with the same script a developer uses.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = std::process::Command::new("bash")
            .arg(root().join("scripts/build-guests.sh"))
            .status()
            .expect("run scripts/build-guests.sh");
        assert!(status.success(), "building the guests failed");
    });
    let path = root()
        .join("guest/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(path.exists(), "no guest fixture {}", path.display());
    path
}

/// A fresh directory for this test's files.
pub fn tempdir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wasm-sockserver-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Put `from` in place at `to` the way a deploy should: write beside it,
/// then rename, so a reload never reads half a file.
pub fn install(from: &Path, to: &Path) {
    let next = to.with_extension("next");
    std::fs::copy(from, &next).unwrap();
    std::fs::rename(&next, to).unwrap();
}

/// A fresh directory holding a copy of `from` as `handler.wasm`, for a
/// server to load and a test to replace before a reload. Returns the
/// directory and the module's path.
pub fn stage(from: &Path) -> (PathBuf, PathBuf) {
    let dir = tempdir();
    let module = dir.join("handler.wasm");
    install(from, &module);
    (dir, module)
}

/// [`install`] for bytes that are not a file yet.
pub fn install_bytes(bytes: &[u8], to: &Path) {
    let next = to.with_extension("next");
    std::fs::write(&next, bytes).unwrap();
    std::fs::rename(&next, to).unwrap();
}

/// A config for fixture `name` with a small pool, so many test servers fit
/// in one process.
pub fn config(name: &str) -> Config {
    config_for(guest(name))
}

/// A test config for the component at `module`: port 0, a small pool, a
/// short drain and the test suite's own compiled-code cache.
pub fn config_for(module: PathBuf) -> Config {
    let mut config = Config::new(module);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.max_connections = 100;
    config.shutdown_timeout = Duration::from_secs(5);
    config.cache_dir = Some(test_cache());
    config
}

/// A compiled-code cache private to the test suite.
pub fn test_cache() -> PathBuf {
    root().join("target/test-cache")
}

/// A server running in this process on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub reloader: Reloader,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let server = Server::new(&config).expect("load the server");
        let listener = wasm_sockserver::bind(config.listen).expect("bind");
        let addr = listener.local_addr().unwrap();
        let stats = server.stats();
        let reloader = server.reloader();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            stats,
            reloader,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Wait (bounded) until the counters satisfy `condition`.
    pub async fn wait_for(&self, what: &str, condition: impl FnMut(&Stats) -> bool) {
        if tokio::time::timeout(PATIENCE, self.stats.wait_for(condition))
            .await
            .is_err()
        {
            panic!(
                "timed out waiting for {what}: open={} stores={} closed={}",
                self.stats.open_connections(),
                self.stats.live_stores(),
                self.stats.closed()
            );
        }
    }

    /// Stop the server and wait for it to finish draining.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// Send `data`, half-close, and read everything until EOF, concurrently so
/// neither side's buffers fill up.
pub async fn roundtrip(stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = stream.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, rd.read_to_end(&mut got))
        .await
        .expect("echo finishes")
        .unwrap();
    let _ = writer.await.unwrap();
    got
}

/// Write `msg` and read exactly as many bytes back.
pub async fn ping(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
        .await
        .expect("echo reply")
        .unwrap();
    back
}

/// A fresh connection to `listener`, for tests that hand the accepted side
/// to [`serve_stream`](wasm_sockserver::serve_stream) themselves: the
/// client, the accepted stream and the client's address.
pub async fn connect_pair(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
    let (client, accepted) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let (tcp, peer) = accepted.unwrap();
    (client.unwrap(), tcp, peer)
}

/// Read until EOF or error; returns what was read and whether it ended in
/// an error (a reset) rather than a clean EOF.
pub async fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("server closes")
        {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, true),
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The server binary, started with `args`, with stdout and stderr piped.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    /// stderr lines, read by a background task so the server never blocks
    /// on a full pipe while a test is busy elsewhere.
    pub stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// The binary's command line for serving guest fixture `fixture` on
/// 127.0.0.1:0, with `extra` flags.
pub fn fixture_command(fixture: &str, extra: &[&str]) -> Command {
    module_command(&guest(fixture), extra)
}

/// The binary's command line for serving the component at `module` on
/// 127.0.0.1:0, with `extra` flags.
pub fn module_command(module: &Path, extra: &[&str]) -> Command {
    let mut cmd = binary();
    cmd.args([
        "--module",
        module.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    cmd.args(extra);
    cmd
}

pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasm-sockserver"));
    cmd.env("XDG_CACHE_HOME", root().join("target/test-xdg-cache"))
        .env("RUST_LOG", "info,wasm_sockserver::cache=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

impl Binary {
    /// Start the binary serving guest fixture `fixture` on 127.0.0.1:0,
    /// with `extra` flags.
    pub async fn fixture(fixture: &str, extra: &[&str]) -> Binary {
        Binary::start_with(&mut fixture_command(fixture, extra)).await
    }

    /// Like [`Binary::fixture`], with `setup` run in the child just before
    /// the binary starts (resource limits, CPU affinity).
    ///
    /// # Safety
    /// `setup` runs between fork and exec: it may only make
    /// async-signal-safe calls.
    pub async unsafe fn fixture_with(
        fixture: &str,
        extra: &[&str],
        setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Binary {
        let mut cmd = fixture_command(fixture, extra);
        // SAFETY: the caller promises `setup` is async-signal-safe.
        unsafe { cmd.pre_exec(setup) };
        Binary::start_with(&mut cmd).await
    }

    /// Start the binary and wait for its `listening on` line.
    pub async fn start(args: &[&str]) -> Binary {
        Binary::start_with(binary().args(args)).await
    }

    pub async fn start_with(cmd: &mut Command) -> Binary {
        Binary::spawn(cmd, None).await
    }

    /// Like [`Binary::start_with`], but nothing reads the server's stderr
    /// until the returned sender is used (or dropped): a log reader that
    /// stalls.
    pub async fn start_stalled(cmd: &mut Command) -> (Binary, tokio::sync::oneshot::Sender<()>) {
        let (open, gate) = tokio::sync::oneshot::channel();
        (Binary::spawn(cmd, Some(gate)).await, open)
    }

    async fn spawn(cmd: &mut Command, gate: Option<tokio::sync::oneshot::Receiver<()>>) -> Binary {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn binary");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("listening line in time")
            .unwrap()
            .expect("a listening line");
        let addr = first
            .strip_prefix("listening on ")
            .expect("listening on IP:PORT")
            .parse()
            .expect("an address");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, stderr) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary {
            child,
            addr,
            stderr,
        }
    }

    /// Read stderr until a line containing every one of `needles`; returns
    /// that line. Panics if the process closes stderr first.
    pub async fn log_line(&mut self, needles: &[&str]) -> String {
        let wait = async {
            while let Some(line) = self.stderr.recv().await {
                if needles.iter().all(|n| line.contains(n)) {
                    return line;
                }
            }
            panic!("stderr closed before a line with {needles:?}");
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("no log line with {needles:?}"))
    }

    /// SIGTERM the server and assert that it exits 0 once drained.
    pub async fn stop_cleanly(&mut self) {
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the server exits after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }

    /// Send a signal to the server process.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

/// Run the binary with `args` to completion (it must exit on its own).
/// Returns the exit code and stderr.
pub async fn run_binary(args: &[&str]) -> (i32, String) {
    let mut cmd = binary();
    cmd.env("RUST_LOG", "info").args(args);
    // An open-file limit below what the default --max-connections needs,
    // as on many hosts: a warning about it must not come before an error
    // about the input (which must be the only line).
    // SAFETY: set_nofile only calls setrlimit, which is async-signal-safe.
    unsafe { cmd.pre_exec(set_nofile(256, 256)) };
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .expect("binary exits")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fields of /proc/PID/status, in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) the process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

impl Binary {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Read stderr until `count` lines containing every one of `needles`
    /// have been seen; returns them.
    pub async fn log_lines(&mut self, needles: &[&str], count: usize) -> Vec<String> {
        let mut found = Vec::new();
        while found.len() < count {
            found.push(self.log_line(needles).await);
        }
        found
    }

    /// SIGTERM, wait for exit 0, and return the `shutdown complete` line.
    pub async fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let summary = self.log_line(&["shutdown complete"]).await;
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(0), "server exit status");
        summary
    }
}

/// A [`Binary::fixture_with`] setup that pins the server to the first CPU,
/// as the benchmark does: every connection then competes for one thread.
pub fn pin_to_first_cpu() -> std::io::Result<()> {
    // SAFETY: sched_setaffinity is async-signal-safe, and the set is a
    // plain bit mask initialised here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A [`Binary::fixture_with`] setup that sets the open-file limit.
pub fn set_nofile(
    soft: u64,
    hard: u64,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit is async-signal-safe and only reads `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A [`Binary::fixture_with`] setup that installs a seccomp filter making
/// every `accept4` (what tokio's listener calls on Linux) fail with EPERM,
/// as a systemd `SystemCallFilter=` that leaves it out does. Everything
/// else is allowed, so the server starts and listens.
pub fn deny_accept() -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    let filter = [
        // Load the system call number; deny accept4.
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        op(jeq, libc::SYS_accept4 as u32, 1, 0),
        op(ret, libc::SECCOMP_RET_ALLOW, 0, 0),
        op(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32, 0, 0),
    ];
    move || {
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: prctl is async-signal-safe; the kernel copies `program`
        // and the filter it points to, which outlive the calls.
        let installed = unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) == 0
        };
        if !installed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A canary: one echo connection that must keep round-tripping correct
/// bytes. `check` returns the round-trip time.
pub struct Canary {
    stream: TcpStream,
    round: u64,
}

impl Canary {
    pub async fn connect(addr: SocketAddr) -> Canary {
        let stream = TcpStream::connect(addr).await.expect("canary connects");
        stream.set_nodelay(true).unwrap();
        let mut canary = Canary { stream, round: 0 };
        canary.check().await;
        canary
    }

    /// Keep echoing, a round every 50ms, until `until` completes (so the
    /// idle timeout never takes the canary, and every round proves the
    /// server still answers); returns what `until` gave.
    pub async fn busy_until<T>(&mut self, until: impl std::future::Future<Output = T>) -> T {
        let mut until = std::pin::pin!(until);
        let mut beat = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                out = &mut until => return out,
                _ = beat.tick() => {
                    self.check().await;
                }
            }
        }
    }

    pub async fn check(&mut self) -> Duration {
        self.round += 1;
        let msg = pattern(64, self.round);
        let start = std::time::Instant::now();
        assert_eq!(
            ping(&mut self.stream, &msg).await,
            msg,
            "canary round {}",
            self.round
        );
        start.elapsed()
    }
}

/// The number in `key=NUMBER` within a log line.
pub fn field(line: &str, key: &str) -> f64 {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    let value: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    value
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not a number in {line}"))
}

/// The isolation check shared by every crashing fixture: A echoes before,
/// during and after B sends `crash`; B is closed
/// with nothing echoed and counted as `crash_outcome`; a new C is served.
///
/// `expect_reset`: B must see a reset rather than a FIN. That holds when the
/// guest still owns its output at the trap; a handler that drops `output` on
/// the way out (Python's `with`, a JS `finally`) half-closes first, and the
/// client then sees the FIN before the reset.
pub async fn crash_ends_only_its_connection(
    server: &TestServer,
    name: &str,
    crash_outcome: OutcomeKind,
    expect_reset: bool,
) {
    let mut a = server.connect().await;
    assert_eq!(ping(&mut a, b"before").await, b"before");

    let mut b = server.connect().await;
    assert_eq!(ping(&mut b, b"hello").await, b"hello");
    b.write_all(b"crash").await.unwrap();
    let (rest, reset) = read_to_close(&mut b).await;
    assert!(
        rest.is_empty(),
        "{name}: the crashing connection echoed {rest:?}"
    );
    if expect_reset {
        assert!(
            reset,
            "{name}: a trapped connection must be reset, not closed like a finished one"
        );
    }
    server
        .wait_for("B's crash to be counted", |s| {
            s.outcomes(crash_outcome) == 1
        })
        .await;

    assert_eq!(ping(&mut a, b"during").await, b"during");
    let mut c = server.connect().await;
    assert_eq!(ping(&mut c, b"after").await, b"after");
    assert_eq!(ping(&mut a, b"still here").await, b"still here");
    drop((a, c));
    server
        .wait_for("all connections to close", |s| {
            s.closed() == 3 && s.live_stores() == 0
        })
        .await;
    assert_eq!(server.stats.outcomes(crash_outcome), 1, "{name}");
    assert_eq!(server.stats.outcomes(OutcomeKind::Ok), 2, "{name}");
}
