//! A real etcd server (Debian `etcd-server`) for tests: free loopback ports,
//! a temporary data dir, killed and removed on drop.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// TLS for the client port: server certificate, and optionally required
/// client certificates (`--client-cert-auth`: the CN is the etcd user).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_cert_auth: bool,
    /// A client certificate and key used only to probe health.
    pub probe_cert_file: PathBuf,
    pub probe_key_file: PathBuf,
}

/// A running etcd member.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    name: String,
    tls: Option<EtcdTls>,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> io::Result<Self> {
        Self::start_with(None)
    }

    /// Starts etcd serving TLS on its client port.
    pub fn start_tls(tls: EtcdTls) -> io::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> io::Result<Self> {
        let mut last = None;
        for _ in 0..5 {
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let mut s = Self {
                child: None,
                dir: tempfile::Builder::new().prefix("cm-etcd-").tempdir()?,
                client_port,
                peer_port,
                name: "t".to_owned(),
                tls: tls.clone(),
            };
            match s
                .spawn()
                .and_then(|()| s.wait_healthy(Duration::from_secs(20)))
            {
                Ok(()) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(&t.cert_file);
            cmd.arg("--key-file").arg(&t.key_file);
            cmd.arg("--trusted-ca-file").arg(&t.ca_file);
            if t.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "etcd exited with {status}: {}",
                    self.log_tail()
                )));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd not healthy after {timeout:?}: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers its health check.
    pub fn healthy(&self) -> bool {
        if let Some(t) = &self.tls {
            return Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "--dial-timeout", "1s"])
                .arg("--cacert")
                .arg(&t.ca_file)
                .arg("--cert")
                .arg(&t.probe_cert_file)
                .arg("--key")
                .arg(&t.probe_key_file)
                .args(["endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS)
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill()?;
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(20))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
