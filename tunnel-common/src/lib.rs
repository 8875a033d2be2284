//! Types shared by the eBPF programs (tunnel-ebpf, `no_std`) and user space
//! (node-agent, with the `user` feature).
//!
//! Rules, because the kernel and user space must agree byte for byte:
//! every type is `#[repr(C)]`, `Copy`, has explicit padding fields and no
//! `bool` (flags are integers), and its size is asserted at compile time.
//! Map and program names are defined here once.
#![no_std]

/// Program names (the function names in tunnel-ebpf, i.e. ELF symbols).
pub mod programs {
    /// TC ingress of a pod's host-side veth: traffic leaving the pod.
    pub const FROM_ENDPOINT: &str = "from_endpoint";
    /// TC ingress of the overlay (VXLAN) device: decapsulated traffic.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// TC ingress of the node's underlay interface: Geneve decapsulation
    /// and direct-routing delivery.
    pub const FROM_UNDERLAY: &str = "from_underlay";
    /// TC ingress of the WireGuard (TUN) device: decrypted traffic.
    pub const FROM_WIREGUARD: &str = "from_wireguard";
}

/// Map names (the static names in tunnel-ebpf). Every map is pinned by name
/// under the node's pin directory, so both programs share them and a
/// restarted agent adopts them.
pub mod maps {
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::metric_index`].
    pub const METRICS: &str = "CM_METRICS";
    /// Hash: local endpoint IPv4 (network order) -> [`crate::EndpointInfo`].
    pub const ENDPOINTS: &str = "CM_ENDPOINTS";
    /// Hash: local endpoint IPv6 ([`crate::Ip6`], the address's 16 bytes in
    /// network order) -> [`crate::EndpointInfo`].
    pub const ENDPOINTS6: &str = "CM_ENDPOINTS6";
    /// LPM trie: IPv4 prefix -> [`crate::IpCacheValue`].
    pub const IPCACHE: &str = "CM_IPCACHE";
    /// LPM trie: IPv6 prefix ([`crate::Ip6`]) -> [`crate::IpCacheValue`]
    /// (the same value as IPv4: either family of pod may sit behind a node
    /// reached over either family of underlay).
    pub const IPCACHE6: &str = "CM_IPCACHE6";
    /// Array of one [`crate::DatapathConfig`].
    pub const CONFIG: &str = "CM_CONFIG";
    /// LRU hash: remote source IPv4 -> identity it last arrived with.
    pub const SOURCE_IDENTITY: &str = "CM_SRC_IDENTITY";
    /// LRU hash: remote source IPv6 ([`crate::Ip6`]) -> identity it last
    /// arrived with.
    pub const SOURCE_IDENTITY6: &str = "CM_SRC_IDENTITY6";
    /// Hash: [`crate::LbServiceKey`] -> [`crate::LbServiceValue`]. Slot 0 of
    /// a frontend holds the number of backends new flows are spread over;
    /// slots 1..=count hold those backends.
    pub const LB_SERVICES: &str = "CM_LB_SERVICES";
    /// Hash: [`crate::LbBackendKey`] -> [`crate::LbBackendValue`]: every
    /// backend a frontend's existing flows may keep (the selectable ones
    /// and the draining ones). A new TCP connection or a UDP flow whose
    /// remembered backend is not here any more (removed, or its cluster
    /// withdrawn) is balanced again; an established TCP connection keeps
    /// its backend.
    pub const LB_BACKENDS: &str = "CM_LB_BACKENDS";
    /// LRU hash: [`crate::LbFlowKey`] of a client's flow to a frontend ->
    /// the backend it was given ([`crate::LbAddr`]).
    pub const LB_FLOWS: &str = "CM_LB_FLOWS";
    /// LRU hash: [`crate::LbFlowKey`] of the reply (backend -> client) ->
    /// the frontend to restore as its source ([`crate::LbAddr`]).
    pub const LB_REVERSE: &str = "CM_LB_REVERSE";
    /// Hash: service frontend IPv4 (network order) -> number of (port,
    /// protocol) frontends it has. A packet to such an address that is a
    /// fragment, not TCP/UDP, or to a port that is not one of its frontends
    /// is dropped ([`crate::Verdict::DropFragment`],
    /// [`crate::Verdict::DropServiceProtocol`]), never handed to the host.
    pub const LB_FRONTENDS: &str = "CM_LB_FRONTENDS";
    /// Hash: [`crate::Lb6ServiceKey`] -> [`crate::Lb6ServiceValue`]:
    /// [`LB_SERVICES`] for IPv6 frontends (and their IPv6 backends).
    pub const LB6_SERVICES: &str = "CM_LB6_SERVICES";
    /// Hash: [`crate::Lb6BackendKey`] -> [`crate::LbBackendValue`]:
    /// [`LB_BACKENDS`] for IPv6 frontends.
    pub const LB6_BACKENDS: &str = "CM_LB6_BACKENDS";
    /// LRU hash: [`crate::Lb6FlowKey`] -> [`crate::Lb6Addr`]: [`LB_FLOWS`]
    /// of IPv6 clients.
    pub const LB6_FLOWS: &str = "CM_LB6_FLOWS";
    /// LRU hash: [`crate::Lb6FlowKey`] of the reply -> [`crate::Lb6Addr`]:
    /// [`LB_REVERSE`] of IPv6 flows.
    pub const LB6_REVERSE: &str = "CM_LB6_REVERSE";
    /// Hash: service frontend IPv6 ([`crate::Ip6`]) -> number of (port,
    /// protocol) frontends: [`LB_FRONTENDS`] for IPv6. A packet to such an
    /// address whose next header is a Fragment header is dropped
    /// ([`crate::Verdict::DropFragment`]); any next header other than TCP
    /// or UDP (other extension headers included), or a port that is no
    /// frontend, [`crate::Verdict::DropServiceProtocol`].
    pub const LB6_FRONTENDS: &str = "CM_LB6_FRONTENDS";
    /// LPM trie: IPv4 prefix (the mesh's pod ranges) -> [`crate::STRICT_RANGE`].
    /// In strict mode a destination inside one that the ip-cache cannot
    /// route (no entry, or one without a tunnel endpoint or encryption) is
    /// dropped ([`crate::Verdict::DropStrictUnknownDest`]).
    pub const STRICT_RANGES: &str = "CM_STRICT_RANGES";
    /// LPM trie: IPv6 prefix ([`crate::Ip6`]) -> [`crate::STRICT_RANGE`]:
    /// [`STRICT_RANGES`] for IPv6 pod ranges.
    pub const STRICT_RANGES6: &str = "CM_STRICT_RANGES6";
    /// LPM trie: [`crate::PolicyKey`] -> [`crate::PolicyValue`]: the
    /// compiled network policy of every local endpoint identity. The port
    /// is the last 16 bits of the key, so a port range is a handful of
    /// prefixes; protocols without ports (and the "any protocol" rules for
    /// them) are keyed with protocol 0 and a prefix that ends before the
    /// port.
    pub const POLICY: &str = "CM_POLICY";
    /// Hash: local endpoint identity -> [`crate::PolicyState`]. An identity
    /// that is not here has no policy at all: its packets skip every policy
    /// lookup.
    pub const POLICY_STATE: &str = "CM_POLICY_STATE";
    /// LRU hash: [`crate::PolicyCtKey`] -> the [`crate::PolicyState`]
    /// revision the connection was allowed under. A connection allowed in
    /// one direction passes in both (replies) while the endpoint's policy
    /// revision is unchanged; after a change it is checked again.
    pub const POLICY_CT: &str = "CM_POLICY_CT";
    /// Per-CPU hash: [`crate::PolicyStatsKey`] -> [`crate::Counter`]: policy
    /// verdicts per local endpoint (its host-side ifindex) and direction.
    pub const POLICY_STATS: &str = "CM_POLICY_STATS";
    /// Ring buffer of [`crate::FlowEvent`]s: drops, policy audits and
    /// (aggregated) traces of forwarded traffic, read by the agent.
    pub const FLOWS: &str = "CM_FLOWS";
    /// Array of one [`crate::FlowConfig`]: whether events are emitted and
    /// how often a forwarded flow is reported.
    pub const FLOW_CONFIG: &str = "CM_FLOW_CONFIG";
    /// LRU hash: [`crate::FlowKey`] -> [`crate::FlowAgg`]: when each
    /// forwarded flow was last reported and what it carried since.
    pub const FLOW_AGG: &str = "CM_FLOW_AGG";
    /// Per-CPU array of one u64: events the ring buffer had no room for.
    pub const FLOW_LOST: &str = "CM_FLOW_LOST";
    /// Per-CPU array of one [`crate::FlowEvent`]: the event of the packet
    /// being handled, filled as the program goes (no stack for it).
    pub const FLOW_SCRATCH: &str = "CM_FLOW_SCRATCH";
    /// LPM trie: IPv4 prefix -> node-local identity (bit 24 set) of a CIDR
    /// prefix the node's policies name: the peer identity of an address
    /// that is no local endpoint and not in the ip-cache.
    pub const POLICY_CIDR: &str = "CM_POLICY_CIDR";
    /// LPM trie: IPv6 prefix ([`crate::Ip6`]) -> node-local identity:
    /// [`POLICY_CIDR`] for IPv6.
    pub const POLICY_CIDR6: &str = "CM_POLICY_CIDR6";
}

/// An IPv6 address as the maps key it: its 16 bytes in network order (what
/// `Ipv6Addr::octets` gives, and what the programs load from the header).
pub type Ip6 = [u8; 16];

/// Entries of the maps (sizes are fixed at load).
pub const MAX_ENDPOINTS: u32 = 4096;
pub const MAX_IPCACHE: u32 = 512 * 1024;
pub const MAX_SOURCE_IDENTITIES: u32 = 65536;
/// Frontend slots (slot 0 plus one per selectable backend, per frontend
/// address, port and protocol).
pub const MAX_LB_SLOTS: u32 = 65536;
/// (frontend, backend) pairs flows may use.
pub const MAX_LB_BACKENDS: u32 = 65536;
/// Balanced flows remembered (each has a forward and a reverse entry).
pub const MAX_LB_FLOWS: u32 = 262_144;
/// Distinct service frontend addresses.
pub const MAX_LB_FRONTENDS: u32 = 16384;
/// Pod ranges strict mode covers.
pub const MAX_STRICT_RANGES: u32 = 4096;
/// The value of every [`maps::STRICT_RANGES`] entry.
pub const STRICT_RANGE: u32 = 1;
/// Policy entries (LPM prefixes) of every local endpoint identity together.
pub const MAX_POLICY: u32 = 512 * 1024;
/// Connections the policy tracks (each direction of a node's pods).
pub const MAX_POLICY_CT: u32 = 65536;
/// CIDR prefixes the node's policies name, per family.
pub const MAX_POLICY_CIDRS: u32 = 16384;
/// (endpoint, direction, verdict) counters.
pub const MAX_POLICY_STATS: u32 = 16384;
/// Default size in bytes of [`maps::FLOWS`] (a power of two, a multiple
/// of the page size); the agent's `--flow-ring-bytes` sets it at load.
pub const FLOW_RING_BYTES: u32 = 1 << 20;
pub const MAX_FLOW_AGG: u32 = 65536;

/// How pod traffic to remote nodes leaves this node.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelMode {
    /// Not configured: everything goes to the host stack.
    None = 0,
    /// VXLAN (UDP 8472) through an external-mode VXLAN device.
    Vxlan = 1,
    /// Geneve (UDP 6081), encapsulated and decapsulated by the programs
    /// themselves (no kernel Geneve device).
    Geneve = 2,
    /// No encapsulation: routed to the remote node through the routes the
    /// agent installs; identity resolved from the ip-cache on receipt.
    Direct = 3,
}

/// UDP destination port of VXLAN (the Linux default, as Cilium uses).
pub const VXLAN_PORT: u16 = 8472;
/// UDP destination port of Geneve (IANA).
pub const GENEVE_PORT: u16 = 6081;
/// Bytes added in front of an Ethernet frame's payload by VXLAN or Geneve
/// (outer IPv4 20 + UDP 8 + tunnel header 8 + inner Ethernet 14): the pod
/// MTU is the underlay MTU minus this.
pub const ENCAP_OVERHEAD: u32 = 50;
/// [`ENCAP_OVERHEAD`] over an IPv6 underlay (outer IPv6 40 + UDP 8 +
/// tunnel header 8 + inner Ethernet 14).
pub const ENCAP_OVERHEAD6: u32 = 70;
/// The identity of traffic from outside the mesh (Cilium's `world`).
pub const IDENTITY_WORLD: u32 = 2;

/// A local endpoint: where to deliver packets for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the endpoint's host-side veth.
    pub ifindex: u32,
    /// The endpoint's security identity.
    pub identity: u32,
    /// The endpoint's MAC (destination of delivered frames).
    pub mac: [u8; 6],
    /// MAC of the host-side veth (source of delivered frames).
    pub host_mac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 20);

/// What the ip-cache knows about an address or prefix (IPv4 in
/// [`maps::IPCACHE`], IPv6 in [`maps::IPCACHE6`]).
///
/// The node to tunnel to is `tunnel_endpoint` when it is set (an IPv4
/// underlay), else `tunnel_endpoint6` when that is set (an IPv6 underlay);
/// neither: local, or not reachable through the tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpCacheValue {
    pub identity: u32,
    /// Underlay IPv4 of the node to tunnel to (network order); 0: none.
    pub tunnel_endpoint: u32,
    pub cluster_id: u8,
    /// [`IPCACHE_FLAG_ENCRYPT`], ...
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Underlay IPv6 of the node to tunnel to (network order), used when
    /// `tunnel_endpoint` is 0; all zero: none.
    pub tunnel_endpoint6: Ip6,
}

const _: () = assert!(core::mem::size_of::<IpCacheValue>() == 28);

impl IpCacheValue {
    /// Whether the entry names a node to tunnel to (either family).
    #[inline(always)]
    pub fn has_tunnel_endpoint(&self) -> bool {
        self.tunnel_endpoint != 0 || self.tunnel_endpoint6 != [0; 16]
    }
}

/// Traffic to this entry must be encrypted.
pub const IPCACHE_FLAG_ENCRYPT: u8 = 1;
/// A remote range whose node is gone: traffic to it is dropped with
/// [`Verdict::DropNoTunnelEndpoint`] instead of leaking to the host stack.
pub const IPCACHE_FLAG_UNREACHABLE: u8 = 2;

/// IP protocol numbers the load-balancer handles.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

// ---- Service load-balancing ------------------------------------------
//
// The keys and values are generic over the address (`A`: `u32` for IPv4,
// network order; [`Ip6`] for IPv6) so both families share one definition
// and one meaning; the maps of each family hold one instantiation (the
// `Lb*` aliases IPv4, the `Lb6*` ones IPv6). Every field after the
// addresses is 2-byte aligned and the padding is explicit, so neither
// instantiation has implicit padding (both sizes asserted).

/// A service frontend slot: address, port (both network order), protocol
/// and slot (0: the frontend itself, 1..=count: its backends).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceKeyOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub slot: u16,
    pub _pad2: u16,
}

/// Key of [`maps::LB_SERVICES`].
pub type LbServiceKey = LbServiceKeyOf<u32>;
/// Key of [`maps::LB6_SERVICES`].
pub type Lb6ServiceKey = LbServiceKeyOf<Ip6>;
const _: () = assert!(core::mem::size_of::<LbServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<Lb6ServiceKey>() == 24);

/// Slot 0: `count` backends are selectable (0: the frontend exists but has
/// none; its packets are dropped with [`Verdict::DropNoServiceBackend`]).
/// Other slots: the backend's address and port (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbServiceValueOf<A> {
    pub addr: A,
    pub port: u16,
    pub count: u16,
}

pub type LbServiceValue = LbServiceValueOf<u32>;
pub type Lb6ServiceValue = LbServiceValueOf<Ip6>;
const _: () = assert!(core::mem::size_of::<LbServiceValue>() == 8);
const _: () = assert!(core::mem::size_of::<Lb6ServiceValue>() == 20);

/// A (frontend, backend) pair flows may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackendKeyOf<A> {
    pub frontend: A,
    pub frontend_port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub backend: A,
    pub backend_port: u16,
    pub _pad2: u16,
}

pub type LbBackendKey = LbBackendKeyOf<u32>;
pub type Lb6BackendKey = LbBackendKeyOf<Ip6>;
const _: () = assert!(core::mem::size_of::<LbBackendKey>() == 16);
const _: () = assert!(core::mem::size_of::<Lb6BackendKey>() == 40);

/// [`LB_BACKEND_SELECTABLE`] or [`LB_BACKEND_DRAINING`] (both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackendValue {
    pub state: u32,
}

const _: () = assert!(core::mem::size_of::<LbBackendValue>() == 4);

/// The backend is in the frontend's slots (gets new flows).
pub const LB_BACKEND_SELECTABLE: u32 = 1;
/// The backend keeps its flows but gets no new ones (terminating, or a
/// preferred-cluster policy moved new flows elsewhere).
pub const LB_BACKEND_DRAINING: u32 = 2;

/// One direction of a balanced flow: addresses and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbFlowKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub type LbFlowKey = LbFlowKeyOf<u32>;
pub type Lb6FlowKey = LbFlowKeyOf<Ip6>;
const _: () = assert!(core::mem::size_of::<LbFlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<Lb6FlowKey>() == 40);

/// An address and port (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAddrOf<A> {
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

pub type LbAddr = LbAddrOf<u32>;
pub type Lb6Addr = LbAddrOf<Ip6>;
const _: () = assert!(core::mem::size_of::<LbAddr>() == 8);
const _: () = assert!(core::mem::size_of::<Lb6Addr>() == 20);

/// The node's datapath configuration (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// A [`TunnelMode`] value.
    pub mode: u32,
    /// ifindex of the overlay device (VXLAN).
    pub overlay_ifindex: u32,
    /// ifindex of the underlay interface (Geneve, direct routing).
    pub underlay_ifindex: u32,
    /// This node's underlay IPv4 (network order): the outer source of
    /// Geneve packets, and the address Geneve is accepted on.
    pub underlay_ip: u32,
    /// ifindex of the WireGuard (TUN) device; 0: none.
    pub wg_ifindex: u32,
    /// [`CONFIG_FLAG_STRICT`], ...
    pub flags: u32,
    /// This node's underlay IPv6 (network order; all zero: none): the outer
    /// source of Geneve packets sent over IPv6, and the address Geneve and
    /// VXLAN over IPv6 are accepted on.
    pub underlay_ip6: Ip6,
}

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 40);

/// Strict encryption (fail closed): pod traffic to an ip-cache entry marked
/// [`IPCACHE_FLAG_ENCRYPT`] is dropped ([`Verdict::DropStrictPlaintext`])
/// whenever it cannot go through the WireGuard device, never sent in
/// plaintext.
pub const CONFIG_FLAG_STRICT: u32 = 1;
/// Strict ingress: pod traffic arriving from remote nodes outside WireGuard
/// (through a tunnel or routed in the clear) is dropped
/// ([`Verdict::DropStrictPlaintext`], ingress) instead of delivered.
pub const CONFIG_FLAG_STRICT_INGRESS: u32 = 2;

// ---- Network policy ----------------------------------------------------

/// Key of [`maps::POLICY`] (the data of an LPM key, every field in network
/// order so that the trie's bit order is the fields' order): the local
/// endpoint's identity, the peer's identity, the direction
/// ([`Direction`] as a byte), the protocol (6 TCP, 17 UDP, 0 any other) and
/// the destination port (of the packet for egress and ingress alike: the
/// port the connection is made to).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub identity: u32,
    pub peer: u32,
    pub direction: u8,
    pub proto: u8,
    pub port: u16,
}

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// Prefix length (in bits) of a [`PolicyKey`] up to and including the
/// protocol: an entry of this length matches every port.
pub const POLICY_PREFIX_PROTO: u32 = 80;
/// Prefix length of a [`PolicyKey`] with its port: one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKey {
    /// A key from host-order values (as user space and the programs hold
    /// them).
    #[inline(always)]
    pub fn new(identity: u32, peer: u32, direction: Direction, proto: u8, port: u16) -> Self {
        Self {
            identity: identity.to_be(),
            peer: peer.to_be(),
            direction: direction as u8,
            proto,
            port: port.to_be(),
        }
    }
}

/// Value of [`maps::POLICY`]: [`POLICY_ALLOW`] or [`POLICY_DENY`], and the
/// index of the rule (in the agent's compiled entries of the endpoint) that
/// decided, for reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    pub _pad: u8,
    pub rule: u16,
}

const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

pub const POLICY_ALLOW: u8 = 1;
pub const POLICY_DENY: u8 = 2;

/// Value of [`maps::POLICY_STATE`]: how a local endpoint identity's
/// policy is enforced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// [`POLICY_DEFAULT_DENY_INGRESS`], [`POLICY_DEFAULT_DENY_EGRESS`],
    /// [`POLICY_AUDIT`].
    pub flags: u32,
    /// Changed by the agent whenever the identity's entries change:
    /// tracked connections of another revision are checked again.
    pub revision: u32,
}

const _: () = assert!(core::mem::size_of::<PolicyState>() == 8);

/// Ingress is default-deny: only what an allow entry matches is delivered.
pub const POLICY_DEFAULT_DENY_INGRESS: u32 = 1;
/// Egress is default-deny.
pub const POLICY_DEFAULT_DENY_EGRESS: u32 = 2;
/// Audit mode: a packet the policy would drop is counted
/// ([`Verdict::PolicyAudit`]) and passes.
pub const POLICY_AUDIT: u32 = 4;

/// The flag of a direction's default deny.
#[inline(always)]
pub const fn policy_default_deny(dir: Direction) -> u32 {
    match dir {
        Direction::Egress => POLICY_DEFAULT_DENY_EGRESS,
        Direction::Ingress => POLICY_DEFAULT_DENY_INGRESS,
    }
}

/// Key of [`maps::POLICY_CT`]: a connection as the direction that allowed
/// it saw it (addresses as IPv6, IPv4 ones mapped as `::ffff:a.b.c.d`;
/// ports in network order) and that direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCtKey {
    pub saddr: Ip6,
    pub daddr: Ip6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<PolicyCtKey>() == 40);

/// Key of [`maps::POLICY_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyStatsKey {
    /// The local endpoint's host-side ifindex.
    pub ifindex: u32,
    pub direction: u8,
    /// A [`Verdict`] number.
    pub verdict: u8,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<PolicyStatsKey>() == 8);

/// Direction of a counted packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Leaving a local endpoint (pod).
    Egress = 0,
    /// Arriving for a local endpoint.
    Ingress = 1,
}

/// What happened to a packet: forwarding outcomes and drop reasons.
/// Numbers are stable (they are exported as metrics); append only.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to the host stack unchanged.
    Pass = 0,
    /// Redirected to a local endpoint.
    Local = 1,
    /// Sent to a remote node through the tunnel.
    Tunnel = 2,
    /// Sent to a remote node unencapsulated (direct routing).
    Routed = 3,
    /// Handed to the WireGuard device for a remote node.
    Encrypted = 4,
    /// Answered in eBPF: a pod's IPv6 Neighbour Solicitation for its
    /// gateway (`fe80::1`) got a Neighbour Advertisement with the host
    /// veth's MAC, sent back into the pod.
    NeighbourReply = 5,
    /// Audit mode: the policy would have dropped this packet; it passed
    /// (counted in addition to the packet's own verdict).
    PolicyAudit = 6,
    /// Dropped: packet too short or not parseable.
    DropMalformed = 64,
    /// Dropped: destination is a known remote range without a live node.
    DropNoTunnelEndpoint = 65,
    /// Dropped: strict mode refuses to send pod traffic unencrypted.
    DropStrictPlaintext = 66,
    /// Dropped: a helper call failed.
    DropInternal = 67,
    /// Dropped: arrived from the overlay for an address with no local endpoint.
    DropUnknownEndpoint = 68,
    /// Dropped: addressed to a service frontend that has no backend to
    /// give a new flow.
    DropNoServiceBackend = 69,
    /// Dropped: a pod sent a packet (IPv4, IPv6, or ARP) whose source
    /// address is not its own (not a local endpoint bound to the interface
    /// it came in on), or a link-local IPv6 packet other than neighbour
    /// discovery and MLD.
    DropSpoofed = 70,
    /// Dropped: a pod sent a frame that is neither IPv4, IPv6 nor ARP.
    DropUnsupportedL3 = 71,
    /// Dropped: an IPv4 fragment, or an IPv6 packet whose next header is a
    /// Fragment header, addressed to a service frontend address.
    DropFragment = 72,
    /// Dropped: addressed to a service frontend address with a protocol
    /// (IPv6: a next header, extension headers included) other than
    /// TCP/UDP, or to a port that is not one of its frontends.
    DropServiceProtocol = 73,
    /// Dropped: strict mode, the destination lies in a mesh pod range but
    /// the ip-cache has no tunnel endpoint (or encryption) for it.
    DropStrictUnknownDest = 74,
    /// Dropped: a network policy denies it (a deny rule, or no allow rule
    /// in a default-deny direction).
    DropPolicyDenied = 75,
    /// Dropped: a default-deny direction, and the peer's identity is not
    /// known yet (its address is in a mesh pod range the ip-cache has no
    /// entry for: the agent has not synced it), never mistaken for world.
    DropPolicyUnknownPeer = 76,
}

impl Verdict {
    pub const ALL: [Verdict; 20] = [
        Verdict::Pass,
        Verdict::Local,
        Verdict::Tunnel,
        Verdict::Routed,
        Verdict::Encrypted,
        Verdict::NeighbourReply,
        Verdict::PolicyAudit,
        Verdict::DropMalformed,
        Verdict::DropNoTunnelEndpoint,
        Verdict::DropStrictPlaintext,
        Verdict::DropInternal,
        Verdict::DropUnknownEndpoint,
        Verdict::DropNoServiceBackend,
        Verdict::DropSpoofed,
        Verdict::DropUnsupportedL3,
        Verdict::DropFragment,
        Verdict::DropServiceProtocol,
        Verdict::DropStrictUnknownDest,
        Verdict::DropPolicyDenied,
        Verdict::DropPolicyUnknownPeer,
    ];

    pub const fn is_drop(self) -> bool {
        (self as u8) >= 64
    }

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Local => "local",
            Verdict::Tunnel => "tunnel",
            Verdict::Routed => "routed",
            Verdict::Encrypted => "encrypted",
            Verdict::NeighbourReply => "neighbour_reply",
            Verdict::PolicyAudit => "policy_audit",
            Verdict::DropMalformed => "drop_malformed",
            Verdict::DropNoTunnelEndpoint => "drop_no_tunnel_endpoint",
            Verdict::DropStrictPlaintext => "drop_strict_plaintext",
            Verdict::DropInternal => "drop_internal",
            Verdict::DropUnknownEndpoint => "drop_unknown_endpoint",
            Verdict::DropNoServiceBackend => "drop_no_service_backend",
            Verdict::DropSpoofed => "drop_spoofed",
            Verdict::DropUnsupportedL3 => "drop_unsupported_l3",
            Verdict::DropFragment => "drop_fragment",
            Verdict::DropServiceProtocol => "drop_service_protocol",
            Verdict::DropStrictUnknownDest => "drop_strict_unknown_dest",
            Verdict::DropPolicyDenied => "drop_policy_denied",
            Verdict::DropPolicyUnknownPeer => "drop_policy_unknown_peer",
        }
    }
}

/// Verdicts per direction in the metrics array.
pub const VERDICT_SLOTS: u32 = 128;
/// Entries of the metrics array.
pub const METRICS_ENTRIES: u32 = 2 * VERDICT_SLOTS;

/// Index of a (direction, verdict) counter in [`maps::METRICS`].
#[inline(always)]
pub const fn metric_index(dir: Direction, verdict: Verdict) -> u32 {
    (dir as u32) * VERDICT_SLOTS + (verdict as u32)
}

/// Which program saw a [`FlowEvent`] ([`FlowEvent::hook`]).
pub const FLOW_HOOK_ENDPOINT: u8 = 0;
pub const FLOW_HOOK_OVERLAY: u8 = 1;
pub const FLOW_HOOK_UNDERLAY: u8 = 2;
pub const FLOW_HOOK_WIREGUARD: u8 = 3;

/// [`FlowEvent::flags`]: the packet was a forwarded flow's trace
/// (aggregated: `packets`/`bytes` since the flow's last report).
pub const FLOW_FLAG_TRACE: u8 = 1;
/// The packet was dropped (`verdict` says why).
pub const FLOW_FLAG_DROP: u8 = 2;
/// The policy would have dropped it; audit mode passed it.
pub const FLOW_FLAG_AUDIT: u8 = 4;
/// The destination was a service frontend (`svc`, `svc_port`), translated
/// to the backend now in `dst`, `dport`.
pub const FLOW_FLAG_TRANSLATED: u8 = 8;

/// Key of [`maps::FLOW_AGG`]: the first 40 bytes of a [`FlowEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub src: Ip6,
    pub dst: Ip6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub hook: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of [`maps::FLOW_AGG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowAgg {
    /// `bpf_ktime_get_ns` of the flow's last report.
    pub last_ns: u64,
    /// Packets and bytes since then (not yet reported).
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<FlowAgg>() == 24);

/// One flow event ([`maps::FLOWS`]). Addresses are 16 bytes in network
/// order (IPv4 as `::ffff:a.b.c.d`), ports network order, identities host
/// order (0: the program did not know it; the agent fills it from its
/// ip-cache). Starts with its [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub src: Ip6,
    pub dst: Ip6,
    pub sport: u16,
    pub dport: u16,
    /// IP protocol (IPv6: the first next header).
    pub proto: u8,
    /// 4 or 6; 0: not IP (then only `verdict` and `ifindex` mean anything).
    pub family: u8,
    /// `FLOW_HOOK_*`.
    pub hook: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The service frontend (`FLOW_FLAG_TRANSLATED`,
    /// `FLOW_FLAG_REPLY_TRANSLATED`).
    pub svc: Ip6,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
    /// Where the program found the IP header (internal to the programs).
    pub l3_offset: u32,
    pub svc_port: u16,
    /// The packet's [`Verdict`] number.
    pub verdict: u8,
    /// The node's [`TunnelMode`] number.
    pub mode: u8,
    /// `FLOW_FLAG_*`.
    pub flags: u8,
    /// [`Direction`] relative to the local endpoint (from_endpoint:
    /// egress; the others: ingress).
    pub direction: u8,
    pub _pad3: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 104);

/// Value of [`maps::FLOW_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    /// `FLOW_CONFIG_*`.
    pub flags: u32,
    pub _pad: u32,
    /// A forwarded flow is reported on its first packet and then at most
    /// once per this many nanoseconds (with what it carried meanwhile);
    /// 0: every packet.
    pub trace_interval_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FlowConfig>() == 16);

/// Emit events for drops and policy audits.
pub const FLOW_CONFIG_DROPS: u32 = 1;
/// Emit (aggregated) trace events for forwarded traffic.
pub const FLOW_CONFIG_TRACES: u32 = 2;

/// Packets and bytes, one per CPU per (direction, verdict).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: all of them are repr(C), Copy, have no implicit padding (explicit
// pad fields, size asserted) and every bit pattern is valid.
mod pod {
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IpCacheValue {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::LbServiceKey {}
    unsafe impl aya::Pod for super::LbServiceValue {}
    unsafe impl aya::Pod for super::LbBackendKey {}
    unsafe impl aya::Pod for super::LbBackendValue {}
    unsafe impl aya::Pod for super::LbFlowKey {}
    unsafe impl aya::Pod for super::LbAddr {}
    unsafe impl aya::Pod for super::Lb6ServiceKey {}
    unsafe impl aya::Pod for super::Lb6ServiceValue {}
    unsafe impl aya::Pod for super::Lb6BackendKey {}
    unsafe impl aya::Pod for super::Lb6FlowKey {}
    unsafe impl aya::Pod for super::Lb6Addr {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::PolicyState {}
    unsafe impl aya::Pod for super::PolicyCtKey {}
    unsafe impl aya::Pod for super::PolicyStatsKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowAgg {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::FlowConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_are_distinct_and_drops_are_drops() {
        for (i, a) in Verdict::ALL.iter().enumerate() {
            for b in &Verdict::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert_ne!(*a as u8, *b as u8);
            }
            assert_eq!(a.is_drop(), a.name().starts_with("drop_"), "{a:?}");
        }
    }

    #[test]
    fn metric_indexes_are_distinct_and_in_range() {
        let mut seen = [false; METRICS_ENTRIES as usize];
        for dir in [Direction::Egress, Direction::Ingress] {
            for v in Verdict::ALL {
                let i = metric_index(dir, v);
                assert!(i < METRICS_ENTRIES);
                assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }
    }
}
