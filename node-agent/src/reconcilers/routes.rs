//! Direct routing: kernel routes to remote pod CIDRs via their nodes,
//! installed over netlink (rtnetlink; no `ip` commands).
//!
//! Every route we install carries the routing protocol [`RTPROT_CLUSTERMESH`]
//! (shown by `ip route` as `proto 222`), which is how prune tells ours from
//! the routes of anyone else and never touches the latter. Routes are
//! written with NLM_F_REPLACE, so re-applying a desired state (agent
//! restart, a node's IP changing) is atomic per route: no moment without one.
//!
//! Netlink sockets belong to the network namespace they are created in, so
//! the table runs its own thread (entered into the node's namespace when one
//! is given) with a small runtime, and callers talk to it synchronously.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::mpsc,
};

use clustermesh_api::IpCidr;
use futures_util::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
};

use super::{ReconcileError, Reconciler};
use crate::desired::TunnelEntry;

/// The routing protocol number marking our routes (`ip route ... proto 222`).
pub const RTPROT_CLUSTERMESH: u8 = 222;

enum Op {
    Replace(Ipv4Addr, u8, Ipv4Addr),
    Delete(Ipv4Addr, u8),
    /// Every route of ours: (prefix, length, gateway).
    List,
}

/// What the route thread reports.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the route thread ended")]
    Gone,
    #[error(transparent)]
    Netns(#[from] clustermesh_api::netns::Error),
    #[error(transparent)]
    Iface(#[from] crate::datapath::Error),
    #[error("netlink: {0}")]
    Io(#[source] std::io::Error),
}

type Reply = Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>, RouteError>;

/// The node's routes to remote pod CIDRs through `dev`.
pub struct RouteTable {
    tx: mpsc::Sender<(Op, mpsc::Sender<Reply>)>,
}

fn rerr(e: impl Into<super::BoxError>) -> ReconcileError {
    ReconcileError::new("routes", e)
}

impl RouteTable {
    /// Opens the table for routes out of interface `dev` in network
    /// namespace `netns` (a path such as `/var/run/netns/NAME`; None: the
    /// caller's own).
    pub fn open(netns: Option<&std::path::Path>, dev: &str) -> Result<Self, ReconcileError> {
        let (tx, rx) = mpsc::channel::<(Op, mpsc::Sender<Reply>)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), RouteError>>();
        let netns = netns.map(std::path::Path::to_owned);
        let dev = dev.to_owned();
        std::thread::Builder::new()
            .name("routes".into())
            .spawn(move || {
                let setup =
                    || -> Result<(tokio::runtime::Runtime, rtnetlink::Handle, u32), RouteError> {
                        if let Some(ns) = &netns {
                            // This thread lives in the namespace for good.
                            clustermesh_api::netns::enter(&clustermesh_api::netns::open(ns)?)?;
                        }
                        let ifindex = crate::datapath::ifindex(&dev)?;
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_io()
                            .build()
                            .map_err(RouteError::Io)?;
                        let handle = rt.block_on(async {
                            let (conn, handle, _) =
                                rtnetlink::new_connection().map_err(RouteError::Io)?;
                            tokio::spawn(conn);
                            Ok::<_, RouteError>(handle)
                        })?;
                        Ok((rt, handle, ifindex))
                    };
                let (rt, handle, ifindex) = match setup() {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok((op, reply)) = rx.recv() {
                    let r = rt.block_on(serve(&handle, ifindex, op));
                    let _ = reply.send(r);
                }
            })
            .map_err(rerr)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { tx }),
            Ok(Err(e)) => Err(rerr(e)),
            Err(_) => Err(rerr(RouteError::Gone)),
        }
    }

    fn call(&self, op: Op) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.tx.send((op, tx)).map_err(|_| RouteError::Gone)?;
        rx.recv().map_err(|_| RouteError::Gone)?
    }

    /// Our routes now in the kernel: (destination, gateway).
    pub fn list(&self) -> Result<BTreeMap<IpCidr, Option<Ipv4Addr>>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (addr, len, gw) in self.call(Op::List).map_err(rerr)? {
            if let Ok(c) = IpCidr::new(IpAddr::V4(addr), len) {
                out.insert(c, gw);
            }
        }
        Ok(out)
    }
}

fn route(addr: Ipv4Addr, len: u8) -> RouteMessageBuilder<Ipv4Addr> {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(addr, len)
        .protocol(RouteProtocol::Other(RTPROT_CLUSTERMESH))
}

async fn serve(handle: &rtnetlink::Handle, ifindex: u32, op: Op) -> Reply {
    match op {
        Op::Replace(addr, len, gw) => {
            let msg = route(addr, len)
                .gateway(gw)
                .output_interface(ifindex)
                .build();
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|source| RouteError::Netlink {
                    what: format!("route {addr}/{len} via {gw}"),
                    source,
                })?;
            Ok(Vec::new())
        }
        Op::Delete(addr, len) => {
            let msg = route(addr, len).build();
            match handle.route().del(msg).execute().await {
                Ok(()) => Ok(Vec::new()),
                // Already gone (ESRCH): what we wanted.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {
                    Ok(Vec::new())
                }
                Err(source) => Err(RouteError::Netlink {
                    what: format!("deleting route {addr}/{len}"),
                    source,
                }),
            }
        }
        Op::List => {
            let mut out = Vec::new();
            let mut s = handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            while let Some(m) = s.try_next().await.map_err(|source| RouteError::Netlink {
                what: "listing routes".into(),
                source,
            })? {
                if let Some(r) = ours(&m) {
                    out.push(r);
                }
            }
            Ok(out)
        }
    }
}

fn ours(m: &RouteMessage) -> Option<(Ipv4Addr, u8, Option<Ipv4Addr>)> {
    if m.header.protocol != RouteProtocol::Other(RTPROT_CLUSTERMESH) {
        return None;
    }
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
            _ => {}
        }
    }
    Some((dst?, m.header.destination_prefix_length, gw))
}

fn v4(c: &IpCidr) -> Option<Ipv4Addr> {
    match c.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

impl Reconciler<IpCidr, TunnelEntry> for RouteTable {
    fn name(&self) -> &'static str {
        "routes"
    }
    fn update(&mut self, k: &IpCidr, v: &TunnelEntry) -> Result<(), ReconcileError> {
        let (Some(addr), IpAddr::V4(gw)) = (v4(k), v.node_ip) else {
            return Ok(());
        };
        self.call(Op::Replace(addr, k.prefix_len(), gw))
            .map(drop)
            .map_err(rerr)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        let Some(addr) = v4(k) else { return Ok(()) };
        self.call(Op::Delete(addr, k.prefix_len()))
            .map(drop)
            .map_err(rerr)
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, TunnelEntry>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for c in self.list()?.keys() {
            if !desired.contains_key(c) {
                self.delete(c)?;
                n += 1;
            }
        }
        Ok(n)
    }
    /// Empty: routes do not record which node or cluster they are for, so
    /// the first diff after a restart re-applies every desired route (an
    /// in-place replace, no gap) and prune removes the rest.
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, TunnelEntry>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

/// Direct routing's tunnel target: the kernel route first, then the eBPF
/// map entry that makes `from_endpoint` use it (and in reverse on removal,
/// so the program never redirects to a route that is not there).
pub struct RoutedTunnels<M> {
    pub map: M,
    pub routes: RouteTable,
}

impl<M: Reconciler<IpCidr, TunnelEntry>> Reconciler<IpCidr, TunnelEntry> for RoutedTunnels<M> {
    fn name(&self) -> &'static str {
        "tunnels+routes"
    }
    fn update(&mut self, k: &IpCidr, v: &TunnelEntry) -> Result<(), ReconcileError> {
        self.routes.update(k, v)?;
        self.map.update(k, v)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.map.delete(k)?;
        self.routes.delete(k)
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, TunnelEntry>) -> Result<usize, ReconcileError> {
        let n = self.map.prune(desired)?;
        Ok(n + self.routes.prune(desired)?)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, TunnelEntry>, ReconcileError> {
        // Only what both hold counts as applied.
        let routes = self.routes.list()?;
        let mut s = self.map.snapshot()?;
        s.retain(|k, _| routes.contains_key(k));
        Ok(s)
    }
}
