//! The gRPC API (`clustermesh.v1.ClusterMesh`).
//!
//! Every mutating call follows one order: convert and validate the request
//! (an error names the field, `InvalidArgument`), check it against the
//! current state under the state lock (`AlreadyExists`,
//! `FailedPrecondition`, ...), persist it to the internal store, apply it to
//! the state, and wake the exporter. A refused request changes nothing in
//! etcd; a failed etcd write leaves the state as it was (`Unavailable`).
//!
//! Before any of that, the caller is identified from its client certificate
//! and authorized for what the call does ([`crate::authz`]): a refusal is
//! `PermissionDenied`, naming the caller and what it needed. Posture
//! changes (encryption policy, services, removing a node, a node's record
//! changing) and every refused call are written to the audit trail as
//! `api_call` events with the caller's identity and peer address.

use std::{pin::Pin, sync::Arc, time::Instant};

use clustermesh_api::{
    FieldError, K8sName, NodeName, convert,
    proto::{self, cluster_mesh_server::ClusterMesh},
};
use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Shared,
    authz::{self, Action, Caller},
    state::Refusal,
    store,
};

pub struct Api {
    pub shared: Arc<Shared>,
}

fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub(crate) fn refused(r: Refusal) -> Status {
    match r {
        Refusal::Invalid(f) => invalid(f),
        Refusal::AlreadyExists(m) => Status::already_exists(m),
        Refusal::FailedPrecondition(m) => Status::failed_precondition(m),
        Refusal::NotFound(m) => Status::not_found(m),
    }
}

pub(crate) fn unavailable(e: store::Error) -> Status {
    Status::unavailable(format!("etcd write failed, nothing was changed: {e}"))
}

impl Api {
    /// Records the outcome of a call in the metrics.
    fn done<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
        let result = match &r {
            Ok(_) => "ok",
            Err(s) => match s.code() {
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::AlreadyExists => "already_exists",
                tonic::Code::FailedPrecondition => "failed_precondition",
                tonic::Code::NotFound => "not_found",
                tonic::Code::Unavailable => "unavailable",
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::Unauthenticated => "unauthenticated",
                _ => "error",
            },
        };
        self.shared.metrics.request(method, result);
        if let Err(s) = &r {
            tracing::info!(method, code = ?s.code(), message = s.message(), "request refused");
        }
        r
    }

    /// The caller of `req`, authorized for `action`; a refusal is audited.
    pub(crate) fn authorize<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        action: Action<'_>,
    ) -> Result<Caller, Status> {
        let caller = Caller::of(req, self.shared.cfg.insecure_plaintext)?;
        if let Err(e) = authz::authorize(&caller, action) {
            self.audit(
                &caller,
                req.remote_addr(),
                method,
                Err(&e),
                serde_json::json!({}),
            );
            return Err(e);
        }
        Ok(caller)
    }

    /// One `api_call` line of the audit trail (when `--audit-log` is set).
    pub(crate) fn audit(
        &self,
        caller: &Caller,
        peer: Option<std::net::SocketAddr>,
        method: &'static str,
        outcome: Result<(), &Status>,
        fields: serde_json::Value,
    ) {
        let Some(a) = &self.shared.audit else {
            return;
        };
        let mut v = serde_json::json!({
            "action": method,
            "caller": caller.to_string(),
            "peer": peer.map(|p| p.to_string()),
            "result": match outcome {
                Ok(()) => "ok",
                Err(s) if s.code() == tonic::Code::PermissionDenied => "permission_denied",
                Err(_) => "refused",
            },
        });
        if let Err(s) = outcome {
            v["message"] = s.message().into();
        }
        if let (Some(m), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
            m.extend(f);
        }
        a.record("api_call", v);
    }

    async fn register(
        &self,
        req: proto::RegisterNodeRequest,
    ) -> Result<(proto::RegisterNodeResponse, crate::state::Registration), Status> {
        let sh = &self.shared;
        let node = req
            .node
            .ok_or_else(|| invalid(FieldError::new("node", "required")))?;
        if !node.cluster.is_empty() && node.cluster != sh.cfg.cluster_name.as_str() {
            return Err(Status::failed_precondition(format!(
                "node {} registers for cluster {}, but this apiserver serves cluster {}",
                node.name, node.cluster, sh.cfg.cluster_name
            )));
        }
        let rec = convert::node_from_proto(&node, &sh.cfg.cluster_name).map_err(invalid)?;
        let now = Instant::now();
        let mut st = sh.state.lock().await;
        let outcome = st
            .check_register(&rec, now, sh.cfg.node_ttl)
            .map_err(refused)?;
        let mut client = sh.client.clone();
        match outcome {
            crate::state::Registration::Unchanged => {}
            crate::state::Registration::Replaced => {
                let old = st.endpoints_of(&rec.name);
                store::delete_node(&mut client, &sh.keys, &rec.name, &old)
                    .await
                    .map_err(unavailable)?;
                store::put_node(&mut client, &sh.keys, &rec)
                    .await
                    .map_err(unavailable)?;
            }
            _ => store::put_node(&mut client, &sh.keys, &rec)
                .await
                .map_err(unavailable)?,
        }
        tracing::info!(node = %rec.name, boot_id = %rec.boot_id, ?outcome, "node registered");
        st.apply_register(rec, outcome, now);
        drop(st);
        sh.changed.notify_one();
        Ok((
            proto::RegisterNodeResponse {
                ttl_seconds: sh.cfg.node_ttl.as_secs() as u32,
                cluster_id: sh.cfg.cluster_id.get().into(),
                cluster: sh.cfg.cluster_name.to_string(),
            },
            outcome,
        ))
    }
}

/// A request's node name, or the `InvalidArgument` naming the field.
pub(crate) fn node_name(field: &'static str, s: &str) -> Result<NodeName, Status> {
    s.parse()
        .map_err(|e: clustermesh_api::ValueError| invalid(FieldError::new(field, e.to_string())))
}

type HeartbeatStream =
    Pin<Box<dyn Stream<Item = Result<proto::NodeHeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterMesh for Api {
    async fn get_cluster_info(
        &self,
        req: Request<proto::GetClusterInfoRequest>,
    ) -> Result<Response<proto::ClusterInfo>, Status> {
        if let Err(e) = self.authorize(&req, "GetClusterInfo", Action::Read) {
            return self.done("GetClusterInfo", Err(e));
        }
        let sh = &self.shared;
        let ca = match &sh.cfg.etcd.ca_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| Status::internal(format!("reading etcd CA {}: {e}", p.display())))?,
            None => String::new(),
        };
        let st = sh.state.lock().await;
        let pod_cidrs = st
            .nodes
            .values()
            .flat_map(|n| n.record.pod_cidrs.iter().map(ToString::to_string))
            .collect();
        let r = Ok(Response::new(proto::ClusterInfo {
            name: sh.cfg.cluster_name.to_string(),
            id: sh.cfg.cluster_id.get().into(),
            etcd_endpoints: sh.cfg.advertised_endpoints().to_vec(),
            etcd_ca_pem: ca,
            encryption: Some(convert::encryption_to_proto(&st.encryption)),
            pod_cidrs,
        }));
        self.done("GetClusterInfo", r)
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        if let Err(e) = self.authorize(&req, "Status", Action::Read) {
            return self.done("Status", Err(e));
        }
        let sh = &self.shared;
        let mut client = sh.client.clone();
        let (etcd_healthy, etcd_error) =
            match tokio::time::timeout(std::time::Duration::from_secs(3), client.status()).await {
                Ok(Ok(_)) => (true, String::new()),
                Ok(Err(e)) => (false, e.to_string()),
                Err(_) => (false, "etcd did not answer within 3s".to_owned()),
            };
        let counts = sh.state.lock().await.counts();
        let exp = sh
            .export_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let kinds = counts
            .iter()
            .map(|(k, n)| proto::KindStatus {
                kind: k.to_string(),
                count: *n as u64,
                synced: exp.synced.contains(k),
            })
            .collect();
        let age = if exp.last_heartbeat_ms == 0 {
            0
        } else {
            crate::export::now_ms().saturating_sub(exp.last_heartbeat_ms)
        };
        let r = Ok(Response::new(proto::StatusResponse {
            cluster: sh.cfg.cluster_name.to_string(),
            cluster_id: sh.cfg.cluster_id.get().into(),
            etcd_healthy,
            etcd_error: if etcd_error.is_empty() {
                exp.last_error.unwrap_or_default()
            } else {
                etcd_error
            },
            kinds,
            heartbeat_age_ms: age,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api_security: if sh.cfg.insecure_plaintext {
                "insecure-plaintext"
            } else {
                "mutual-tls"
            }
            .to_owned(),
        }));
        self.done("Status", r)
    }

    async fn register_node(
        &self,
        req: Request<proto::RegisterNodeRequest>,
    ) -> Result<Response<proto::RegisterNodeResponse>, Status> {
        const M: &str = "RegisterNode";
        let name = match &req.get_ref().node {
            None => Err(invalid(FieldError::new("node", "required"))),
            Some(n) => node_name("node.name", &n.name),
        };
        let caller = match name.and_then(|n| self.authorize(&req, M, Action::ActAsNode(&n))) {
            Ok(c) => c,
            Err(e) => return self.done(M, Err(e)),
        };
        let peer = req.remote_addr();
        let node = req.get_ref().node.as_ref().map(|n| n.name.clone());
        let r = self.register(req.into_inner()).await;
        match &r {
            Ok((_, crate::state::Registration::Unchanged)) => {}
            Ok((_, outcome)) => self.audit(
                &caller,
                peer,
                M,
                Ok(()),
                serde_json::json!({"node": node, "outcome": format!("{outcome:?}")}),
            ),
            Err(e) => self.audit(&caller, peer, M, Err(e), serde_json::json!({"node": node})),
        }
        self.done(M, r.map(|(v, _)| Response::new(v)))
    }

    type NodeHeartbeatStream = HeartbeatStream;

    async fn node_heartbeat(
        &self,
        req: Request<Streaming<proto::NodeHeartbeatRequest>>,
    ) -> Result<Response<Self::NodeHeartbeatStream>, Status> {
        let shared = self.shared.clone();
        // Who may beat for which node is decided per message (a stream
        // names its node in each).
        let caller = match Caller::of(&req, shared.cfg.insecure_plaintext) {
            Ok(c) => c,
            Err(e) => return self.done("NodeHeartbeat", Err(e)),
        };
        let out = req.into_inner().then(move |msg| {
            let shared = shared.clone();
            let caller = caller.clone();
            async move {
                let m = msg?;
                let node: NodeName = m.node.parse().map_err(|e: clustermesh_api::ValueError| {
                    invalid(FieldError::new("node", e.to_string()))
                })?;
                if let Err(e) = authz::authorize(&caller, Action::ActAsNode(&node)) {
                    shared.metrics.request("NodeHeartbeat", "permission_denied");
                    tracing::info!(%caller, %node, "heartbeat refused");
                    return Err(e);
                }
                let r = shared
                    .state
                    .lock()
                    .await
                    .heartbeat(&node, &m.boot_id, Instant::now())
                    .map_err(refused);
                shared
                    .metrics
                    .request("NodeHeartbeat", if r.is_ok() { "ok" } else { "refused" });
                r?;
                Ok(proto::NodeHeartbeatResponse {
                    server_time_ms: crate::export::now_ms(),
                })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister_node(
        &self,
        req: Request<proto::DeregisterNodeRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        const M: &str = "DeregisterNode";
        let sh = &self.shared;
        // A node deregisters itself with its boot id (without it, a caller
        // could remove a live node and register its name with its own key);
        // removing a node without its boot id is the admin's.
        let node = match node_name("node", &req.get_ref().node) {
            Ok(n) => n,
            Err(e) => return self.done(M, Err(e)),
        };
        let forced = req.get_ref().boot_id.is_empty();
        let action = if forced {
            Action::ForceRemoveNode(&node)
        } else {
            Action::ActAsNode(&node)
        };
        let caller = match self.authorize(&req, M, action) {
            Ok(c) => c,
            // A node that left out its boot id is told what is missing.
            Err(e) if forced && e.code() == tonic::Code::PermissionDenied => {
                let need = match Caller::of(&req, sh.cfg.insecure_plaintext) {
                    Ok(Caller::Node(_)) => Status::invalid_argument(format!(
                        "boot_id: required to deregister node {node} (a node deregisters only its own incarnation; {})",
                        e.message()
                    )),
                    _ => e,
                };
                return self.done(M, Err(need));
            }
            Err(e) => return self.done(M, Err(e)),
        };
        let peer = req.remote_addr();
        let req = req.into_inner();
        let r = async {
            let mut st = sh.state.lock().await;
            match st.nodes.get(&node) {
                None => return Ok(proto::Empty {}),
                Some(e) if !req.boot_id.is_empty() && e.record.boot_id.as_str() != req.boot_id => {
                    return Err(Status::failed_precondition(format!(
                        "node {node} is registered with boot id {}, not {}",
                        e.record.boot_id, req.boot_id
                    )));
                }
                Some(_) => {}
            }
            let eps = st.endpoints_of(&node);
            store::delete_node(&mut sh.client.clone(), &sh.keys, &node, &eps)
                .await
                .map_err(unavailable)?;
            st.remove_node(&node);
            drop(st);
            tracing::info!(%node, %caller, forced, "node deregistered");
            self.audit(
                &caller,
                peer,
                M,
                Ok(()),
                serde_json::json!({"node": node.to_string(), "forced": forced, "endpoints": eps.len()}),
            );
            sh.changed.notify_one();
            Ok(proto::Empty {})
        }
        .await
        .map(Response::new);
        self.done(M, r)
    }

    async fn add_endpoint(
        &self,
        req: Request<proto::AddEndpointRequest>,
    ) -> Result<Response<proto::AddEndpointResponse>, Status> {
        let r = self.add_endpoint_call(req).await;
        self.done("AddEndpoint", r)
    }

    async fn remove_endpoint(
        &self,
        req: Request<proto::RemoveEndpointRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = self.remove_endpoint_call(req).await;
        self.done("RemoveEndpoint", r)
    }

    async fn add_endpoints(
        &self,
        req: Request<proto::AddEndpointsRequest>,
    ) -> Result<Response<proto::EndpointsResponse>, Status> {
        let r = self.add_endpoints_call(req).await;
        self.done("AddEndpoints", r)
    }

    async fn remove_endpoints(
        &self,
        req: Request<proto::RemoveEndpointsRequest>,
    ) -> Result<Response<proto::EndpointsResponse>, Status> {
        let r = self.remove_endpoints_call(req).await;
        self.done("RemoveEndpoints", r)
    }

    async fn upsert_service(
        &self,
        req: Request<proto::UpsertServiceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        const M: &str = "UpsertService";
        let sh = &self.shared;
        let caller = match self.authorize(&req, M, Action::Services) {
            Ok(c) => c,
            Err(e) => return self.done(M, Err(e)),
        };
        let peer = req.remote_addr();
        let req = req.into_inner();
        let r = async {
            let svc = req
                .service
                .ok_or_else(|| invalid(FieldError::new("service", "required")))?;
            let rec = convert::service_from_proto(&svc, &sh.cfg.cluster_name).map_err(invalid)?;
            let mut st = sh.state.lock().await;
            st.check_service(&rec).map_err(refused)?;
            let key = (rec.namespace.clone(), rec.name.clone());
            if st.services.get(&key) != Some(&rec) {
                store::put_service(&mut sh.client.clone(), &sh.keys, &rec)
                    .await
                    .map_err(unavailable)?;
                let fields = serde_json::json!({
                    "service": format!("{}/{}", rec.namespace, rec.name),
                    "frontends": rec.frontends.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "backends": rec.backends.len(),
                    "global": rec.global,
                });
                st.put_service(rec);
                drop(st);
                self.audit(&caller, peer, M, Ok(()), fields);
                sh.changed.notify_one();
            }
            Ok(proto::Empty {})
        }
        .await
        .map(Response::new);
        self.done(M, r)
    }

    async fn set_encryption_policy(
        &self,
        req: Request<proto::SetEncryptionPolicyRequest>,
    ) -> Result<Response<proto::EncryptionPolicy>, Status> {
        const M: &str = "SetEncryptionPolicy";
        let sh = &self.shared;
        let caller = match self.authorize(&req, M, Action::Posture) {
            Ok(c) => c,
            Err(e) => return self.done(M, Err(e)),
        };
        let peer = req.remote_addr();
        let req = req.into_inner();
        let r = async {
            let p = req
                .policy
                .ok_or_else(|| invalid(FieldError::new("policy", "required")))?;
            let p = convert::encryption_from_proto(&p).map_err(invalid)?;
            let mut st = sh.state.lock().await;
            if st.encryption != p {
                store::put_encryption_policy(&mut sh.client.clone(), &sh.keys, &p)
                    .await
                    .map_err(unavailable)?;
                tracing::info!(policy = ?p, %caller, "encryption policy changed through the API");
                let old = st.encryption;
                st.set_encryption(p);
                drop(st);
                self.audit(
                    &caller,
                    peer,
                    M,
                    Ok(()),
                    serde_json::json!({"old": old, "new": p}),
                );
                sh.changed.notify_one();
            }
            Ok(convert::encryption_to_proto(&p))
        }
        .await
        .map(Response::new);
        self.done(M, r)
    }

    async fn delete_service(
        &self,
        req: Request<proto::DeleteServiceRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        const M: &str = "DeleteService";
        let sh = &self.shared;
        let caller = match self.authorize(&req, M, Action::Services) {
            Ok(c) => c,
            Err(e) => return self.done(M, Err(e)),
        };
        let peer = req.remote_addr();
        let req = req.into_inner();
        let r = async {
            let ns: K8sName = req
                .namespace
                .parse()
                .map_err(|e: clustermesh_api::ValueError| {
                    invalid(FieldError::new("namespace", e.to_string()))
                })?;
            let name: K8sName = req.name.parse().map_err(|e: clustermesh_api::ValueError| {
                invalid(FieldError::new("name", e.to_string()))
            })?;
            let mut st = sh.state.lock().await;
            let key = (ns, name);
            if st.file_services.contains_key(&key) {
                return Err(Status::failed_precondition(format!(
                    "service {}/{} is declared in the services file; remove it there",
                    key.0, key.1
                )));
            }
            if st.services.contains_key(&key) {
                store::delete_service(
                    &mut sh.client.clone(),
                    &sh.keys,
                    key.0.as_str(),
                    key.1.as_str(),
                )
                .await
                .map_err(unavailable)?;
                st.remove_service(&key);
                drop(st);
                self.audit(
                    &caller,
                    peer,
                    M,
                    Ok(()),
                    serde_json::json!({"service": format!("{}/{}", key.0, key.1)}),
                );
                sh.changed.notify_one();
            }
            Ok(proto::Empty {})
        }
        .await
        .map(Response::new);
        self.done(M, r)
    }

    async fn list_services(
        &self,
        req: Request<proto::ListServicesRequest>,
    ) -> Result<Response<proto::ListServicesResponse>, Status> {
        if let Err(e) = self.authorize(&req, "ListServices", Action::Read) {
            return self.done("ListServices", Err(e));
        }
        let st = self.shared.state.lock().await;
        let services = st.all_services().map(convert::service_to_proto).collect();
        let r = Ok(Response::new(proto::ListServicesResponse { services }));
        self.done("ListServices", r)
    }

    async fn apply_policies(
        &self,
        req: Request<proto::ApplyPoliciesRequest>,
    ) -> Result<Response<proto::ApplyPoliciesResponse>, Status> {
        let r = self.apply_policies_call(req).await;
        self.done("ApplyPolicies", r)
    }

    async fn delete_policy(
        &self,
        req: Request<proto::DeletePolicyRequest>,
    ) -> Result<Response<proto::DeletePolicyResponse>, Status> {
        let r = self.delete_policy_call(req).await;
        self.done("DeletePolicy", r)
    }

    async fn list_policies(
        &self,
        req: Request<proto::ListPoliciesRequest>,
    ) -> Result<Response<proto::ListPoliciesResponse>, Status> {
        let r = self.list_policies_call(req).await;
        self.done("ListPolicies", r)
    }

    async fn get_policy(
        &self,
        req: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::NetworkPolicy>, Status> {
        let r = self.get_policy_call(req).await;
        self.done("GetPolicy", r)
    }
}
