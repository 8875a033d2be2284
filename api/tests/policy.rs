//! Table tests of the network policy model: selectors, semantics, the
//! manifest parsers (shapes of Cilium's and Kubernetes' documentation
//! examples, written here), refusals, compile-vs-evaluate agreement, lint.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use clustermesh_api::{
    ClusterId, ClusterName, Identity, K8sName, Labels, Protocol,
    policy::{
        Decision, Direction, EndpointRef, FlowPeer, LabelKey, LabelView, Operator, Policy,
        PolicyError, Requirement, Reserved, RuleSection, Selector, Verdict, WarningKind, compile,
        evaluate, lint, lint_with_endpoints, parse_manifests,
    },
};

use Direction::{Egress, Ingress};
use Protocol::{Tcp, Udp};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::new(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap()
}

fn cn(s: &str) -> ClusterName {
    s.parse().unwrap()
}

fn ns(s: &str) -> K8sName {
    s.parse().unwrap()
}

/// A peer endpoint of `cluster` in namespace `namespace` with `app`.
fn pod(cluster: &str, namespace: &str, app: &str) -> FlowPeer {
    FlowPeer::Endpoint {
        cluster: cn(cluster),
        labels: labels(&[
            ("k8s:app", app),
            ("k8s:io.kubernetes.pod.namespace", namespace),
        ]),
    }
}

/// The local endpoint the tables evaluate: c1/default, `k8s:app=<app>`.
struct Local {
    cluster: ClusterName,
    namespace: K8sName,
    labels: Labels,
}

impl Local {
    fn new(cluster: &str, namespace: &str, app: &str) -> Self {
        Self {
            cluster: cn(cluster),
            namespace: ns(namespace),
            labels: labels(&[("k8s:app", app)]),
        }
    }
    fn r(&self) -> EndpointRef<'_> {
        EndpointRef {
            cluster: &self.cluster,
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }
}

fn parse(yaml: &str) -> Vec<Policy> {
    match parse_manifests(yaml) {
        Ok(p) => p,
        Err(e) => panic!("{e}\n{yaml}"),
    }
}

fn verdict(
    policies: &[Policy],
    local: &Local,
    peer: &FlowPeer,
    dir: Direction,
    proto: Protocol,
    port: u16,
) -> Decision {
    evaluate(policies, &local.r(), peer, dir, proto, port)
}

/// One flow and its expected verdict.
struct Flow {
    local: (&'static str, &'static str, &'static str),
    peer: FlowPeer,
    dir: Direction,
    proto: Protocol,
    port: u16,
    want: Verdict,
}

fn flow(
    local: (&'static str, &'static str, &'static str),
    peer: FlowPeer,
    dir: Direction,
    proto: Protocol,
    port: u16,
    want: Verdict,
) -> Flow {
    Flow {
        local,
        peer,
        dir,
        proto,
        port,
        want,
    }
}

const WEB: (&str, &str, &str) = ("c1", "default", "web");
const DB: (&str, &str, &str) = ("c1", "default", "db");

fn check(policies: &[Policy], flows: &[Flow]) {
    for (i, f) in flows.iter().enumerate() {
        let local = Local::new(f.local.0, f.local.1, f.local.2);
        let d = verdict(policies, &local, &f.peer, f.dir, f.proto, f.port);
        assert_eq!(
            d.verdict, f.want,
            "flow {i}: {:?} {} {:?} {}/{:?}: {d}",
            f.local, f.dir, f.peer, f.port, f.proto
        );
    }
}

use Verdict::{Allowed, DeniedByDefault, DeniedByRule, DeniedUnknownPeer};

// ---------------------------------------------------------------- selectors

#[test]
fn selector_operators_and_sources() {
    let l = labels(&[
        ("k8s:app", "web"),
        ("k8s:tier", "front"),
        ("container:team", "a"),
        ("plain", "x"),
    ]);
    let c1 = cn("c1");
    let view = LabelView::new(&l, Some("default"), Some(&c1));
    let req = |k: &str, op: Operator, vals: &[&str]| {
        Requirement::new(
            LabelKey::parse(k).unwrap(),
            op,
            vals.iter().map(|v| (*v).to_owned()).collect(),
        )
        .unwrap()
    };
    use Operator::*;
    let table: Vec<(Requirement, bool)> = vec![
        (req("app", In, &["web", "api"]), true),
        (req("app", In, &["api"]), false),
        (req("k8s:app", In, &["web"]), true),
        (req("any:app", In, &["web"]), true),
        (req("container:app", In, &["web"]), false),
        (req("team", In, &["a"]), true),
        (req("k8s:team", In, &["a"]), false),
        (req("plain", In, &["x"]), true),
        (req("k8s:plain", In, &["x"]), false),
        (req("app", NotIn, &["api"]), true),
        (req("app", NotIn, &["web"]), false),
        (req("missing", NotIn, &["web"]), true),
        (req("tier", Exists, &[]), true),
        (req("missing", Exists, &[]), false),
        (req("k8s:team", Exists, &[]), false),
        (req("missing", DoesNotExist, &[]), true),
        (req("tier", DoesNotExist, &[]), false),
        // the namespace and cluster labels the evaluator sets
        (
            req("k8s:io.kubernetes.pod.namespace", In, &["default"]),
            true,
        ),
        (req("io.cilium.k8s.policy.cluster", In, &["c2"]), false),
        (req("io.cilium.k8s.policy.cluster", In, &["c1"]), true),
    ];
    for (i, (r, want)) in table.into_iter().enumerate() {
        let s = Selector {
            requirements: vec![r.clone()],
        };
        assert_eq!(s.matches(&view), want, "row {i}: {r}");
    }
    // All requirements must hold; none selects everything.
    assert!(Selector::all().matches(&view));
    let both = Selector {
        requirements: vec![req("app", In, &["web"]), req("tier", In, &["back"])],
    };
    assert!(!both.matches(&view));
    // Operators refuse wrong value counts; reserved: keys are refused.
    assert!(Requirement::new(LabelKey::any("a"), In, Default::default()).is_err());
    assert!(Requirement::new(LabelKey::any("a"), Exists, ["x".to_owned()].into()).is_err());
    assert!(LabelKey::parse("reserved:host").is_err());
}

#[test]
fn claimed_cluster_label_is_replaced_by_the_identity_cluster() {
    // A peer whose labels claim c1 but whose identity is c2's.
    let l = labels(&[
        ("k8s:app", "web"),
        ("k8s:io.cilium.k8s.policy.cluster", "c1"),
    ]);
    let c2 = cn("c2");
    let view = LabelView::new(&l, None, Some(&c2));
    let k = LabelKey::any("io.cilium.k8s.policy.cluster");
    assert_eq!(view.values(&k).collect::<Vec<_>>(), vec!["c2"]);
}

// ------------------------------------------------------------- semantics

const L3_ALLOW_FRONTEND: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: l3-frontend-to-web
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
"#;

#[test]
fn default_deny_only_in_the_selected_direction() {
    let p = parse(L3_ALLOW_FRONTEND);
    check(
        &p,
        &[
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Udp,
                53,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "other"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            // egress is not selected: allowed
            flow(WEB, pod("c1", "default", "other"), Egress, Tcp, 80, Allowed),
            // db is not selected at all
            flow(DB, pod("c1", "default", "other"), Ingress, Tcp, 80, Allowed),
            // unknown identity: its own verdict, only where enforced
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::Unknown),
                Ingress,
                Tcp,
                80,
                DeniedUnknownPeer,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::Unknown),
                Egress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
        ],
    );
    let local = Local::new("c1", "default", "web");
    let d = verdict(
        &p,
        &local,
        &pod("c1", "default", "frontend"),
        Ingress,
        Tcp,
        80,
    );
    let rule = d.rule.unwrap();
    assert_eq!(rule.origin, "spec.ingress[0]");
    assert_eq!(rule.section, RuleSection::Ingress);
    assert_eq!(rule.policy.name.as_str(), "l3-frontend-to-web");
    let d = verdict(&p, &local, &pod("c1", "default", "other"), Ingress, Tcp, 80);
    assert_eq!(d.enforced_by.len(), 1);
    assert!(d.to_string().contains("l3-frontend-to-web"), "{d}");
}

#[test]
fn empty_rule_is_deny_all_and_deny_wins() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-all-ingress, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - {}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-all-but-deny-frontend, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports:
      - {port: "22", protocol: TCP}
"#,
    );
    check(
        &p,
        &[
            flow(
                DB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                22,
                DeniedByRule,
            ),
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Udp,
                22,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "other"),
                Ingress,
                Tcp,
                22,
                Allowed,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Ingress,
                Tcp,
                22,
                Allowed,
            ),
        ],
    );
    let local = Local::new("c1", "default", "web");
    let d = verdict(
        &p,
        &local,
        &pod("c1", "default", "frontend"),
        Ingress,
        Tcp,
        22,
    );
    let r = d.rule.unwrap();
    assert_eq!(r.section, RuleSection::IngressDeny);
    assert_eq!(r.origin, "spec.ingressDeny[0]");
}

#[test]
fn deny_applies_without_default_deny() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: deny-world-egress}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: false}
  egressDeny:
  - toEntities: [world]
"#,
    );
    check(
        &p,
        &[
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Egress,
                Tcp,
                443,
                DeniedByRule,
            ),
            flow(
                WEB,
                FlowPeer::Address("8.8.8.8".parse().unwrap()),
                Egress,
                Udp,
                53,
                DeniedByRule,
            ),
            flow(
                WEB,
                pod("c1", "kube-system", "dns"),
                Egress,
                Udp,
                53,
                Allowed,
            ),
            flow(WEB, pod("c1", "default", "x"), Ingress, Tcp, 1, Allowed),
        ],
    );
}

#[test]
fn namespace_scoping() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ns-scope, namespace: prod}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    - matchLabels:
        app: monitor
        k8s:io.kubernetes.pod.namespace: ops
"#,
    );
    let prod_web = ("c1", "prod", "web");
    check(
        &p,
        &[
            // the endpoint selector only selects prod
            flow(WEB, pod("c1", "default", "x"), Ingress, Tcp, 80, Allowed),
            flow(
                prod_web,
                pod("c1", "prod", "frontend"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            // a peer selector without namespace means the policy's namespace
            flow(
                prod_web,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            // with one, that namespace
            flow(
                prod_web,
                pod("c1", "ops", "monitor"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                prod_web,
                pod("c1", "prod", "monitor"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            // a peer without namespace label never matches the default
            flow(
                prod_web,
                FlowPeer::Endpoint {
                    cluster: cn("c1"),
                    labels: labels(&[("k8s:app", "frontend")]),
                },
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
        ],
    );
    // Cluster-wide: no namespace default either side.
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
"#,
    );
    check(
        &p,
        &[
            flow(
                ("c1", "prod", "web"),
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(WEB, pod("c1", "ops", "frontend"), Ingress, Tcp, 80, Allowed),
            flow(
                WEB,
                pod("c1", "ops", "backend"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
        ],
    );
}

#[test]
fn cluster_scoping() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: clusters, namespace: default}
specs:
- endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: local-only}
    - matchLabels:
        app: from-c2
        io.cilium.k8s.policy.cluster: c2
    - matchLabels: {app: anywhere}
      matchExpressions:
      - {key: io.cilium.k8s.policy.cluster, operator: Exists}
    - matchLabels: {app: some}
      matchExpressions:
      - {key: k8s:io.cilium.k8s.policy.cluster, operator: In, values: [c1, c3]}
"#,
    );
    check(
        &p,
        &[
            flow(
                WEB,
                pod("c1", "default", "local-only"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c2", "default", "local-only"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            flow(
                WEB,
                pod("c2", "default", "from-c2"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "from-c2"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            flow(
                WEB,
                pod("c3", "default", "from-c2"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            flow(
                WEB,
                pod("c1", "default", "anywhere"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c2", "default", "anywhere"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c3", "default", "anywhere"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(WEB, pod("c3", "default", "some"), Ingress, Tcp, 80, Allowed),
            flow(
                WEB,
                pod("c2", "default", "some"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            // the namespace default still holds for remote clusters
            flow(
                WEB,
                pod("c2", "other", "anywhere"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            // "local" is the evaluated endpoint's cluster
            flow(
                ("c2", "default", "web"),
                pod("c2", "default", "local-only"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                ("c2", "default", "web"),
                pod("c1", "default", "local-only"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
        ],
    );
    assert_eq!(p[0].specs[0].origin, "specs[0]");
}

#[test]
fn entities() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: entities, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [host, remote-node]
  egress:
  - toEntities: [cluster]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "443"}]
"#,
    );
    let r = |x| FlowPeer::Reserved(x);
    check(
        &p,
        &[
            flow(WEB, r(Reserved::Host), Ingress, Tcp, 1, Allowed),
            flow(WEB, r(Reserved::RemoteNode), Ingress, Tcp, 1, Allowed),
            flow(WEB, r(Reserved::World), Ingress, Tcp, 1, DeniedByDefault),
            flow(
                WEB,
                pod("c1", "default", "x"),
                Ingress,
                Tcp,
                1,
                DeniedByDefault,
            ),
            flow(WEB, pod("c1", "other", "x"), Egress, Tcp, 1, Allowed),
            flow(
                WEB,
                pod("c2", "default", "x"),
                Egress,
                Tcp,
                1,
                DeniedByDefault,
            ),
            flow(WEB, r(Reserved::Host), Egress, Udp, 9, Allowed),
            flow(WEB, r(Reserved::Health), Egress, Udp, 9, Allowed),
            flow(WEB, r(Reserved::World), Egress, Tcp, 443, DeniedByDefault),
            flow(
                WEB,
                FlowPeer::Address("1.1.1.1".parse().unwrap()),
                Egress,
                Tcp,
                443,
                DeniedByDefault,
            ),
            flow(DB, r(Reserved::World), Egress, Tcp, 443, Allowed),
            flow(DB, r(Reserved::World), Egress, Udp, 443, Allowed),
            flow(
                DB,
                FlowPeer::Address("1.1.1.1".parse().unwrap()),
                Egress,
                Tcp,
                443,
                Allowed,
            ),
            flow(DB, r(Reserved::World), Egress, Tcp, 80, DeniedByDefault),
            flow(
                DB,
                pod("c1", "default", "x"),
                Egress,
                Tcp,
                443,
                DeniedByDefault,
            ),
            flow(DB, r(Reserved::Host), Egress, Tcp, 443, DeniedByDefault),
        ],
    );
}

#[test]
fn cidr_with_except_and_port_ranges() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toCIDR: [192.0.2.10/32]
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12]
    toPorts:
    - ports:
      - {port: "8000", endPort: 8099, protocol: TCP}
      - {port: "53", protocol: UDP}
  - toCIDRSet:
    - cidr: 2001:db8::/32
    toPorts:
    - ports:
      - {port: "443", protocol: ANY}
"#,
    );
    let a = |s: &str| FlowPeer::Address(s.parse().unwrap());
    check(
        &p,
        &[
            flow(WEB, a("192.0.2.10"), Egress, Udp, 9, Allowed),
            flow(WEB, a("192.0.2.11"), Egress, Udp, 9, DeniedByDefault),
            flow(WEB, a("10.1.2.3"), Egress, Tcp, 8000, Allowed),
            flow(WEB, a("10.1.2.3"), Egress, Tcp, 8099, Allowed),
            flow(WEB, a("10.1.2.3"), Egress, Tcp, 8100, DeniedByDefault),
            flow(WEB, a("10.1.2.3"), Egress, Tcp, 7999, DeniedByDefault),
            flow(WEB, a("10.1.2.3"), Egress, Udp, 8000, DeniedByDefault),
            flow(WEB, a("10.1.2.3"), Egress, Udp, 53, Allowed),
            flow(WEB, a("10.1.2.3"), Egress, Tcp, 53, DeniedByDefault),
            flow(WEB, a("10.96.0.10"), Egress, Tcp, 8000, DeniedByDefault),
            flow(WEB, a("10.111.255.255"), Egress, Tcp, 8000, DeniedByDefault),
            flow(WEB, a("10.112.0.0"), Egress, Tcp, 8000, Allowed),
            flow(WEB, a("2001:db8::1"), Egress, Tcp, 443, Allowed),
            flow(WEB, a("2001:db8::1"), Egress, Udp, 443, Allowed),
            flow(WEB, a("2001:db9::1"), Egress, Udp, 443, DeniedByDefault),
            // CIDR rules select addresses, not mesh endpoints or world
            flow(
                WEB,
                pod("c1", "default", "x"),
                Egress,
                Tcp,
                8000,
                DeniedByDefault,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Egress,
                Tcp,
                8000,
                DeniedByDefault,
            ),
        ],
    );
}

#[test]
fn l4_only_rule_means_every_peer() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#,
    );
    check(
        &p,
        &[
            flow(WEB, pod("c2", "other", "x"), Ingress, Tcp, 80, Allowed),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::Unknown),
                Ingress,
                Tcp,
                80,
                DeniedUnknownPeer,
            ),
            flow(
                WEB,
                pod("c1", "default", "x"),
                Ingress,
                Tcp,
                81,
                DeniedByDefault,
            ),
            flow(
                WEB,
                pod("c1", "default", "x"),
                Ingress,
                Udp,
                80,
                DeniedByDefault,
            ),
        ],
    );
}

// ---------------------------------------------------- Kubernetes NetworkPolicy

#[test]
fn network_policy_namespace_selector_and_ip_block() {
    let p = parse(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-access
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: analytics
    - podSelector:
        matchLabels:
          app: web
    ports:
    - protocol: TCP
      port: 5432
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 32000
      endPort: 32768
"#,
    );
    let a = |s: &str| FlowPeer::Address(s.parse().unwrap());
    check(
        &p,
        &[
            flow(DB, a("172.17.0.9"), Ingress, Tcp, 5432, Allowed),
            flow(DB, a("172.17.1.9"), Ingress, Tcp, 5432, DeniedByDefault),
            flow(DB, a("172.17.0.9"), Ingress, Udp, 5432, DeniedByDefault),
            flow(
                DB,
                pod("c1", "analytics", "anything"),
                Ingress,
                Tcp,
                5432,
                Allowed,
            ),
            flow(
                DB,
                pod("c1", "other", "anything"),
                Ingress,
                Tcp,
                5432,
                DeniedByDefault,
            ),
            flow(DB, pod("c1", "default", "web"), Ingress, Tcp, 5432, Allowed),
            flow(
                DB,
                pod("c1", "other", "web"),
                Ingress,
                Tcp,
                5432,
                DeniedByDefault,
            ),
            flow(
                DB,
                pod("c1", "default", "web"),
                Ingress,
                Tcp,
                5433,
                DeniedByDefault,
            ),
            // local cluster only by default
            flow(
                DB,
                pod("c2", "default", "web"),
                Ingress,
                Tcp,
                5432,
                DeniedByDefault,
            ),
            flow(
                DB,
                pod("c2", "analytics", "x"),
                Ingress,
                Tcp,
                5432,
                DeniedByDefault,
            ),
            flow(DB, a("10.0.0.5"), Egress, Tcp, 32000, Allowed),
            flow(DB, a("10.0.0.5"), Egress, Tcp, 32768, Allowed),
            flow(DB, a("10.0.0.5"), Egress, Tcp, 32769, DeniedByDefault),
            flow(DB, a("10.0.1.5"), Egress, Tcp, 32000, DeniedByDefault),
            flow(WEB, a("10.0.1.5"), Egress, Tcp, 1, Allowed),
        ],
    );
}

#[test]
fn network_policy_defaults() {
    let p = parse(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress}
spec:
  podSelector: {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-egress, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  egress:
  - {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: team-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: a}
      podSelector:
        matchLabels: {role: client}
"#,
    );
    assert_eq!(p[0].namespace.as_ref().unwrap().as_str(), "default");
    let team_a_client = FlowPeer::Endpoint {
        cluster: cn("c1"),
        labels: labels(&[
            ("k8s:role", "client"),
            ("k8s:io.kubernetes.pod.namespace", "ta"),
            ("k8s:io.cilium.k8s.namespace.labels.team", "a"),
        ]),
    };
    let team_b_client = FlowPeer::Endpoint {
        cluster: cn("c1"),
        labels: labels(&[
            ("k8s:role", "client"),
            ("k8s:io.kubernetes.pod.namespace", "tb"),
            ("k8s:io.cilium.k8s.namespace.labels.team", "b"),
        ]),
    };
    check(
        &p,
        &[
            flow(
                WEB,
                pod("c1", "default", "x"),
                Ingress,
                Tcp,
                80,
                DeniedByDefault,
            ),
            flow(
                ("c1", "other", "web"),
                pod("c1", "default", "x"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            // Ingress only: egress not enforced by the first, allowed by the second
            flow(
                DB,
                FlowPeer::Reserved(Reserved::World),
                Egress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::World),
                Egress,
                Udp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                FlowPeer::Reserved(Reserved::Unknown),
                Egress,
                Udp,
                80,
                DeniedUnknownPeer,
            ),
            flow(DB, team_a_client.clone(), Ingress, Tcp, 80, Allowed),
            flow(DB, team_b_client, Ingress, Tcp, 80, DeniedByDefault),
        ],
    );
    let local = Local::new("c1", "default", "web");
    let d = verdict(
        &p,
        &local,
        &FlowPeer::Reserved(Reserved::World),
        Egress,
        Udp,
        80,
    );
    assert_eq!(d.rule.unwrap().policy.name.as_str(), "allow-all-egress");
}

// --------------------------------------------------------------- refusals

fn refused(yaml: &str) -> PolicyError {
    match parse_manifests(yaml) {
        Ok(p) => panic!("accepted: {p:?}\n{yaml}"),
        Err(e) => e,
    }
}

const CNP_HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n";

#[test]
fn unsupported_and_unknown_fields_are_refused_by_path() {
    let table: &[(&str, &str, &str)] = &[
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http:\n        - {method: GET, path: /}\n",
            "spec.ingress[0].toPorts[0].rules",
            "L7",
        ),
        (
            "spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs:\n    - matchName: example.com\n",
            "spec.egress[0].toFQDNs",
            "FQDN",
        ),
        (
            "spec:\n  endpointSelector: {}\n  egress:\n  - toServices:\n    - k8sService: {serviceName: a, namespace: b}\n",
            "spec.egress[0].toServices",
            "toServices",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - fromRequires: [{matchLabels: {env: prod}}]\n",
            "spec.ingress[0].fromRequires",
            "not supported",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - icmps:\n    - fields: [{type: 8}]\n",
            "spec.ingress[0].icmps",
            "ICMP",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: SCTP}]\n",
            "spec.ingress[0].toPorts[0].ports[0].protocol",
            "SCTP",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: http}]\n",
            "spec.ingress[0].toPorts[0].ports[0].port",
            "named port",
        ),
        (
            "spec:\n  nodeSelector: {}\n",
            "spec.nodeSelector",
            "nodeSelector",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoint: [{}]\n",
            "spec.ingress[0].fromEndpoint",
            "unknown field",
        ),
        (
            "spec:\n  endpointSelector: {matchLabel: {a: b}}\n",
            "spec.endpointSelector.matchLabel",
            "unknown field",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEntities: [kube-apiserver]\n",
            "spec.ingress[0].fromEntities[0]",
            "not supported",
        ),
        (
            "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]\n",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "not inside",
        ),
        (
            "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.1/8]\n",
            "spec.egress[0].toCIDR[0]",
            "host bits",
        ),
        (
            "spec:\n  endpointSelector:\n    matchExpressions: [{key: a, operator: Equals, values: [b]}]\n",
            "spec.endpointSelector.matchExpressions[0].operator",
            "operator",
        ),
        (
            "spec:\n  endpointSelector:\n    matchExpressions: [{key: a, operator: In}]\n",
            "spec.endpointSelector.matchExpressions[0]",
            "at least one value",
        ),
        (
            "spec:\n  endpointSelector: {matchLabels: {reserved:host: \"\"}}\n",
            "spec.endpointSelector.matchLabels.reserved:host",
            "entities",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"90\", endPort: 80}]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort",
            "below",
        ),
        (
            "specs:\n- endpointSelector: {}\n- endpointSelector: {}\n  egressDeny:\n  - toPorts: [{ports: [{port: \"1\"}], serverNames: [a.b]}]\n",
            "specs[1].egressDeny[0].toPorts[0].serverNames",
            "TLS",
        ),
        ("spec: {}\nspecs: []\n", "specs", "not both"),
        ("status: {}\n", "spec", "missing"),
        ("spec: {}\n", "spec.endpointSelector", "missing"),
        (
            "spec: {endpointSelector: {}}\nextra: 1\n",
            "extra",
            "unknown field",
        ),
    ];
    for (body, field, words) in table {
        let yaml = format!("{CNP_HEAD}{body}");
        let e = refused(&yaml);
        assert_eq!(e.field(), Some(*field), "{e}\n{yaml}");
        assert!(e.to_string().contains(words), "{e} lacks {words:?}");
        assert!(e.to_string().contains(field), "{e} lacks {field}");
    }
}

#[test]
fn network_policy_refusals() {
    let head = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: default}\n";
    let table: &[(&str, &str, &str)] = &[
        (
            "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: http}]\n",
            "spec.ingress[0].ports[0].port",
            "named port",
        ),
        (
            "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, protocol: SCTP}]\n",
            "spec.ingress[0].ports[0].protocol",
            "SCTP",
        ),
        (
            "spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n",
            "spec.ingress[0].from[0].ipBlock",
            "cannot be combined",
        ),
        (
            "spec:\n  podSelector: {}\n  ingress:\n  - from: [{}]\n",
            "spec.ingress[0].from[0]",
            "needs",
        ),
        (
            "spec:\n  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
            "spec.ingress",
            "policyTypes",
        ),
        (
            "spec:\n  podSelector: {}\n  policyTypes: [Sideways]\n",
            "spec.policyTypes[0]",
            "variant",
        ),
        (
            "spec:\n  podSelector: {}\n  egress:\n  - to: [{podSelector: {}}]\n    port: 80\n",
            "spec.egress[0].port",
            "unknown field",
        ),
        ("spec: {}\n", "spec", "podSelector"),
        (
            "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{endPort: 90}]\n",
            "spec.ingress[0].ports[0].endPort",
            "port",
        ),
    ];
    for (body, field, words) in table {
        let yaml = format!("{head}{body}");
        let e = refused(&yaml);
        assert_eq!(e.field(), Some(*field), "{e}\n{yaml}");
        assert!(e.to_string().contains(words), "{e} lacks {words:?}");
    }
    let e = refused(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p, namespace: default}\nspec: {endpointSelector: {}}\n",
    );
    assert_eq!(e.field(), Some("metadata.namespace"), "{e}");
    let e = refused(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {endpointSelector: {}}\n",
    );
    assert_eq!(e.field(), Some("metadata.name"), "{e}");
}

#[test]
fn multi_document_stream_and_lists() {
    let yaml = format!(
        "{L3_ALLOW_FRONTEND}---\n# a comment-only document\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: default}}\nspec: {{podSelector: {{}}}}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumClusterwideNetworkPolicy\n  metadata: {{name: cw}}\n  spec: {{endpointSelector: {{}}}}\n"
    );
    let p = parse(&yaml);
    let names: Vec<_> = p.iter().map(|p| p.name.as_str().to_owned()).collect();
    assert_eq!(names, ["l3-frontend-to-web", "np", "cw"]);
    assert!(p[2].namespace.is_none());
    // An error names its document (0-based) and, inside a List, the item.
    let bad = format!(
        "{L3_ALLOW_FRONTEND}---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {{name: x}}\n  spec: {{endpointSelector: {{}}, egress: [{{toFQDNs: [{{matchName: a.b}}]}}]}}\n"
    );
    let e = refused(&bad);
    match &e {
        PolicyError::Field {
            document, field, ..
        } => {
            assert_eq!(*document, 1, "{e}");
            assert_eq!(field, "items[0].spec.egress[0].toFQDNs", "{e}");
        }
        other => panic!("{other}"),
    }
    // JSON is YAML too.
    let json = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"j","namespace":"default"},"spec":{"endpointSelector":{"matchLabels":{"app":"web"}},"ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend"}}],"toPorts":[{"ports":[{"port":"80","protocol":"TCP"}]}]}]}}"#;
    let p = parse(json);
    check(
        &p,
        &[
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                80,
                Allowed,
            ),
            flow(
                WEB,
                pod("c1", "default", "frontend"),
                Ingress,
                Tcp,
                81,
                DeniedByDefault,
            ),
        ],
    );
    // A syntax error in a later document carries its position.
    let e = refused(&format!("{L3_ALLOW_FRONTEND}---\nspec: [unclosed\n"));
    match e {
        PolicyError::Syntax { document, message } => {
            assert_eq!(document, 1);
            assert!(message.contains("line"), "{message}");
        }
        other => panic!("{other}"),
    }
}

// ----------------------------------------------------- compile == evaluate

#[test]
fn compiled_entries_agree_with_evaluation() {
    let p = parse(&format!(
        "{L3_ALLOW_FRONTEND}---\n{}",
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: more, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: api}
      matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: Exists}]
    toPorts:
    - ports: [{port: "8000", endPort: 8080, protocol: TCP}, {port: "53", protocol: ANY}]
  - fromEntities: [host]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "22"}]}]
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#
    ));
    let c1 = ClusterId::new(1).unwrap();
    let c2 = ClusterId::new(2).unwrap();
    let peers: Vec<(Identity, FlowPeer)> = vec![
        (
            Identity::new(c1, 300).unwrap(),
            pod("c1", "default", "frontend"),
        ),
        (Identity::new(c1, 301).unwrap(), pod("c1", "default", "api")),
        (Identity::new(c2, 300).unwrap(), pod("c2", "default", "api")),
        (
            Identity::new(c2, 301).unwrap(),
            pod("c2", "default", "frontend"),
        ),
        (Identity::new(c1, 302).unwrap(), pod("c1", "other", "api")),
        (Identity::HOST, FlowPeer::Reserved(Reserved::Host)),
        (Identity::WORLD, FlowPeer::Reserved(Reserved::World)),
        (
            Identity::REMOTE_NODE,
            FlowPeer::Reserved(Reserved::RemoteNode),
        ),
    ];
    for app in ["web", "db"] {
        let local = Local::new("c1", "default", app);
        let compiled = compile(&p, &local.r(), &peers);
        if app == "db" {
            assert!(compiled.entries.is_empty());
            assert!(!compiled.default_deny_ingress);
        } else {
            assert!(compiled.default_deny_ingress && compiled.default_deny_egress);
            assert!(!compiled.entries.is_empty());
        }
        let mut checked = 0;
        for (id, peer) in &peers {
            for dir in [Ingress, Egress] {
                for proto in [Tcp, Udp] {
                    for port in [1, 22, 53, 443, 7999, 8000, 8080, 8081, 65535] {
                        let want = evaluate(&p, &local.r(), peer, dir, proto, port);
                        let (got, rule) = compiled.lookup(*id, dir, proto, port);
                        assert_eq!(got, want.verdict, "{app} {id} {dir} {proto} {port}: {want}");
                        assert_eq!(rule, want.rule.as_ref(), "{app} {id} {dir} {proto} {port}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, peers.len() * 2 * 2 * 9);
    }
    // Spot checks that the table above is not trivially uniform.
    let web = Local::new("c1", "default", "web");
    let compiled = compile(&p, &web.r(), &peers);
    let id = |i: usize| peers[i].0;
    assert_eq!(compiled.lookup(id(0), Ingress, Tcp, 22).0, DeniedByRule);
    assert_eq!(compiled.lookup(id(0), Ingress, Tcp, 80).0, Allowed);
    assert_eq!(compiled.lookup(id(2), Ingress, Tcp, 8080).0, Allowed);
    assert_eq!(
        compiled.lookup(id(2), Ingress, Udp, 8080).0,
        DeniedByDefault
    );
    assert_eq!(compiled.lookup(id(2), Ingress, Udp, 53).0, Allowed);
    assert_eq!(compiled.lookup(id(3), Ingress, Tcp, 80).0, DeniedByDefault);
    assert_eq!(
        compiled.lookup(id(4), Ingress, Tcp, 8000).0,
        DeniedByDefault
    );
    assert_eq!(compiled.lookup(id(6), Egress, Tcp, 443).0, Allowed);
    assert_eq!(compiled.lookup(id(6), Egress, Udp, 443).0, DeniedByDefault);
}

// --------------------------------------------------------------------- lint

#[test]
fn lint_warnings() {
    let p = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lint-me, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: a}
    - matchLabels: {app: b, io.cilium.k8s.policy.cluster: c2}
    - matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: Exists}]
    - matchLabels: {app: d}
  - fromEndpoints:
    - matchLabels: {app: shadowed}
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromCIDR: [10.1.0.0/16]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: shadowed}
    toPorts: [{ports: [{port: "1", endPort: 1000}]}]
  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.2.0.0/16]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: default}
spec:
  podSelector: {matchLabels: {app: nothing-has-this}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8}
    - podSelector: {matchLabels: {app: x}}
"#,
    );
    let w = lint(&p);
    let implicit: Vec<_> = w
        .iter()
        .filter(|w| w.kind == WarningKind::ImplicitLocalCluster)
        .map(|w| w.field.as_str())
        .collect();
    assert_eq!(
        implicit,
        [
            "spec.ingress[0].fromEndpoints[0]",
            "spec.ingress[0].fromEndpoints[3]",
            "spec.ingress[1].fromEndpoints[0]",
            "spec.ingressDeny[0].fromEndpoints[0]",
            "spec.ingress[0].from[1]",
        ]
    );
    assert!(w[0].message.contains("local cluster only"), "{}", w[0]);
    let shadowed: Vec<_> = w
        .iter()
        .filter(|w| w.kind == WarningKind::ShadowedByDeny)
        .map(|w| w.field.as_str())
        .collect();
    // ingress[1] (port 80 inside 1-1000) and ingress[2] (10.1/16 inside
    // 10/8 and outside the except) are shadowed; ingress[0] is not.
    assert_eq!(shadowed, ["spec.ingress[1]", "spec.ingress[2]"]);

    let (c, n) = (cn("c1"), ns("default"));
    let l = labels(&[("k8s:app", "web")]);
    let eps = [EndpointRef {
        cluster: &c,
        namespace: &n,
        labels: &l,
    }];
    let w = lint_with_endpoints(&p, &eps);
    let nothing: Vec<_> = w
        .iter()
        .filter(|w| w.kind == WarningKind::SelectsNothing)
        .map(|w| (w.policy.name.as_str(), w.field.as_str()))
        .collect();
    assert_eq!(nothing, [("np", "spec.endpointSelector")]);
}

#[test]
fn lint_shadowing_needs_full_cover() {
    let p = parse(&format!(
        "{CNP_HEAD}{}",
        r#"spec:
  endpointSelector: {}
  egress:
  - toCIDR: [10.2.0.0/16]
  - toEndpoints: [{matchLabels: {app: x}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  - toEntities: [host]
  egressDeny:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.2.128.0/17]}]
  - toEndpoints: [{matchLabels: {app: x}}]
    toPorts: [{ports: [{port: "53", protocol: TCP}]}]
"#
    ));
    let w: Vec<_> = lint(&p)
        .into_iter()
        .filter(|w| w.kind == WarningKind::ShadowedByDeny)
        .collect();
    assert!(w.is_empty(), "{w:?}");
}

// ------------------------------------------------------------- never panics

#[test]
fn truncated_and_mutated_manifests_never_panic() {
    let base = format!(
        "{L3_ALLOW_FRONTEND}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: d}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}]\n    ports: [{{port: 80, endPort: 90}}]\n"
    );
    let bytes = base.as_bytes();
    let mut accepted = 0;
    for cut in 0..bytes.len() {
        if let Ok(s) = std::str::from_utf8(&bytes[..cut])
            && parse_manifests(s).is_ok()
        {
            accepted += 1;
        }
    }
    // Deterministic mutations: replace one byte with characters that
    // matter to YAML.
    for (i, &b) in b":-[{ \n0\"*&".iter().enumerate() {
        for pos in (i..bytes.len()).step_by(7) {
            let mut m = bytes.to_vec();
            m[pos] = b;
            if let Ok(s) = std::str::from_utf8(&m) {
                let _ = parse_manifests(s);
            }
        }
    }
    // Some prefixes are whole documents, most are not.
    assert!(accepted > 0 && accepted < bytes.len() / 2, "{accepted}");
}
