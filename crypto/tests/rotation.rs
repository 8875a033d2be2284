//! Privileged: long-term key rotation between two of our devices under a
//! 10 ms ping, make before break, with zero loss:
//!
//! 1. A adds a new private key (`x_add_private_key`): it accepts
//!    handshakes to either key; sessions under the old one keep working;
//! 2. B learns A's new key and, in one transaction, turns the old peer
//!    entry draining (still decrypts) and routes to the new one, which
//!    handshakes with A's new key (packets queue meanwhile, none lost);
//! 3. after the overlap A retires the old key and B removes the old entry.
//!
//! The underlay carries WireGuard only throughout.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clustermesh_api::WgPublicKey;
use clustermesh_crypto::{keys::PrivateKey, wg::uapi::Client};
use clustermesh_testkit::{
    capture::Capture,
    netns::sweep_stale,
    ping::Ping,
    wireguard::{Impl, RUN_DIR, WgPair},
};

use clustermesh_testkit::require_root;

#[test]
fn key_rotation_under_ping_loses_nothing() {
    require_root!();
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let pair = WgPair::new(ours.clone(), ours).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    let ca = Client::new(format!("{RUN_DIR}/{}.sock", a.iface));
    let cb = Client::new(format!("{RUN_DIR}/{}.sock", b.iface));
    pair.wait_connected().unwrap();
    let cap = Capture::start(&b.ns, "ul0", &pair.dir.path().join("ul.pcap")).unwrap();

    const PINGS: u32 = 400;
    let ping = Ping::start(&a.ns, &b.tunnel_ip, PINGS, "0.01").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let old: WgPublicKey = a.public.parse().unwrap();
    let k2 = PrivateKey::generate().unwrap();
    let new = k2.public_key().unwrap();
    let endpoint = format!("{}:{}", a.underlay_ip, a.port).parse().unwrap();
    let allowed = [format!("{}/32", a.tunnel_ip).parse().unwrap()];
    // 1. A holds both keys.
    ca.add_private_key(&k2).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // 2. B moves to A's new key in one step.
    cb.replace_peer_key(&old, &new, endpoint, &allowed).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // 3. Overlap over: the old key and the old entry go.
    ca.drop_key(&old).unwrap();
    cb.remove_peer(old.as_bytes()).unwrap();

    let sum = ping.finish().unwrap();
    eprintln!("key rotation under 10 ms ping: {sum:?}");
    assert_eq!(
        (sum.sent, sum.received),
        (PINGS, PINGS),
        "lost pings across the rotation"
    );
    // A now runs on the new key only; B's one peer for A is the new key.
    let shown = a.ns.exec("wg", &["show", &a.iface, "public-key"]).unwrap();
    assert_eq!(shown.trim(), new.to_string());
    let peers = b.ns.exec("wg", &["show", &b.iface, "peers"]).unwrap();
    assert_eq!(peers.trim(), new.to_string());
    // And traffic still flows on the new key alone.
    let out =
        a.ns.exec("ping", &["-c", "3", "-i", "0.05", &b.tunnel_ip])
            .unwrap();
    assert!(out.contains("3 received"), "{out}");
    let wire = cap.wireguard_only().unwrap();
    assert!(
        wire.initiations >= 1 && wire.data >= PINGS as usize,
        "{wire:?}"
    );
}
