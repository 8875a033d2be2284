//! Direct routing: kernel routes to remote pod CIDRs via their nodes,
//! installed over netlink (rtnetlink; no `ip` commands), for both address
//! families. A range's gateway is the node's underlay address of the same
//! family when it has one (the merge picks it); an IPv4 range via an IPv6
//! gateway is written with `RTA_VIA`; an IPv6 range via an IPv4 gateway
//! cannot be expressed and is refused (a reconcile error naming the route).
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

use std::{collections::BTreeMap, net::IpAddr, sync::mpsc};

use clustermesh_api::IpCidr;
use futures_util::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteVia},
};

use super::{ReconcileError, Reconciler};
use crate::desired::TunnelEntry;

/// The routing protocol number marking our routes (`ip route ... proto 222`).
pub const RTPROT_CLUSTERMESH: u8 = 222;

enum Op {
    Replace(IpCidr, IpAddr),
    Delete(IpCidr),
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
    #[error("route {0}: {1}")]
    Invalid(String, String),
}

type Reply = Result<Vec<(IpAddr, u8, Option<IpAddr>)>, RouteError>;

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
    pub fn list(&self) -> Result<BTreeMap<IpCidr, Option<IpAddr>>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (addr, len, gw) in self.call(Op::List).map_err(rerr)? {
            if let Ok(c) = IpCidr::new(addr, len) {
                out.insert(c, gw);
            }
        }
        Ok(out)
    }
}

fn route(c: &IpCidr) -> Result<RouteMessageBuilder<IpAddr>, RouteError> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(c.addr(), c.prefix_len())
        .map_err(|e| RouteError::Invalid(c.to_string(), e.to_string()))?
        .protocol(RouteProtocol::Other(RTPROT_CLUSTERMESH)))
}

async fn serve(handle: &rtnetlink::Handle, ifindex: u32, op: Op) -> Reply {
    match op {
        Op::Replace(c, gw) => {
            let msg = route(&c)?
                .gateway(gw)
                .map_err(|e| RouteError::Invalid(format!("{c} via {gw}"), e.to_string()))?
                .output_interface(ifindex)
                .build();
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|source| RouteError::Netlink {
                    what: format!("route {c} via {gw}"),
                    source,
                })?;
            Ok(Vec::new())
        }
        Op::Delete(c) => {
            let msg = route(&c)?.build();
            match handle.route().del(msg).execute().await {
                Ok(()) => Ok(Vec::new()),
                // Already gone (ESRCH): what we wanted.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {
                    Ok(Vec::new())
                }
                Err(source) => Err(RouteError::Netlink {
                    what: format!("deleting route {c}"),
                    source,
                }),
            }
        }
        Op::List => {
            let mut out = Vec::new();
            let mut s = handle
                .route()
                // No address family: both are dumped.
                .get(RouteMessageBuilder::<IpAddr>::new().build())
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

fn ours(m: &RouteMessage) -> Option<(IpAddr, u8, Option<IpAddr>)> {
    if m.header.protocol != RouteProtocol::Other(RTPROT_CLUSTERMESH) {
        return None;
    }
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(IpAddr::V4(*d)),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = Some(IpAddr::V6(*d)),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
            _ => {}
        }
    }
    Some((dst?, m.header.destination_prefix_length, gw))
}

impl Reconciler<IpCidr, TunnelEntry> for RouteTable {
    fn name(&self) -> &'static str {
        "routes"
    }
    fn update(&mut self, k: &IpCidr, v: &TunnelEntry) -> Result<(), ReconcileError> {
        self.call(Op::Replace(*k, v.node_ip))
            .map(drop)
            .map_err(rerr)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.call(Op::Delete(*k)).map(drop).map_err(rerr)
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
