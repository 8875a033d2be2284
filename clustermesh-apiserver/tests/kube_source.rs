//! The Kubernetes source against kube-rs's client driven by a mock HTTP
//! service (tower-test), answering with realistic Kubernetes API JSON.
//! A mock is used because no Kubernetes API server can be installed on
//! these machines; everything above the HTTP layer (kube's watchers, list
//! then watch, our caches and translation) is the real code.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clustermesh_api::{Affinity, BackendState};
use clustermesh_apiserver::kube_source::{KubeSource, Records};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "100"}, "items": items})
}

fn node(name: &str, internal_ip: Option<&str>, cidrs: &[&str], wg: Option<&str>) -> Value {
    let mut ann = serde_json::Map::new();
    if let Some(k) = wg {
        ann.insert(
            "network.clustermesh.io/wireguard-public-key".into(),
            json!(k),
        );
    }
    let mut addresses = vec![json!({"type": "Hostname", "address": name})];
    if let Some(ip) = internal_ip {
        addresses.push(json!({"type": "InternalIP", "address": ip}));
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "90", "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/hostname": name}, "annotations": ann},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {
            "addresses": addresses,
            "nodeInfo": {"bootID": format!("5d1f6c2a-{name}"), "machineID": "m", "systemUUID": "s",
                         "kernelVersion": "6.1.0", "osImage": "Debian", "containerRuntimeVersion": "containerd://1.7",
                         "kubeletVersion": "v1.33.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn service(ns: &str, name: &str, cluster_ip: &str, ann: Value, extra_spec: Value) -> Value {
    let mut spec = json!({
        "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}],
        "selector": {"app": name}
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": ns, "name": name, "resourceVersion": "91", "uid": format!("uid-{ns}-{name}"), "annotations": ann},
           "spec": spec})
}

fn slice(ns: &str, svc: &str, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"namespace": ns, "name": format!("{svc}-abcde"), "resourceVersion": "92",
                        "labels": {"kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
           "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
           "endpoints": endpoints})
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

/// Serves the mock API: lists, then one batch of watch events for services;
/// later watch requests are held open (never answered), as a quiet API
/// server would.
async fn serve(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>) {
    let nodes = list(
        "NodeList",
        "v1",
        vec![
            node(
                "n1",
                Some("192.0.2.11"),
                &["10.1.0.0/24"],
                Some("CZ8+0aXeHr0kKcJmG6Uyn4Ar7k5LhRdH4dLJ9Bo1rlM="),
            ),
            node("n2", None, &["10.1.1.0/24"], None),
        ],
    );
    let services = list(
        "ServiceList",
        "v1",
        vec![
            service(
                "default",
                "web",
                "10.96.0.10",
                json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}),
                json!({}),
            ),
            service("team", "api", "10.96.0.11", json!({}), json!({})),
            service(
                "team",
                "private",
                "10.96.0.12",
                json!({"service.cilium.io/global": "false"}),
                json!({}),
            ),
            service(
                "default",
                "db",
                "None",
                json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}),
                json!({"clusterIPs": ["None"]}),
            ),
            service(
                "default",
                "ext",
                "",
                json!({}),
                json!({"type": "ExternalName", "externalName": "example.invalid", "clusterIPs": []}),
            ),
            service(
                "default",
                "bad",
                "10.96.0.13",
                json!({"service.cilium.io/affinity": "nearest"}),
                json!({}),
            ),
        ],
    );
    let slices = list(
        "EndpointSliceList",
        "discovery.k8s.io/v1",
        vec![
            slice(
                "default",
                "web",
                json!([
                    {"addresses": ["10.1.0.5"], "nodeName": "n1", "conditions": {"ready": true, "serving": true, "terminating": false}},
                    {"addresses": ["10.1.0.6"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.1.0.7"], "nodeName": "n1", "conditions": {"ready": false, "serving": false, "terminating": false}},
                    {"addresses": ["10.1.0.8"], "nodeName": "n1", "conditions": {}}
                ]),
            ),
            slice(
                "team",
                "api",
                json!([{"addresses": ["10.1.1.5"], "nodeName": "n2", "conditions": {"ready": true}}]),
            ),
        ],
    );
    let namespaces = list(
        "NamespaceList",
        "v1",
        vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "resourceVersion": "93"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team", "resourceVersion": "94",
               "annotations": {"service.cilium.io/global": "true"}}}),
        ],
    );
    // Network policies: none here (tests/kube_policies.rs).
    let cnps = list("CiliumNetworkPolicyList", "cilium.io/v2", vec![]);
    let ccnps = list("CiliumClusterwideNetworkPolicyList", "cilium.io/v2", vec![]);
    let nps = list("NetworkPolicyList", "networking.k8s.io/v1", vec![]);
    let mut changed_web = service(
        "default",
        "web",
        "10.96.0.10",
        json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "remote"}),
        json!({}),
    );
    changed_web["metadata"]["resourceVersion"] = json!("101");
    let db = service(
        "default",
        "db",
        "None",
        json!({}),
        json!({"clusterIPs": ["None"]}),
    );
    let events = format!(
        "{}\n{}\n",
        json!({"type": "MODIFIED", "object": changed_web}),
        json!({"type": "DELETED", "object": db}),
    );
    let mut held = Vec::new();
    let mut services_watched = false;
    while let Some((req, send)) = handle.next_request().await {
        let path = req.uri().path().to_owned();
        let watch = req.uri().query().unwrap_or("").contains("watch=true");
        if watch {
            if path == "/api/v1/services" && !services_watched {
                services_watched = true;
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
            "/api/v1/nodes" => &nodes,
            "/api/v1/services" => &services,
            "/apis/discovery.k8s.io/v1/endpointslices" => &slices,
            "/api/v1/namespaces" => &namespaces,
            "/apis/cilium.io/v2/ciliumnetworkpolicies" => &cnps,
            "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies" => &ccnps,
            "/apis/networking.k8s.io/v1/networkpolicies" => &nps,
            other => panic!("unexpected request {other}"),
        };
        send.send_response(ok(body));
    }
}

fn find<'a>(r: &'a Records, ns: &str, name: &str) -> Option<&'a clustermesh_api::ServiceRecord> {
    r.services
        .iter()
        .find(|s| s.namespace.as_str() == ns && s.name.as_str() == name)
}

#[tokio::test]
async fn kubernetes_objects_become_records_and_follow_changes() {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle));
    let client = kube::Client::new(mock, "default");
    let mut src = KubeSource::new(client, "c1".parse().unwrap());
    tokio::time::timeout(Duration::from_secs(10), src.initial_sync())
        .await
        .unwrap()
        .unwrap();
    let r = src.records();

    // Nodes: InternalIP, podCIDRs, bootID and the WireGuard key annotation.
    assert_eq!(r.nodes.len(), 1, "{r:?}");
    let n1 = &r.nodes[0];
    assert_eq!(n1.name.as_str(), "n1");
    assert_eq!(n1.underlay_ips[0].to_string(), "192.0.2.11");
    assert_eq!(n1.pod_cidrs[0].to_string(), "10.1.0.0/24");
    assert_eq!(n1.boot_id.as_str(), "5d1f6c2a-n1");
    assert_eq!(n1.wireguard_public_keys.len(), 1);
    // A node without an address is skipped with a reason, not exported.
    assert!(
        r.skipped
            .iter()
            .any(|s| s.kind == "node" && s.name == "n2" && s.reason.contains("InternalIP")),
        "{:?}",
        r.skipped
    );

    // Annotations: global + affinity on the service.
    let web = find(&r, "default", "web").unwrap();
    assert!(web.global && web.shared);
    assert_eq!(web.affinity, Affinity::Local);
    assert_eq!(web.frontends[0].to_string(), "10.96.0.10");
    assert_eq!(web.ports[0].port, 80);
    assert_eq!(
        web.ports[0].target_port, 8080,
        "named targetPort resolved through the slice"
    );
    let state = |ip: &str| {
        web.backends
            .iter()
            .find(|b| b.ip.to_string() == ip)
            .unwrap()
            .state
    };
    assert_eq!(state("10.1.0.5"), BackendState::Ready);
    assert_eq!(state("10.1.0.6"), BackendState::Terminating);
    assert_eq!(state("10.1.0.7"), BackendState::NotReady);
    assert_eq!(
        state("10.1.0.8"),
        BackendState::Ready,
        "unknown readiness counts as ready (Kubernetes semantics)"
    );
    assert_eq!(web.backends[0].node.as_ref().unwrap().as_str(), "n1");
    // Namespace default: global unless the service says otherwise.
    assert!(find(&r, "team", "api").unwrap().global);
    assert!(!find(&r, "team", "private").unwrap().global);
    // shared=false, headless: no frontends, still exported with its flags.
    let db = find(&r, "default", "db").unwrap();
    assert!(db.global && !db.shared && db.frontends.is_empty());
    // ExternalName: not a load-balanced service. Bad annotation: skipped, named.
    assert!(find(&r, "default", "ext").is_none());
    assert!(find(&r, "default", "bad").is_none());
    assert!(
        r.skipped
            .iter()
            .any(|s| s.name == "default/bad" && s.reason.contains("nearest")),
        "{:?}",
        r.skipped
    );

    // Watch events: web's affinity changes, db is deleted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::timeout_at(deadline, src.next())
            .await
            .unwrap()
            .unwrap();
        let r = src.records();
        if find(&r, "default", "web").unwrap().affinity == Affinity::Remote
            && find(&r, "default", "db").is_none()
        {
            break;
        }
    }

    // The state takes the records with mark and sweep.
    let mut st = clustermesh_apiserver::state::ClusterState::new(
        "c1".parse().unwrap(),
        clustermesh_api::ClusterId::new(1).unwrap(),
        Default::default(),
    );
    let now = std::time::Instant::now();
    let first = src.records();
    assert!(st.replace_kube(&first.nodes, &first.services, now) > 0);
    st.take_changes();
    assert_eq!(
        st.replace_kube(&first.nodes, &first.services, now),
        0,
        "same records: nothing touched"
    );
    assert!(st.take_changes().is_empty());
    assert_eq!(
        st.replace_kube(&[], &first.services, now),
        1,
        "node removed"
    );
    server.abort();
}
