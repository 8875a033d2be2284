//! Small topologies for privileged tests: a node namespace with an external
//! VXLAN device and one pod namespace behind a veth, wired the way the
//! product wires pods (pod /32, fixed gateway 169.254.1.1 with a permanent
//! neighbour entry for the host-side veth's MAC). A dual-stack pod
//! ([`Node::new_dual`]) also has `fd00:<id>::2/128` with the gateway
//! `fe80::1` (permanent neighbour, the same MAC), as the CNI plugin sets up
//! IPv6 pods; nodes are joined by an IPv4 ([`underlay`]) or an IPv6
//! ([`underlay6`]) underlay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustermesh_testkit::netns::{NetNs, PinDir, enable_ipv6};
use node_agent::datapath::Datapath;
use tunnel_common::{DatapathConfig, EndpointInfo, Ip6, IpCacheValue, TunnelMode};

/// One node (of cluster `id`) with one pod.
#[derive(Debug)]
pub struct Node {
    pub id: u8,
    pub ns: NetNs,
    pub pod: NetNs,
    pub pins: PinDir,
    pub pod_ip: Ipv4Addr,
    /// The pod's IPv6 address `fd00:<id>::2`, configured in the pod (and
    /// declared in `CM_ENDPOINTS6`) only by [`Node::new_dual`].
    pub pod_ip6: Ipv6Addr,
    /// Whether the pod has its IPv6 address.
    pub dual_stack: bool,
    /// The pod's security identity: cluster `id`, local id 300.
    pub identity: u32,
}

/// `02:00:0a:<id>:00:<last>`: host-side veth `last` = 1, pod `last` = 2.
pub fn mac(last: u8, id: u8) -> String {
    format!("02:00:0a:{id:02x}:00:{last:02x}")
}

pub fn mac_bytes(last: u8, id: u8) -> [u8; 6] {
    [0x02, 0x00, 0x0a, id, 0x00, last]
}

pub fn ifindex(ns: &NetNs, dev: &str) -> std::io::Result<u32> {
    let out = ns.exec("ip", &["-o", "link", "show", "dev", dev])?;
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no ifindex in {out:?}")))
}

impl Node {
    /// Creates the namespaces, the VXLAN device `cm_vxlan` and the pod
    /// `10.<id>.0.2` behind `lxc0` (MTU 1450: VXLAN adds 50 bytes).
    pub fn new(id: u8) -> std::io::Result<Self> {
        let ns = NetNs::new(&format!("n{id}"))?;
        let pod = NetNs::new(&format!("p{id}"))?;
        let pod_ip: Ipv4Addr = format!("10.{id}.0.2")
            .parse()
            .map_err(std::io::Error::other)?;
        ns.exec(
            "ip",
            &[
                "link", "add", "cm_vxlan", "type", "vxlan", "external", "dstport", "8472",
            ],
        )?;
        ns.exec("ip", &["link", "set", "cm_vxlan", "up"])?;
        ns.exec(
            "ip",
            &[
                "link",
                "add",
                "lxc0",
                "address",
                &mac(1, id),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
        )?;
        ns.exec("ip", &["link", "set", "lxc0", "up"])?;
        pod.exec("ip", &["link", "set", "eth0", "address", &mac(2, id)])?;
        pod.exec("ip", &["link", "set", "eth0", "mtu", "1450", "up"])?;
        pod.exec(
            "ip",
            &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"],
        )?;
        pod.exec(
            "ip",
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        pod.exec(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )?;
        pod.exec(
            "ip",
            &[
                "neigh",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "lladdr",
                &mac(1, id),
                "nud",
                "permanent",
            ],
        )?;
        let pins = PinDir::new(&format!("n{id}"))?;
        Ok(Self {
            id,
            ns,
            pod,
            pins,
            pod_ip,
            pod_ip6: Ipv6Addr::new(0xfd00, u16::from(id), 0, 0, 0, 0, 0, 2),
            dual_stack: false,
            identity: (u32::from(id) << 16) | 300,
        })
    }

    /// [`Node::new`] with a dual-stack pod: also `fd00:<id>::2/128` on
    /// `eth0` (no DAD), a default route via `fe80::1` and a permanent
    /// neighbour entry for it with the host-side veth's MAC. The pod's
    /// kernel still makes its own link-local address (and sends DAD, MLD
    /// and router solicitations), as a real pod's does.
    pub fn new_dual(id: u8) -> std::io::Result<Self> {
        let mut n = Self::new(id)?;
        for ns in [&n.ns, &n.pod] {
            enable_ipv6(ns)?;
        }
        let addr = format!("{}/128", n.pod_ip6);
        n.pod
            .exec("ip", &["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])?;
        n.pod.exec(
            "ip",
            &[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        )?;
        n.pod.exec(
            "ip",
            &[
                "-6",
                "neigh",
                "add",
                "fe80::1",
                "dev",
                "eth0",
                "lladdr",
                &mac(1, id),
                "nud",
                "permanent",
            ],
        )?;
        n.dual_stack = true;
        Ok(n)
    }

    /// Loads the datapath on this node's pin directory from a thread inside
    /// the node namespace; attaches the programs when `attach` is set (else
    /// only opens the shared maps, as a second handle).
    pub fn datapath(&self, attach: bool) -> Result<Datapath, node_agent::datapath::Error> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _in = self
                    .ns
                    .enter()
                    .map_err(|e| node_agent::datapath::Error::PinDir {
                        path: self.ns.name().to_owned(),
                        source: e,
                    })?;
                let mut dp = Datapath::load(self.pins.path())?;
                if attach {
                    dp.attach_endpoint("lxc0")?;
                    dp.attach_overlay("cm_vxlan")?;
                    // The underlay exists once `underlay()` wired the nodes.
                    if node_agent::datapath::ifindex("ul0").is_ok() {
                        dp.attach_underlay("ul0")?;
                    }
                }
                Ok(dp)
            })
            .join()
            .unwrap_or_else(|_| panic!("datapath thread panicked"))
        })
    }

    /// Programs the maps as the agent does: VXLAN, the local pod, and
    /// `peer`'s pod CIDR and pod through the tunnel to its `underlay` address.
    pub fn connect(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        underlay: Ipv4Addr,
    ) -> Result<(), node_agent::datapath::Error> {
        self.connect_with(dp, peer, TunnelMode::Vxlan, Ipv4Addr::UNSPECIFIED, underlay)
    }

    /// [`Node::connect`] in any mode; `own` is this node's underlay address
    /// (the outer source of Geneve). Direct routing also needs the routes
    /// of [`Node::routes`].
    pub fn connect_with(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        mode: TunnelMode,
        own: Ipv4Addr,
        underlay: Ipv4Addr,
    ) -> Result<(), node_agent::datapath::Error> {
        self.program(dp, mode, own)?;
        self.learn(dp, peer, underlay)
    }

    /// The node's direct-routing route table (netlink, in its namespace,
    /// out of `ul0`).
    pub fn routes(
        &self,
    ) -> Result<node_agent::reconcilers::routes::RouteTable, node_agent::reconcilers::ReconcileError>
    {
        let path = std::path::PathBuf::from(format!("/var/run/netns/{}", self.ns.name()));
        node_agent::reconcilers::routes::RouteTable::open(Some(&path), "ul0")
    }

    /// Configures the mode and declares the local pod (what the agent does
    /// at start); remote entries come from [`Node::connect_with`] or from
    /// the agent's reconcilers.
    pub fn program(
        &self,
        dp: &mut Datapath,
        mode: TunnelMode,
        own: Ipv4Addr,
    ) -> Result<(), node_agent::datapath::Error> {
        self.program_any(dp, mode, IpAddr::V4(own))
    }

    /// [`Node::program`] with this node's underlay address of either
    /// family (`underlay_ip` or `underlay_ip6`; unspecified: none); a
    /// dual-stack pod is declared in both endpoint maps.
    pub fn program_any(
        &self,
        dp: &mut Datapath,
        mode: TunnelMode,
        own: IpAddr,
    ) -> Result<(), node_agent::datapath::Error> {
        let lxc = ifindex(&self.ns, "lxc0").map_err(|e| io(self, e))?;
        let vx = ifindex(&self.ns, "cm_vxlan").map_err(|e| io(self, e))?;
        let (underlay_ip, underlay_ip6) = tep(own);
        dp.set_config(DatapathConfig {
            mode: mode as u32,
            overlay_ifindex: vx,
            underlay_ifindex: ifindex(&self.ns, "ul0").unwrap_or(0),
            underlay_ip,
            underlay_ip6,
            ..Default::default()
        })?;
        let info = EndpointInfo {
            ifindex: lxc,
            identity: self.identity,
            mac: mac_bytes(2, self.id),
            host_mac: mac_bytes(1, self.id),
        };
        if self.dual_stack {
            dp.upsert_endpoint6(self.pod_ip6, info)?;
        }
        dp.upsert_endpoint(self.pod_ip, info)
    }

    /// [`Node::connect_with`] over an underlay of either family: `own` is
    /// this node's underlay address (unspecified: none, e.g. to receive
    /// VXLAN through the kernel device), `underlay` the peer's. Both of
    /// the peer's pod families are learnt (IPv6 ones when the peer is
    /// dual-stack: `fd00:<peer>::/64` and the pod's /128).
    pub fn connect_any(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        mode: TunnelMode,
        own: IpAddr,
        underlay: IpAddr,
    ) -> Result<(), node_agent::datapath::Error> {
        self.program_any(dp, mode, own)?;
        self.learn_any(dp, peer, underlay)
    }

    fn learn(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        underlay: Ipv4Addr,
    ) -> Result<(), node_agent::datapath::Error> {
        self.learn_any(dp, peer, IpAddr::V4(underlay))
    }

    fn learn_any(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        underlay: IpAddr,
    ) -> Result<(), node_agent::datapath::Error> {
        let (tunnel_endpoint, tunnel_endpoint6) = tep(underlay);
        let cidr: Ipv4Addr = Ipv4Addr::new(10, peer.id, 0, 0);
        let v = |identity| IpCacheValue {
            identity,
            tunnel_endpoint,
            tunnel_endpoint6,
            cluster_id: peer.id,
            ..Default::default()
        };
        dp.upsert_ipcache(cidr, 24, v(0))?;
        dp.upsert_ipcache(peer.pod_ip, 32, v(peer.identity))?;
        if peer.dual_stack {
            let cidr6 = Ipv6Addr::new(0xfd00, u16::from(peer.id), 0, 0, 0, 0, 0, 0);
            dp.upsert_ipcache6(cidr6, 64, v(0))?;
            dp.upsert_ipcache6(peer.pod_ip6, 128, v(peer.identity))?;
        }
        Ok(())
    }
}

/// An underlay address as the maps hold it: (IPv4, IPv6), network order,
/// the other family zero.
fn tep(ip: IpAddr) -> (u32, Ip6) {
    match ip {
        IpAddr::V4(a) => (u32::from(a).to_be(), [0; 16]),
        IpAddr::V6(a) => (0, a.octets()),
    }
}

fn io(n: &Node, e: std::io::Error) -> node_agent::datapath::Error {
    node_agent::datapath::Error::PinDir {
        path: n.ns.name().to_owned(),
        source: e,
    }
}

/// Nodes `id` and `id + 1` joined by an underlay, each with the eBPF
/// datapath attached and connected to the other in Geneve mode (the
/// benchmarks' and tests' two-node setup); the datapaths live as long as
/// the returned vector.
pub fn geneve_pair(id: u8) -> anyhow::Result<(Node, Node, Vec<Datapath>)> {
    let a = Node::new(id)?;
    let b = Node::new(id + 1)?;
    let (ula, ulb) = underlay(&a, &b)?;
    let mut dpa = a.datapath(true)?;
    let mut dpb = b.datapath(true)?;
    a.connect_with(&mut dpa, &b, TunnelMode::Geneve, ula, ulb)?;
    b.connect_with(&mut dpb, &a, TunnelMode::Geneve, ulb, ula)?;
    Ok((a, b, vec![dpa, dpb]))
}

/// Two nodes on one underlay link: 192.0.2.1 and 192.0.2.2 (addresses that
/// exist only inside the namespaces).
pub fn underlay(a: &Node, b: &Node) -> std::io::Result<(Ipv4Addr, Ipv4Addr)> {
    clustermesh_testkit::netns::veth_pair(
        &a.ns,
        "ul0",
        "192.0.2.1/24",
        &b.ns,
        "ul0",
        "192.0.2.2/24",
    )?;
    Ok((Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)))
}

/// Two nodes on an IPv6-only underlay link: 2001:db8::1 and 2001:db8::2
/// (no DAD, addresses inside the namespaces only). The pods' MTU becomes
/// 1430: Geneve and VXLAN over IPv6 add 70 bytes (`ENCAP_OVERHEAD6`).
pub fn underlay6(a: &Node, b: &Node) -> std::io::Result<(Ipv6Addr, Ipv6Addr)> {
    let ips = [
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
    ];
    clustermesh_testkit::netns::veth_pair6(
        &a.ns,
        "ul0",
        &format!("{}/64", ips[0]),
        &b.ns,
        "ul0",
        &format!("{}/64", ips[1]),
    )?;
    for n in [a, b] {
        n.pod.exec("ip", &["link", "set", "eth0", "mtu", "1430"])?;
    }
    Ok((ips[0], ips[1]))
}

/// A link-local address `fe80::ff:<id>` (no DAD) on the node's `ul0`: the
/// next hop of IPv6 pod routes over an underlay addressed with IPv4 only
/// (IPv6 routes cannot have IPv4 gateways).
pub fn link_local6(n: &Node) -> std::io::Result<Ipv6Addr> {
    enable_ipv6(&n.ns)?;
    let ip = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xff, u16::from(n.id));
    n.ns.exec(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            "ul0",
            "nodad",
        ],
    )?;
    Ok(ip)
}

/// ping's output, whatever its exit status (it fails when nothing answers).
pub fn ping(from: &NetNs, to: Ipv4Addr, count: u32, interval: &str) -> String {
    ping_any(from, IpAddr::V4(to), count, interval)
}

/// [`ping`] to an IPv6 address.
pub fn ping6(from: &NetNs, to: Ipv6Addr, count: u32, interval: &str) -> String {
    ping_any(from, IpAddr::V6(to), count, interval)
}

fn ping_any(from: &NetNs, to: IpAddr, count: u32, interval: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
        ])
        .arg(to.to_string())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => e.to_string(),
    }
}
