//! [`PolicyMap`] keeps the pinned `CM_POLICY` (LPM trie of policy entries)
//! and `CM_POLICY_STATE` (per local endpoint identity: default-deny flags,
//! audit, revision) equal to the merge's compiled network policies.
//!
//! [`map_entries`] is the pure part, table tested: a [`CompiledPolicy`]
//! (entries in policy order, deny over allow) becomes non-overlapping
//! prefixes whose longest match gives exactly [`CompiledPolicy::lookup`]'s
//! verdict for every (peer, direction, protocol, port):
//! - for TCP and for UDP, the port space is cut at every entry's range
//!   boundary; each piece gets the verdict of the entries covering it (any
//!   deny: deny; else an allow; none: no prefix, so the direction's default
//!   applies) and is written as the fewest aligned port prefixes;
//! - every other protocol (ICMP, ...) is matched only by the entries of rules
//!   without ports (`ANY`, every port): one prefix with protocol 0 that ends
//!   before the port.
//!
//! The value carries the index of the deciding entry in the compiled
//! entries, for reports. Writes are ordered so no packet sees less than
//! the old or the new policy: new prefixes first, then the state (flags and
//! a new revision, which makes the datapath check tracked connections
//! again), then the prefixes that went.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use clustermesh_api::{
    Identity,
    policy::{CompiledPolicy, Direction as PolicyDirection, MapVerdict, ProtoMatch},
};
use tunnel_common::{
    Direction, IPPROTO_TCP, IPPROTO_UDP, POLICY_ALLOW, POLICY_AUDIT, POLICY_DEFAULT_DENY_EGRESS,
    POLICY_DEFAULT_DENY_INGRESS, POLICY_DENY, POLICY_PREFIX_PROTO, PolicyKey, PolicyState,
    PolicyValue, maps,
};

use super::{ReconcileError, Reconciler, lpm::err};

const TARGET: &str = "network policies";

/// One prefix of `CM_POLICY`: its length in bits and its key.
pub type Prefix = (u32, PolicyKey);

fn direction(d: PolicyDirection) -> Direction {
    match d {
        PolicyDirection::Ingress => Direction::Ingress,
        PolicyDirection::Egress => Direction::Egress,
    }
}

/// The aligned prefixes covering the ports `first..=last`: (first port,
/// number of prefix bits of the 16).
fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest block aligned at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// The verdict of the first entry (by index) among `hits` of the given
/// kind.
fn first_of(p: &CompiledPolicy, hits: &[usize], v: MapVerdict) -> Option<usize> {
    hits.iter().copied().find(|&i| p.entries[i].verdict == v)
}

/// The deciding entry among `hits` (indexes into `p.entries`): the first
/// deny, else the first allow.
fn decide(p: &CompiledPolicy, hits: &[usize]) -> Option<PolicyValue> {
    let (verdict, i) = match first_of(p, hits, MapVerdict::Deny) {
        Some(i) => (POLICY_DENY, i),
        None => (POLICY_ALLOW, first_of(p, hits, MapVerdict::Allow)?),
    };
    Some(PolicyValue {
        verdict,
        _pad: 0,
        rule: u16::try_from(i).unwrap_or(u16::MAX),
    })
}

/// The `CM_POLICY` prefixes of local endpoint `identity`'s compiled policy.
pub fn map_entries(identity: Identity, p: &CompiledPolicy) -> BTreeMap<Prefix, PolicyValue> {
    let mut groups: BTreeMap<(u32, PolicyDirection), Vec<usize>> = BTreeMap::new();
    for (i, e) in p.entries.iter().enumerate() {
        groups
            .entry((e.peer.get(), e.direction))
            .or_default()
            .push(i);
    }
    let mut out = BTreeMap::new();
    for ((peer, dir), idx) in groups {
        let dir = direction(dir);
        for (proto, m) in [
            (IPPROTO_TCP, ProtoMatch::Tcp),
            (IPPROTO_UDP, ProtoMatch::Udp),
        ] {
            let apply: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| p.entries[i].protocol.covers(m))
                .collect();
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            for &i in &apply {
                cuts.insert(u32::from(p.entries[i].ports.first()));
                cuts.insert(u32::from(p.entries[i].ports.last()) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            for w in cuts.windows(2) {
                let (first, last) = (w[0] as u16, (w[1] - 1) as u16);
                let hits: Vec<usize> = apply
                    .iter()
                    .copied()
                    .filter(|&i| p.entries[i].ports.contains(first))
                    .collect();
                let Some(value) = decide(p, &hits) else {
                    continue;
                };
                for (port, bits) in port_prefixes(first, last) {
                    let key = PolicyKey::new(identity.get(), peer, dir, proto, port);
                    out.insert((POLICY_PREFIX_PROTO + bits, key), value);
                }
            }
        }
        let any: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| {
                let e = &p.entries[i];
                e.protocol == ProtoMatch::Any && e.ports == clustermesh_api::policy::PortRange::ALL
            })
            .collect();
        if let Some(value) = decide(p, &any) {
            let key = PolicyKey::new(identity.get(), peer, dir, 0, 0);
            out.insert((POLICY_PREFIX_PROTO, key), value);
        }
    }
    out
}

/// The `CM_POLICY_STATE` flags of a compiled policy.
pub fn state_flags(p: &CompiledPolicy, audit: bool) -> u32 {
    let mut f = 0;
    if p.default_deny_ingress {
        f |= POLICY_DEFAULT_DENY_INGRESS;
    }
    if p.default_deny_egress {
        f |= POLICY_DEFAULT_DENY_EGRESS;
    }
    if audit {
        f |= POLICY_AUDIT;
    }
    f
}

/// The pinned policy maps and what this agent wrote into them.
pub struct PolicyMap {
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    state: HashMap<MapData, u32, PolicyState>,
    /// Per local endpoint identity (host order), the prefixes it has in
    /// the map (read back at open, so a restart removes what went).
    written: BTreeMap<u32, BTreeMap<Prefix, PolicyValue>>,
    audit: bool,
}

impl PolicyMap {
    /// Opens the pinned maps; `audit`: every endpoint in audit mode (the
    /// agent's `--policy-audit`).
    pub fn open(pin_dir: &Path, audit: bool) -> Result<Self, ReconcileError> {
        let p = super::pinned(pin_dir, maps::POLICY, TARGET)?;
        let s = super::pinned(pin_dir, maps::POLICY_STATE, TARGET)?;
        let policy: LpmTrie<MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(Map::LpmTrie(p)).map_err(err(TARGET))?;
        let state = HashMap::try_from(Map::HashMap(s)).map_err(err(TARGET))?;
        let mut written: BTreeMap<u32, BTreeMap<Prefix, PolicyValue>> = BTreeMap::new();
        for k in policy.keys() {
            let k = k.map_err(err(TARGET))?;
            let data = k.data();
            let Ok(v) = policy.get(&k, 0) else { continue };
            written
                .entry(u32::from_be(data.identity))
                .or_default()
                .insert((k.prefix_len(), data), v);
        }
        Ok(Self {
            policy,
            state,
            written,
            audit,
        })
    }

    fn remove_identity(&mut self, id: u32) -> Result<(), ReconcileError> {
        match crate::datapath::absent_ok(self.state.remove(&id)) {
            Ok(()) => {}
            Err(e) => return Err(err(TARGET)(e)),
        }
        for (len, key) in self.written.remove(&id).unwrap_or_default().into_keys() {
            match crate::datapath::absent_ok(self.policy.remove(&Key::new(len, key))) {
                Ok(()) => {}
                Err(e) => return Err(err(TARGET)(e)),
            }
        }
        Ok(())
    }
}

impl Reconciler<Identity, CompiledPolicy> for PolicyMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, k: &Identity, p: &CompiledPolicy) -> Result<(), ReconcileError> {
        let id = k.get();
        let want = map_entries(*k, p);
        let old = self.written.remove(&id).unwrap_or_default();
        let mut now = BTreeMap::new();
        for (prefix, v) in &want {
            if old.get(prefix) != Some(v) {
                let r = self.policy.insert(&Key::new(prefix.0, prefix.1), v, 0);
                if let Err(e) = r {
                    // Keep what is in the map known, so a retry diffs right.
                    now.extend(old);
                    self.written.insert(id, now);
                    return Err(err(TARGET)(e));
                }
            }
            now.insert(*prefix, *v);
        }
        let flags = state_flags(p, self.audit);
        let prev = self.state.get(&id, 0).ok();
        if prev.map(|s| s.flags) != Some(flags) || now != old {
            let revision = prev.map_or(1, |s| s.revision.wrapping_add(1));
            let r = self.state.insert(&id, &PolicyState { flags, revision }, 0);
            if let Err(e) = r {
                now.extend(old);
                self.written.insert(id, now);
                return Err(err(TARGET)(e));
            }
        }
        for prefix in old.keys().filter(|k| !want.contains_key(*k)) {
            match crate::datapath::absent_ok(self.policy.remove(&Key::new(prefix.0, prefix.1))) {
                Ok(()) => {}
                Err(e) => {
                    now.insert(*prefix, old[prefix]);
                    self.written.insert(id, now);
                    return Err(err(TARGET)(e));
                }
            }
        }
        self.written.insert(id, now);
        Ok(())
    }
    fn delete(&mut self, k: &Identity) -> Result<(), ReconcileError> {
        self.remove_identity(k.get())
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<Identity, CompiledPolicy>,
    ) -> Result<usize, ReconcileError> {
        let keep: BTreeSet<u32> = desired.keys().map(|k| k.get()).collect();
        let mut gone: BTreeSet<u32> = self.written.keys().copied().collect();
        for k in self.state.keys() {
            gone.insert(k.map_err(err(TARGET))?);
        }
        gone.retain(|id| !keep.contains(id));
        for id in &gone {
            self.remove_identity(*id)?;
        }
        Ok(gone.len())
    }
    /// Empty: a compiled policy cannot be read back from its prefixes. The
    /// agent rewrites every desired one after a restart; [`PolicyMap::open`]
    /// read the prefixes back, so only the differences reach the kernel.
    fn snapshot(&mut self) -> Result<BTreeMap<Identity, CompiledPolicy>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

/// `CM_POLICY_CIDR` and `CM_POLICY_CIDR6`: the node-local identity of
/// each CIDR prefix the policies name (`Desired::policy_cidrs`).
pub struct PolicyCidrMap {
    map: super::lpm::DualLpm<u32>,
}

const CIDR_TARGET: &str = "policy CIDRs";

impl PolicyCidrMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: super::lpm::DualLpm::open(
                pin_dir,
                (maps::POLICY_CIDR, maps::POLICY_CIDR6),
                CIDR_TARGET,
            )?,
        })
    }
}

impl Reconciler<clustermesh_api::IpCidr, u32> for PolicyCidrMap {
    fn name(&self) -> &'static str {
        CIDR_TARGET
    }
    fn update(&mut self, k: &clustermesh_api::IpCidr, v: &u32) -> Result<(), ReconcileError> {
        self.map.insert(k, v)
    }
    fn delete(&mut self, k: &clustermesh_api::IpCidr) -> Result<(), ReconcileError> {
        self.map.remove(k)
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<clustermesh_api::IpCidr, u32>,
    ) -> Result<usize, ReconcileError> {
        self.map.retain(|c| desired.contains_key(c))
    }
    fn snapshot(&mut self) -> Result<BTreeMap<clustermesh_api::IpCidr, u32>, ReconcileError> {
        Ok(self
            .map
            .entries()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.cidr()?, v)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_api::policy::{CompiledEntry, PortRange, RuleRef, RuleSection};

    fn rule(n: &str) -> RuleRef {
        RuleRef {
            policy: clustermesh_api::policy::PolicyRef {
                kind: clustermesh_api::policy::PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: None,
                name: "p".parse().expect("name"),
            },
            section: RuleSection::Ingress,
            origin: n.to_owned(),
        }
    }

    fn entry(peer: u32, proto: ProtoMatch, ports: (u16, u16), v: MapVerdict) -> CompiledEntry {
        CompiledEntry {
            peer: Identity::from_raw(peer.into()).expect("identity"),
            direction: PolicyDirection::Ingress,
            protocol: proto,
            ports: PortRange::new(ports.0, ports.1).expect("range"),
            verdict: v,
            rule: rule("r"),
        }
    }

    /// The longest prefix of `m` matching (peer, proto, port), as the
    /// kernel's trie finds it.
    fn lpm(m: &BTreeMap<Prefix, PolicyValue>, peer: u32, proto: u8, port: u16) -> Option<u8> {
        let (proto, port) = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            (proto, port)
        } else {
            (0, 0)
        };
        let want = PolicyKey::new(7, peer, Direction::Ingress, proto, port);
        let bits = |k: &PolicyKey| -> u128 {
            let b: [u8; 12] = unsafe_free_bytes(k);
            let mut x = 0u128;
            for byte in b {
                x = (x << 8) | u128::from(byte);
            }
            x
        };
        let w = bits(&want);
        m.iter()
            .filter(|((len, k), _)| {
                let shift = 96 - len;
                shift == 96 || (bits(k) >> shift) == (w >> shift)
            })
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, v)| v.verdict)
    }

    fn unsafe_free_bytes(k: &PolicyKey) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&k.identity.to_ne_bytes());
        b[4..8].copy_from_slice(&k.peer.to_ne_bytes());
        b[8] = k.direction;
        b[9] = k.proto;
        b[10..12].copy_from_slice(&k.port.to_ne_bytes());
        b
    }

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        for (a, b) in [
            (0, 65535),
            (80, 80),
            (1024, 65535),
            (1, 6),
            (8000, 8999),
            (0, 0),
        ] {
            let ps = port_prefixes(a, b);
            let mut covered = 0u32;
            for (start, bits) in &ps {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                covered += size;
            }
            assert_eq!(covered, u32::from(b) - u32::from(a) + 1, "{a}-{b}: {ps:?}");
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert!(port_prefixes(1024, 65535).len() <= 6);
    }

    #[test]
    fn prefixes_agree_with_lookup_for_every_port_protocol_and_peer() {
        use clustermesh_api::records::Protocol;
        let cases: Vec<(&str, Vec<CompiledEntry>)> = vec![
            (
                "one port",
                vec![entry(100, ProtoMatch::Tcp, (8080, 8080), MapVerdict::Allow)],
            ),
            (
                "deny inside an allowed range wins",
                vec![
                    entry(100, ProtoMatch::Tcp, (8000, 8999), MapVerdict::Allow),
                    entry(100, ProtoMatch::Any, (8080, 8090), MapVerdict::Deny),
                ],
            ),
            (
                "allow everything but a denied port",
                vec![
                    entry(100, ProtoMatch::Any, (0, 65535), MapVerdict::Allow),
                    entry(100, ProtoMatch::Udp, (53, 53), MapVerdict::Deny),
                ],
            ),
            (
                "two peers",
                vec![
                    entry(100, ProtoMatch::Udp, (1, 1023), MapVerdict::Allow),
                    entry(200, ProtoMatch::Any, (0, 65535), MapVerdict::Deny),
                ],
            ),
        ];
        let ports = [
            0u16, 1, 52, 53, 54, 79, 80, 1023, 1024, 7999, 8000, 8079, 8080, 8085, 8090, 8091,
            8999, 9000, 65535,
        ];
        for (name, entries) in cases {
            let p = CompiledPolicy {
                default_deny_ingress: true,
                default_deny_egress: false,
                entries,
            };
            let m = map_entries(Identity::from_raw(7).expect("id"), &p);
            for peer in [100u32, 200, 250] {
                let id = Identity::from_raw(peer.into()).expect("id");
                for (proto, wire) in [(Protocol::Tcp, IPPROTO_TCP), (Protocol::Udp, IPPROTO_UDP)] {
                    for port in ports {
                        let (want, _) = p.lookup(id, PolicyDirection::Ingress, proto, port);
                        let got = lpm(&m, peer, wire, port);
                        let got = match got {
                            Some(POLICY_ALLOW) => clustermesh_api::policy::Verdict::Allowed,
                            Some(POLICY_DENY) => clustermesh_api::policy::Verdict::DeniedByRule,
                            _ => clustermesh_api::policy::Verdict::DeniedByDefault,
                        };
                        assert_eq!(got, want, "{name}: peer {peer} {proto:?} port {port}");
                    }
                }
            }
            // ICMP: only rules for every protocol and port speak for it.
            let icmp = lpm(&m, 100, 1, 0);
            let expect = match name {
                "allow everything but a denied port" => Some(POLICY_ALLOW),
                _ => None,
            };
            assert_eq!(icmp, expect, "{name}: ICMP");
            assert_eq!(lpm(&m, 200, 1, 0).is_some(), name == "two peers", "{name}");
        }
    }

    #[test]
    fn flags_follow_default_deny_and_audit() {
        let p = CompiledPolicy {
            default_deny_ingress: true,
            default_deny_egress: false,
            entries: vec![],
        };
        assert_eq!(state_flags(&p, false), POLICY_DEFAULT_DENY_INGRESS);
        assert_eq!(
            state_flags(&p, true),
            POLICY_DEFAULT_DENY_INGRESS | POLICY_AUDIT
        );
        assert!(map_entries(Identity::from_raw(7).expect("id"), &p).is_empty());
    }
}
