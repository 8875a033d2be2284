//! Table-driven tests of the shared model: round trips of every record and
//! key, a rejection table of malformed inputs with the error each must
//! produce, and a fuzz-style run proving random and mutated bytes never
//! panic the decoders.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use clustermesh_api::{
    Affinity, Backend, BackendState, ClusterConfig, DecodeError, EncryptionMode, EncryptionPolicy,
    EncryptionScope, EndpointRecord, Entry, Heartbeat, IdentityRecord, Key, KeyError, KvKey,
    NodeRecord, Protocol, ServicePort, ServiceRecord, StateKind, SyncCanary, decode_entry,
};

fn samples() -> Vec<Entry> {
    let c1 = || "c1".parse().unwrap();
    let mut labels = BTreeMap::new();
    labels.insert("k8s:app".to_owned(), "web".to_owned());
    labels.insert(
        "k8s:io.kubernetes.pod.namespace".to_owned(),
        "default".to_owned(),
    );
    vec![
        Entry::ClusterConfig(ClusterConfig {
            id: clustermesh_api::ClusterId::new(1).unwrap(),
            name: c1(),
            capabilities: Default::default(),
            encryption: EncryptionPolicy {
                mode: EncryptionMode::Wireguard,
                scope: EncryptionScope::InterCluster,
                strict: true,
                strict_ingress: true,
                node_to_node: false,
            },
        }),
        Entry::Node(NodeRecord {
            name: "node-a.zone-1".parse().unwrap(),
            cluster: c1(),
            underlay_ips: vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
            pod_cidrs: vec![
                "10.1.0.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            wireguard_public_keys: vec![
                "CZ8+0aXeHr0kKcJmG6Uyn4Ar7k5LhRdH4dLJ9Bo1rlM="
                    .parse()
                    .unwrap(),
            ],
            wireguard_port: Some(51871),
            boot_id: "3f2a-77".parse().unwrap(),
        }),
        Entry::Endpoint(EndpointRecord {
            ip: "10.1.0.5".parse().unwrap(),
            cluster: c1(),
            identity: clustermesh_api::Identity::new(
                clustermesh_api::ClusterId::new(1).unwrap(),
                300,
            )
            .unwrap(),
            host_ip: "192.0.2.10".parse().unwrap(),
            node: Some("node-a.zone-1".parse().unwrap()),
            namespace: Some("default".parse().unwrap()),
            name: Some("web-1".parse().unwrap()),
        }),
        Entry::Endpoint(EndpointRecord {
            ip: "fd00:1::5".parse().unwrap(),
            cluster: c1(),
            identity: clustermesh_api::Identity::HOST,
            host_ip: "2001:db8::10".parse().unwrap(),
            node: None,
            namespace: None,
            name: None,
        }),
        Entry::Identity(IdentityRecord {
            id: clustermesh_api::Identity::new(clustermesh_api::ClusterId::new(1).unwrap(), 300)
                .unwrap(),
            cluster: c1(),
            labels: clustermesh_api::Labels::new(labels).unwrap(),
        }),
        Entry::Service(ServiceRecord {
            cluster: c1(),
            namespace: "default".parse().unwrap(),
            name: "web".parse().unwrap(),
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: Some("http".parse().unwrap()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: 8080,
                },
                ServicePort {
                    name: Some("dns".parse().unwrap()),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: 53,
                },
            ],
            backends: vec![
                Backend {
                    ip: "10.1.0.5".parse().unwrap(),
                    cluster: c1(),
                    state: BackendState::Ready,
                    node: Some("node-a.zone-1".parse().unwrap()),
                },
                Backend {
                    ip: "10.1.0.6".parse().unwrap(),
                    cluster: c1(),
                    state: BackendState::Terminating,
                    node: None,
                },
            ],
            global: true,
            shared: false,
            affinity: Affinity::Local,
        }),
        Entry::Synced(SyncCanary {
            cluster: c1(),
            kind: StateKind::Services,
            synced_at_ms: 1_790_000_000_000,
        }),
        Entry::Heartbeat(Heartbeat {
            cluster: c1(),
            timestamp_ms: 1_790_000_000_123,
            version: Some("0.1.0".to_owned()),
        }),
    ]
}

#[test]
fn every_record_round_trips_through_key_and_value() {
    for entry in samples() {
        let key = entry.key().build();
        let value = entry.encode().unwrap();
        let (k, back) = decode_entry(key.as_bytes(), &value)
            .unwrap_or_else(|e| panic!("{key}: {e}\n{}", String::from_utf8_lossy(&value)));
        assert_eq!(back, entry, "{key}");
        assert_eq!(k, entry.key());
        // Encoding is deterministic: re-encoding gives the same bytes.
        assert_eq!(back.encode().unwrap(), value);
    }
}

#[test]
fn every_key_round_trips() {
    let keys = [
        "clustermesh/cluster-config/c1",
        "clustermesh/state/nodes/v1/c1/node-a.zone-1",
        "clustermesh/state/ip/v1/c1/10.1.0.5",
        "clustermesh/state/ip/v1/c-2/fd00:1::5",
        "clustermesh/state/identities/v1/c1/65836",
        "clustermesh/state/identities/v1/c1/1",
        "clustermesh/state/services/v1/c1/default/web",
        "clustermesh/synced/c1/nodes",
        "clustermesh/synced/c1/ip",
        "clustermesh/synced/c1/identities",
        "clustermesh/synced/c1/services",
        "clustermesh/heartbeat/c1",
    ];
    for k in keys {
        let parsed = Key::parse(k.as_bytes()).unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(parsed.build(), k);
        assert_eq!(
            parsed.cluster().as_str(),
            if k.contains("c-2") { "c-2" } else { "c1" }
        );
    }
    // Prefixes end with '/', so cluster c1 never matches c10's keys.
    let c1 = "c1".parse().unwrap();
    for kind in StateKind::ALL {
        let p = kind.prefix(&c1);
        assert!(p.ends_with("/c1/"), "{p}");
        assert!(!format!("clustermesh/state/{kind}/v1/c10/x").starts_with(&p));
    }
}

/// What a rejection must look like.
enum Want {
    Key(fn(&KeyError) -> bool),
    BadJson,
    /// An invalid field: (JSON path, words the message must contain).
    Field(&'static str, &'static str),
    ClusterMismatch,
    KeyMismatch,
    TooLarge,
}

#[test]
fn rejection_table() {
    let node = |pod_cidrs: &str| {
        format!(
            r#"{{"name":"n1","cluster":"c1","underlayIps":["192.0.2.1"],"podCidrs":{pod_cidrs},"bootId":"b1"}}"#
        )
    };
    let big = format!(
        r#"{{"cluster":"c1","kind":"nodes","syncedAtMs":1,"pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let many_labels: String = (0..65)
        .map(|i| format!(r#""k{i}":"v""#))
        .collect::<Vec<_>>()
        .join(",");
    let many_labels = format!(r#"{{"id":65836,"cluster":"c1","labels":{{{many_labels}}}}}"#);
    let svc = |extra: &str| {
        format!(
            r#"{{"cluster":"c1","namespace":"default","name":"web","frontends":[],"ports":[{{"protocol":"TCP","port":80,"targetPort":80}}],"backends":[],"global":true,"shared":true{extra}}}"#
        )
    };
    let n = "clustermesh/state/nodes/v1/c1/n1";
    let cases: Vec<(&str, String, String, Want)> = vec![
        // keys
        ("non-utf8 key", String::from_utf8_lossy(b"x").into(), String::new(), Want::Key(|e| matches!(e, KeyError::NotUtf8))),
        ("foreign prefix", "cilium/state/nodes/v1/c1/n1".into(), node("[]"), Want::Key(|e| matches!(e, KeyError::OutsideSchema { .. }))),
        ("unknown kind", "clustermesh/state/pods/v1/c1/p".into(), "{}".into(), Want::Key(|e| matches!(e, KeyError::UnknownKind { .. }))),
        ("unknown version", "clustermesh/state/nodes/v2/c1/n1".into(), node("[]"), Want::Key(|e| matches!(e, KeyError::UnknownVersion { version, .. } if version == "v2"))),
        ("missing segment", "clustermesh/state/services/v1/c1/web".into(), svc(""), Want::Key(|e| matches!(e, KeyError::Shape { expected: 3, .. }))),
        ("uppercase cluster in key", "clustermesh/state/nodes/v1/C1/n1".into(), node("[]"), Want::Key(|e| matches!(e, KeyError::Segment { .. }))),
        ("non-canonical ip key", "clustermesh/state/ip/v1/c1/010.1.0.5".into(), "{}".into(), Want::Key(|e| matches!(e, KeyError::Segment { .. }))),
        ("identity key with leading zero", "clustermesh/state/identities/v1/c1/065836".into(), "{}".into(), Want::Key(|e| matches!(e, KeyError::Segment { .. }))),
        ("unknown canary kind", "clustermesh/synced/c1/pods".into(), "{}".into(), Want::Key(|e| matches!(e, KeyError::UnknownKind { .. }))),
        // JSON
        ("not JSON", n.into(), "not json".into(), Want::BadJson),
        ("truncated JSON", n.into(), r#"{"name":"n1""#.into(), Want::BadJson),
        ("trailing garbage", n.into(), format!("{} x", node("[]")), Want::BadJson),
        ("empty value", n.into(), String::new(), Want::BadJson),
        // fields
        ("missing field", n.into(), r#"{"name":"n1","cluster":"c1"}"#.into(), Want::Field("(top level)", "missing field `underlayIps`")),
        ("CIDR with host bits", n.into(), node(r#"["10.1.0.1/24"]"#), Want::Field("podCidrs[0]", "host bits")),
        ("overlapping pod CIDRs", n.into(), node(r#"["10.1.0.0/16","10.1.2.0/24"]"#), Want::Field("podCidrs[1]", "overlaps")),
        ("prefix too long", n.into(), node(r#"["10.1.0.0/33"]"#), Want::Field("podCidrs[0]", "at most 32")),
        ("no underlay IP", n.into(), r#"{"name":"n1","cluster":"c1","underlayIps":[],"podCidrs":[],"bootId":"b"}"#.into(), Want::Field("underlayIps", "1..=4")),
        ("bad boot id", n.into(), r#"{"name":"n1","cluster":"c1","underlayIps":["192.0.2.1"],"podCidrs":[],"bootId":"a b"}"#.into(), Want::Field("bootId", "boot id")),
        ("low-order WireGuard key", n.into(), r#"{"name":"n1","cluster":"c1","underlayIps":["192.0.2.1"],"podCidrs":[],"bootId":"b","wireguardPublicKeys":["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]}"#.into(), Want::Field("wireguardPublicKeys[0]", "low-order")),
        ("short WireGuard key", n.into(), r#"{"name":"n1","cluster":"c1","underlayIps":["192.0.2.1"],"podCidrs":[],"bootId":"b","wireguardPublicKeys":["AAAA"]}"#.into(), Want::Field("wireguardPublicKeys[0]", "32 bytes")),
        ("cluster id 0", "clustermesh/cluster-config/c1".into(), r#"{"id":0,"name":"c1"}"#.into(), Want::Field("id", "1..=255")),
        ("cluster id 256", "clustermesh/cluster-config/c1".into(), r#"{"id":256,"name":"c1"}"#.into(), Want::Field("id", "1..=255")),
        ("strict without encryption", "clustermesh/cluster-config/c1".into(), r#"{"id":1,"name":"c1","encryption":{"mode":"none","strict":true}}"#.into(), Want::Field("encryption.strict", "wireguard")),
        ("unknown encryption mode", "clustermesh/cluster-config/c1".into(), r#"{"id":1,"name":"c1","encryption":{"mode":"ipsec"}}"#.into(), Want::Field("encryption.mode", "unknown variant")),
        ("identity with high bits", "clustermesh/state/ip/v1/c1/10.1.0.5".into(), r#"{"ip":"10.1.0.5","cluster":"c1","identity":16777472,"hostIp":"192.0.2.1"}"#.into(), Want::Field("identity", "bits 24-31")),
        ("identity in reserved range of a cluster", "clustermesh/state/ip/v1/c1/10.1.0.5".into(), r#"{"ip":"10.1.0.5","cluster":"c1","identity":65537,"hostIp":"192.0.2.1"}"#.into(), Want::Field("identity", "reserved")),
        ("negative identity", "clustermesh/state/ip/v1/c1/10.1.0.5".into(), r#"{"ip":"10.1.0.5","cluster":"c1","identity":-1,"hostIp":"192.0.2.1"}"#.into(), Want::Field("identity", "")),
        ("reserved identity exported", "clustermesh/state/identities/v1/c1/2".into(), r#"{"id":2,"cluster":"c1","labels":{"reserved:world":""}}"#.into(), Want::Field("id", "reserved")),
        ("too many labels", "clustermesh/state/identities/v1/c1/65836".into(), many_labels, Want::Field("labels", "too many labels")),
        ("unknown affinity", "clustermesh/state/services/v1/c1/default/web".into(), svc(r#","affinity":"nearest""#), Want::Field("affinity", "unknown variant")),
        ("port 0", "clustermesh/state/services/v1/c1/default/web".into(), r#"{"cluster":"c1","namespace":"default","name":"web","frontends":[],"ports":[{"protocol":"TCP","port":0,"targetPort":80}],"backends":[],"global":true,"shared":true}"#.into(), Want::Field("ports[0].port", "0")),
        ("port out of range", "clustermesh/state/services/v1/c1/default/web".into(), r#"{"cluster":"c1","namespace":"default","name":"web","frontends":[],"ports":[{"protocol":"TCP","port":70000,"targetPort":80}],"backends":[],"global":true,"shared":true}"#.into(), Want::Field("ports[0].port", "")),
        ("backend of another cluster", "clustermesh/state/services/v1/c1/default/web".into(), svc("").replace(r#""backends":[]"#, r#""backends":[{"ip":"10.2.0.5","cluster":"c2","state":"ready"}]"#), Want::Field("backends[0].cluster", "only its own")),
        // key/value agreement
        ("value of another cluster", n.into(), node("[]").replace(r#""cluster":"c1""#, r#""cluster":"c2""#), Want::ClusterMismatch),
        ("value of another node", n.into(), node("[]").replace(r#""name":"n1""#, r#""name":"n2""#), Want::KeyMismatch),
        ("endpoint under another IP", "clustermesh/state/ip/v1/c1/10.1.0.6".into(), r#"{"ip":"10.1.0.5","cluster":"c1","identity":65836,"hostIp":"192.0.2.1"}"#.into(), Want::KeyMismatch),
        ("canary of another kind", "clustermesh/synced/c1/ip".into(), r#"{"cluster":"c1","kind":"nodes","syncedAtMs":1}"#.into(), Want::KeyMismatch),
        // size
        ("oversize value", "clustermesh/synced/c1/nodes".into(), big, Want::TooLarge),
    ];
    assert!(cases.len() >= 20);
    for (name, key, value, want) in &cases {
        let key_bytes: &[u8] = if *name == "non-utf8 key" {
            b"clustermesh/\xff/x"
        } else {
            key.as_bytes()
        };
        let err = match decode_entry(key_bytes, value.as_bytes()) {
            Ok((_, e)) => panic!("{name}: accepted {e:?}"),
            Err(e) => e,
        };
        let ok = match (want, &err) {
            (Want::Key(f), DecodeError::Key(k)) => f(k),
            (Want::BadJson, DecodeError::BadJson { .. }) => true,
            (Want::Field(path, words), DecodeError::InvalidField { field, message, .. }) => {
                field == path && message.contains(words)
            }
            (Want::ClusterMismatch, DecodeError::ClusterMismatch { .. }) => true,
            (Want::KeyMismatch, DecodeError::KeyMismatch { .. }) => true,
            (Want::TooLarge, DecodeError::TooLarge { .. }) => true,
            _ => false,
        };
        assert!(ok, "{name}: wrong error: {err:?} / {err}");
        // Every message names the key it came from, so logs are actionable.
        if !matches!(err, DecodeError::Key(KeyError::NotUtf8)) {
            assert!(
                err.to_string().contains("clustermesh/") || err.to_string().contains("cilium/"),
                "{name}: {err}"
            );
        }
    }
}

/// splitmix64: a tiny deterministic generator, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x5eed);
    let seeds: Vec<(String, Vec<u8>)> = samples()
        .into_iter()
        .map(|e| (e.key().build(), e.encode().unwrap()))
        .collect();
    let interesting: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b",",
        b":",
        b"-1",
        b"1e999",
        b"null",
        b"\\u0000",
        b"\xff",
        b"/",
        b"..",
        b"4294967296",
        b"18446744073709551616",
        b"0.5",
        b"\"\"",
    ];
    let mut accepted = 0usize;
    let mut refused = 0usize;
    for i in 0..60_000 {
        let (key, value) = if i % 10 == 0 {
            // Pure random bytes for both.
            let k: Vec<u8> = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
            let v: Vec<u8> = (0..rng.below(96)).map(|_| rng.next() as u8).collect();
            (k, v)
        } else {
            // Structured mutations of valid entries.
            let (k, v) = &seeds[rng.below(seeds.len())];
            let mut k = k.clone().into_bytes();
            let mut v = v.clone();
            for _ in 0..1 + rng.below(4) {
                let target = if rng.below(5) == 0 { &mut k } else { &mut v };
                if target.is_empty() {
                    target.push(b'x');
                }
                let at = rng.below(target.len());
                match rng.below(4) {
                    0 => target[at] = rng.next() as u8,
                    1 => {
                        target.remove(at);
                    }
                    2 => {
                        let ins = interesting[rng.below(interesting.len())];
                        target.splice(at..at, ins.iter().copied());
                    }
                    _ => {
                        let end = (at + 1 + rng.below(8)).min(target.len());
                        let dup = target[at..end].to_vec();
                        target.splice(at..at, dup);
                    }
                }
            }
            (k, v)
        };
        match decode_entry(&key, &value) {
            Ok((k, entry)) => {
                accepted += 1;
                // Anything accepted is self-consistent and re-encodes.
                assert_eq!(k, entry.key());
                let again = entry.encode().unwrap();
                let (_, back) = decode_entry(k.build().as_bytes(), &again).unwrap();
                assert_eq!(back, entry);
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
                assert!(!e.reason().is_empty());
            }
        }
    }
    // The mutator must reach both outcomes, or it tested nothing.
    assert!(accepted > 100, "accepted {accepted}");
    assert!(refused > 10_000, "refused {refused}");
}

#[test]
fn policy_records_round_trip_and_decode_strictly() {
    let manifest = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all.deny}
spec:
  endpointSelector: {}
  ingress: [{}]
"#;
    let docs = clustermesh_api::policy::parse_documents(manifest).unwrap();
    assert_eq!(docs.len(), 2);
    let keys = [
        "clustermesh/state/policies/v1/c1/prod/db",
        "clustermesh/state/policies/v1/c1/_/all.deny",
    ];
    for (d, want) in docs.into_iter().zip(keys) {
        let rec = clustermesh_api::PolicyRecord::new("c1".parse().unwrap(), d.policy, d.manifest);
        let entry = Entry::Policy(rec);
        let key = entry.key().build();
        assert_eq!(key, want);
        let value = entry.encode().unwrap();
        let (k, back) = decode_entry(key.as_bytes(), &value).unwrap();
        assert_eq!(back, entry);
        assert_eq!(k.build(), want);
        assert_eq!(Key::parse(want.as_bytes()).unwrap().build(), want);
    }
    // A stored manifest is as strict as an applied one: an L7 rule, a name
    // that disagrees with the key, bad key segments are refused.
    let l7 = r#"{"cluster":"c1","namespace":"prod","name":"db","manifest":{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"db","namespace":"prod"},"spec":{"endpointSelector":{},"ingress":[{"toPorts":[{"ports":[{"port":"80"}],"rules":{"http":[{}]}}]}]}}}"#;
    let e = decode_entry(keys[0].as_bytes(), l7.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("toPorts[0].rules"), "{e}");
    let other = l7
        .replace(r#","rules":{"http":[{}]}"#, "")
        .replace(r#""name":"db","manifest""#, r#""name":"dbx","manifest""#);
    let e = decode_entry(keys[0].as_bytes(), other.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("metadata.name"), "{e}");
    for bad in [
        "clustermesh/state/policies/v1/c1/Prod/db",
        "clustermesh/state/policies/v1/c1/db",
        "clustermesh/state/policies/v1/c1/_/DB",
    ] {
        assert!(Key::parse(bad.as_bytes()).is_err(), "{bad}");
    }
}
