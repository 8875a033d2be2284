//! The `clustermesh.v1.Observer` gRPC service of one node (`--flows-listen`).
//!
//! Always mutual TLS: the client's certificate must come from the cluster
//! CA (`--flows-client-ca`) and name the admin (CN `root`) or this very
//! node (CN `node:<node>`): a node's credential reads its own flows only,
//! never another node's, and no remote cluster's credential reads any.
//!
//! `GetFlows` answers from the node's buffer ([`super::Observer::query`],
//! filtered here, not by the client), then with `follow` streams each new
//! matching flow. A follower too slow for the flow rate skips flows
//! (counted in `lost_followers`) rather than holding the node's memory.

use std::{net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc};

use clustermesh_api::{
    flow::Filter,
    proto::{
        Flow, GetFlowsRequest, ObserverStatus, ObserverStatusRequest,
        observer_server::{Observer as ObserverApi, ObserverServer},
    },
};
use futures_util::Stream;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::Observer;

/// The files of the service's TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

struct Service {
    observer: Arc<Observer>,
    node: String,
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Whether the caller's certificate may read this node's flows.
fn authorize<T>(req: &Request<T>, node: &str) -> Result<(), Status> {
    let cn = req
        .peer_certs()
        .and_then(|c| c.first().and_then(|d| common_name(d.as_ref())))
        .ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: the flow API needs one of the cluster CA",
            )
        })?;
    allowed(&cn, node)
}

/// The rule of [`authorize`] on a verified common name.
fn allowed(cn: &str, node: &str) -> Result<(), Status> {
    if cn == "root" || cn.strip_prefix("node:") == Some(node) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "certificate {cn:?} may not read the flows of node {node}: the admin certificate (CN root) or this node's own (CN node:{node}) may"
    )))
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl ObserverApi for Service {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        authorize(&req, &self.node)?;
        let r = req.into_inner();
        let filter = Filter::from_proto(&r.filter.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Subscribed before the history is read: nothing falls between.
        let mut live = r.follow.then(|| self.observer.subscribe());
        let history = self
            .observer
            .query(&filter, r.last as usize, r.since_unix_nanos);
        let mut after = history.last().map_or(0, |f| f.sequence);
        let (tx, rx) = mpsc::channel::<Result<Flow, Status>>(256);
        let observer = self.observer.clone();
        tokio::spawn(async move {
            for f in history {
                if tx.send(Ok((*f).clone())).await.is_err() {
                    return;
                }
            }
            let Some(live) = live.as_mut() else { return };
            loop {
                let got = tokio::select! {
                    () = tx.closed() => return,
                    got = live.recv() => got,
                };
                match got {
                    Ok(f) if f.sequence > after && filter.matches(&f) => {
                        after = f.sequence;
                        if tx.send(Ok((*f).clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        observer
                            .lost_followers
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_observer_status(
        &self,
        req: Request<ObserverStatusRequest>,
    ) -> Result<Response<ObserverStatus>, Status> {
        authorize(&req, &self.node)?;
        Ok(Response::new(self.observer.status()))
    }
}

/// A TLS file the service could not read.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read {path} for the flow API's TLS: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the flow API's TLS configuration was refused: {0}")]
    Tls(tonic::transport::Error),
    #[error("cannot listen on {addr} for the flow API: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Reads the TLS files and binds `addr` (start errors are the caller's);
/// the returned future serves the API until `cancel`.
pub async fn start(
    addr: SocketAddr,
    tls: Tls,
    observer: Arc<Observer>,
    node: String,
    cancel: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, ServeError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| ServeError::TlsFile {
            path: p.clone(),
            source,
        })
    };
    let cfg = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read(&tls.cert)?,
            read(&tls.key)?,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(
            &tls.client_ca,
        )?));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let router = tonic::transport::Server::builder()
        .tls_config(cfg)
        .map_err(ServeError::Tls)?
        .add_service(ObserverServer::new(Service { observer, node }));
    Ok(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "flow API server failed");
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_admin_and_the_node_itself_read_its_flows() {
        assert!(allowed("root", "node-1").is_ok());
        assert!(allowed("node:node-1", "node-1").is_ok());
        for cn in ["node:node-2", "remote-c2", "apiserver-c1", "node:", "rooot"] {
            let e = allowed(cn, "node-1").unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{cn}");
            assert!(e.message().contains("node-1"), "{}", e.message());
        }
    }
}
