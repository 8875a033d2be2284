//! Periodic readings for status and evidence: every [`SAMPLE`] the
//! encryption section of the status is refreshed from the kernel and the
//! device (strict-mode drops, peers, device drops); every `--report-every`
//! seconds the counters are printed and what was refused since the last
//! report goes to the audit trail (strict-mode drops, WireGuard handshake
//! or decryption failures, traffic without a peer). With `--reports N` the
//! agent stops after N reports (tests).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use clustermesh_api::status::{
    DeviceDrops, EncryptionStatus, PlaintextDrops, PolicyStatus, PolicyVerdictCount,
};
use clustermesh_crypto::wg::uapi::Client;
use tokio_util::sync::CancellationToken;
use tunnel_common::{Direction, Verdict};

use crate::{audit::Audit, datapath::Counters, wireguard::peer_status};

/// How often the status is refreshed.
pub const SAMPLE: Duration = Duration::from_millis(500);

pub struct Telemetry {
    pub counters: Option<Counters>,
    pub wg: Option<Client>,
    pub status: Arc<Mutex<EncryptionStatus>>,
    /// The pin directory and the policy section to refresh (with a
    /// datapath).
    pub policy: Option<(std::path::PathBuf, Arc<Mutex<PolicyStatus>>)>,
    pub audit: Audit,
    pub report_every: Duration,
    /// Stop the agent (cancel the root token) after this many reports; 0:
    /// never.
    pub reports: u64,
}

fn plaintext(c: &Counters) -> PlaintextDrops {
    let get = |d| {
        c.get(d, Verdict::DropStrictPlaintext)
            .map_or(0, |c| c.packets)
    };
    PlaintextDrops {
        egress: get(Direction::Egress),
        ingress: get(Direction::Ingress),
        unknown_destination: c
            .get(Direction::Egress, Verdict::DropStrictUnknownDest)
            .map_or(0, |c| c.packets),
    }
}

fn device_drops(client: &Client) -> Option<DeviceDrops> {
    let d = client.stats().ok()?;
    Some(DeviceDrops {
        tx_no_peer: d.tx_no_peer,
        rx_not_allowed: d.rx_not_allowed,
        rx_unknown: d.rx_unknown,
        rx_errors: d.rx_errors,
    })
}

/// The per-endpoint policy verdicts of the datapath (None: unreadable).
fn policy_verdicts(pin_dir: &std::path::Path) -> Option<Vec<PolicyVerdictCount>> {
    let stats = crate::datapath::policy_stats(pin_dir).ok()?;
    let eps = crate::datapath::endpoints_by_ifindex(pin_dir).unwrap_or_default();
    Some(
        stats
            .into_iter()
            .map(|(ifindex, dir, v, c)| {
                let (endpoint, identity) = match eps.get(&ifindex) {
                    Some((ips, id)) => (
                        ips.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        *id,
                    ),
                    None => (format!("ifindex {ifindex}"), 0),
                };
                PolicyVerdictCount {
                    endpoint,
                    identity,
                    direction: match dir {
                        Direction::Ingress => "ingress".into(),
                        Direction::Egress => "egress".into(),
                    },
                    verdict: v.name().into(),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect(),
    )
}

impl Telemetry {
    fn sample(&self) {
        if let Some((pin, status)) = &self.policy
            && let Some(v) = policy_verdicts(pin)
            && let Ok(mut s) = status.lock()
        {
            s.verdicts = v;
        }
        let peers = self.wg.as_ref().and_then(|w| peer_status(w).ok());
        let device = self.wg.as_ref().and_then(device_drops);
        let drops = self.counters.as_ref().map(plaintext);
        if let Ok(mut e) = self.status.lock() {
            if let Some(p) = peers {
                e.peers = p;
            }
            if let Some(d) = drops {
                e.plaintext_drops = d;
            }
            if let Some(d) = device {
                e.device_drops = d;
            }
        }
    }

    /// Audits what was refused since the last report.
    fn report(&self, was: &mut (PlaintextDrops, Option<DeviceDrops>)) {
        let (now, dev) = self
            .status
            .lock()
            .map(|e| (e.plaintext_drops, e.device_drops))
            .unwrap_or_default();
        let interval = self.report_every.as_secs();
        let total = |d: &PlaintextDrops| d.egress + d.ingress + d.unknown_destination;
        if total(&now) > total(&was.0) {
            self.audit.record(
                "plaintext_drops",
                serde_json::json!({
                    "egress": now.egress.saturating_sub(was.0.egress),
                    "ingress": now.ingress.saturating_sub(was.0.ingress),
                    "unknown_destination": now.unknown_destination.saturating_sub(was.0.unknown_destination),
                    "interval_s": interval,
                }),
            );
        }
        was.0 = now;
        // The device outlives agents too: its first reading is the baseline.
        if let Some(before) = was.1 {
            let delta = |now: u64, was: u64| now.saturating_sub(was);
            let failures = delta(dev.rx_errors, before.rx_errors);
            let no_peer = delta(dev.tx_no_peer, before.tx_no_peer);
            let unknown = delta(dev.rx_unknown, before.rx_unknown);
            if failures + no_peer + unknown > 0 {
                self.audit.record(
                    "wireguard_drops",
                    serde_json::json!({
                        "handshake_or_decrypt_failures": failures,
                        "no_peer": no_peer,
                        "unknown_sender": unknown,
                        "source_not_allowed": delta(dev.rx_not_allowed, before.rx_not_allowed),
                        "interval_s": interval,
                    }),
                );
            }
        }
        was.1 = Some(dev);
        if let Some(c) = &self.counters {
            match c.all() {
                Ok(all) => {
                    for (dir, verdict, c) in all {
                        println!(
                            "{:?} {}: {} packets, {} bytes",
                            dir,
                            verdict.name(),
                            c.packets,
                            c.bytes
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the datapath counters"),
            }
        }
    }

    pub async fn run(self, root: CancellationToken) {
        // The pinned counters outlive agents: start from what they say now,
        // so the first report counts only new drops.
        self.sample();
        let mut was = (
            self.counters.as_ref().map(plaintext).unwrap_or_default(),
            None,
        );
        let mut sample = tokio::time::interval(SAMPLE);
        let mut report = tokio::time::interval(self.report_every.max(Duration::from_secs(1)));
        report.tick().await;
        let mut n = 0;
        loop {
            tokio::select! {
                _ = root.cancelled() => return,
                _ = sample.tick() => self.sample(),
                _ = report.tick() => {
                    self.sample();
                    self.report(&mut was);
                    n += 1;
                    if self.reports != 0 && n >= self.reports {
                        root.cancel();
                        return;
                    }
                }
            }
        }
    }
}
