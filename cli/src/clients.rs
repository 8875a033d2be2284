//! The two things the CLI talks to: a cluster's apiserver (gRPC,
//! `clustermesh.v1.ClusterMesh`) and a node agent's status endpoint (HTTP
//! `GET /status`). Every failure becomes one sentence naming what failed and
//! what to check.

use std::time::Duration;

use anyhow::{Result, anyhow};
use clustermesh_api::proto::{self, cluster_mesh_client::ClusterMeshClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ClusterEntry, ConfigDir};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected apiserver client of one cluster.
pub struct Api {
    pub cluster: String,
    pub addr: String,
    client: ClusterMeshClient<Channel>,
}

fn unreachable(c: &ClusterEntry, cd: &ConfigDir, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "cannot reach the apiserver of cluster {} at {} ({}); check that it is running and that `apiserver` in {} is right",
        c.name,
        c.apiserver,
        one_line(&e.to_string()),
        cd.cluster_file(&c.name).display()
    )
}

/// The innermost useful text of an error chain on one line.
pub fn one_line(s: &str) -> String {
    s.split('\n').next().unwrap_or_default().trim().to_owned()
}

pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    one_line(&parts.join(": "))
}

impl Api {
    pub async fn connect(cd: &ConfigDir, c: &ClusterEntry) -> Result<Self> {
        let mut ep = Endpoint::from_shared(c.apiserver.clone())
            .map_err(|e| {
                anyhow!(
                    "the apiserver address {:?} of cluster {} is not a URL ({e}); fix `apiserver` in {}",
                    c.apiserver,
                    c.name,
                    cd.cluster_file(&c.name).display()
                )
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if c.apiserver.starts_with("https://") {
            // The cluster's CA and the admin identity enable created.
            let pki = cd.pki(&c.name);
            let read = |f: &str| {
                std::fs::read(pki.join(f)).map_err(|e| {
                    anyhow!(
                        "cannot read {} for the apiserver TLS of cluster {} ({e}); run `clustermesh enable --cluster {}` again",
                        pki.join(f).display(),
                        c.name,
                        c.name
                    )
                })
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("ca.pem")?))
                .identity(Identity::from_pem(
                    read("admin.pem")?,
                    read("admin-key.pem")?,
                ));
            ep = ep
                .tls_config(tls)
                .map_err(|e| unreachable(c, cd, error_text(&e)))?;
        }
        let ch = match ep.connect().await {
            Ok(ch) => ch,
            // A refused TLS handshake reads like a failed connection: if
            // the port answers, it is the credentials.
            Err(e)
                if c.apiserver.starts_with("https://")
                    && crate::connect::port_answers(std::slice::from_ref(&c.apiserver)).await =>
            {
                return Err(anyhow!(
                    "the apiserver of cluster {} at {} refused the TLS handshake ({}); check that it runs with --tls-client-ca pki/{}/ca.pem and a certificate from that CA, and that pki/{}/admin.pem is the one enable created",
                    c.name,
                    c.apiserver,
                    error_text(&e),
                    c.name,
                    c.name
                ));
            }
            Err(e) => return Err(unreachable(c, cd, error_text(&e))),
        };
        Ok(Self {
            cluster: c.name.clone(),
            addr: c.apiserver.clone(),
            client: ClusterMeshClient::new(ch),
        })
    }

    async fn status_error(&self, what: &str, s: tonic::Status) -> anyhow::Error {
        use tonic::Code;
        let msg = one_line(s.message());
        // With TLS 1.3 a refused client certificate shows on the first
        // call, as a transport error: if the port answers, say so.
        // A status made on this side from a transport error has a source;
        // one the apiserver sent has none.
        let transport = std::error::Error::source(&s).is_some();
        if self.addr.starts_with("https://")
            && transport
            && crate::connect::port_answers(std::slice::from_ref(&self.addr)).await
        {
            return anyhow!(
                "the apiserver of cluster {} at {} refused the TLS handshake or dropped the connection on {what} ({msg}); check that it runs with --tls-client-ca pki/{}/ca.pem and a certificate from that CA, and that pki/{}/admin.pem is the one enable created",
                self.cluster,
                self.addr,
                self.cluster,
                self.cluster
            );
        }
        match s.code() {
            _ if transport || s.code() == Code::DeadlineExceeded => {
                anyhow!(
                    "the apiserver of cluster {} at {} did not answer {what} ({msg}); check that it is running",
                    self.cluster,
                    self.addr
                )
            }
            Code::Unauthenticated | Code::PermissionDenied => anyhow!(
                "the apiserver of cluster {} refused the CLI's credentials for {what} ({msg}); check the apiserver's --tls-client-ca is the cluster CA that enable created",
                self.cluster
            ),
            _ => anyhow!("{what} on cluster {} failed: {msg}", self.cluster),
        }
    }

    pub async fn info(&mut self) -> Result<proto::ClusterInfo> {
        let r = self
            .client
            .get_cluster_info(proto::GetClusterInfoRequest {})
            .await
            .map(tonic::Response::into_inner);
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("GetClusterInfo", s).await),
        }
    }

    pub async fn status(&mut self) -> Result<proto::StatusResponse> {
        let r = self
            .client
            .status(proto::StatusRequest {})
            .await
            .map(tonic::Response::into_inner);
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("Status", s).await),
        }
    }

    pub async fn list_services(&mut self) -> Result<Vec<proto::Service>> {
        let r = self
            .client
            .list_services(proto::ListServicesRequest {})
            .await
            .map(|r| r.into_inner().services);
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("ListServices", s).await),
        }
    }

    pub async fn upsert_service(&mut self, s: proto::Service) -> Result<()> {
        let r = self
            .client
            .upsert_service(proto::UpsertServiceRequest { service: Some(s) })
            .await
            .map(|_| ());
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("UpsertService", s).await),
        }
    }

    pub async fn delete_service(&mut self, namespace: &str, name: &str) -> Result<()> {
        let r = self
            .client
            .delete_service(proto::DeleteServiceRequest {
                namespace: namespace.into(),
                name: name.into(),
            })
            .await
            .map(|_| ());
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("DeleteService", s).await),
        }
    }

    pub async fn set_encryption(
        &mut self,
        p: proto::EncryptionPolicy,
    ) -> Result<proto::EncryptionPolicy> {
        let r = self
            .client
            .set_encryption_policy(proto::SetEncryptionPolicyRequest { policy: Some(p) })
            .await
            .map(|r| r.into_inner());
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("SetEncryptionPolicy", s).await),
        }
    }
}

impl Api {
    pub async fn apply_policies(&mut self, manifest: String) -> Result<Vec<proto::AppliedPolicy>> {
        let r = self
            .client
            .apply_policies(proto::ApplyPoliciesRequest { manifest })
            .await
            .map(|r| r.into_inner().policies);
        match r {
            Ok(v) => Ok(v),
            // The manifest's own errors name the document and field.
            Err(s)
                if s.code() == tonic::Code::InvalidArgument
                    || s.code() == tonic::Code::FailedPrecondition =>
            {
                Err(anyhow!(
                    "cluster {} refused the policies: {}",
                    self.cluster,
                    s.message()
                ))
            }
            Err(s) => Err(self.status_error("ApplyPolicies", s).await),
        }
    }

    pub async fn list_policies(&mut self) -> Result<Vec<proto::NetworkPolicy>> {
        let r = self
            .client
            .list_policies(proto::ListPoliciesRequest {})
            .await
            .map(|r| r.into_inner().policies);
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("ListPolicies", s).await),
        }
    }

    pub async fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<bool> {
        let r = self
            .client
            .delete_policy(proto::DeletePolicyRequest {
                namespace: namespace.into(),
                name: name.into(),
            })
            .await
            .map(|r| r.into_inner().deleted);
        match r {
            Ok(v) => Ok(v),
            Err(s) => Err(self.status_error("DeletePolicy", s).await),
        }
    }
}

/// `GET /status` of a node agent, parsed as JSON.
/// The agent's `/status` document, read with the types the agent serves.
pub async fn agent_status(addr: &str) -> Result<clustermesh_api::status::NodeStatus, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        s.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("cannot read: {e}"))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "not an HTTP answer".to_owned())?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "answered {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        serde_json::from_str(body).map_err(|e| format!("status is not a node status document: {e}"))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}
