//! A watch on a quiet etcd stays up (real etcd, default server settings).
//!
//! etcd's gRPC server refuses client pings closer than its
//! `--grpc-keepalive-min-time` (5 s by default): after three such pings
//! on a connection it sent nothing on, it closes the connection
//! (GOAWAY `too_many_pings`). With a client keepalive below that, every
//! watch of a cluster that is quiet for about ten seconds broke and the
//! agent relisted the whole cluster (found by the churn benchmark: the
//! idle local cluster's watch broke every 12-15 s, each relist filling the
//! event queue).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clustermesh_kvstore::etcd::{EtcdConfig, KEEPALIVE_INTERVAL};
use clustermesh_testkit::etcd::EtcdServer;
use etcd_client::WatchOptions;

/// The number of events of the next message that has any (the watch's
/// creation has none), or why the stream ended.
async fn next_events(w: &mut etcd_client::WatchStream) -> Result<usize, String> {
    loop {
        match w.message().await {
            Ok(Some(m)) if m.events().is_empty() && !m.canceled() => continue,
            Ok(Some(m)) if m.canceled() => return Err(format!("cancelled: {}", m.cancel_reason())),
            Ok(Some(m)) => return Ok(m.events().len()),
            Ok(None) => return Err("stream ended".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[tokio::test]
async fn a_watch_on_a_quiet_etcd_survives_the_servers_ping_policy() {
    let etcd = EtcdServer::start().unwrap();
    let mut c = EtcdConfig::plain([etcd.endpoint()])
        .connect()
        .await
        .unwrap();
    let mut w = c
        .watch("quiet/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    // Three keepalive pings with nothing else on the connection (the
    // server closed it after 12 s before the fix).
    let quiet = KEEPALIVE_INTERVAL * 3 + Duration::from_secs(2);
    let idle = tokio::time::timeout(quiet, next_events(&mut w)).await;
    assert!(idle.is_err(), "the watch ended while quiet: {idle:?}");
    // The same stream still delivers.
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put("quiet/k", "v", None).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), next_events(&mut w))
        .await
        .expect("the event within 5 s");
    assert_eq!(n, Ok(1));
}
