//! Admission of nodes: what a cluster may claim, decided as a pure
//! function of (the node record, whether its cluster is the local one,
//! everything already admitted). The merge admits nodes local cluster
//! first, then remote ones in their order; a refusal carries a reason and
//! never stops the rest from applying (docs/security.md's remote-cluster
//! rules).
//!
//! A remote cluster is trusted only for its own records within sane
//! bounds:
//! - its pod CIDRs have a prefix of /8 to /30 (IPv4) or /16 to /120
//!   (IPv6), never touch reserved ranges (this-network, loopback,
//!   link-local, multicast, reserved/broadcast) and never cover a node's
//!   underlay address (ours or anyone's: in direct mode they become routes);
//! - its underlay addresses are unicast, outside every admitted pod CIDR
//!   and not already another node's;
//! - its WireGuard keys are no other node's (a duplicate would steal the
//!   victim's encrypted traffic);
//! - when its remote-cluster file declares `pod-cidrs` (the cluster's pod
//!   ranges), each of its nodes' pod CIDRs lies inside one of them; a file
//!   that declares none leaves the other bounds alone;
//! - and, as for every cluster, its pod CIDRs overlap no admitted one.

use std::{collections::BTreeMap, net::IpAddr};

use clustermesh_api::{ClusterName, IpCidr, NodeName, NodeRecord, WgPublicKey};

use super::prefixes::PrefixMap;

/// Why a node is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

fn refuse(reason: &'static str, detail: String) -> Result<(), Refusal> {
    Err(Refusal { reason, detail })
}

/// Ranges no pod CIDR may touch.
const RESERVED: [&str; 9] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/127",
    "fe80::/10",
    "ff00::/8",
    "::ffff:0:0/96",
];

fn reserved() -> impl Iterator<Item = IpCidr> {
    RESERVED.iter().filter_map(|r| r.parse().ok())
}

fn prefix_ok(c: &IpCidr) -> bool {
    match c.addr() {
        IpAddr::V4(_) => (8..=30).contains(&c.prefix_len()),
        IpAddr::V6(_) => (16..=120).contains(&c.prefix_len()),
    }
}

fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local())
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
    }
}

type Holder<'a> = (&'a ClusterName, &'a NodeName);

/// What is admitted so far, with who holds it, indexed so that each check
/// is a few ordered-map lookups (no scan of the mesh's nodes).
#[derive(Debug, Default)]
pub struct Admitted<'a> {
    /// Every underlay address of every node offered (admitted or not):
    /// no remote pod CIDR may cover one. The first node offering it.
    node_ips: BTreeMap<IpAddr, Holder<'a>>,
    cidrs: PrefixMap<Holder<'a>>,
    underlay: BTreeMap<IpAddr, Vec<Holder<'a>>>,
    keys: BTreeMap<WgPublicKey, Holder<'a>>,
    /// The pod ranges each remote cluster's file declares (none: not
    /// bounded by declaration).
    declared: BTreeMap<&'a ClusterName, &'a [IpCidr]>,
}

impl<'a> Admitted<'a> {
    /// A node that will be offered: its underlay addresses count against
    /// every remote pod CIDR, whether it is admitted or not.
    pub fn offer(&mut self, rec: &'a NodeRecord, cluster: &'a ClusterName) {
        for ip in &rec.underlay_ips {
            self.node_ips.entry(*ip).or_insert((cluster, &rec.name));
        }
    }

    /// The pod ranges `cluster`'s file declares.
    pub fn declare(&mut self, cluster: &'a ClusterName, ranges: &'a [IpCidr]) {
        self.declared.insert(cluster, ranges);
    }

    /// Decides `rec` of `cluster` against what is admitted.
    pub fn check(
        &self,
        rec: &NodeRecord,
        cluster: &ClusterName,
        local: bool,
    ) -> Result<(), Refusal> {
        if !local {
            remote_bounds(self, rec)?;
            self.declared_bounds(rec, cluster)?;
        }
        for ip in &rec.underlay_ips {
            if let Some((c, (oc, on))) = self.cidrs.containing(*ip).next() {
                return refuse(
                    "underlay_ip_in_pod_cidr",
                    format!(
                        "underlay address {ip} lies in pod CIDR {c} of node {on} in cluster {oc}"
                    ),
                );
            }
            if let Some((oc, on)) = self
                .underlay
                .get(ip)
                .into_iter()
                .flatten()
                .find(|(oc, on)| !(*oc == cluster && **on == rec.name))
            {
                return refuse(
                    "underlay_ip_taken",
                    format!("underlay address {ip} is node {on}'s in cluster {oc}"),
                );
            }
        }
        for cidr in &rec.pod_cidrs {
            if let Some((o, (oc, on))) = self.cidrs.overlapping(cidr).next() {
                return refuse(
                    "cidr_overlap",
                    format!("pod CIDR {cidr} overlaps {o} of node {on} in cluster {oc}"),
                );
            }
        }
        for key in &rec.wireguard_public_keys {
            if let Some((oc, on)) = self.keys.get(key) {
                return refuse(
                    "wireguard_key_taken",
                    format!(
                        "WireGuard key {} is node {on}'s in cluster {oc}",
                        key.fingerprint()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A remote node's pod CIDRs inside its cluster's declared ranges.
    fn declared_bounds(&self, rec: &NodeRecord, cluster: &ClusterName) -> Result<(), Refusal> {
        let declared = self.declared.get(cluster).copied().unwrap_or_default();
        if declared.is_empty() {
            return Ok(());
        }
        if let Some(cidr) = rec
            .pod_cidrs
            .iter()
            .find(|c| !declared.iter().any(|d| d.contains_cidr(c)))
        {
            let list: Vec<String> = declared.iter().map(ToString::to_string).collect();
            return refuse(
                "pod_cidr_undeclared",
                format!(
                    "pod CIDR {cidr} is outside the pod ranges cluster {cluster}'s file declares ({})",
                    list.join(", ")
                ),
            );
        }
        Ok(())
    }

    /// Records an admitted node.
    pub fn admit(&mut self, rec: &'a NodeRecord, cluster: &'a ClusterName) {
        for c in &rec.pod_cidrs {
            if self.cidrs.get(c).is_none() {
                self.cidrs.insert(*c, (cluster, &rec.name));
            }
        }
        for ip in &rec.underlay_ips {
            self.underlay
                .entry(*ip)
                .or_default()
                .push((cluster, &rec.name));
        }
        for k in &rec.wireguard_public_keys {
            self.keys.entry(*k).or_insert((cluster, &rec.name));
        }
    }
}

/// What only a remote cluster is held to.
fn remote_bounds(a: &Admitted<'_>, rec: &NodeRecord) -> Result<(), Refusal> {
    for cidr in &rec.pod_cidrs {
        if !prefix_ok(cidr) {
            return refuse(
                "pod_cidr_prefix",
                format!("pod CIDR {cidr}: a remote pod CIDR is /8 to /30 (IPv6 /16 to /120)"),
            );
        }
        if let Some(r) = reserved().find(|r| r.overlaps(cidr)) {
            return refuse(
                "pod_cidr_reserved",
                format!("pod CIDR {cidr} overlaps the reserved range {r}"),
            );
        }
        if let Some((ip, (oc, on))) = a
            .node_ips
            .range(cidr.addr()..)
            .take_while(|(ip, _)| cidr.contains(**ip))
            .next()
        {
            return refuse(
                "pod_cidr_covers_node_ip",
                format!(
                    "pod CIDR {cidr} covers the underlay address {ip} of node {on} in cluster {oc}"
                ),
            );
        }
    }
    if let Some(ip) = rec.underlay_ips.iter().find(|ip| !unicast(**ip)) {
        return refuse(
            "underlay_ip_reserved",
            format!("underlay address {ip} is not a unicast address"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(name: &str, cidr: &str, ip: &str, key: u8) -> NodeRecord {
        NodeRecord {
            name: name.parse().unwrap(),
            cluster: "c2".parse().unwrap(),
            underlay_ips: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_public_keys: vec![WgPublicKey::from_bytes([key; 32]).unwrap()],
            wireguard_port: None,
            boot_id: "b".parse().unwrap(),
        }
    }

    /// Each row: a remote node offered after the local n1 (10.1.0.0/24,
    /// 192.0.2.1, key 1) and the remote m1 (10.2.0.0/24, 192.0.2.11,
    /// key 2); the reason it is refused, or None.
    #[test]
    fn remote_node_admission_table() {
        let c1: ClusterName = "c1".parse().unwrap();
        let c2: ClusterName = "c2".parse().unwrap();
        let n1 = node("n1", "10.1.0.0/24", "192.0.2.1", 1);
        let m1 = node("m1", "10.2.0.0/24", "192.0.2.11", 2);
        let declared: Vec<IpCidr> = vec!["10.2.0.0/16".parse().unwrap()];
        let rows: [(&str, &str, u8, Option<&str>, bool); 19] = [
            ("10.3.0.0/24", "192.0.2.21", 3, None, false),
            ("0.0.0.0/1", "192.0.2.21", 3, Some("pod_cidr_prefix"), false),
            (
                "10.0.0.0/7",
                "192.0.2.21",
                3,
                Some("pod_cidr_prefix"),
                false,
            ),
            (
                "192.0.2.1/32",
                "192.0.2.21",
                3,
                Some("pod_cidr_prefix"),
                false,
            ),
            (
                "127.0.0.0/8",
                "192.0.2.21",
                3,
                Some("pod_cidr_reserved"),
                false,
            ),
            (
                "169.254.0.0/24",
                "192.0.2.21",
                3,
                Some("pod_cidr_reserved"),
                false,
            ),
            (
                "224.0.0.0/8",
                "192.0.2.21",
                3,
                Some("pod_cidr_reserved"),
                false,
            ),
            (
                "192.0.2.0/24",
                "198.51.100.1",
                3,
                Some("pod_cidr_covers_node_ip"),
                false,
            ),
            (
                "10.3.0.0/24",
                "127.0.0.1",
                3,
                Some("underlay_ip_reserved"),
                false,
            ),
            (
                "10.3.0.0/24",
                "224.0.0.1",
                3,
                Some("underlay_ip_reserved"),
                false,
            ),
            (
                "10.3.0.0/24",
                "10.1.0.7",
                3,
                Some("underlay_ip_in_pod_cidr"),
                false,
            ),
            (
                "10.3.0.0/24",
                "192.0.2.1",
                3,
                Some("underlay_ip_taken"),
                false,
            ),
            (
                "10.2.0.128/25",
                "192.0.2.21",
                3,
                Some("cidr_overlap"),
                false,
            ),
            (
                "10.3.0.0/24",
                "192.0.2.21",
                1,
                Some("wireguard_key_taken"),
                false,
            ),
            // The cluster's file declares 10.2.0.0/16: inside it is fine ...
            ("10.2.1.0/24", "192.0.2.21", 3, None, true),
            ("10.2.0.0/16", "192.0.2.21", 3, Some("cidr_overlap"), true),
            // ... outside it, or only partly inside, is refused.
            (
                "10.3.0.0/24",
                "192.0.2.21",
                3,
                Some("pod_cidr_undeclared"),
                true,
            ),
            (
                "10.2.0.0/15",
                "192.0.2.21",
                3,
                Some("pod_cidr_undeclared"),
                true,
            ),
            // Without a declaration, today's bounds only.
            ("10.3.0.0/24", "192.0.2.21", 3, None, false),
        ];
        for (cidr, ip, key, want, bounded) in rows {
            let x = node("x1", cidr, ip, key);
            let mut a = Admitted::default();
            for (rec, c) in [(&n1, &c1), (&m1, &c2), (&x, &c2)] {
                a.offer(rec, c);
            }
            a.admit(&n1, &c1);
            a.admit(&m1, &c2);
            if bounded {
                a.declare(&c2, &declared);
            }
            let got = a.check(&x, &c2, false).err().map(|r| r.reason);
            assert_eq!(got, want, "{cidr} via {ip} key {key} declared {bounded}");
        }
    }

    #[test]
    fn the_local_cluster_is_not_held_to_remote_bounds_but_to_uniqueness() {
        let c1: ClusterName = "c1".parse().unwrap();
        let a = Admitted::default();
        // A local /31 on a host address is the operator's choice.
        let n = node("n1", "10.1.0.0/31", "192.0.2.1", 1);
        assert!(a.check(&n, &c1, true).is_ok());
        let mut a = Admitted::default();
        a.admit(&n, &c1);
        let dup = node("n2", "10.9.0.0/24", "192.0.2.9", 1);
        assert_eq!(
            a.check(&dup, &c1, true).unwrap_err().reason,
            "wireguard_key_taken"
        );
    }
}
