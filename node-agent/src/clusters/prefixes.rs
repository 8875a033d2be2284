//! A map of IP prefixes answering "which prefixes hold this address" and
//! "which prefixes overlap this one" in O(distinct prefix lengths x log n)
//! instead of a scan: what admission and the CIDR-ownership lookups of the
//! merge need once a mesh has thousands of nodes.
//!
//! The prefixes sit in a `BTreeMap` ordered by (network address, length),
//! with a count of the prefixes of each length per family. A prefix `q`
//! overlaps `p` exactly when `q` holds `p`'s network address (then `q` is
//! no longer than `p`: found by one lookup per length present) or `q`'s
//! network address lies inside `p` (a contiguous range of the map from
//! `p`). A binary trie would answer the same; this keeps one ordinary map
//! and its ordered iteration, which the diffs of the merge rely on.

use std::{collections::BTreeMap, net::IpAddr};

use clustermesh_api::IpCidr;

#[derive(Debug, Clone)]
pub struct PrefixMap<V> {
    map: BTreeMap<IpCidr, V>,
    /// Prefixes per length: IPv4 at 0..=32, IPv6 at 33..=161.
    lens: Vec<u32>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            lens: vec![0; 33 + 129],
        }
    }
}

impl<V: PartialEq> PartialEq for PrefixMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

fn slot(c: &IpCidr) -> usize {
    usize::from(c.prefix_len()) + if c.addr().is_ipv4() { 0 } else { 33 }
}

impl<V> PrefixMap<V> {
    pub fn insert(&mut self, c: IpCidr, v: V) -> Option<V> {
        let old = self.map.insert(c, v);
        if old.is_none() {
            self.lens[slot(&c)] += 1;
        }
        old
    }

    pub fn remove(&mut self, c: &IpCidr) -> Option<V> {
        let old = self.map.remove(c);
        if old.is_some() {
            self.lens[slot(c)] -= 1;
        }
        old
    }

    pub fn get(&self, c: &IpCidr) -> Option<&V> {
        self.map.get(c)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpCidr, &V)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The prefixes holding `ip`, longest first.
    pub fn containing(&self, ip: IpAddr) -> impl Iterator<Item = (&IpCidr, &V)> {
        let (base, width) = if ip.is_ipv4() { (0, 32u8) } else { (33, 128u8) };
        (0..=width)
            .rev()
            .filter(move |len| self.lens[base + usize::from(*len)] > 0)
            .filter_map(move |len| self.map.get_key_value(&IpCidr::truncate(ip, len)))
    }

    /// The prefixes sharing at least one address with `p`: those holding
    /// it (shortest to `p`'s own length), then those inside it in order.
    pub fn overlapping<'a>(&'a self, p: &IpCidr) -> impl Iterator<Item = (&'a IpCidr, &'a V)> {
        let p = *p;
        let outer = self
            .containing(p.addr())
            .filter(move |(c, _)| c.prefix_len() < p.prefix_len());
        let inner = self
            .map
            .range(p..)
            .take_while(move |(c, _)| p.contains(c.addr()));
        outer.chain(inner)
    }
}

impl<V> FromIterator<(IpCidr, V)> for PrefixMap<V> {
    fn from_iter<T: IntoIterator<Item = (IpCidr, V)>>(iter: T) -> Self {
        let mut m = Self::default();
        for (c, v) in iter {
            m.insert(c, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn c(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    /// Against the scan it replaces: every query over a set of nested,
    /// adjacent and disjoint prefixes of both families.
    #[test]
    fn queries_agree_with_a_scan() {
        let set = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.3.0/24",
            "10.2.0.0/16",
            "11.0.0.0/24",
            "0.0.0.0/0",
            "fd00::/16",
            "fd00:1::/64",
            "fd00:1::5/128",
        ];
        let mut m: PrefixMap<u32> = set
            .iter()
            .enumerate()
            .map(|(i, s)| (c(s), i as u32))
            .collect();
        let probes = [
            "10.1.2.3/32",
            "10.1.0.0/16",
            "10.0.0.0/7",
            "10.1.2.0/23",
            "12.0.0.0/8",
            "fd00:1::/48",
            "fd00:1::5/128",
            "fe80::/10",
        ];
        for round in 0..2 {
            for probe in probes {
                let p = c(probe);
                let mut got: Vec<IpCidr> = m.overlapping(&p).map(|(c, _)| *c).collect();
                got.sort();
                let mut want: Vec<IpCidr> = m
                    .iter()
                    .filter(|(c, _)| c.overlaps(&p))
                    .map(|(c, _)| *c)
                    .collect();
                want.sort();
                assert_eq!(got, want, "overlapping {probe} (round {round})");
                let holding: Vec<IpCidr> = m.containing(p.addr()).map(|(c, _)| *c).collect();
                let mut want: Vec<IpCidr> = m
                    .iter()
                    .filter(|(c, _)| c.contains(p.addr()))
                    .map(|(c, _)| *c)
                    .collect();
                want.sort_by_key(|c| std::cmp::Reverse(c.prefix_len()));
                assert_eq!(holding, want, "containing {probe} (round {round})");
            }
            if round == 0 {
                // Removing keeps the length counts true (round 1 checks).
                assert_eq!(m.remove(&c("0.0.0.0/0")), Some(6));
                assert_eq!(m.remove(&c("10.1.0.0/16")), Some(1));
                assert_eq!(m.remove(&c("10.1.0.0/16")), None);
            }
        }
        assert_eq!(m.len(), set.len() - 2);
    }
}
