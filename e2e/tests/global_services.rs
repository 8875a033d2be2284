//! Privileged: a global service with backends in two clusters, balanced by
//! the eBPF datapath at the client pod's veth.
//!
//! Topology: `Mesh` (clusters c1 and c2, one node each, real etcds,
//! apiservers and agent binaries, Geneve) with a backend pod per cluster
//! answering its cluster's name on TCP and UDP 8080, and a client pod on
//! c1's node. `default/web` (frontend 10.96.0.10:80, TCP and UDP) is
//! declared in both clusters, global and shared.
//!
//! Proves, counting answers per backend:
//! - affinity none: the client reaches the backends of both clusters, over
//!   TCP and UDP (the UDP answer comes back from the frontend address);
//! - affinity local: every answer comes from c1 while it has a backend;
//!   when c1's backend is removed, answers come from c2 with no failed
//!   request (c1's backend still runs, so in-flight ones complete);
//! - a stale cluster (its etcd killed, the agent's stale TTL passed): its
//!   backends get no new flow, and none fails;
//! - a frontend left with no backend drops new flows, counted as
//!   `drop_no_service_backend`.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use e2e::{
    product::Mesh,
    require_root,
    services::{
        Answer, BACKEND_PORT, FRONTEND_PORT, ServiceRig, ask_many, ask_tcp, ask_tcp_bound, ask_udp,
        in_pod, tally, web_service,
    },
};
use tunnel_common::{Direction, IPPROTO_TCP, IPPROTO_UDP, Verdict};

const FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Waits until node A's datapath spreads new TCP and UDP flows over
/// exactly `want` (backend addresses, port 8080).
fn until_selectable(m: &Mesh, want: &[Ipv4Addr]) {
    let mut want: Vec<_> = want.iter().map(|ip| (*ip, BACKEND_PORT)).collect();
    want.sort();
    let mut dp = m.a.datapath();
    let t0 = Instant::now();
    loop {
        let tcp = dp
            .lb_selectable(FRONTEND, FRONTEND_PORT, IPPROTO_TCP)
            .unwrap();
        let udp = dp
            .lb_selectable(FRONTEND, FRONTEND_PORT, IPPROTO_UDP)
            .unwrap();
        let sorted = |v: Option<Vec<(Ipv4Addr, u16)>>| {
            v.map(|mut v| {
                v.sort();
                v
            })
        };
        let (tcp, udp) = (sorted(tcp), sorted(udp));
        if tcp.as_ref() == Some(&want) && udp.as_ref() == Some(&want) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "frontend never spread over {want:?}; last TCP/UDP slots {tcp:?} {udp:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn global_service_spreads_fails_over_and_forgets_stale_clusters() {
    require_root!();
    // A forgets an unreachable cluster after 3 s (default 300 s).
    let mut rig = ServiceRig::start(&["client"], &["--stale-ttl", "3"]);
    let client = &rig.clients[0];
    let m = &mut rig.m;
    let (a_ip, b_ip) = (m.a.pod_ip, m.b.pod_ip);

    // 1. Affinity none: both clusters answer, TCP and UDP.
    m.upsert_service(0, web_service(FRONTEND, &[a_ip], true, true, "none"));
    m.upsert_service(1, web_service(FRONTEND, &[b_ip], true, true, "none"));
    until_selectable(m, &[a_ip, b_ip]);
    let to = SocketAddr::from((FRONTEND, FRONTEND_PORT));
    let answers = ask_many(client, to, 200);
    let t = tally(&answers);
    eprintln!("affinity none, 200 TCP requests: {t:?}");
    assert_eq!(t.values().sum::<usize>(), 200);
    assert!(t.get("c1").copied().unwrap_or(0) >= 40, "{t:?}");
    assert!(t.get("c2").copied().unwrap_or(0) >= 40, "{t:?}");
    let udp: Vec<String> = in_pod(client, || {
        (0..60)
            .map(|_| ask_udp(to, Duration::from_secs(1)).unwrap_or_else(|e| format!("error: {e}")))
            .collect()
    });
    let (u1, u2) = (
        udp.iter().filter(|s| *s == "c1").count(),
        udp.iter().filter(|s| *s == "c2").count(),
    );
    eprintln!("affinity none, 60 UDP requests: c1 {u1}, c2 {u2}");
    assert_eq!(u1 + u2, 60, "every UDP answer from the frontend: {udp:?}");
    assert!(u1 >= 5 && u2 >= 5, "c1 {u1}, c2 {u2}");

    // 2. Affinity local: c1 only, while it has a ready backend.
    m.upsert_service(0, web_service(FRONTEND, &[a_ip], true, true, "local"));
    until_selectable(m, &[a_ip]);
    let t = tally(&ask_many(client, to, 100));
    eprintln!("affinity local, 100 TCP requests: {t:?}");
    assert_eq!(t.get("c1"), Some(&100), "{t:?}");

    // A connection from a fixed port: its flow goes to c1 (replayed after
    // the failover below).
    const REPLAYED_PORT: u16 = 61001;
    let r = in_pod(client, || {
        ask_tcp_bound(to, REPLAYED_PORT, Duration::from_secs(1))
    });
    assert_eq!(r.unwrap(), "c1");

    // 3. Failover: requests run back to back while c1's backend is removed
    //    from its service.
    let answers = std::thread::scope(|s| {
        let load = s.spawn(|| {
            in_pod(client, || {
                let mut out: Vec<Answer> = Vec::new();
                let t0 = Instant::now();
                // Until c2 answered 100 times in a row (or 60 s passed).
                while t0.elapsed() < Duration::from_secs(60) {
                    out.push(Answer::ask(to));
                    let tail = out.iter().rev().take(100);
                    if out.len() >= 100 && tail.clone().all(|a| a.result.as_deref() == Ok("c2")) {
                        break;
                    }
                }
                out
            })
        });
        // Let some requests go to c1 first.
        std::thread::sleep(Duration::from_millis(300));
        m.upsert_service(0, web_service(FRONTEND, &[], true, true, "local"));
        load.join().unwrap()
    });
    let t = tally(&answers);
    eprintln!(
        "failover: {} requests around the removal: {t:?}",
        answers.len()
    );
    let failed: Vec<_> = answers.iter().filter(|a| a.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "failed requests during failover: {failed:?}"
    );
    // Answers switch once, from c1 to c2, never back.
    let names: Vec<&str> = answers
        .iter()
        .map(|a| a.result.as_deref().unwrap())
        .collect();
    let first_c2 = names.iter().position(|n| *n == "c2").unwrap();
    assert!(first_c2 > 0, "c1 answered before the removal");
    // A new connection replaying a flow that went to c1's (now removed)
    // backend is balanced again, not sent after it.
    let r = in_pod(client, || {
        ask_tcp_bound(to, REPLAYED_PORT, Duration::from_secs(1))
    });
    assert_eq!(r.unwrap(), "c2", "replayed flow");
    let late_c1 = names[first_c2..].iter().filter(|n| **n == "c1").count();
    assert_eq!(late_c1, 0, "c1 answered after the switch to c2");
    assert!(names[..first_c2].iter().all(|n| *n == "c1"));

    // 4. Stale cluster: back to both (affinity none), then c2's etcd dies;
    //    after A's stale TTL c2's backends get no new flow.
    m.upsert_service(0, web_service(FRONTEND, &[a_ip], true, true, "none"));
    until_selectable(m, &[a_ip, b_ip]);
    m.etcds[1].kill().unwrap();
    let killed = Instant::now();
    until_selectable(m, &[a_ip]);
    eprintln!(
        "c2 withdrawn from the frontend {:?} after its etcd died (stale TTL 3 s)",
        killed.elapsed()
    );
    let t = tally(&ask_many(client, to, 100));
    eprintln!("c2 stale, 100 TCP requests: {t:?}");
    assert_eq!(t.get("c1"), Some(&100), "{t:?}");

    // 5. No backend left: new flows are dropped, counted.
    m.upsert_service(0, web_service(FRONTEND, &[], true, true, "none"));
    until_selectable(m, &[]);
    let dp = m.a.datapath();
    let before = dp
        .counter(Direction::Egress, Verdict::DropNoServiceBackend)
        .unwrap()
        .packets;
    let r = in_pod(client, || ask_tcp(to, Duration::from_millis(300)));
    assert!(r.is_err(), "no backend, yet an answer: {r:?}");
    let after = dp
        .counter(Direction::Egress, Verdict::DropNoServiceBackend)
        .unwrap()
        .packets;
    assert!(
        after > before,
        "drop_no_service_backend {before} -> {after}"
    );
}
