//! The endpoint calls of the gRPC API: `AddEndpoint`, `RemoveEndpoint` and
//! their batches `AddEndpoints`, `RemoveEndpoints` (issue 20).
//!
//! A single call is a batch of one, so both follow one path: each endpoint
//! is converted and validated, authorized (its node's certificate or the
//! admin's) and checked against the state under the state lock, on its own:
//! a refused endpoint is answered with the code and message the single
//! call returns, and does not refuse the others. The accepted endpoints are
//! then written to the internal store in transactions of
//! [`store::TXN_OPS`]; each transaction's endpoints are applied to the state
//! only once etcd committed it, so a failed write leaves the state as etcd
//! holds it and its endpoints (and the ones after it) are `Unavailable`.
//! The exporter is woken once per batch and exports the batch in its own
//! batched transactions.

use std::net::IpAddr;

use clustermesh_api::{
    EndpointRecord, FieldError, K8sName, Labels, NodeName, Record, convert, proto,
};
use tonic::{Request, Response, Status};

use crate::{
    authz::{self, Action, Caller},
    grpc::{Api, refused, unavailable},
    state::ClusterState,
    store,
};

/// Most endpoints one batch may carry (a request of 1000 endpoints is about
/// 150 KB, well inside tonic's 4 MB message limit).
pub const MAX_BATCH: usize = 1000;

fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// An `AddEndpointRequest` converted and validated, before any state check.
struct NewEndpoint {
    node: NodeName,
    ip: IpAddr,
    namespace: Option<K8sName>,
    name: Option<K8sName>,
    /// The security labels with the namespace label identities carry.
    labels: Labels,
}

fn parse_ip(s: &str) -> Result<IpAddr, Status> {
    s.parse()
        .map_err(|_| invalid(FieldError::new("ip", format!("invalid IP address {s:?}"))))
}

fn parse_add(req: &proto::AddEndpointRequest) -> Result<NewEndpoint, Status> {
    let node: NodeName = req.node.parse().map_err(|e: clustermesh_api::ValueError| {
        invalid(FieldError::new("node", e.to_string()))
    })?;
    let ip = parse_ip(&req.ip)?;
    let opt_name = |field: &'static str, s: &str| -> Result<Option<K8sName>, Status> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|e: clustermesh_api::ValueError| {
                invalid(FieldError::new(field, e.to_string()))
            })
    };
    let namespace = opt_name("namespace", &req.namespace)?;
    let name = opt_name("name", &req.name)?;
    let labels = convert::labels_from_proto(&req.labels).map_err(invalid)?;
    if labels.is_empty() {
        return Err(invalid(FieldError::new(
            "labels",
            "an endpoint needs at least one security label",
        )));
    }
    // Identities are per namespace (an endpoint without one is in
    // `default`, as Kubernetes puts it).
    let labels = labels
        .for_identity(namespace.as_ref().map_or("default", |n| n.as_str()))
        .map_err(|e| invalid(FieldError::new("labels", e.to_string())))?;
    Ok(NewEndpoint {
        node,
        ip,
        namespace,
        name,
        labels,
    })
}

/// The outcome of one endpoint of a batch.
fn result(ip: String, r: Result<u32, Status>) -> proto::EndpointResult {
    match r {
        Ok(identity) => proto::EndpointResult {
            ip,
            code: 0,
            message: String::new(),
            identity,
        },
        Err(s) => proto::EndpointResult {
            ip,
            code: s.code() as i32,
            message: s.message().to_owned(),
            identity: 0,
        },
    }
}

/// The puts and deletes of one transaction.
type TxnOps = (Vec<(String, Vec<u8>)>, Vec<String>);

/// Writes `items` (index in the request, item) to the internal store in
/// transactions of [`store::TXN_OPS`], `ops` giving each chunk's
/// operations. Once a transaction commits, `apply` takes each of its items
/// into the state and gives its answer; a failed transaction fails its
/// items and every later one with the same status, so the state stays as
/// etcd holds it. Returns whether anything was written.
async fn write_chunked<T>(
    client: &mut etcd_client::Client,
    st: &mut ClusterState,
    out: &mut [Option<Result<u32, Status>>],
    items: &[(usize, T)],
    ops: impl Fn(&[(usize, T)]) -> Result<TxnOps, Status>,
    apply: impl Fn(&mut ClusterState, &T) -> u32,
) -> bool {
    let mut failed: Option<Status> = None;
    let mut written = false;
    for chunk in items.chunks(store::TXN_OPS) {
        let r = match &failed {
            Some(s) => Err(s.clone()),
            None => match ops(chunk) {
                Ok((puts, dels)) => store::write(client, puts, dels).await.map_err(unavailable),
                Err(s) => Err(s),
            },
        };
        for (i, item) in chunk {
            out[*i] = Some(match &r {
                Ok(()) => Ok(apply(st, item)),
                Err(s) => Err(s.clone()),
            });
        }
        match r {
            Ok(()) => written = true,
            Err(s) => failed = Some(s),
        }
    }
    written
}

/// Every item's answer, in request order.
fn answers(out: Vec<Option<Result<u32, Status>>>) -> Vec<Result<u32, Status>> {
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Status::internal("endpoint left unanswered"))))
        .collect()
}

/// Refuses a batch larger than [`MAX_BATCH`] as a whole.
fn check_size(n: usize) -> Result<(), Status> {
    if n > MAX_BATCH {
        return Err(invalid(FieldError::new(
            "endpoints",
            format!("{n} endpoints in one batch; at most {MAX_BATCH}"),
        )));
    }
    Ok(())
}

impl Api {
    /// The node's address of the pod's family when it has one (a dual-stack
    /// node's IPv6 pods are reached over IPv6).
    fn host_ip(st: &ClusterState, node: &NodeName, ip: IpAddr) -> Result<IpAddr, Status> {
        st.nodes
            .get(node)
            .and_then(|n| {
                let ips = &n.record.underlay_ips;
                ips.iter()
                    .find(|u| u.is_ipv4() == ip.is_ipv4())
                    .or(ips.first())
                    .copied()
            })
            .ok_or_else(|| Status::failed_precondition(format!("node {node} is not registered")))
    }

    /// Checks one endpoint against the state and allocates its identity:
    /// the record to write.
    async fn prepare(
        &self,
        st: &mut ClusterState,
        e: NewEndpoint,
    ) -> Result<EndpointRecord, Status> {
        let sh = &self.shared;
        st.check_endpoint(&e.node, e.ip).map_err(refused)?;
        let host_ip = Self::host_ip(st, &e.node, e.ip)?;
        let ident = store::allocate_identity(
            &mut sh.client.clone(),
            &sh.keys,
            &sh.cfg.cluster_name,
            sh.cfg.cluster_id,
            &e.labels,
            st,
        )
        .await
        .map_err(|err| match err {
            store::Error::Etcd { .. } => unavailable(err),
            other => Status::resource_exhausted(other.to_string()),
        })?;
        let rec = EndpointRecord {
            ip: e.ip,
            cluster: sh.cfg.cluster_name.clone(),
            identity: ident.id,
            host_ip,
            node: Some(e.node),
            namespace: e.namespace,
            name: e.name,
        };
        rec.validate().map_err(invalid)?;
        st.add_identity(ident);
        Ok(rec)
    }

    /// Adds a batch of endpoints for `caller`: one outcome per request, in
    /// order.
    pub(crate) async fn add_endpoints_as(
        &self,
        caller: &Caller,
        reqs: &[proto::AddEndpointRequest],
    ) -> Vec<Result<u32, Status>> {
        let sh = &self.shared;
        let mut out: Vec<Option<Result<u32, Status>>> = Vec::with_capacity(reqs.len());
        // (index in the request, record) of the endpoints to write.
        let mut accepted: Vec<(usize, EndpointRecord)> = Vec::new();
        let mut st = sh.state.lock().await;
        let mut seen = std::collections::HashSet::new();
        for (i, req) in reqs.iter().enumerate() {
            let r = async {
                let e = parse_add(req)?;
                authz::authorize(caller, Action::ActAsNode(&e.node))?;
                if !seen.insert(e.ip) {
                    return Err(Status::invalid_argument(format!(
                        "ip: {} is listed twice in this batch",
                        e.ip
                    )));
                }
                self.prepare(&mut st, e).await
            }
            .await;
            match r {
                Ok(rec) => {
                    accepted.push((i, rec));
                    out.push(None);
                }
                Err(s) => out.push(Some(Err(s))),
            }
        }
        let mut client = sh.client.clone();
        let written = write_chunked(
            &mut client,
            &mut st,
            &mut out,
            &accepted,
            |chunk| {
                let puts = chunk
                    .iter()
                    .map(|(_, rec)| store::endpoint_put(&sh.keys, rec))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable)?;
                Ok((puts, Vec::new()))
            },
            |st, rec| {
                st.put_endpoint(rec.clone());
                rec.identity.get()
            },
        )
        .await;
        drop(st);
        self.answer(written, out)
    }

    /// Wakes the exporter if a batch wrote anything; every item's answer.
    fn answer(
        &self,
        written: bool,
        out: Vec<Option<Result<u32, Status>>>,
    ) -> Vec<Result<u32, Status>> {
        if written {
            self.shared.changed.notify_one();
        }
        answers(out)
    }

    /// Removes a batch of endpoints for `caller`. Only an endpoint's own
    /// node (or the admin) removes it; an IP that is no endpoint is done
    /// already (OK), as the single call has it.
    pub(crate) async fn remove_endpoints_as(
        &self,
        caller: &Caller,
        peer: Option<std::net::SocketAddr>,
        ips: &[String],
    ) -> Vec<Result<u32, Status>> {
        let sh = &self.shared;
        let mut out: Vec<Option<Result<u32, Status>>> = Vec::with_capacity(ips.len());
        let mut doomed: Vec<(usize, IpAddr)> = Vec::new();
        let mut st = sh.state.lock().await;
        for (i, s) in ips.iter().enumerate() {
            let r = parse_ip(s).and_then(|ip| {
                let Some(e) = st.endpoints.get(&ip) else {
                    return Ok(None);
                };
                let allowed = match &e.node {
                    Some(n) => authz::authorize(caller, Action::ActAsNode(n)),
                    None => authz::authorize(caller, Action::Services),
                };
                if let Err(s) = allowed {
                    self.audit(
                        caller,
                        peer,
                        "RemoveEndpoint",
                        Err(&s),
                        serde_json::json!({"ip": ip.to_string()}),
                    );
                    return Err(s);
                }
                Ok(Some(ip))
            });
            match r {
                Ok(Some(ip)) if !doomed.iter().any(|(_, d)| *d == ip) => {
                    doomed.push((i, ip));
                    out.push(None);
                }
                Ok(_) => out.push(Some(Ok(0))),
                Err(s) => out.push(Some(Err(s))),
            }
        }
        let mut client = sh.client.clone();
        let written = write_chunked(
            &mut client,
            &mut st,
            &mut out,
            &doomed,
            |chunk| {
                Ok((
                    Vec::new(),
                    chunk.iter().map(|(_, ip)| sh.keys.endpoint(ip)).collect(),
                ))
            },
            |st, ip| {
                st.remove_endpoint(ip);
                0
            },
        )
        .await;
        drop(st);
        self.answer(written, out)
    }

    pub(crate) async fn add_endpoint_call(
        &self,
        req: Request<proto::AddEndpointRequest>,
    ) -> Result<Response<proto::AddEndpointResponse>, Status> {
        // Authorized up front as well (before the rest of the request is
        // read), so that a refusal is audited with the caller's peer.
        let n = crate::grpc::node_name("node", &req.get_ref().node)?;
        let caller = self.authorize(&req, "AddEndpoint", Action::ActAsNode(&n))?;
        let one = std::slice::from_ref(req.get_ref());
        let identity = self
            .add_endpoints_as(&caller, one)
            .await
            .pop()
            .unwrap_or_else(|| Err(Status::internal("endpoint left unanswered")))?;
        Ok(Response::new(proto::AddEndpointResponse { identity }))
    }

    pub(crate) async fn remove_endpoint_call(
        &self,
        req: Request<proto::RemoveEndpointRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let caller = Caller::of(&req, self.shared.cfg.insecure_plaintext)?;
        let peer = req.remote_addr();
        let one = std::slice::from_ref(&req.get_ref().ip);
        self.remove_endpoints_as(&caller, peer, one)
            .await
            .pop()
            .unwrap_or_else(|| Err(Status::internal("endpoint left unanswered")))?;
        Ok(Response::new(proto::Empty {}))
    }

    pub(crate) async fn add_endpoints_call(
        &self,
        req: Request<proto::AddEndpointsRequest>,
    ) -> Result<Response<proto::EndpointsResponse>, Status> {
        let caller = Caller::of(&req, self.shared.cfg.insecure_plaintext)?;
        let peer = req.remote_addr();
        let reqs = &req.get_ref().endpoints;
        check_size(reqs.len())?;
        let results = self.add_endpoints_as(&caller, reqs).await;
        for (req, r) in reqs.iter().zip(&results) {
            if let Err(s) = r
                && s.code() == tonic::Code::PermissionDenied
            {
                self.audit(
                    &caller,
                    peer,
                    "AddEndpoints",
                    Err(s),
                    serde_json::json!({"ip": req.ip, "node": req.node}),
                );
            }
        }
        let results = reqs
            .iter()
            .zip(results)
            .map(|(q, r)| result(q.ip.clone(), r))
            .collect();
        Ok(Response::new(proto::EndpointsResponse { results }))
    }

    pub(crate) async fn remove_endpoints_call(
        &self,
        req: Request<proto::RemoveEndpointsRequest>,
    ) -> Result<Response<proto::EndpointsResponse>, Status> {
        let caller = Caller::of(&req, self.shared.cfg.insecure_plaintext)?;
        let peer = req.remote_addr();
        let ips = &req.get_ref().ips;
        check_size(ips.len())?;
        let results = self.remove_endpoints_as(&caller, peer, ips).await;
        let results = ips
            .iter()
            .zip(results)
            .map(|(ip, r)| result(ip.clone(), r))
            .collect();
        Ok(Response::new(proto::EndpointsResponse { results }))
    }
}
