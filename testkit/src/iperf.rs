//! iperf3 runs for the throughput benchmarks: one TCP stream between two
//! network namespaces, robust to the server's start-up race.

use crate::netns::NetNs;

static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(5301);

/// One iperf3 run from `client` to `server_ip`; Gbit/s received, or why
/// there was no result after three tries. Each run
/// uses a fresh port (no clash with a server still exiting). The client is
/// retried while the server is not listening yet: iperf3 -J reports
/// "connection refused" as JSON, sometimes with exit status 0, so the JSON
/// decides, not the exit status. Any other error retries with a new server.
pub fn iperf(
    server: &NetNs,
    client: &NetNs,
    server_ip: &str,
    seconds: u64,
) -> std::io::Result<f64> {
    let mut last = String::new();
    for _ in 0..3 {
        let port = PORT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let mut srv = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                server.name(),
                "iperf3",
                "-s",
                "-1",
                "-p",
                &port,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut result = None;
        for _ in 0..100 {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", client.name(), "iperf3", "-c", server_ip])
                .args(["-p", &port, "-t", &seconds.to_string(), "-J"])
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                result = Some(bps / 1e9);
                break;
            }
            last = v["error"].to_string();
            if !last.contains("refused") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = srv.kill();
        let _ = srv.wait();
        if let Some(r) = result {
            return Ok(r);
        }
    }
    Err(std::io::Error::other(format!(
        "iperf3 gave no result: {last}"
    )))
}

/// (median, min, max); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
