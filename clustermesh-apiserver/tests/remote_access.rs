//! Remote access control against a real etcd with TLS and client-certificate
//! identities (`--client-cert-auth`): the apiserver exports as its own user;
//! a remote cluster's reader (certificate CN `remote-<cluster>`) can read the
//! public prefixes, and cannot read internal records or write anything.
#![allow(clippy::unwrap_used)]

use std::{path::Path, time::Duration};

mod common;

use clustermesh_crypto::pki::{Ca, Usage};
use clustermesh_kvstore::remote_access::{self, REMOTE_ROLE};
use clustermesh_testkit::etcd::{EtcdServer, EtcdTls};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

async fn connect_as(etcd: &EtcdServer, ca: &str, cert: &str, key: &str) -> Client {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    Client::connect([etcd.endpoint()], Some(ConnectOptions::new().with_tls(tls)))
        .await
        .unwrap()
}

fn denied(e: etcd_client::Error) -> bool {
    e.to_string().contains("permission denied")
}

#[tokio::test]
async fn remote_reader_can_read_public_prefixes_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("clustermesh-ca-c1").unwrap();
    let server = ca
        .issue("etcd", &["127.0.0.1", "localhost"], Usage::Server)
        .unwrap();
    let root = ca.issue("root", &[], Usage::Client).unwrap();
    let apiserver = ca.issue("apiserver-c1", &[], Usage::Client).unwrap();
    let reader = ca
        .issue(
            &remote_access::remote_user(&"c2".parse().unwrap()),
            &[],
            Usage::Client,
        )
        .unwrap();
    let stranger = ca.issue("somebody", &[], Usage::Client).unwrap();
    let ca_file = write(dir.path(), "ca.pem", ca.cert_pem());
    let etcd = EtcdServer::start_tls(EtcdTls {
        ca_file: ca_file.clone(),
        cert_file: write(dir.path(), "server.pem", &server.cert_pem),
        key_file: write(dir.path(), "server-key.pem", &server.key_pem),
        client_cert_auth: true,
        probe_cert_file: write(dir.path(), "root.pem", &root.cert_pem),
        probe_key_file: write(dir.path(), "root-key.pem", &root.key_pem),
    })
    .unwrap();

    let mut admin = connect_as(&etcd, ca.cert_pem(), &root.cert_pem, &root.key_pem).await;
    remote_access::enable_auth(&mut admin, "apiserver-c1")
        .await
        .unwrap();
    // Idempotent.
    remote_access::enable_auth(&mut admin, "apiserver-c1")
        .await
        .unwrap();
    let user = remote_access::grant_remote_reader(&mut admin, &"c2".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(user, "remote-c2");
    remote_access::grant_remote_reader(&mut admin, &"c2".parse().unwrap())
        .await
        .unwrap();

    // The apiserver exports as its own certificate user.
    let mut cfg = common::config(&etcd, "c1", 1);
    cfg.etcd.ca_file = Some(ca_file);
    cfg.etcd.cert_file = Some(write(dir.path(), "apiserver.pem", &apiserver.cert_pem));
    cfg.etcd.key_file = Some(write(dir.path(), "apiserver-key.pem", &apiserver.key_pem));
    let a = common::start(cfg).await;
    let mut g = common::grpc(&a).await;
    common::register(&mut g, common::node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();

    let mut remote = connect_as(&etcd, ca.cert_pem(), &reader.cert_pem, &reader.key_pem).await;
    // Reads of every public prefix work (the node shows up once exported).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = remote
            .get(
                "clustermesh/state/nodes/v1/c1/",
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        if r.kvs().len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node not readable by the remote reader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in remote_access::READABLE_PREFIXES {
        remote
            .get(p, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
    }
    assert!(
        !remote
            .get("clustermesh/cluster-config/c1", None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    // Internal records and anything else: denied.
    let e = remote
        .get(
            "clustermesh/internal/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap_err();
    assert!(denied(e));
    // Writes anywhere: denied, including the public prefixes.
    for k in [
        "clustermesh/state/nodes/v1/c1/evil",
        "clustermesh/cluster-config/c1",
        "clustermesh/synced/c1/nodes",
        "elsewhere",
    ] {
        let e = remote.put(k, "x", None).await.unwrap_err();
        assert!(denied(e), "put {k} was not denied");
    }
    let e = remote
        .delete("clustermesh/state/nodes/v1/c1/n1", None)
        .await
        .unwrap_err();
    assert!(denied(e));
    // A certificate without an etcd user gets nothing.
    let mut nobody = connect_as(&etcd, ca.cert_pem(), &stranger.cert_pem, &stranger.key_pem).await;
    assert!(
        nobody
            .get("clustermesh/cluster-config/c1", None)
            .await
            .is_err()
    );

    // The role holds exactly the read permissions on the public prefixes.
    let role = admin.role_get(REMOTE_ROLE).await.unwrap();
    let mut keys: Vec<String> = role
        .permissions()
        .iter()
        .map(|p| p.key_str().unwrap().to_owned())
        .collect();
    keys.sort();
    let mut want: Vec<String> = remote_access::READABLE_PREFIXES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    want.sort();
    assert_eq!(keys, want);

    // Revoked: the reader is locked out.
    remote_access::revoke_remote_reader(&mut admin, &"c2".parse().unwrap())
        .await
        .unwrap();
    assert!(
        remote
            .get("clustermesh/cluster-config/c1", None)
            .await
            .is_err()
    );
    a.shutdown(Duration::from_secs(5)).await;
}
