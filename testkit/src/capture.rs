//! A tcpdump capture inside a namespace, written to a pcap file: started
//! and awaited until it listens, stopped with SIGTERM (so it flushes), and
//! read back with tshark fields.

use std::{
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Stdio},
};

use crate::netns::NetNs;

/// A running capture; stopped (and reaped) on drop.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    /// Kept open: a closed pipe would kill tcpdump before it flushes.
    _stderr: BufReader<ChildStderr>,
    pub pcap: PathBuf,
}

impl Capture {
    /// Captures every packet on `iface` of `ns` into `pcap`, packet by
    /// packet (`--immediate-mode`, `-U`), as root (`-Z root`: the file may
    /// live in a directory only root can write).
    pub fn start(ns: &NetNs, iface: &str, pcap: &Path) -> io::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tcpdump",
                "-Z",
                "root",
                "-i",
                iface,
            ])
            .args(["-nn", "-U", "--immediate-mode", "-w"])
            .arg(pcap)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(
            child
                .stderr
                .take()
                .ok_or_else(|| io::Error::other("tcpdump has no stderr"))?,
        );
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other("tcpdump exited before listening"));
            }
        }
        Ok(Self {
            child,
            _stderr: err,
            pcap: pcap.to_owned(),
        })
    }

    /// Stops the capture and returns tshark's `-T fields` output for
    /// `fields` (one line per packet, tab-separated), with `decode` as
    /// extra tshark arguments (e.g. `-d udp.port==8472,vxlan`).
    pub fn stop_and_read(mut self, decode: &[&str], fields: &[&str]) -> io::Result<String> {
        self.stop();
        let mut cmd = Command::new("tshark");
        cmd.arg("-r")
            .arg(&self.pcap)
            .args(decode)
            .args(["-T", "fields"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "tshark: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// WireGuard message counts of a capture: (initiations, responses,
/// transport data).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireGuardWire {
    pub initiations: usize,
    pub responses: usize,
    pub data: usize,
}

impl Capture {
    /// Stops the capture and checks that no packet on the wire is a pod's
    /// in the clear: no ICMP, no ICMPv6 other than the nodes' own neighbour
    /// discovery and multicast listener messages, no Geneve or VXLAN
    /// (tunnels without encryption), no UDP that is not WireGuard. Returns the WireGuard
    /// message counts, or the first offending packet's fields.
    pub fn wireguard_only(self) -> Result<WireGuardWire, String> {
        let text = self
            .stop_and_read(
                &["-d", "udp.port==8472,vxlan"],
                &[
                    "wg.type",
                    "icmp.type",
                    "udp.port",
                    "geneve.vni",
                    "vxlan.vni",
                    "icmpv6.type",
                ],
            )
            .map_err(|e| e.to_string())?;
        let mut w = WireGuardWire::default();
        for l in text.lines() {
            let c: Vec<&str> = l.split('\t').collect();
            let col = |i: usize| c.get(i).copied().unwrap_or("");
            if !col(1).is_empty() {
                return Err(format!("plaintext ICMP on the wire: {l}"));
            }
            // Types 130-137 and 143: MLD and neighbour discovery, the
            // underlay's own (every IPv6 link has them).
            let nd = |t: &str| {
                t.parse::<u8>()
                    .is_ok_and(|t| (130..=137).contains(&t) || t == 143)
            };
            if col(5).split(',').any(|t| !t.is_empty() && !nd(t)) {
                return Err(format!("plaintext ICMPv6 on the wire: {l}"));
            }
            if !col(3).is_empty() || !col(4).is_empty() {
                return Err(format!("an unencrypted tunnel on the wire: {l}"));
            }
            match col(0) {
                "1" => w.initiations += 1,
                "2" => w.responses += 1,
                "4" => w.data += 1,
                "" if !col(2).is_empty() => return Err(format!("UDP that is not WireGuard: {l}")),
                _ => {}
            }
        }
        Ok(w)
    }
}
