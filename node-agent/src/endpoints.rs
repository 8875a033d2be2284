//! The local endpoints: the pods on this node, from the CNI plugin's
//! endpoint files (`--endpoint-dir`) and the static `--endpoint` flags, to
//! the registration (which gets them identities from the apiserver) and to
//! `CM_ENDPOINTS` (through [`EndpointMap`]).
//!
//! ```text
//! endpoint dir (poll) ─> attach from_endpoint on the pod's veth ─> specs ─> registration
//!                                                                   identities <─┘
//! attached pods + identities ─> desired LocalEndpoints ─> EndpointMap (diff)
//! ```
//!
//! A pod whose identity is not known yet keeps the entry a previous agent
//! left (adopted), so a restart never interrupts delivery; a pod whose file
//! is gone is removed at once.
//!
//! Fail closed from the first packet: the CNI plugin leaves a new pod's
//! host veth down and waits. Once `from_endpoint` is attached and the pod's
//! `CM_ENDPOINTS` entry is written and, with a control plane, once it has
//! applied the pod's network policy (the pod's record came back from the
//! local cluster and went through a reconcile), [`CniEndpoints::mark_ready`]
//! sets the veth up and writes the readiness marker the plugin waits for
//! (`clustermesh_api::endpoint_file::write_ready`).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use clustermesh_api::endpoint_file::{EndpointFile, read_endpoint_dir};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::Datapath,
    desired::{LocalEndpoint, LocalEndpoints},
    reconcilers::{Reconciler, apply_isolated, endpoints::EndpointMap},
    registration::EndpointSpec,
};

/// How often the endpoint directory is read.
pub const POLL: Duration = Duration::from_millis(200);

/// Host side of an attached interface: (ifindex, MAC).
pub type HostIfaces = BTreeMap<String, (u32, [u8; 6])>;

/// Pods the CNI plugin attached, by container id.
#[derive(Debug, Default)]
pub struct CniEndpoints {
    known: BTreeMap<String, EndpointFile>,
    /// Container ids whose readiness marker names their current veth.
    ready: std::collections::BTreeSet<String>,
}

impl CniEndpoints {
    /// Reads the directory and applies what changed: new pods get
    /// `from_endpoint` attached (or adopted) on their host veth; removed
    /// ones leave `ifaces`. Returns whether the set changed.
    pub fn poll(
        &mut self,
        dir: &std::path::Path,
        dp: &mut Datapath,
        netns: Option<&str>,
        ifaces: &mut HostIfaces,
    ) -> bool {
        let (files, errors) = read_endpoint_dir(dir);
        for (path, e) in errors {
            tracing::warn!(path = %path.display(), error = %e, "ignoring endpoint file");
        }
        let now: BTreeMap<_, _> = files
            .into_iter()
            .map(|f| (f.container_id.clone(), f))
            .collect();
        let before = self.known.len();
        self.known.retain(|id, f| {
            let keep = now.contains_key(id);
            if !keep {
                ifaces.remove(&f.host_iface);
                self.ready.remove(id);
                tracing::info!(container = %id, ips = ?ips(f), "pod detached");
            }
            keep
        });
        let mut changed = self.known.len() != before;
        for (id, f) in now {
            if self.known.get(&id) == Some(&f) {
                continue;
            }
            let iface = f.host_iface.clone();
            match clustermesh_api::netns::run_in_named(netns, || dp.attach_endpoint(&iface)) {
                Ok(Ok(how)) => {
                    tracing::info!(container = %id, ips = ?ips(&f), iface = %iface, ?how, "pod attached");
                    ifaces.insert(iface, (f.host_ifindex, f.host_mac.0));
                    self.known.insert(id, f);
                    changed = true;
                }
                // Retried on the next poll (the veth may be mid-creation).
                Ok(Err(e)) => tracing::warn!(container = %id, error = %e, "attaching pod"),
                Err(e) => tracing::warn!(container = %id, error = %e, "attaching pod"),
            }
        }
        changed
    }

    /// Sets up the host veth of every pod whose endpoint entry is in
    /// `applied` and writes its readiness marker, once per veth. A failure
    /// is logged and retried on the next call (the plugin keeps waiting).
    /// With `policy_ready` (a control plane runs), also only once the
    /// control plane has applied the pod's network policy (every address
    /// of the pod in it): until then the pod stays down, so a new pod of a
    /// default-deny identity never has a moment without its policy.
    pub fn mark_ready(
        &mut self,
        dir: &std::path::Path,
        netns: Option<&str>,
        applied: &LocalEndpoints,
        policy_ready: Option<&std::collections::BTreeSet<std::net::IpAddr>>,
    ) {
        use clustermesh_api::endpoint_file::{read_ready, write_ready};
        for (id, f) in &self.known {
            // Ready once every address of the pod (both families of a
            // dual-stack pod) has its entry for this veth.
            let applied_all = f.ips().all(|ip| {
                applied.get(&ip).map(|e| e.host_ifindex) == Some(f.host_ifindex)
                    && policy_ready.is_none_or(|r| r.contains(&ip))
            });
            if self.ready.contains(id) || !applied_all {
                continue;
            }
            if read_ready(dir, id) != Some(f.host_ifindex) {
                let up =
                    clustermesh_api::netns::run_in_named(netns, || set_link_up(f.host_ifindex))
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = up {
                    tracing::warn!(container = %id, iface = %f.host_iface, error = %e, "setting the pod's veth up");
                    continue;
                }
                if let Err(e) = write_ready(dir, id, f.host_ifindex) {
                    tracing::warn!(container = %id, error = %e, "writing the pod's readiness marker");
                    continue;
                }
                tracing::info!(container = %id, ips = ?ips(f), iface = %f.host_iface, "pod ready");
            }
            self.ready.insert(id.clone());
        }
    }

    /// The pods as registration specs: one per address (a dual-stack pod
    /// is two endpoints of one identity, as in the ip-cache).
    pub fn specs(&self) -> impl Iterator<Item = EndpointSpec> + '_ {
        self.known
            .values()
            .flat_map(|f| f.ips().map(move |ip| (f, ip)))
            .map(|(f, ip)| EndpointSpec {
                ip: ip.to_string(),
                namespace: f.namespace.clone().unwrap_or_default(),
                name: f.name.clone().unwrap_or_else(|| f.container_id.clone()),
                iface: Some(f.host_iface.clone()),
                mac: Some(f.mac.0),
                labels: if f.labels.is_empty() {
                    // An identity needs at least one label.
                    [("cni:container".to_owned(), "unlabelled".to_owned())].into()
                } else {
                    f.labels.clone().into_iter().collect()
                },
            })
    }
}

/// A pod's addresses, for logs.
fn ips(f: &EndpointFile) -> Vec<IpAddr> {
    f.ips().collect()
}

/// Sets link `ifindex` up, in the calling thread's network namespace.
fn set_link_up(ifindex: u32) -> std::io::Result<()> {
    use rtnetlink::LinkUnspec;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await
            .map_err(|e| std::io::Error::other(format!("setting link {ifindex} up: {e}")));
        task.abort();
        r
    })
}

/// The desired local endpoints: every spec with a veth, a MAC and an
/// attached interface; its identity from `ids`, else what `adopted` holds.
pub fn desired(
    specs: &[EndpointSpec],
    ifaces: &HostIfaces,
    ids: &[(String, u32)],
    adopted: &LocalEndpoints,
) -> LocalEndpoints {
    let mut out = LocalEndpoints::new();
    for spec in specs {
        let (Some(iface), Some(mac), Ok(ip)) = (&spec.iface, spec.mac, spec.ip.parse::<IpAddr>())
        else {
            continue;
        };
        let Some((host_ifindex, host_mac)) = ifaces.get(iface) else {
            continue;
        };
        let identity = ids.iter().find(|(i, _)| *i == spec.ip).map(|(_, id)| *id);
        let entry = match (identity, adopted.get(&ip)) {
            (Some(identity), _) => LocalEndpoint {
                host_ifindex: *host_ifindex,
                host_mac: *host_mac,
                mac,
                identity,
            },
            (None, Some(old)) => *old,
            (None, None) => continue,
        };
        out.insert(ip, entry);
    }
    out
}

/// What the endpoint task works with.
pub struct EndpointSource {
    pub dp: Datapath,
    pub map: EndpointMap,
    /// The static `--endpoint` flags.
    pub static_specs: Vec<EndpointSpec>,
    pub endpoint_dir: Option<PathBuf>,
    pub netns: Option<String>,
    /// Interfaces attached at start (`--endpoint-iface`).
    pub ifaces: HostIfaces,
    /// The control plane's endpoints with their policy applied
    /// (`clusters::Agent::policy_ready`); None: no control plane, no wait.
    pub policy_ready: Option<watch::Receiver<std::collections::BTreeSet<IpAddr>>>,
}

impl EndpointSource {
    /// Reads the pods present now and removes the map entries of pods
    /// deleted while no agent ran (the live ones stay untouched, so traffic
    /// never pauses). Returns the specs to register.
    pub fn start(&mut self, cni: &mut CniEndpoints) -> Vec<EndpointSpec> {
        if let Some(dir) = &self.endpoint_dir {
            cni.poll(dir, &mut self.dp, self.netns.as_deref(), &mut self.ifaces);
        }
        let specs: Vec<EndpointSpec> = self
            .static_specs
            .iter()
            .cloned()
            .chain(cni.specs())
            .collect();
        if self.endpoint_dir.is_some() {
            let live: Vec<&str> = specs.iter().map(|e| e.ip.as_str()).collect();
            match self
                .map
                .retain(|ip| live.contains(&ip.to_string().as_str()))
            {
                Ok(gone) => {
                    for ip in gone {
                        tracing::info!(%ip, "removed stale endpoint");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "removing stale endpoints"),
            }
        }
        specs
    }

    /// Follows the endpoint directory and the identities until cancelled.
    pub async fn run(
        mut self,
        mut cni: CniEndpoints,
        mut specs: Vec<EndpointSpec>,
        specs_tx: watch::Sender<Vec<EndpointSpec>>,
        mut ids_rx: watch::Receiver<Vec<(String, u32)>>,
        cancel: CancellationToken,
    ) {
        let mut last = self.map.snapshot().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the endpoint map; rewriting it");
            LocalEndpoints::new()
        });
        let adopted = last.clone();
        let mut ids: Vec<(String, u32)> = Vec::new();
        let mut tick = tokio::time::interval(POLL);
        let mut ids_open = true;
        let mut policy_rx = self.policy_ready.take();
        let mut policy_open = policy_rx.is_some();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick(), if self.endpoint_dir.is_some() => {
                    let Some(dir) = &self.endpoint_dir else { continue };
                    if !cni.poll(dir, &mut self.dp, self.netns.as_deref(), &mut self.ifaces) {
                        continue;
                    }
                    specs = self.static_specs.iter().cloned().chain(cni.specs()).collect();
                    specs_tx.send_replace(specs.clone());
                }
                r = ids_rx.changed(), if ids_open => {
                    if r.is_err() {
                        ids_open = false;
                        continue;
                    }
                    ids = ids_rx.borrow_and_update().clone();
                    for (ip, id) in &ids {
                        println!("endpoint {ip} has identity {id}");
                    }
                }
                r = async {
                    match policy_rx.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                }, if policy_open => {
                    // Closed: the control plane stopped; the last set stays.
                    policy_open = r.is_ok();
                }
            }
            let want = desired(&specs, &self.ifaces, &ids, &adopted);
            // A refused entry is retried on the next change or poll (the
            // diff is from what was applied); the others apply now.
            let mut failures = Vec::new();
            last = apply_isolated(&mut self.map, &last, &want, true, &mut failures);
            for f in failures {
                tracing::warn!(key = %f.key, error = %f.error, "updating the endpoint map");
            }
            if let Some(dir) = &self.endpoint_dir {
                let ready = policy_rx.as_mut().map(|r| r.borrow_and_update().clone());
                cni.mark_ready(dir, self.netns.as_deref(), &last, ready.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(ip: &str, iface: &str) -> EndpointSpec {
        EndpointSpec {
            ip: ip.into(),
            namespace: String::new(),
            name: ip.into(),
            iface: Some(iface.into()),
            mac: Some([2; 6]),
            labels: Default::default(),
        }
    }

    #[test]
    fn identities_make_endpoints_deliverable_and_adopted_ones_stay() {
        let ifaces: HostIfaces =
            [("lxc1".into(), (7, [1; 6])), ("lxc2".into(), (8, [1; 6]))].into();
        let specs = [
            spec("10.0.0.1", "lxc1"),
            spec("10.0.0.2", "lxc2"),
            spec("10.0.0.3", "gone"),
        ];
        let old = LocalEndpoint {
            host_ifindex: 8,
            host_mac: [1; 6],
            mac: [2; 6],
            identity: 99,
        };
        let adopted: LocalEndpoints = [("10.0.0.2".parse().unwrap(), old)].into();
        // No identity yet: only the adopted entry.
        let d = desired(&specs, &ifaces, &[], &adopted);
        assert_eq!(d.len(), 1);
        assert_eq!(d[&"10.0.0.2".parse::<IpAddr>().unwrap()].identity, 99);
        // Identities known: both attached pods, never the one without a veth.
        let ids = [
            ("10.0.0.1".to_owned(), 5),
            ("10.0.0.2".to_owned(), 6),
            ("10.0.0.3".to_owned(), 7),
        ];
        let d = desired(&specs, &ifaces, &ids, &adopted);
        assert_eq!(d.len(), 2);
        assert_eq!(d[&"10.0.0.1".parse::<IpAddr>().unwrap()].host_ifindex, 7);
        assert_eq!(d[&"10.0.0.2".parse::<IpAddr>().unwrap()].identity, 6);
    }
}
