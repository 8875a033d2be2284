//! Netlink work: the veth pair, the pod's address, routes and neighbour.
//!
//! A netlink socket talks to the network namespace of the thread that
//! opened it. [`Netlink::connect`] opens one for the calling thread, driven
//! by its own current-thread tokio runtime (the plugin is a short-lived
//! synchronous program; the runtime exists only to run rtnetlink's
//! futures). Work inside a pod goes through [`in_netns`]: a dedicated
//! thread `setns()`es into the pod's namespace and opens its own
//! connection there, so the calling thread never changes namespace.
//!
//! The pod side of the pair is created directly inside the pod's namespace
//! under its final name (`IFLA_NET_NS_FD` on the peer), so no temporary
//! name ever appears in the node namespace. The host side is named
//! [`host_iface_name`] of the container id, so DEL finds it without state,
//! and carries the container id as its alias (`IFLA_IFALIAS`), so DEL never
//! removes an interface of another container.
//!
//! Inside the pod, per family: address IP/32 (IPv6: IP/128 `nodad`), a
//! link-scope route to the gateway ([`GATEWAY`], [`GATEWAY6`]), a default
//! route via it, and a PERMANENT neighbour entry mapping it to the host
//! veth's MAC: the pod never ARPs nor solicits its gateway, and every frame
//! it sends reaches the host veth, where the datapath takes it.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    },
};
use tokio::runtime::Runtime;

use crate::{endpoint::MacAddr, error::code, ipam::PodIps};

/// The pods' fixed next hop. No interface holds it; the permanent neighbour
/// entry makes it resolve to the host veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 next hop, likewise: link-local, held by no interface, resolved
/// by a permanent neighbour entry (the datapath also answers neighbour
/// solicitations for it).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// 32-bit FNV-1a.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `lxc` + 8 hex digits of the FNV-1a hash of the container id (11 bytes,
/// within the 15 an interface name may have).
pub fn host_iface_name(container_id: &str) -> String {
    format!("lxc{:08x}", fnv1a32(container_id.as_bytes()))
}

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {op} {target}")]
    Netlink {
        op: &'static str,
        target: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what} already exists")]
    Exists { what: String },
    #[error("interface {name} not found")]
    NotFound { name: String },
    #[error("interface {name} reported no usable MAC address")]
    NoMac { name: String },
    #[error("starting the netlink runtime")]
    Runtime(#[source] io::Error),
    #[error("the pod's network namespace")]
    Netns(#[source] clustermesh_api::netns::Error),
    #[error("turning IPv6 on: {path}")]
    Ipv6Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl LinkError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Netlink { .. }
            | Self::NotFound { .. }
            | Self::NoMac { .. }
            | Self::Netns(clustermesh_api::netns::Error::Panicked) => code::NETLINK,
            Self::Exists { .. } => code::CONFLICT,
            Self::Runtime(_) | Self::Netns(_) | Self::Ipv6Sysctl { .. } => code::IO,
        }
    }
}

fn nl_err(
    op: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let target = target.into();
    move |source| LinkError::Netlink { op, target, source }
}

/// The errno a netlink error carries, if any.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A link as the plugin needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    pub alias: Option<String>,
    pub up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Self {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            alias: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(b) => link.mac = MacAddr::from_bytes(b),
                LinkAttribute::Mtu(v) => link.mtu = Some(*v),
                LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
                _ => {}
            }
        }
        link
    }

    pub(crate) fn mac(&self) -> Result<MacAddr, LinkError> {
        self.mac.ok_or_else(|| LinkError::NoMac {
            name: self.name.clone(),
        })
    }
}

/// What the pod side of an attachment looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub link: Link,
    /// Addresses on the interface (both families), with prefix lengths.
    pub addrs: Vec<(IpAddr, u8)>,
    /// Link-layer address of the permanent neighbour entry for [`GATEWAY`].
    pub gateway_neighbour: Option<MacAddr>,
    /// Link-layer address of the permanent neighbour entry for [`GATEWAY6`].
    pub gateway6_neighbour: Option<MacAddr>,
    /// Whether the main table has `default via GATEWAY dev <ifname>`.
    pub default_route: bool,
    /// Whether the main table has `default via GATEWAY6 dev <ifname>`.
    pub default_route6: bool,
}

impl PodState {
    /// The permanent neighbour entry's MAC for `gateway`'s family.
    pub fn neighbour(&self, v6: bool) -> Option<MacAddr> {
        if v6 {
            self.gateway6_neighbour
        } else {
            self.gateway_neighbour
        }
    }

    /// Whether the default route of that family is there.
    pub fn has_default_route(&self, v6: bool) -> bool {
        if v6 {
            self.default_route6
        } else {
            self.default_route
        }
    }
}

/// A netlink connection in the calling thread's network namespace.
pub struct Netlink {
    rt: Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's current namespace.
    pub fn connect() -> Result<Self, LinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(LinkError::Runtime)?;
        let handle = {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Runtime)?;
            rt.spawn(conn);
            handle
        };
        Ok(Self { rt, handle })
    }

    /// The link named `name`, `None` if there is none.
    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>, LinkError> {
        let result = self.rt.block_on(async {
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await
        });
        match result {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err("looking up link", name)(e)),
        }
    }

    /// Deletes link `index`; `false` if it was already gone.
    pub fn delete_link(&self, index: u32) -> Result<bool, LinkError> {
        let result = self.rt.block_on(self.handle.link().del(index).execute());
        match result {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_err("deleting link", format!("index {index}"))(e)),
        }
    }

    /// Creates the veth pair: `host` here, with `mtu` and alias
    /// `container_id`, up if `up` (else left down for the node agent to set
    /// up once the datapath is attached); `peer` inside the namespace
    /// `netns`, with `mtu`, left down for [`Netlink::configure_pod`].
    /// Returns the host side.
    pub fn create_veth(
        &self,
        host: &str,
        peer: &str,
        netns: &File,
        mtu: u32,
        container_id: &str,
        up: bool,
    ) -> Result<Link, LinkError> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .mtu(mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_owned())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        let target = format!("{host} (peer {peer} in the pod namespace)");
        match self.rt.block_on(self.handle.link().add(msg).execute()) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                return Err(LinkError::Exists {
                    what: format!("interface {peer} in the pod namespace, or {host} on the node,"),
                });
            }
            Err(e) => return Err(nl_err("creating veth", target)(e)),
        }
        let link = self
            .link_by_name(host)?
            .ok_or_else(|| LinkError::NotFound {
                name: host.to_owned(),
            })?;
        let set = LinkUnspec::new_with_index(link.index).alias(container_id);
        let set = if up { set.up() } else { set.down() }.build();
        if let Err(e) = self.rt.block_on(self.handle.link().set(set).execute()) {
            // Do not leave a half-made pair behind.
            let _ = self.delete_link(link.index);
            return Err(nl_err("setting alias and up on", host)(e));
        }
        Ok(Link {
            alias: Some(container_id.to_owned()),
            up,
            ..link
        })
    }

    /// Inside the pod's namespace: `lo` up; `ifname` up with `mtu`; per
    /// family of `ips`: the address (`/32`; `/128` with `nodad`), a
    /// link-scope route to the gateway ([`GATEWAY`], [`GATEWAY6`]), the
    /// default route via it and the permanent neighbour gateway ->
    /// `gateway_mac`. IPv6 is turned on for `ifname` first if the
    /// namespace had it off. Returns the pod interface's MAC.
    pub fn configure_pod(
        &self,
        ifname: &str,
        ips: PodIps,
        mtu: u32,
        gateway_mac: MacAddr,
    ) -> Result<MacAddr, LinkError> {
        let lo = self
            .link_by_name("lo")?
            .ok_or_else(|| LinkError::NotFound {
                name: "lo".to_owned(),
            })?;
        let link = self
            .link_by_name(ifname)?
            .ok_or_else(|| LinkError::NotFound {
                name: ifname.to_owned(),
            })?;
        if ips.v6.is_some() {
            enable_ipv6(ifname)?;
        }
        let idx = link.index;
        let h = &self.handle;
        self.rt.block_on(async {
            h.link()
                .set(LinkUnspec::new_with_index(lo.index).up().build())
                .execute()
                .await
                .map_err(nl_err("setting up", "lo"))?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(nl_err("setting up", ifname))?;
            if let Some(ip) = ips.v4 {
                self.configure_v4(idx, ifname, ip, gateway_mac).await?;
            }
            if let Some(ip) = ips.v6 {
                self.configure_v6(idx, ifname, ip, gateway_mac).await?;
            }
            Ok::<_, LinkError>(())
        })?;
        link.mac()
    }

    /// `ip`/32, `GATEWAY dev IF scope link`, `default via GATEWAY`, the
    /// permanent neighbour.
    async fn configure_v4(
        &self,
        idx: u32,
        ifname: &str,
        ip: Ipv4Addr,
        gateway_mac: MacAddr,
    ) -> Result<(), LinkError> {
        let h = &self.handle;
        h.address()
            .add(idx, IpAddr::V4(ip), 32)
            .replace()
            .execute()
            .await
            .map_err(nl_err("adding address", format!("{ip}/32 on {ifname}")))?;
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(to_gateway)
            .replace()
            .execute()
            .await
            .map_err(nl_err("adding route", format!("{GATEWAY}/32 dev {ifname}")))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY)
            .output_interface(idx)
            .build();
        h.route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "adding route",
                format!("default via {GATEWAY} dev {ifname}"),
            ))?;
        self.permanent_neighbour(idx, ifname, IpAddr::V4(GATEWAY), gateway_mac)
            .await
    }

    /// `ip`/128 nodad, `GATEWAY6 dev IF`, `default via GATEWAY6 dev IF`,
    /// the permanent neighbour.
    async fn configure_v6(
        &self,
        idx: u32,
        ifname: &str,
        ip: Ipv6Addr,
        gateway_mac: MacAddr,
    ) -> Result<(), LinkError> {
        let h = &self.handle;
        let mut add = h.address().add(idx, IpAddr::V6(ip), 128).replace();
        // No duplicate address detection: the address is the pod's alone
        // (leased), and DAD would hold it tentative (unusable) for a while.
        let msg = add.message_mut();
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        add.execute().await.map_err(nl_err(
            "adding address",
            format!("{ip}/128 nodad on {ifname}"),
        ))?;
        let to_gateway = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(GATEWAY6, 128)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(to_gateway)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "adding route",
                format!("{GATEWAY6}/128 dev {ifname}"),
            ))?;
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY6)
            .output_interface(idx)
            .build();
        h.route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "adding route",
                format!("default via {GATEWAY6} dev {ifname}"),
            ))?;
        self.permanent_neighbour(idx, ifname, IpAddr::V6(GATEWAY6), gateway_mac)
            .await
    }

    async fn permanent_neighbour(
        &self,
        idx: u32,
        ifname: &str,
        gateway: IpAddr,
        mac: MacAddr,
    ) -> Result<(), LinkError> {
        self.handle
            .neighbours()
            .add(idx, gateway)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "adding permanent neighbour",
                format!("{gateway} lladdr {mac} dev {ifname}"),
            ))
    }

    /// The state of `ifname` in this namespace, for CHECK; `None` if there
    /// is no such interface.
    pub fn pod_state(&self, ifname: &str) -> Result<Option<PodState>, LinkError> {
        let Some(link) = self.link_by_name(ifname)? else {
            return Ok(None);
        };
        let idx = link.index;
        let h = &self.handle;
        let (addrs, neighbours, routes, routes6) = self.rt.block_on(async {
            let addrs: Vec<_> = h
                .address()
                .get()
                .set_link_index_filter(idx)
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("listing addresses of", ifname))?;
            let neighbours: Vec<_> = h
                .neighbours()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("listing neighbours of", ifname))?;
            let routes: Vec<_> = h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("listing routes of", ifname))?;
            let routes6: Vec<_> = h
                .route()
                .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("listing IPv6 routes of", ifname))?;
            Ok::<_, LinkError>((addrs, neighbours, routes, routes6))
        })?;
        let addrs = addrs
            .iter()
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some((*ip, a.header.prefix_len)),
                    _ => None,
                })
            })
            .collect();
        let neighbour = |gateway: IpAddr| {
            neighbours
                .iter()
                .filter(|n| n.header.ifindex == idx && n.header.state == NeighbourState::Permanent)
                .filter(|n| {
                    n.attributes.iter().any(|a| match (a, gateway) {
                        (
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)),
                            IpAddr::V4(g),
                        ) => *d == g,
                        (
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)),
                            IpAddr::V6(g),
                        ) => *d == g,
                        _ => false,
                    })
                })
                .find_map(|n| {
                    n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_bytes(b),
                        _ => None,
                    })
                })
        };
        let default_via = |routes: &[RouteMessage], gateway: RouteAddress| {
            routes.iter().any(|r| {
                r.header.destination_prefix_length == 0
                    && r.attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == idx))
                    && r.attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Gateway(g) if *g == gateway))
            })
        };
        Ok(Some(PodState {
            link,
            addrs,
            gateway_neighbour: neighbour(IpAddr::V4(GATEWAY)),
            gateway6_neighbour: neighbour(IpAddr::V6(GATEWAY6)),
            default_route: default_via(&routes, RouteAddress::Inet(GATEWAY)),
            default_route6: default_via(&routes6, RouteAddress::Inet6(GATEWAY6)),
        }))
    }
}

/// `net.ipv6.conf.<ifname>.disable_ipv6 = 0` in the calling thread's
/// network namespace, if it is not already (a node whose default turns
/// IPv6 off hands that to new namespaces).
fn enable_ipv6(ifname: &str) -> Result<(), LinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    let err = |source| LinkError::Ipv6Sysctl {
        path: path.clone(),
        source,
    };
    let now = std::fs::read_to_string(&path).map_err(err)?;
    if now.trim() != "0" {
        std::fs::write(&path, b"0").map_err(err)?;
    }
    Ok(())
}

/// Runs `f` on a dedicated thread inside the network namespace `netns`.
/// The thread ends with `f`, so no thread ever returns from the pod's
/// namespace to run anything else.
pub fn in_netns<T: Send>(
    netns: &File,
    f: impl FnOnce() -> Result<T, LinkError> + Send,
) -> Result<T, LinkError> {
    clustermesh_api::netns::run_in(Some(netns), f).map_err(LinkError::Netns)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn host_names_are_stable_and_short() {
        let n = host_iface_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        assert_eq!(n.len(), 11);
        assert!(n.starts_with("lxc"));
        assert!(n[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            n,
            host_iface_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_ne!(host_iface_name("a"), host_iface_name("b"));
        assert_eq!(host_iface_name("a"), "lxce40c292c");
    }
}
