//! Privileged: our WireGuard device (`clustermesh-wg`, boringtun over TUN)
//! in one network namespace and a standard WireGuard peer (Debian's
//! `wireguard-go`) in another, both configured with the standard `wg` tool
//! over their control sockets. Proves the handshake completes and traffic
//! passes both ways, that the wire carries WireGuard (tshark's dissector)
//! and never the inner ICMP, that our key derivation matches `wg pubkey`,
//! and that `wg show` reads our device.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_testkit::netns::{NetNs, sweep_stale, veth_pair};

macro_rules! require_root {
    () => {
        if !clustermesh_testkit::is_root() {
            eprintln!("SKIPPED: this test needs root (network namespaces, TUN)");
            if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
                panic!("CLUSTERMESH_REQUIRE_PRIVILEGED is set but the test is not root");
            }
            return;
        }
    };
}

/// A child process killed on drop, with its control socket removed.
struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wg(ns: &NetNs, args: &[&str]) -> String {
    ns.exec("wg", args)
        .unwrap_or_else(|e| panic!("wg {}: {e}", args.join(" ")))
}

fn pubkey(private_file: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("wg pubkey < {}", private_file.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn handshake_and_traffic_with_wireguard_go() {
    require_root!();
    sweep_stale();
    let a = NetNs::new("wga").unwrap();
    let b = NetNs::new("wgb").unwrap();
    veth_pair(&a, "ul0", "10.99.0.1/24", &b, "ul0", "10.99.0.2/24").unwrap();
    let tag = std::process::id() % 100_000;
    let (ifa, ifb) = (format!("cmwg{tag}a"), format!("cmwg{tag}b"));
    let run = Path::new("/var/run/wireguard");
    let dir = tempfile::tempdir().unwrap();

    // Ours in A, its key file created by the device (mode 0600).
    let akey = dir.path().join("a.key");
    let log = std::fs::File::create(dir.path().join("a.log")).unwrap();
    let _ours = Proc(
        Command::new("ip")
            .args(["netns", "exec", a.name()])
            .arg(env!("CARGO_BIN_EXE_clustermesh-wg"))
            .args([&ifa, "--port", "51871", "--private-key-file"])
            .arg(&akey)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        run.join(format!("{ifa}.sock")),
    );
    // wireguard-go in B.
    let _theirs = Proc(
        Command::new("ip")
            .args(["netns", "exec", b.name(), "wireguard-go", "-f", &ifb])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        run.join(format!("{ifb}.sock")),
    );
    until("both control sockets", || {
        run.join(format!("{ifa}.sock")).exists() && run.join(format!("{ifb}.sock")).exists()
    });

    let bkey = dir.path().join("b.key");
    let genkey = Command::new("wg").arg("genkey").output().unwrap();
    std::fs::write(&bkey, &genkey.stdout).unwrap();
    let (apub, bpub) = (pubkey(&akey), pubkey(&bkey));
    // Our device derives the same public key as `wg pubkey`.
    assert_eq!(wg(&a, &["show", &ifa, "public-key"]).trim(), apub);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&akey).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Configure both sides with the standard tool.
    wg(
        &a,
        &[
            "set",
            &ifa,
            "peer",
            &bpub,
            "endpoint",
            "10.99.0.2:51872",
            "allowed-ips",
            "10.100.0.2/32",
        ],
    );
    a.exec("ip", &["addr", "add", "10.100.0.1/24", "dev", &ifa])
        .unwrap();
    wg(
        &b,
        &[
            "set",
            &ifb,
            "listen-port",
            "51872",
            "private-key",
            bkey.to_str().unwrap(),
            "peer",
            &apub,
            "endpoint",
            "10.99.0.1:51871",
            "allowed-ips",
            "10.100.0.1/32",
        ],
    );
    b.exec("ip", &["addr", "add", "10.100.0.2/24", "dev", &ifb])
        .unwrap();
    b.exec("ip", &["link", "set", &ifb, "up"]).unwrap();

    // Capture B's underlay while the peers talk.
    let pcap = dir.path().join("ul.pcap");
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.name(),
            "tcpdump",
            "-Z",
            "root",
            "-i",
            "ul0",
            "-nn",
            "-U",
            "--immediate-mode",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr stays open until the end (a closed pipe would kill it
    // with SIGPIPE before it flushes).
    let mut dump_err = std::io::BufReader::new(dump.stderr.take().unwrap());
    {
        use std::io::BufRead as _;
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            assert!(
                dump_err.read_line(&mut line).unwrap() > 0,
                "tcpdump did not start"
            );
        }
    }

    // Handshake (initiated by our side's first packet), then both ways.
    until("A reaches B through the tunnel", || {
        a.exec("ping", &["-c", "1", "-W", "1", "10.100.0.2"])
            .is_ok()
    });
    let out = a
        .exec("ping", &["-c", "5", "-i", "0.05", "10.100.0.2"])
        .unwrap();
    assert!(out.contains("5 received"), "{out}");
    let out = b
        .exec("ping", &["-c", "5", "-i", "0.05", "10.100.0.1"])
        .unwrap();
    assert!(out.contains("5 received"), "{out}");

    // Both sides report the handshake and the traffic.
    let ours = wg(&a, &["show", &ifa, "dump"]);
    let theirs = wg(&b, &["show", &ifb, "dump"]);
    let peer_line = |dump: &str, key: &str| -> Vec<String> {
        dump.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no peer {key} in {dump}"))
            .split('\t')
            .map(str::to_owned)
            .collect()
    };
    // public-key preshared endpoint allowed-ips latest-handshake rx tx keepalive
    let p = peer_line(&ours, &bpub);
    assert_eq!(p[2], "10.99.0.2:51872", "{ours}");
    assert!(
        p[4].parse::<u64>().unwrap() > 0,
        "our latest handshake: {ours}"
    );
    assert!(
        p[5].parse::<u64>().unwrap() > 0 && p[6].parse::<u64>().unwrap() > 0,
        "{ours}"
    );
    let p = peer_line(&theirs, &apub);
    assert!(
        p[4].parse::<u64>().unwrap() > 0,
        "wireguard-go's latest handshake: {theirs}"
    );

    // The wire: WireGuard messages only, never the inner ICMP.
    // SIGTERM: tcpdump flushes and closes the file.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) };
    let _ = dump.wait();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut dump_err, &mut rest);
    eprintln!("tcpdump: {rest}");
    let fields = Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "wg.type",
            "-e",
            "icmp.type",
            "-e",
            "udp.port",
        ])
        .output()
        .unwrap();
    assert!(
        fields.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&fields.stderr)
    );
    let text = String::from_utf8_lossy(&fields.stdout);
    let types: Vec<&str> = text
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    assert!(
        types.contains(&"1") && types.contains(&"2"),
        "handshake initiation and response: {text}"
    );
    assert!(
        types.iter().filter(|t| **t == "4").count() >= 10,
        "transport data: {text}"
    );
    for l in text.lines() {
        let cols: Vec<&str> = l.split('\t').collect();
        assert!(cols[1].is_empty(), "plaintext ICMP on the underlay: {l}");
        assert!(
            !cols[0].is_empty() || cols[2].is_empty(),
            "UDP that is not WireGuard: {l}"
        );
    }
}
