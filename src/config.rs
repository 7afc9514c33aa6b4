//! Command-line options (clap derive), the size and duration parsers they
//! use, and the checks that run before anything is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;

use crate::limits::{EPOCH_TICK, Limits};

/// Serve TCP connections with a fresh, sandboxed WebAssembly component per
/// connection.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "wasm-sockserver",
    version,
    about,
    max_term_width = 100,
    after_help = "Signals: SIGINT or SIGTERM stops accepting and drains open connections (a \
                  second one exits at once); SIGHUP loads --module again for new connections \
                  while open ones finish on the old one."
)]
pub struct Config {
    /// The handler component (.wasm, or .wat in the text format) exporting
    /// sockserver:handler/handler.
    #[arg(long, value_name = "PATH")]
    pub module: PathBuf,

    /// Address to listen on; port 0 picks a free port (the chosen address is
    /// printed as `listening on IP:PORT`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,

    /// Serve the server's counters in Prometheus text format at
    /// http://ADDR/metrics (off by default; bind it to a private address).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Share the listening port with other processes that also pass this
    /// flag (SO_REUSEPORT): the kernel spreads new connections among them.
    /// For one server process per core, or to start a new build beside a
    /// running one and then stop the old one.
    #[arg(long)]
    pub reuse_port: bool,

    /// Most connections open at once. At the limit the server stops
    /// accepting and new clients wait in the kernel's backlog.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Linear memory per wasm memory of a connection's instance (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_memory)]
    pub max_memory: u64,

    /// Wasm execution time per connection, not counting time spent waiting
    /// for the client (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_cpu)]
    pub max_cpu: Duration,

    /// Close a connection when no byte has moved either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// Close any connection after this long, busy or not (default: no cap).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub max_lifetime: Option<Duration>,

    /// On Ctrl-C or SIGTERM, how long live connections may take to finish
    /// before they are cut off. A second signal exits at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Where compiled components are kept between runs (default:
    /// $XDG_CACHE_HOME/wasm-sockserver or ~/.cache/wasm-sockserver). Must be
    /// as trusted as this binary: its contents are loaded as native code.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,

    /// Compile the component from scratch and keep no compiled code on disk.
    #[arg(long)]
    pub no_cache: bool,
}

impl Config {
    /// The defaults for serving `module`, as if given on the command line
    /// with no other flags. Embedders adjust the public fields from here.
    pub fn new(module: impl Into<PathBuf>) -> Config {
        let mut config = Config::parse_from(["wasm-sockserver", "--module", "-"]);
        config.module = module.into();
        config
    }

    /// The per-connection limits these options describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_memory: usize::try_from(self.max_memory).unwrap_or(usize::MAX),
            max_cpu: self.max_cpu,
            idle_timeout: self.idle_timeout,
            max_lifetime: self.max_lifetime,
        }
    }

    /// The compiled-code cache directory in effect, if any.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(crate::cache::default_dir)
    }

    /// Checks that span options, or that an embedder may have broken by
    /// setting fields directly.
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        check_memory(self.max_memory)?;
        if self.max_cpu < EPOCH_TICK {
            bail!("--max-cpu must be at least {}", format_duration(EPOCH_TICK));
        }
        if self.idle_timeout.is_zero() {
            bail!("--idle-timeout must be greater than zero");
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            bail!("--max-lifetime must be greater than zero");
        }
        Ok(())
    }
}

/// Parse a byte size: a whole number with an optional unit, `64MiB`,
/// `512KiB`, `1GiB`, `65536`. `K`/`M`/`G` and `KB`/`MB`/`GB` are read as
/// binary units too, since memory limits are page multiples anyway.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "'{text}' is not a size (expected a number with an optional unit, like 64MiB)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, KiB, MiB or GiB)"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn check_memory(bytes: u64) -> Result<(), anyhow::Error> {
    if bytes < 64 * 1024 {
        bail!("--max-memory must be at least 64KiB (one wasm page)");
    }
    if bytes > 4 << 30 {
        bail!("--max-memory must be at most 4GiB (32-bit wasm memories cannot grow further)");
    }
    Ok(())
}

fn parse_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    check_memory(bytes).map_err(|e| e.to_string().replace("--max-memory must", "must"))?;
    Ok(bytes)
}

/// Parse a duration: a number with a unit, `500ms`, `30s`, `5m`, `2h`
/// (`us` and `d` work too). A bare number is refused: the unit is required
/// so that `--idle-timeout 300` cannot be misread.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("'{text}' is not a duration (expected a number with a unit, like 500ms, 30s or 5m)")
    })?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" | "sec" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        "" => return Err(format!("'{text}' needs a unit (ms, s, m or h)")),
        other => {
            return Err(format!(
                "unknown duration unit '{other}' (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{text}' is out of range"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

fn parse_cpu(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < EPOCH_TICK {
        return Err(format!(
            "must be at least {} (the CPU meter's resolution)",
            format_duration(EPOCH_TICK)
        ));
    }
    Ok(duration)
}

/// `65536` → `64KiB`, for messages.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 3] = [("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// `Duration` → `500ms` / `30s`, for messages.
pub fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12parsecs").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert_eq!(format_size(64 << 20), "64MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("300").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_cpu("0.5ms").is_err());
        assert_eq!(parse_cpu("1ms"), Ok(EPOCH_TICK));
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::new("x.wasm");
        config.validate().unwrap();
        assert_eq!(config.limits(), Limits::default());
    }
}
