//! Network policies from Kubernetes (CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy, NetworkPolicy) through the Kubernetes
//! source, against kube-rs's client driven by a mock HTTP service
//! (tower-test) that answers with Kubernetes API JSON of the real shape
//! (list items of built-in kinds without apiVersion/kind, server-set
//! metadata, Cilium's `status`, a 410 Gone watch error that makes the
//! watcher relist, a 404 for a CRD that is not installed).
//!
//! The Kubernetes API server is mocked because none can run on this
//! machine; everything above the HTTP layer (kube's watchers, list then
//! watch, relist, our caches, the translation through the policy parser
//! and the state's mark and sweep) is the real code.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clustermesh_api::{
    PolicyRecord, StateKind,
    policy::{PolicyKind, parse_documents},
};
use clustermesh_apiserver::{
    kube_source::{KubeSource, Records, SkipLog},
    state::{ClusterState, Refusal},
};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

const CNP: &str = "/apis/cilium.io/v2/ciliumnetworkpolicies";
const CCNP: &str = "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies";
const NP: &str = "/apis/networking.k8s.io/v1/networkpolicies";

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}, "items": items})
}

/// Server-set metadata as the API server returns it.
fn meta(ns: Option<&str>, name: &str, rv: &str) -> Value {
    let mut m = json!({
        "name": name, "resourceVersion": rv, "generation": 1,
        "uid": format!("6f2c1e0a-0000-4000-8000-{:012}", name.len()),
        "creationTimestamp": "2025-05-01T10:00:00Z",
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
        "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                           "apiVersion": "cilium.io/v2", "time": "2025-05-01T10:00:00Z",
                           "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
    });
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

/// A CiliumNetworkPolicy as the API server serves it (custom resources
/// keep apiVersion/kind in list items; the agent writes `status`).
fn cnp(name: &str, rv: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": meta(Some("default"), name, rv),
        "spec": spec,
        "status": {"conditions": [{"type": "Valid", "status": "True",
                   "lastTransitionTime": "2025-05-01T10:00:01Z", "message": "Policy validation succeeded"}]}
    })
}

/// The L3 example of Cilium's documentation: backend accepts frontend.
fn l3_spec() -> Value {
    json!({"endpointSelector": {"matchLabels": {"app": "backend"}},
           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}]})
}

/// The L4 example: egress on TCP `port`.
fn l4_spec(port: &str) -> Value {
    json!({"endpointSelector": {"matchLabels": {"app": "myService"}},
           "egress": [{"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]})
}

/// The L7 example: HTTP rules, which we do not enforce.
fn l7_spec() -> Value {
    json!({"endpointSelector": {"matchLabels": {"app": "myService"}},
           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                     "rules": {"http": [{"method": "GET", "path": "/public"}]}}]}]})
}

fn ccnp() -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": meta(None, "allow-dns", "95"),
        "spec": {"endpointSelector": {},
                 "egress": [{"toEndpoints": [{"matchLabels": {
                                "k8s:io.kubernetes.pod.namespace": "kube-system",
                                "k8s:k8s-app": "kube-dns"}}],
                             "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}
    })
}

/// A NetworkPolicy list item (built-in kinds: no apiVersion/kind there).
fn np(name: &str) -> Value {
    json!({
        "metadata": meta(Some("default"), name, "96"),
        "spec": {
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [
                            {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                            {"podSelector": {"matchLabels": {"role": "frontend"}}}],
                         "ports": [{"protocol": "TCP", "port": 6379}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                        "ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}]}]
        }
    })
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn not_found(path: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("the server could not find the requested resource ({path})"),
                        "reason": "NotFound", "details": {}, "code": 404});
    Response::builder()
        .status(404)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

/// Serves the mock API. CiliumNetworkPolicies: a first list; a watch with
/// MODIFIED, ADDED, DELETED, then a 410 Gone (the watcher relists); a
/// second list without the added one. `ccnp_crd`: whether the
/// CiliumClusterwideNetworkPolicy CRD is installed (404 otherwise).
/// Later watches are held open, as a quiet API server does.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    ccnp_crd: bool,
) {
    let first = list(
        "CiliumNetworkPolicyList",
        "cilium.io/v2",
        "100",
        vec![
            cnp("l3-rule", "90", l3_spec()),
            cnp("l4-rule", "91", l4_spec("80")),
            cnp("l7-rule", "92", l7_spec()),
        ],
    );
    let second = list(
        "CiliumNetworkPolicyList",
        "cilium.io/v2",
        "200",
        vec![
            cnp("l4-rule", "101", l4_spec("8080")),
            cnp("l7-rule", "92", l7_spec()),
        ],
    );
    let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": "too old resource version: 100 (150)", "reason": "Expired", "code": 410});
    let events = [
        json!({"type": "MODIFIED", "object": cnp("l4-rule", "101", l4_spec("8080"))}),
        json!({"type": "ADDED", "object": cnp("db-allow", "102", l3_spec())}),
        json!({"type": "DELETED", "object": cnp("l3-rule", "103", l3_spec())}),
        json!({"type": "ERROR", "object": gone}),
    ]
    .map(|e| e.to_string())
    .join("\n")
        + "\n";
    let ccnps = list(
        "CiliumClusterwideNetworkPolicyList",
        "cilium.io/v2",
        "100",
        vec![ccnp()],
    );
    // `l4-rule` collides with the CiliumNetworkPolicy of that name.
    let nps = list(
        "NetworkPolicyList",
        "networking.k8s.io/v1",
        "100",
        vec![np("test-network-policy"), np("l4-rule")],
    );
    let empty = |kind: &str, v: &str| list(kind, v, "100", vec![]);
    let (mut cnp_lists, mut cnp_watches, mut held) = (0, 0, Vec::new());
    while let Some((req, send)) = handle.next_request().await {
        let path = req.uri().path().to_owned();
        let watch = req.uri().query().unwrap_or("").contains("watch=true");
        if path == CCNP && !ccnp_crd {
            send.send_response(not_found(&path));
            continue;
        }
        if watch {
            if path == CNP && cnp_watches == 0 {
                cnp_watches += 1;
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(events.clone().into_bytes()))
                        .unwrap(),
                );
            } else {
                held.push(send);
            }
            continue;
        }
        let body = match path.as_str() {
            CNP => {
                cnp_lists += 1;
                if cnp_lists == 1 {
                    first.clone()
                } else {
                    second.clone()
                }
            }
            CCNP => ccnps.clone(),
            NP => nps.clone(),
            "/api/v1/nodes" => empty("NodeList", "v1"),
            "/api/v1/services" => empty("ServiceList", "v1"),
            "/apis/discovery.k8s.io/v1/endpointslices" => {
                empty("EndpointSliceList", "discovery.k8s.io/v1")
            }
            "/api/v1/namespaces" => empty("NamespaceList", "v1"),
            other => panic!("unexpected request {other}"),
        };
        send.send_response(ok(&body));
    }
}

async fn synced_source(ccnp_crd: bool) -> (KubeSource, tokio::task::JoinHandle<()>) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, ccnp_crd));
    let client = kube::Client::new(mock, "default");
    let mut src = KubeSource::new(client, "c1".parse().unwrap());
    tokio::time::timeout(Duration::from_secs(10), src.initial_sync())
        .await
        .unwrap()
        .unwrap();
    (src, server)
}

fn find<'a>(
    r: &'a Records,
    kind: PolicyKind,
    ns: Option<&str>,
    name: &str,
) -> Option<&'a PolicyRecord> {
    r.policies.iter().find(|p| {
        p.policy.kind == kind
            && p.namespace.as_ref().map(|n| n.as_str()) == ns
            && p.name.as_str() == name
    })
}

fn names(r: &Records) -> Vec<String> {
    r.policies
        .iter()
        .map(|p| p.policy.reference().to_string())
        .collect()
}

/// What `clustermesh policy apply` makes of the same manifest.
fn applied(yaml: &str) -> PolicyRecord {
    let mut d = parse_documents(yaml).unwrap();
    assert_eq!(d.len(), 1);
    let d = d.remove(0);
    PolicyRecord::new("c1".parse().unwrap(), d.policy, d.manifest)
}

/// The first egress port of a CiliumNetworkPolicy, in its stored manifest
/// (JSON text) and in the parsed model.
fn cnp_port(r: &Records, name: &str) -> Option<(String, u16)> {
    find(r, PolicyKind::CiliumNetworkPolicy, Some("default"), name).map(|p| {
        (
            p.manifest["spec"]["egress"][0]["toPorts"][0]["ports"][0]["port"].to_string(),
            p.policy.specs[0].egress[0].ports[0].ports.first(),
        )
    })
}

#[tokio::test]
async fn listed_policies_become_the_records_policy_apply_stores() {
    let (src, server) = synced_source(true).await;
    let r = src.records();
    assert_eq!(r.policies.len(), 4, "{:?}", names(&r));

    let l3 = find(
        &r,
        PolicyKind::CiliumNetworkPolicy,
        Some("default"),
        "l3-rule",
    )
    .unwrap();
    let by_cli = applied(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: l3-rule\n  namespace: default\n\
         spec:\n  endpointSelector:\n    matchLabels:\n      app: backend\n  ingress:\n  - fromEndpoints:\n    \
         - matchLabels:\n        app: frontend\n",
    );
    assert_eq!(l3.policy, by_cli.policy, "same model as the CLI path");
    assert_eq!(
        l3.manifest, by_cli.manifest,
        "same stored manifest: server-set metadata and status are not part of it"
    );
    assert_eq!(cnp_port(&r, "l4-rule"), Some(("\"80\"".to_owned(), 80)));

    let dns = find(
        &r,
        PolicyKind::CiliumClusterwideNetworkPolicy,
        None,
        "allow-dns",
    )
    .unwrap();
    assert!(dns.namespace.is_none());
    assert_eq!(
        dns.manifest["spec"]["egress"][0]["toPorts"][0]["ports"][0]["protocol"],
        "UDP"
    );

    // A NetworkPolicy list item carries no apiVersion/kind: the watched
    // resource's are used.
    let np = find(
        &r,
        PolicyKind::NetworkPolicy,
        Some("default"),
        "test-network-policy",
    )
    .unwrap();
    assert_eq!(np.manifest["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(np.manifest["kind"], "NetworkPolicy");
    assert_eq!(
        np.manifest["spec"]["egress"][0]["ports"][0]["endPort"],
        32768
    );
    assert_eq!(
        np.policy.specs[0].egress[0].ports[0].ports.last(),
        32768,
        "endPort parsed into the port range"
    );

    // Into the state and the export, under the standalone path's keys.
    let mut st = ClusterState::new(
        "c1".parse().unwrap(),
        clustermesh_api::ClusterId::new(1).unwrap(),
        Default::default(),
    );
    assert_eq!(st.replace_kube_policies(&r.policies), 4);
    assert_eq!(st.take_changes().len(), 4);
    assert_eq!(
        st.replace_kube_policies(&r.policies),
        0,
        "unchanged: nothing touched"
    );
    let d = st.desired();
    let keys: Vec<&String> = d.kinds[&StateKind::Policies].keys().collect();
    assert!(
        keys.iter()
            .any(|k| k.ends_with("policies/v1/c1/default/l3-rule")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.ends_with("policies/v1/c1/_/allow-dns")),
        "{keys:?}"
    );
    let stored = &d.kinds[&StateKind::Policies]
        .iter()
        .find(|(k, _)| k.ends_with("/default/l3-rule"))
        .unwrap()
        .1;
    let decoded: PolicyRecord = serde_json::from_slice(stored).unwrap();
    assert_eq!(&decoded, l3, "decodes as the stored record");

    // The gRPC path may not change a Kubernetes policy.
    let e = st
        .check_policies(&[by_cli], &["document 0".to_owned()])
        .unwrap_err();
    assert!(
        matches!(&e, Refusal::FailedPrecondition(m) if m.contains("Kubernetes") && m.contains("l3-rule")),
        "{e:?}"
    );
    server.abort();
}

#[tokio::test]
async fn refused_objects_are_skipped_named_and_counted() {
    let (src, server) = synced_source(true).await;
    let r = src.records();
    assert!(
        find(
            &r,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "l7-rule"
        )
        .is_none(),
        "{:?}",
        names(&r)
    );
    // The others of the same kind are still exported.
    assert!(
        find(
            &r,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "l3-rule"
        )
        .is_some()
    );
    let l7 = r
        .skipped
        .iter()
        .find(|s| s.kind == "CiliumNetworkPolicy" && s.name == "default/l7-rule")
        .unwrap_or_else(|| panic!("{:?}", r.skipped));
    let text = l7.to_string();
    assert!(
        text.starts_with("CiliumNetworkPolicy default/l7-rule: spec.ingress[0].toPorts[0].rules:"),
        "{text}"
    );
    // A NetworkPolicy with a CiliumNetworkPolicy's namespace and name.
    let dup = r
        .skipped
        .iter()
        .find(|s| s.kind == "NetworkPolicy" && s.name == "default/l4-rule")
        .unwrap_or_else(|| panic!("{:?}", r.skipped));
    assert!(
        dup.reason.contains("CiliumNetworkPolicy default/l4-rule"),
        "{dup}"
    );
    assert!(find(&r, PolicyKind::NetworkPolicy, Some("default"), "l4-rule").is_none());

    let counts = r.skipped_counts();
    assert_eq!(counts.get("CiliumNetworkPolicy"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("NetworkPolicy"), Some(&1), "{counts:?}");

    // Logged once, not on every recomputation.
    let mut log = SkipLog::default();
    let logged = log.report(&r.skipped);
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(log.report(&src.records().skipped).is_empty());
    server.abort();
}

#[tokio::test]
async fn watch_events_and_a_relist_update_and_sweep() {
    let (mut src, server) = synced_source(true).await;
    let mut st = ClusterState::new(
        "c1".parse().unwrap(),
        clustermesh_api::ClusterId::new(1).unwrap(),
        Default::default(),
    );
    st.replace_kube_policies(&src.records().policies);
    st.take_changes();

    // MODIFIED l4-rule, ADDED db-allow, DELETED l3-rule.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after_watch = loop {
        tokio::time::timeout_at(deadline, src.next())
            .await
            .unwrap()
            .unwrap();
        let r = src.records();
        if find(
            &r,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "l3-rule",
        )
        .is_none()
        {
            break r;
        }
    };
    assert_eq!(
        cnp_port(&after_watch, "l4-rule"),
        Some(("\"8080\"".to_owned(), 8080))
    );
    assert!(
        find(
            &after_watch,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "db-allow"
        )
        .is_some()
    );
    assert_eq!(
        st.replace_kube_policies(&after_watch.policies),
        3,
        "modified, added, deleted"
    );
    let changes = st.take_changes();
    let deleted: Vec<&String> = changes
        .iter()
        .filter(|c| c.1.is_none())
        .map(|c| &c.0)
        .collect();
    assert!(
        deleted.len() == 1 && deleted[0].ends_with("/default/l3-rule"),
        "{changes:?}"
    );

    // 410 Gone: the watcher relists; db-allow is not in the new list.
    let after_relist = loop {
        tokio::time::timeout_at(deadline + Duration::from_secs(10), src.next())
            .await
            .unwrap()
            .unwrap();
        let r = src.records();
        if find(
            &r,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "db-allow",
        )
        .is_none()
        {
            break r;
        }
    };
    assert_eq!(
        cnp_port(&after_relist, "l4-rule"),
        Some(("\"8080\"".to_owned(), 8080))
    );
    assert_eq!(after_relist.policies.len(), 3, "{:?}", names(&after_relist));
    assert_eq!(st.replace_kube_policies(&after_relist.policies), 1, "swept");
    assert!(
        !st.desired().kinds[&StateKind::Policies]
            .keys()
            .any(|k| k.ends_with("/default/db-allow"))
    );
    server.abort();
}

#[tokio::test]
async fn a_kind_whose_crd_is_not_installed_does_not_block_the_others() {
    let (src, server) = synced_source(false).await;
    let r = src.records();
    assert!(
        find(
            &r,
            PolicyKind::CiliumClusterwideNetworkPolicy,
            None,
            "allow-dns"
        )
        .is_none()
    );
    assert!(
        find(
            &r,
            PolicyKind::CiliumNetworkPolicy,
            Some("default"),
            "l3-rule"
        )
        .is_some()
    );
    assert!(
        find(
            &r,
            PolicyKind::NetworkPolicy,
            Some("default"),
            "test-network-policy"
        )
        .is_some()
    );
    server.abort();
}
