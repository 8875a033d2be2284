//! Machine-readable benchmark figures, next to each benchmark's
//! human-readable output.
//!
//! When `CLUSTERMESH_BENCH_JSON=<file>` is set, [`record`] appends one JSON
//! line per figure to that file:
//! `{bench, case, unit, median, min, max, p99, baseline, baseline_median,
//! ratio, baselines: [{case, median, ratio}], better, params}` (the first
//! baseline is the primary one; `median` of a latency is its p50). `cargo xtask bench` sets it, runs every
//! benchmark with real sizes and renders `docs/benchmarks.md` from the
//! lines. Without the variable nothing is written.
//!
//! Also: percentiles of a sample, and a small TCP request/response loop
//! (latency of one round trip over one connection) run between two
//! network namespaces.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

pub use serde_json;

use crate::netns::NetNs;

/// The environment variable naming the JSON-lines file.
pub const ENV: &str = "CLUSTERMESH_BENCH_JSON";

/// Which direction of a figure is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One figure of one benchmark case.
#[derive(Debug, Clone)]
pub struct Figure {
    pub bench: &'static str,
    pub case: String,
    pub unit: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// For latencies: the 99th percentile.
    pub p99: Option<f64>,
    /// The cases this one is compared with, measured in the same run:
    /// (case, its median); the first is the primary one.
    pub baselines: Vec<(String, f64)>,
    pub better: Better,
    /// Sizes and settings of the run (free-form).
    pub params: serde_json::Value,
}

impl Figure {
    /// A figure from (median, min, max).
    pub fn new(
        bench: &'static str,
        case: impl Into<String>,
        unit: &'static str,
        (median, min, max): (f64, f64, f64),
        better: Better,
    ) -> Self {
        Self {
            bench,
            case: case.into(),
            unit,
            median,
            min,
            max,
            p99: None,
            baselines: Vec::new(),
            better,
            params: serde_json::Value::Null,
        }
    }

    /// A latency figure from its percentiles.
    pub fn latency(
        bench: &'static str,
        case: impl Into<String>,
        unit: &'static str,
        p: &Percentiles,
    ) -> Self {
        let mut f = Self::new(bench, case, unit, (p.p50, p.min, p.max), Better::Lower);
        f.p99 = Some(p.p99);
        f
    }

    /// Adds a baseline (the first added is the primary one).
    pub fn baseline(mut self, name: impl Into<String>, median: f64) -> Self {
        self.baselines.push((name.into(), median));
        self
    }

    pub fn params(mut self, params: serde_json::Value) -> Self {
        self.params = params;
        self
    }

    /// Median over the primary baseline's median.
    pub fn ratio(&self) -> Option<f64> {
        self.baselines
            .first()
            .and_then(|(_, b)| (*b != 0.0).then(|| self.median / b))
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bench": self.bench,
            "case": self.case,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "p99": self.p99,
            "baseline": self.baselines.first().map(|b| &b.0),
            "baseline_median": self.baselines.first().map(|b| b.1),
            "ratio": self.ratio(),
            "baselines": self.baselines.iter().map(|(case, m)| serde_json::json!({
                "case": case,
                "median": m,
                "ratio": (*m != 0.0).then(|| self.median / m),
            })).collect::<Vec<_>>(),
            "better": match self.better { Better::Higher => "higher", Better::Lower => "lower" },
            "params": self.params,
        })
    }
}

/// Appends `fig` to the file named by [`ENV`], if set. Failing to write is
/// reported on stderr, not fatal (the printed figures stand).
pub fn record(fig: &Figure) {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let line = format!("{}\n", fig.to_json());
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = r {
        eprintln!(
            "report: writing {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}

/// Order statistics of a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; an empty sample gives zeros.
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Self {
            n: v.len(),
            min: v[0],
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Request/response latency: one TCP connection from `client` to
/// `server_ip:port` (a small echo server started in `server`), `iterations`
/// round trips of `size` bytes each way, Nagle off. Returns each round
/// trip's duration in microseconds (after `iterations / 10` warm-up trips).
pub fn tcp_rr(
    server: &NetNs,
    client: &NetNs,
    server_ip: std::net::IpAddr,
    port: u16,
    size: usize,
    iterations: usize,
) -> std::io::Result<Vec<f64>> {
    let addr = SocketAddr::new(server_ip, port);
    let warmup = iterations / 10;
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let srv = s.spawn(move || -> std::io::Result<()> {
            let _in = server.enter()?;
            let l = TcpListener::bind(addr);
            let l = match l {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            // Accept with a deadline: a client that never connects must not
            // leave this thread (and the scope) waiting forever.
            l.set_nonblocking(true)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut c = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(std::io::Error::other("no client within 10 s"));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            };
            c.set_nonblocking(false)?;
            c.set_nodelay(true)?;
            let mut buf = vec![0u8; size];
            loop {
                match c.read_exact(&mut buf) {
                    Ok(()) => c.write_all(&buf)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| std::io::Error::other("echo server did not start"))??;
        let cli = s.spawn(move || -> std::io::Result<Vec<f64>> {
            let _in = client.enter()?;
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let msg = vec![0x5au8; size];
            let mut buf = vec![0u8; size];
            let mut out = Vec::with_capacity(iterations);
            for i in 0..warmup + iterations {
                let t = Instant::now();
                c.write_all(&msg)?;
                c.read_exact(&mut buf)?;
                if i >= warmup {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(out)
        });
        let r = cli
            .join()
            .map_err(|_| std::io::Error::other("client thread panicked"))?;
        let s = srv
            .join()
            .map_err(|_| std::io::Error::other("server thread panicked"))?;
        let out = r?;
        s?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.min, p.p50, p.p99, p.max), (1.0, 50.0, 99.0, 100.0));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]).n, 0);
    }

    #[test]
    fn ratio_needs_a_baseline() {
        let f = Figure::new("b", "c", "x", (2.0, 1.0, 3.0), Better::Higher);
        assert_eq!(f.ratio(), None);
        assert_eq!(f.clone().baseline("base", 4.0).ratio(), Some(0.5));
        let j = f.baseline("base", 4.0).to_json();
        assert_eq!(j["ratio"], 0.5);
        assert_eq!(j["better"], "higher");
    }
}
