//! Connect with TLS etcds and client-certificate users, all certificates
//! from `clustermesh enable`: etcd runs with enable's server certificate and
//! `--client-cert-auth`, the apiserver with enable's apiserver certificate
//! and its gRPC API with mutual TLS (enable's server certificate; the CLI
//! dials it with the cluster CA and its admin certificate).
//! Connect creates a read-only user per direction and gives the nodes its
//! certificate; the test proves it can read and cannot write, that a wrong
//! admin certificate is refused in one sentence without changing anything,
//! and that disconnect revokes the user.
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use std::{path::Path, time::Duration};

use clustermesh_api::ClusterId;
use clustermesh_testkit::etcd::{EtcdServer, EtcdTls};
use common::*;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use node_agent::clusters::config::ClusterFile;

struct TlsCluster {
    c: Cluster,
}

async fn tls_cluster(root: &Path, dir: &Path, name: &str, id: u64) -> TlsCluster {
    let idt = id.to_string();
    // First enable: the PKI (etcd's port is not known yet; 127.0.0.1 is in
    // the server certificate's names anyway).
    run_ok(
        dir,
        &[
            "enable",
            "--cluster",
            name,
            "--id",
            &idt,
            "--etcd-endpoints",
            "https://127.0.0.1:2379",
        ],
    )
    .await;
    let pki = dir.join("pki").join(name);
    let etcd = EtcdServer::start_tls(EtcdTls {
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("etcd-server.pem"),
        key_file: pki.join("etcd-server-key.pem"),
        client_cert_auth: true,
        probe_cert_file: pki.join("admin.pem"),
        probe_key_file: pki.join("admin-key.pem"),
    })
    .unwrap();
    let mut cfg = clustermesh_apiserver::Config::new(
        name.parse().unwrap(),
        ClusterId::new(id).unwrap(),
        vec![etcd.endpoint()],
    );
    cfg.etcd.ca_file = Some(pki.join("ca.pem"));
    cfg.etcd.cert_file = Some(pki.join("apiserver.pem"));
    cfg.etcd.key_file = Some(pki.join("apiserver-key.pem"));
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.heartbeat_interval = Duration::from_secs(1);
    // The gRPC API with mutual TLS: enable's server certificate, clients
    // of the cluster CA (the CLI's admin certificate).
    cfg.grpc_tls = Some(clustermesh_apiserver::config::GrpcTls {
        cert_file: pki.join("apiserver-server.pem"),
        key_file: pki.join("apiserver-server-key.pem"),
        client_ca_file: pki.join("ca.pem"),
    });
    let api = clustermesh_apiserver::start(cfg).await.unwrap();
    let https = format!("https://{}", api.grpc_addr);
    // The node reads its own etcd with enable's node certificate (CN
    // remote-<cluster>), as `node-agent --local-etcd-cert` would; connect
    // grants that user before it turns auth on.
    let local = ClusterFile {
        endpoints: vec![etcd.endpoint()],
        trusted_ca_file: Some(pki.join("ca.pem")),
        cert_file: Some(pki.join("node.pem")),
        key_file: Some(pki.join("node-key.pem")),
        pod_cidrs: Vec::new(),
    };
    let node = agent(root, name, "n1", local).await;
    let c = Cluster {
        name: name.into(),
        id,
        etcd,
        api: Some(api),
        nodes: vec![node],
    };
    let etcd = c.etcd.endpoint();
    let nodes = c.node_args();
    let mut args = vec![
        "enable",
        "--cluster",
        name,
        "--apiserver",
        &https,
        "--etcd-endpoints",
        &etcd,
    ];
    args.extend(nodes.iter().map(String::as_str));
    let out = run_ok(dir, &args).await;
    assert!(
        out.contains("--tls-client-ca") && out.contains("--local-etcd-cert"),
        "{out}"
    );
    TlsCluster { c }
}

async fn client_as(endpoint: &str, ca: &Path, cert: &Path, key: &Path) -> Client {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    Client::connect(
        [endpoint],
        Some(
            ConnectOptions::new()
                .with_tls(tls)
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(5)),
        ),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connect_creates_read_only_users_and_disconnect_revokes_them() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = tls_cluster(root.path(), &dir, "c1", 1).await;
    let c2 = tls_cluster(root.path(), &dir, "c2", 2).await;

    let v = run_json(
        &dir,
        &[
            "connect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--wait",
            "--timeout",
            "45s",
        ],
    )
    .await;
    assert_eq!(v["synced"], true, "{v:#}");
    let mut users: Vec<String> = v["etcd_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            format!(
                "{}:{}",
                u["etcd_of"].as_str().unwrap(),
                u["user"].as_str().unwrap()
            )
        })
        .collect();
    users.sort();
    assert_eq!(users, vec!["c1:remote-c2", "c2:remote-c1"]);
    let s = run_json(&dir, &["status"]).await;
    assert_eq!(s["healthy"], true, "{s:#}");

    // The credentials c1's node got: read c2's public prefixes, nothing else.
    let tls = c1.c.nodes[0].clusters_dir.join(".tls/c2");
    let file = std::fs::read_to_string(c1.c.nodes[0].clusters_dir.join("c2")).unwrap();
    assert!(
        file.contains("cert-file") && file.contains(&c2.c.etcd.endpoint()),
        "{file}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(tls.join("client-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
    let mut reader = client_as(
        &c2.c.etcd.endpoint(),
        &tls.join("ca.pem"),
        &tls.join("client.pem"),
        &tls.join("client-key.pem"),
    )
    .await;
    assert_eq!(
        reader
            .get("clustermesh/cluster-config/c2", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
    let e = reader
        .put("clustermesh/state/nodes/v1/c2/evil", "x", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");

    // c1's nodes still read their own etcd now that auth is on (enable's
    // node certificate, user remote-c1), and only read.
    let pki1 = dir.join("pki/c1");
    let mut own = client_as(
        &c1.c.etcd.endpoint(),
        &pki1.join("ca.pem"),
        &pki1.join("node.pem"),
        &pki1.join("node-key.pem"),
    )
    .await;
    assert_eq!(
        own.get("clustermesh/cluster-config/c1", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
    let e = own.put("clustermesh/x", "x", None).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");

    // A wrong admin certificate (another CA): one sentence, nothing changed.
    let pki = dir.join("pki/c2");
    let (good_cert, good_key) = (
        std::fs::read(pki.join("admin.pem")).unwrap(),
        std::fs::read(pki.join("admin-key.pem")).unwrap(),
    );
    let other = clustermesh_crypto::pki::Ca::generate("someone-else").unwrap();
    let wrong = other
        .issue("root", &[], clustermesh_crypto::pki::Usage::Client)
        .unwrap();
    std::fs::write(pki.join("admin.pem"), &wrong.cert_pem).unwrap();
    std::fs::write(pki.join("admin-key.pem"), &wrong.key_pem).unwrap();
    let e = run_fail(
        &dir,
        &["disconnect", "--cluster", "c1", "--destination", "c2"],
    )
    .await;
    assert!(
        e.contains("etcd of cluster c2 refused the CLI's admin certificate"),
        "{e}"
    );
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c2"]).await;
    assert!(
        e.contains("the apiserver of cluster c2 at https://")
            && e.contains("refused the TLS handshake"),
        "{e}"
    );
    assert_eq!(
        c1.c.remote_files(0),
        vec!["c2"],
        "a refused disconnect removed files"
    );
    std::fs::write(pki.join("admin.pem"), good_cert).unwrap();
    std::fs::write(pki.join("admin-key.pem"), good_key).unwrap();

    // Re-running connect is harmless (same user, same certificate).
    let out = run_ok(&dir, &["connect", "--cluster", "c1", "--destination", "c2"]).await;
    assert_eq!(out.matches("unchanged").count(), 2, "{out}");

    // Disconnect revokes: the reader is locked out of c2's etcd.
    let v = run_json(
        &dir,
        &[
            "disconnect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--wait",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(v["drained"], true, "{v:#}");
    assert_eq!(v["etcd_users_revoked"].as_array().unwrap().len(), 2);
    assert!(!tls.exists());
    assert!(
        reader
            .get("clustermesh/cluster-config/c2", None)
            .await
            .is_err()
    );
}
