//! The network policy calls of the gRPC API (issue 18): `ApplyPolicies`,
//! `DeletePolicy`, `ListPolicies`, `GetPolicy`.
//!
//! Apply and delete need the admin ([`Action::Policy`]). In Kubernetes
//! mode a policy that comes from the Kubernetes API (CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy, NetworkPolicy objects) is refused to
//! both (FailedPrecondition): it is changed there; list and get show it. An apply parses
//! the whole manifest stream with `clustermesh_api::policy` and checks every
//! policy before storing any; all are stored in one etcd transaction, so a
//! bad document stores nothing. Every change is audited (`api_call`) with
//! the caller and the old and new manifests.

use clustermesh_api::{
    FieldError, K8sName, PolicyRecord, convert,
    policy::{PolicyError, PolicyName},
    proto,
};
use tonic::{Request, Response, Status};

use crate::{authz::Action, grpc::Api, state::PolicyKey, store};

fn invalid(field: &str, reason: impl Into<String>) -> Status {
    Status::invalid_argument(FieldError::new(field, reason).to_string())
}

/// A request's namespace (empty: cluster-wide) and name.
pub(crate) fn policy_key(namespace: &str, name: &str) -> Result<PolicyKey, Status> {
    let ns = if namespace.is_empty() {
        None
    } else {
        Some(
            namespace
                .parse::<K8sName>()
                .map_err(|e| invalid("namespace", e.to_string()))?,
        )
    };
    let name: PolicyName = name
        .parse()
        .map_err(|e: clustermesh_api::ValueError| invalid("name", e.to_string()))?;
    Ok((ns, name))
}

fn key_text(k: &PolicyKey) -> String {
    match &k.0 {
        Some(ns) => format!("{ns}/{}", k.1),
        None => k.1.to_string(),
    }
}

/// A parse error as the API returns it: the document and field path.
fn parse_refused(e: PolicyError) -> Status {
    Status::invalid_argument(format!("manifest: {e}"))
}

/// Parses and checks an apply: the records to store, what each is (for
/// errors and audit).
fn parse_apply(
    cluster: &clustermesh_api::ClusterName,
    manifest: &str,
) -> Result<(Vec<PolicyRecord>, Vec<String>), Status> {
    let docs = clustermesh_api::policy::parse_documents(manifest).map_err(parse_refused)?;
    if docs.is_empty() {
        return Err(invalid("manifest", "holds no policy"));
    }
    let mut recs = Vec::with_capacity(docs.len());
    let mut what = Vec::with_capacity(docs.len());
    for d in docs {
        let here = format!("document {} ({})", d.document, d.policy.reference());
        let size = d.manifest.to_string().len();
        if size > PolicyRecord::MAX_MANIFEST_BYTES {
            return Err(invalid(
                "manifest",
                format!(
                    "{here}: {size} bytes exceeds the {}-byte limit of one policy",
                    PolicyRecord::MAX_MANIFEST_BYTES
                ),
            ));
        }
        recs.push(PolicyRecord::new(cluster.clone(), d.policy, d.manifest));
        what.push(here);
    }
    Ok((recs, what))
}

impl Api {
    pub(crate) async fn apply_policies_call(
        &self,
        req: Request<proto::ApplyPoliciesRequest>,
    ) -> Result<Response<proto::ApplyPoliciesResponse>, Status> {
        const M: &str = "ApplyPolicies";
        let sh = &self.shared;
        let caller = self.authorize(&req, M, Action::Policy)?;
        let peer = req.remote_addr();
        let req = req.into_inner();
        let r = async {
            let (recs, what) = parse_apply(&sh.cfg.cluster_name, &req.manifest)?;
            let mut st = sh.state.lock().await;
            st.check_policies(&recs, &what)
                .map_err(crate::grpc::refused)?;
            let mut out = Vec::with_capacity(recs.len());
            let mut changed = Vec::new();
            for r in recs {
                let k = (r.namespace.clone(), r.name.clone());
                let old = st.policies.get(&k);
                let outcome = match old {
                    None => "created",
                    Some(o) if o.manifest == r.manifest => "unchanged",
                    Some(_) => "configured",
                };
                out.push(proto::AppliedPolicy {
                    kind: r.policy.kind.to_string(),
                    namespace: r
                        .namespace
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    name: r.name.to_string(),
                    outcome: outcome.to_owned(),
                });
                if outcome != "unchanged" {
                    changed.push((old.map(|o| o.manifest.clone()), r));
                }
            }
            if !changed.is_empty() {
                let puts: Vec<PolicyRecord> = changed.iter().map(|(_, r)| r.clone()).collect();
                store::write_policies(&mut sh.client.clone(), &sh.keys, &puts, &[])
                    .await
                    .map_err(crate::grpc::unavailable)?;
                for r in puts {
                    st.put_policy(r);
                }
                drop(st);
                for (old, r) in &changed {
                    let fields = serde_json::json!({
                        "policy": key_text(&(r.namespace.clone(), r.name.clone())),
                        "kind": r.policy.kind.to_string(),
                        "old": old,
                        "new": r.manifest,
                    });
                    self.audit(&caller, peer, M, Ok(()), fields);
                }
                tracing::info!(%caller, policies = changed.len(), "network policies applied");
                sh.changed.notify_one();
            }
            Ok(proto::ApplyPoliciesResponse { policies: out })
        }
        .await;
        if let Err(e) = &r {
            self.audit(&caller, peer, M, Err(e), serde_json::json!({}));
        }
        r.map(Response::new)
    }

    pub(crate) async fn delete_policy_call(
        &self,
        req: Request<proto::DeletePolicyRequest>,
    ) -> Result<Response<proto::DeletePolicyResponse>, Status> {
        const M: &str = "DeletePolicy";
        let sh = &self.shared;
        let caller = self.authorize(&req, M, Action::Policy)?;
        let peer = req.remote_addr();
        let req = req.into_inner();
        let key = policy_key(&req.namespace, &req.name)?;
        let mut st = sh.state.lock().await;
        st.check_not_kube_policy(&key, &format!("policy {}", key_text(&key)))
            .map_err(crate::grpc::refused)?;
        let Some(old) = st.policies.get(&key).cloned() else {
            return Ok(Response::new(proto::DeletePolicyResponse {
                deleted: false,
            }));
        };
        store::write_policies(
            &mut sh.client.clone(),
            &sh.keys,
            &[],
            std::slice::from_ref(&key),
        )
        .await
        .map_err(crate::grpc::unavailable)?;
        st.remove_policy(&key);
        drop(st);
        self.audit(
            &caller,
            peer,
            M,
            Ok(()),
            serde_json::json!({
                "policy": key_text(&key),
                "kind": old.policy.kind.to_string(),
                "old": old.manifest,
                "new": null,
            }),
        );
        tracing::info!(%caller, policy = %key_text(&key), "network policy deleted");
        sh.changed.notify_one();
        Ok(Response::new(proto::DeletePolicyResponse { deleted: true }))
    }

    pub(crate) async fn list_policies_call(
        &self,
        req: Request<proto::ListPoliciesRequest>,
    ) -> Result<Response<proto::ListPoliciesResponse>, Status> {
        self.authorize(&req, "ListPolicies", Action::Read)?;
        let st = self.shared.state.lock().await;
        let policies = st.all_policies().map(convert::policy_to_proto).collect();
        Ok(Response::new(proto::ListPoliciesResponse { policies }))
    }

    pub(crate) async fn get_policy_call(
        &self,
        req: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::NetworkPolicy>, Status> {
        self.authorize(&req, "GetPolicy", Action::Read)?;
        let key = policy_key(&req.get_ref().namespace, &req.get_ref().name)?;
        let st = self.shared.state.lock().await;
        match st.policy(&key) {
            Some(p) => Ok(Response::new(convert::policy_to_proto(p))),
            None => Err(Status::not_found(format!(
                "no network policy {} in cluster {}",
                key_text(&key),
                st.cluster
            ))),
        }
    }
}
