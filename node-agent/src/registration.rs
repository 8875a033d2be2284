//! Standalone mode: the agent registers its node and its endpoints with its
//! cluster's clustermesh-apiserver and keeps the registration alive with a
//! heartbeat stream. When the stream breaks (apiserver restart, network),
//! it reconnects with jittered exponential backoff and registers again; the
//! apiserver treats a same-boot-id registration as a refresh.
//!
//! The set of endpoints is live (a watch channel): endpoints the CNI plugin
//! adds or removes while the session runs are registered or removed at
//! once, and every session starts by registering the current set.
//!
//! The apiserver is reached with mutual TLS ([`Target`]): the cluster CA
//! and this node's certificate (CN `node:<name>`), which lets the agent act
//! only for its own node. The files are read at every connection, so a
//! renewed certificate is picked up on the next reconnect.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use clustermesh_api::proto::{self, cluster_mesh_client::ClusterMeshClient};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// An endpoint the agent registers: its IP and security labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: String,
    pub namespace: String,
    pub name: String,
    /// Host-side veth of the endpoint (datapath delivery), if local.
    pub iface: Option<String>,
    /// The endpoint's own MAC (destination of delivered frames).
    pub mac: Option<[u8; 6]>,
    pub labels: HashMap<String, String>,
}

impl std::str::FromStr for EndpointSpec {
    type Err = String;
    /// `IP[,ns=NAMESPACE][,name=NAME][,iface=HOST_VETH,mac=POD_MAC][,LABEL=VALUE...]`,
    /// e.g. `10.1.0.2,ns=default,name=web-1,iface=lxc0,mac=02:00:0a:01:00:02,k8s:app=web`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let ip = parts.next().unwrap_or_default().trim().to_owned();
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("endpoint {s:?}: {ip:?} is not an IP address"));
        }
        let mut e = EndpointSpec {
            ip,
            namespace: String::new(),
            name: String::new(),
            iface: None,
            mac: None,
            labels: HashMap::new(),
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("endpoint {s:?}: {p:?} is not KEY=VALUE"))?;
            match k {
                "ns" => e.namespace = v.to_owned(),
                "name" => e.name = v.to_owned(),
                "iface" => e.iface = Some(v.to_owned()),
                "mac" => {
                    e.mac = Some(
                        parse_mac(v)
                            .ok_or_else(|| format!("endpoint {s:?}: {v:?} is not a MAC address"))?,
                    )
                }
                _ => {
                    e.labels.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        if e.labels.is_empty() {
            return Err(format!("endpoint {s:?}: needs at least one LABEL=VALUE"));
        }
        Ok(e)
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Where the apiserver is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    /// (CA, node certificate, its key); None: plaintext (an apiserver run
    /// with `--insecure-plaintext`).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Target {
    async fn connect(&self) -> Result<ClusterMeshClient<tonic::transport::Channel>, Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let connect = |source| Error::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut ep = Endpoint::from_shared(self.addr.clone())
            .map_err(connect)?
            .connect_timeout(Duration::from_secs(5));
        if let Some((ca, cert, key)) = &self.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| Error::TlsFile {
                    path: p.clone(),
                    source,
                })
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?));
            ep = ep.tls_config(tls).map_err(connect)?;
        }
        Ok(ClusterMeshClient::new(ep.connect().await.map_err(connect)?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the apiserver at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading {path} for the apiserver's TLS: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("apiserver refused {what}: {status}")]
    Refused { what: String, status: tonic::Status },
}

/// The node's boot id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Endpoints registered in this session: IP -> (what was sent, identity).
type Registered = std::collections::BTreeMap<String, (EndpointSpec, u32)>;

/// Most endpoints the agent sends in one batch (the apiserver's limit).
const BATCH: usize = 1000;

/// Brings the apiserver's endpoints of this node to `want`, publishing the
/// identities.
///
/// Removals and additions go in `RemoveEndpoints` / `AddEndpoints` batches
/// (an apiserver of an earlier release, which answers `Unimplemented`, gets
/// the single calls). An endpoint the apiserver refuses is logged and left
/// out, and is sent again at the next change of the set; an `Unavailable`
/// one (etcd failed) ends the session, which reconnects and sends again.
async fn sync_endpoints(
    c: &mut ClusterMeshClient<tonic::transport::Channel>,
    node: &proto::Node,
    want: &[EndpointSpec],
    done: &mut Registered,
    identities: &tokio::sync::watch::Sender<Vec<(String, u32)>>,
) -> Result<(), Error> {
    let gone: Vec<String> = done
        .keys()
        .filter(|ip| !want.iter().any(|e| &e.ip == *ip))
        .cloned()
        .collect();
    for ips in gone.chunks(BATCH) {
        let results = remove_batch(c, ips).await?;
        for (ip, r) in ips.iter().zip(results) {
            answered(r, || format!("removing endpoint {ip}"))?;
            tracing::info!(%ip, "endpoint removed");
            done.remove(ip);
        }
    }
    let todo: Vec<&EndpointSpec> = want
        .iter()
        .filter(|e| done.get(&e.ip).is_none_or(|(sent, _)| sent != *e))
        .collect();
    for specs in todo.chunks(BATCH) {
        let reqs: Vec<proto::AddEndpointRequest> = specs
            .iter()
            .map(|e| proto::AddEndpointRequest {
                node: node.name.clone(),
                ip: e.ip.clone(),
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                labels: e.labels.clone(),
            })
            .collect();
        let results = add_batch(c, reqs).await?;
        for (e, r) in specs.iter().zip(results) {
            if let Some(id) = answered(r, || format!("endpoint {}", e.ip))? {
                tracing::info!(ip = %e.ip, identity = id, "endpoint registered");
                done.insert(e.ip.clone(), ((*e).clone(), id));
            }
        }
    }
    identities.send_replace(done.iter().map(|(ip, (_, id))| (ip.clone(), *id)).collect());
    Ok(())
}

/// One endpoint's outcome: its identity, `None` when the apiserver refused
/// it (logged), or the error that ends the session.
fn answered(
    r: Result<u32, tonic::Status>,
    what: impl FnOnce() -> String,
) -> Result<Option<u32>, Error> {
    match r {
        Ok(id) => Ok(Some(id)),
        Err(status) if status.code() == tonic::Code::Unavailable => Err(Error::Refused {
            what: what(),
            status,
        }),
        Err(status) => {
            tracing::warn!(what = what(), code = ?status.code(), message = status.message(), "apiserver refused endpoint");
            Ok(None)
        }
    }
}

/// A batch's results as the single calls would have returned them.
fn results(r: proto::EndpointsResponse, n: usize) -> Vec<Result<u32, tonic::Status>> {
    let mut out: Vec<_> = r
        .results
        .into_iter()
        .map(|r| match r.code {
            0 => Ok(r.identity),
            code => Err(tonic::Status::new(tonic::Code::from(code), r.message)),
        })
        .collect();
    // An answer shorter than the request leaves the rest unanswered:
    // retried with the session.
    out.resize_with(n, || {
        Err(tonic::Status::unavailable(
            "no answer for this endpoint in the batch",
        ))
    });
    out
}

async fn add_batch(
    c: &mut ClusterMeshClient<tonic::transport::Channel>,
    reqs: Vec<proto::AddEndpointRequest>,
) -> Result<Vec<Result<u32, tonic::Status>>, Error> {
    let n = reqs.len();
    match c
        .add_endpoints(proto::AddEndpointsRequest {
            endpoints: reqs.clone(),
        })
        .await
    {
        Ok(r) => Ok(results(r.into_inner(), n)),
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            let mut out = Vec::with_capacity(n);
            for req in reqs {
                out.push(c.add_endpoint(req).await.map(|r| r.into_inner().identity));
            }
            Ok(out)
        }
        Err(status) => Err(Error::Refused {
            what: format!("a batch of {n} endpoints"),
            status,
        }),
    }
}

async fn remove_batch(
    c: &mut ClusterMeshClient<tonic::transport::Channel>,
    ips: &[String],
) -> Result<Vec<Result<u32, tonic::Status>>, Error> {
    let n = ips.len();
    match c
        .remove_endpoints(proto::RemoveEndpointsRequest { ips: ips.to_vec() })
        .await
    {
        Ok(r) => Ok(results(r.into_inner(), n)),
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            let mut out = Vec::with_capacity(n);
            for ip in ips {
                let r = c
                    .remove_endpoint(proto::RemoveEndpointRequest { ip: ip.clone() })
                    .await;
                out.push(r.map(|_| 0));
            }
            Ok(out)
        }
        Err(status) => Err(Error::Refused {
            what: format!("removing a batch of {n} endpoints"),
            status,
        }),
    }
}

async fn session(
    target: &Target,
    node_rx: &mut tokio::sync::watch::Receiver<proto::Node>,
    endpoints: &mut tokio::sync::watch::Receiver<Vec<EndpointSpec>>,
    identities: &tokio::sync::watch::Sender<Vec<(String, u32)>>,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let mut c = target.connect().await?;
    let node = &node_rx.borrow_and_update().clone();
    let r = c
        .register_node(proto::RegisterNodeRequest {
            node: Some(node.clone()),
        })
        .await
        .map_err(|status| Error::Refused {
            what: format!("node {}", node.name),
            status,
        })?
        .into_inner();
    tracing::info!(node = %node.name, cluster = %r.cluster, cluster_id = r.cluster_id, ttl = r.ttl_seconds, "registered");
    let mut done = Registered::new();
    let want = endpoints.borrow_and_update().clone();
    sync_endpoints(&mut c, node, &want, &mut done, identities).await?;
    let mut endpoints_open = true;
    // Without WireGuard nothing ever changes the node record (its sender
    // is dropped at start): that is no reason to stop the session, whose
    // heartbeats and endpoint updates go on.
    let mut node_open = true;
    let every = Duration::from_secs(u64::from(r.ttl_seconds.max(3)) / 3);
    let beat = proto::NodeHeartbeatRequest {
        node: node.name.clone(),
        boot_id: node.boot_id.clone(),
    };
    let c2 = cancel.clone();
    let out = futures_util::stream::unfold(true, move |first| {
        let beat = beat.clone();
        let c2 = c2.clone();
        async move {
            if !first {
                tokio::select! {
                    _ = c2.cancelled() => return None,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            Some((beat, false))
        }
    });
    let mut acks = c
        .node_heartbeat(out)
        .await
        .map_err(|status| Error::Refused {
            what: "heartbeat stream".into(),
            status,
        })?
        .into_inner();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            // The node record changed (a WireGuard key rotation): the
            // apiserver updates it in place (same boot id).
            r = node_rx.changed(), if node_open => {
                if r.is_err() {
                    node_open = false;
                    continue;
                }
                let n = node_rx.borrow_and_update().clone();
                c.register_node(proto::RegisterNodeRequest { node: Some(n.clone()) })
                    .await
                    .map_err(|status| Error::Refused { what: format!("node {}", n.name), status })?;
                tracing::info!(node = %n.name, keys = n.wireguard_public_keys.len(), "node record updated");
            }
            r = endpoints.changed(), if endpoints_open => {
                if r.is_err() {
                    endpoints_open = false;
                    continue;
                }
                let want = endpoints.borrow_and_update().clone();
                sync_endpoints(&mut c, node, &want, &mut done, identities).await?;
            }
            m = acks.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(status)) => return Err(Error::Refused { what: "heartbeat".into(), status }),
                None => return Err(Error::Refused { what: "heartbeat".into(), status: tonic::Status::unavailable("stream ended") }),
            },
        }
    }
}

/// Registers and keeps the registration alive until cancelled; publishes the
/// identities the apiserver allocated for the endpoints.
pub async fn run(
    target: Target,
    mut node: tokio::sync::watch::Receiver<proto::Node>,
    mut endpoints: tokio::sync::watch::Receiver<Vec<EndpointSpec>>,
    identities: tokio::sync::watch::Sender<Vec<(String, u32)>>,
    cancel: CancellationToken,
) {
    use backon::BackoffBuilder as _;
    let mut backoff = clustermesh_kvstore::backoff::reconnect().build();
    loop {
        let delay = match session(&target, &mut node, &mut endpoints, &identities, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff
                    .next()
                    .unwrap_or(clustermesh_kvstore::backoff::MAX_DELAY);
                tracing::warn!(error = %e, "registration lost; retrying in {delay:?}");
                delay
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoint_specs() {
        let e: EndpointSpec = "10.1.0.2,ns=default,name=web-1,k8s:app=web"
            .parse()
            .unwrap();
        assert_eq!(e.ip, "10.1.0.2");
        assert_eq!(e.namespace, "default");
        assert_eq!(e.labels["k8s:app"], "web");
        assert!("nope,k8s:app=web".parse::<EndpointSpec>().is_err());
        assert!("10.1.0.2".parse::<EndpointSpec>().is_err());
        assert!("10.1.0.2,junk".parse::<EndpointSpec>().is_err());
        let e: EndpointSpec = "10.1.0.2,iface=lxc0,mac=02:00:0a:01:00:02,k8s:app=web"
            .parse()
            .unwrap();
        assert_eq!(e.iface.as_deref(), Some("lxc0"));
        assert_eq!(e.mac, Some([2, 0, 0x0a, 1, 0, 2]));
        assert!(!e.labels.contains_key("iface"));
        assert!(
            "10.1.0.2,mac=zz,k8s:app=web"
                .parse::<EndpointSpec>()
                .is_err()
        );
    }
}
