//! Connecting to this cluster's etcd (plain or TLS, optionally mutual).

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::EtcdConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
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

fn read(what: &'static str, p: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|source| Error::ReadFile {
        what,
        path: p.display().to_string(),
        source,
    })
}

/// Connection options from the configuration: TLS when a CA or client
/// certificate is given.
pub fn options(cfg: &EtcdConfig) -> Result<ConnectOptions, Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read("etcd CA", ca)?));
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("etcd client certificate", c)?,
                read("etcd client key", k)?,
            ));
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

pub async fn connect(cfg: &EtcdConfig) -> Result<Client, Error> {
    let opts = options(cfg)?;
    Client::connect(&cfg.endpoints, Some(opts))
        .await
        .map_err(|source| Error::Connect {
            endpoints: cfg.endpoints.join(","),
            source,
        })
}
