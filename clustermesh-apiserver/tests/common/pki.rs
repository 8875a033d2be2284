//! A cluster CA with the certificates the authorization tests present:
//! the admin (`root`), node-1 and node-2, a reader of the same CA
//! (`remote-c1`), and `root` of another CA.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use clustermesh_api::proto::cluster_mesh_client::ClusterMeshClient;
use clustermesh_crypto::pki::{Ca, Usage};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let ca = Ca::generate("c1").unwrap();
        let other = Ca::generate("elsewhere").unwrap();
        let w = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
        w("ca.pem", ca.cert_pem());
        let server = ca
            .issue("clustermesh-apiserver", &["127.0.0.1"], Usage::Server)
            .unwrap();
        w("server.pem", &server.cert_pem);
        w("server-key.pem", &server.key_pem);
        for (file, cn, from) in [
            ("admin", "root", &ca),
            ("node-1", "node:node-1", &ca),
            ("node-2", "node:node-2", &ca),
            ("reader", "remote-c1", &ca),
            ("stranger", "root", &other),
        ] {
            let c = from.issue(cn, &[], Usage::Client).unwrap();
            w(&format!("{file}.pem"), &c.cert_pem);
            w(&format!("{file}-key.pem"), &c.key_pem);
        }
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// `cfg` serving gRPC over mutual TLS with this CA's server
    /// certificate (no plaintext), auditing into `audit.jsonl` of this
    /// directory, whose path is returned.
    pub fn secure(&self, cfg: &mut clustermesh_apiserver::Config) -> PathBuf {
        cfg.grpc_tls = Some(clustermesh_apiserver::config::GrpcTls {
            cert_file: self.path("server.pem"),
            key_file: self.path("server-key.pem"),
            client_ca_file: self.path("ca.pem"),
        });
        cfg.insecure_plaintext = false;
        let audit = self.path("audit.jsonl");
        cfg.audit_log = Some(audit.clone());
        audit
    }

    /// A client presenting `who`'s certificate (None: none at all).
    pub async fn client(
        &self,
        addr: &str,
        who: Option<&str>,
    ) -> Result<ClusterMeshClient<Channel>, String> {
        let read = |f: &str| std::fs::read(self.path(f)).unwrap();
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem")));
        if let Some(w) = who {
            tls = tls.identity(Identity::from_pem(
                read(&format!("{w}.pem")),
                read(&format!("{w}-key.pem")),
            ));
        }
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(ClusterMeshClient::new(ch))
    }
}
