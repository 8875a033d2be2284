//! Small topologies for privileged tests: a node namespace with an external
//! VXLAN device and one pod namespace behind a veth, wired the way the
//! product wires pods (pod /32, fixed gateway 169.254.1.1 with a permanent
//! neighbour entry for the host-side veth's MAC).

use std::net::Ipv4Addr;

use clustermesh_testkit::netns::{NetNs, PinDir};
use node_agent::datapath::Datapath;
use tunnel_common::{DatapathConfig, EndpointInfo, IpCacheValue, TunnelMode};

/// One node (of cluster `id`) with one pod.
#[derive(Debug)]
pub struct Node {
    pub id: u8,
    pub ns: NetNs,
    pub pod: NetNs,
    pub pins: PinDir,
    pub pod_ip: Ipv4Addr,
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
            identity: (u32::from(id) << 16) | 300,
        })
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
        let lxc = ifindex(&self.ns, "lxc0").map_err(|e| io(self, e))?;
        let vx = ifindex(&self.ns, "cm_vxlan").map_err(|e| io(self, e))?;
        dp.set_config(DatapathConfig {
            mode: mode as u32,
            overlay_ifindex: vx,
            underlay_ifindex: ifindex(&self.ns, "ul0").unwrap_or(0),
            underlay_ip: u32::from(own).to_be(),
            ..Default::default()
        })?;
        dp.upsert_endpoint(
            self.pod_ip,
            EndpointInfo {
                ifindex: lxc,
                identity: self.identity,
                mac: mac_bytes(2, self.id),
                host_mac: mac_bytes(1, self.id),
            },
        )
    }

    fn learn(
        &self,
        dp: &mut Datapath,
        peer: &Node,
        underlay: Ipv4Addr,
    ) -> Result<(), node_agent::datapath::Error> {
        let tep = u32::from(underlay).to_be();
        let cidr: Ipv4Addr = Ipv4Addr::new(10, peer.id, 0, 0);
        let v = |identity| IpCacheValue {
            identity,
            tunnel_endpoint: tep,
            cluster_id: peer.id,
            ..Default::default()
        };
        dp.upsert_ipcache(cidr, 24, v(0))?;
        dp.upsert_ipcache(peer.pod_ip, 32, v(peer.identity))
    }
}

fn io(n: &Node, e: std::io::Error) -> node_agent::datapath::Error {
    node_agent::datapath::Error::PinDir {
        path: n.ns.name().to_owned(),
        source: e,
    }
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

/// ping's output, whatever its exit status (it fails when nothing answers).
pub fn ping(from: &NetNs, to: Ipv4Addr, count: u32, interval: &str) -> String {
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
