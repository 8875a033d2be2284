//! The one way to connect to an etcd: plain or TLS, optionally with a client
//! certificate (with etcd's `--client-cert-auth` its CN is the etcd user).
//!
//! One set of timeouts for every caller: a connection attempt gives up
//! after [`CONNECT_TIMEOUT`], a request after [`REQUEST_TIMEOUT`], and an
//! idle connection is probed every [`KEEPALIVE_INTERVAL`] so a dead etcd
//! (or a cut network) is noticed within about ten seconds even while only
//! a watch is open.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Above etcd's `--grpc-keepalive-min-time` (5 s by default): etcd closes
/// a connection that pings more often once it has been quiet for three
/// pings (GOAWAY `too_many_pings`), which broke every watch of a quiet
/// cluster (`node-agent/tests/etcd_idle_watch.rs`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach and authenticate to one etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
}

fn read(what: &'static str, p: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|source| Error::ReadFile {
        what,
        path: p.to_owned(),
        source,
    })
}

impl EtcdConfig {
    /// Plain endpoints, no TLS.
    pub fn plain(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Connection options: the shared timeouts, and TLS when a CA or client
    /// certificate is given (the files are read now).
    pub fn options(&self) -> Result<ConnectOptions, Error> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("etcd CA", ca)?));
            }
            if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read("etcd client certificate", c)?,
                    read("etcd client key", k)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Connects (the connection itself is lazy: the first request proves
    /// the credentials).
    pub async fn connect(&self) -> Result<Client, Error> {
        let opts = self.options()?;
        Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(|source| Error::Connect {
                endpoints: self.endpoints.join(","),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_missing_certificate_file_is_named() {
        let cfg = EtcdConfig {
            endpoints: vec!["https://127.0.0.1:1".into()],
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = cfg.options().unwrap_err();
        assert!(e.to_string().contains("etcd CA /nonexistent/ca.pem"), "{e}");
    }
}
