//! The CNI commands: environment and stdin in, result or error out.
//!
//! [`run`] is the whole plugin minus process plumbing, so tests can drive
//! it with a map for the environment. The order of an ADD is: addresses,
//! one per family (own leases or delegated IPAM), veth pair (host side down), pod namespace
//! setup, endpoint file, wait for the node agent's readiness marker (it has
//! attached `from_endpoint`, written the pod's endpoint entry and set the
//! host veth up: fail closed from the first packet; `readyTimeoutSeconds`),
//! result. The endpoint file is written last, so the node agent only sees
//! complete attachments; when any step fails (the agent not ready in time
//! included), everything the earlier steps created is removed before the
//! error is returned.
//!
//! DEL removes what exists and succeeds for what does not (an unknown
//! container, a namespace already gone, a repeated DEL), as the spec asks.

use std::{
    fs::{self, File},
    io::{self, Read},
    mem::MaybeUninit,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
};

use serde_json::Value;

use crate::{
    config::{self, CniVersion, Config, Ipam},
    delegate::Delegate,
    endpoint::{self, EndpointFile, MacAddr},
    env::{Command, Env},
    error::Error,
    ipam::{PodIps, Pools, Store},
    link::{self, Netlink, host_iface_name, in_netns},
    result::{self, Attachment},
};

/// What the process should print and exit with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// JSON for stdout, if anything is to be printed.
    pub stdout: Option<String>,
    /// 0 on success, 1 on error (with a CNI error on stdout).
    pub exit_code: u8,
}

/// Runs one plugin invocation. `lookup` reads environment variables;
/// `stdin` is read to the end unless the command is VERSION.
pub fn run(lookup: impl Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let env = Env::from_lookup(lookup);
    if let Ok(env) = &env
        && env.command == Command::Version
    {
        return success(Some(result::version_result()));
    }
    let mut input = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut input) {
        return failure(CniVersion::LATEST, &Error::Stdin(e));
    }
    let version = config::requested_version(&input).unwrap_or(CniVersion::LATEST);
    match env
        .map_err(Error::from)
        .and_then(|env| dispatch(&env, &input))
    {
        Ok(out) => success(out),
        Err(e) => failure(version, &e),
    }
}

fn success(out: Option<Value>) -> Outcome {
    Outcome {
        stdout: out.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        exit_code: 0,
    }
}

fn failure(version: CniVersion, e: &Error) -> Outcome {
    let v = result::error_result(version, e.code(), &e.to_string(), &e.details());
    Outcome {
        stdout: Some(serde_json::to_string_pretty(&v).unwrap_or_default()),
        exit_code: 1,
    }
}

fn dispatch(env: &Env, stdin: &[u8]) -> Result<Option<Value>, Error> {
    let cfg = Config::parse(stdin)?;
    match env.command {
        Command::Version => Ok(Some(result::version_result())),
        Command::Add => add(&cfg, env, stdin).map(Some),
        Command::Del => del(&cfg, env, stdin).map(|()| None),
        Command::Check => check(&cfg, env, stdin).map(|()| None),
        // Nothing to report: the plugin has no daemon to be unavailable and
        // cleans up on DEL. GC is answered as a no-op.
        Command::Status | Command::Gc => {
            if cfg.version.has_status_and_gc() {
                Ok(None)
            } else {
                Err(Error::CommandVersion {
                    command: env.command,
                    version: cfg.version,
                })
            }
        }
    }
}

/// Who hands out addresses for this network.
enum Allocator {
    Own(Store, Pools),
    Delegated(Delegate),
}

impl Allocator {
    fn new(cfg: &Config, env: &Env) -> Result<Self, Error> {
        Ok(match &cfg.ipam {
            Ipam::Own(pools) => Self::Own(Store::new(&cfg.endpoint_dir), *pools),
            Ipam::Delegate { plugin } => Self::Delegated(Delegate::find(plugin, env.path()?)?),
        })
    }
}

/// Opens `CNI_NETNS`, refusing anything but another network namespace.
fn open_netns(path: &str) -> Result<File, Error> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            Error::NetnsMissing {
                path: path.to_owned(),
                source,
            }
        } else {
            Error::NetnsOpen {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    if !is_nsfs(&file) {
        return Err(Error::NetnsNotNamespace {
            path: path.to_owned(),
        });
    }
    let open_err = |source| Error::NetnsOpen {
        path: path.to_owned(),
        source,
    };
    let theirs = file.metadata().map_err(open_err)?;
    let ours = fs::metadata("/proc/thread-self/ns/net").map_err(open_err)?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(Error::NetnsIsOwn {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Whether `file` lives on nsfs (a namespace handle).
fn is_nsfs(file: &File) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid fd and a buffer of the right type; fstatfs fills it
    // on success, and it is read only then.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    magic == NSFS_MAGIC
}

/// What an ADD created so far, to undo on failure.
#[derive(Default)]
struct Undo {
    own_lease: bool,
    delegated_lease: bool,
    host_link: Option<u32>,
    endpoint_file: bool,
}

impl Undo {
    /// Best effort: failures are reported on stderr (the runtime's log),
    /// the original error is what the runtime gets.
    fn run(self, steps: &AddSteps<'_>) {
        if self.endpoint_file {
            if let Err(e) = endpoint::remove(&steps.cfg.endpoint_dir, steps.cid) {
                eprintln!("clustermesh-cni: cleanup: removing the endpoint file: {e}");
            }
            let _ = endpoint::remove_ready(&steps.cfg.endpoint_dir, steps.cid);
        }
        if let Some(index) = self.host_link
            && let Err(e) = steps.nl.delete_link(index)
        {
            eprintln!("clustermesh-cni: cleanup: deleting host veth {index}: {e}");
        }
        match steps.allocator {
            Allocator::Own(store, _) if self.own_lease => {
                if let Err(e) = store.release(steps.cid, steps.ifname) {
                    eprintln!("clustermesh-cni: cleanup: releasing the addresses: {e}");
                }
            }
            Allocator::Delegated(d) if self.delegated_lease => {
                if let Err(e) = d.del(steps.stdin) {
                    eprintln!("clustermesh-cni: cleanup: releasing the delegated address: {e}");
                }
            }
            _ => {}
        }
    }
}

fn add(cfg: &Config, env: &Env, stdin: &[u8]) -> Result<Value, Error> {
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let allocator = Allocator::new(cfg, env)?;
    let netns = open_netns(netns_path)?;
    if let Some(ep) = endpoint::read(&cfg.endpoint_dir, cid)?
        && ep.ifname != ifname
    {
        return Err(Error::AttachmentExists {
            container_id: cid.to_owned(),
            existing: ep.ifname,
        });
    }
    let nl = Netlink::connect()?;
    let host_name = host_iface_name(cid);
    if let Some(old) = nl.link_by_name(&host_name)? {
        if old.alias.as_deref() != Some(cid) {
            return Err(Error::HostNameTaken {
                name: host_name,
                owner: old.alias,
                container_id: cid.to_owned(),
            });
        }
        // Left by an earlier ADD of this container: start again.
        nl.delete_link(old.index)?;
    }
    let mut undo = Undo::default();
    let steps = AddSteps {
        cfg,
        env,
        stdin,
        cid,
        ifname,
        netns_path,
        netns: &netns,
        nl: &nl,
        allocator: &allocator,
        host_name: &host_name,
    };
    match steps.run(&mut undo) {
        Ok(v) => Ok(v),
        Err(e) => {
            undo.run(&steps);
            Err(e)
        }
    }
}

struct AddSteps<'a> {
    cfg: &'a Config,
    env: &'a Env,
    stdin: &'a [u8],
    cid: &'a str,
    ifname: &'a str,
    netns_path: &'a str,
    netns: &'a File,
    nl: &'a Netlink,
    allocator: &'a Allocator,
    host_name: &'a str,
}

impl AddSteps<'_> {
    fn run(&self, undo: &mut Undo) -> Result<Value, Error> {
        let cfg = self.cfg;
        let (ips, dns) = match self.allocator {
            Allocator::Delegated(d) => {
                // Armed first: a failed IPAM ADD is undone by an IPAM DEL.
                undo.delegated_lease = true;
                let a = d.add(self.stdin)?;
                (a.ips, a.dns)
            }
            Allocator::Own(store, pools) => {
                let ips = store.allocate_pools(*pools, self.cid, self.ifname)?;
                undo.own_lease = true;
                (ips, None)
            }
        };
        // Fail closed: the host side stays down until the agent has
        // attached `from_endpoint` (unless readyTimeoutSeconds is 0).
        let wait = !cfg.ready_timeout.is_zero();
        let host = self.nl.create_veth(
            self.host_name,
            self.ifname,
            self.netns,
            cfg.mtu,
            self.cid,
            !wait,
        )?;
        undo.host_link = Some(host.index);
        let host_mac = host.mac()?;
        let (ifname, mtu) = (self.ifname, cfg.mtu);
        let mac = in_netns(self.netns, move || {
            Netlink::connect()?.configure_pod(ifname, ips, mtu, host_mac)
        })?;
        let ep = EndpointFile {
            container_id: self.cid.to_owned(),
            ifname: self.ifname.to_owned(),
            netns: self.netns_path.to_owned(),
            ip: ips.v4,
            ipv6: ips.v6,
            host_iface: self.host_name.to_owned(),
            host_ifindex: host.index,
            host_mac,
            mac,
            // A named pod without a namespace (podman passes a name only)
            // is in "default", as Kubernetes would place it.
            namespace: self
                .env
                .args
                .pod_namespace()
                .or_else(|| self.env.args.pod_name().map(|_| "default".to_owned())),
            name: self.env.args.pod_name(),
            labels: cfg.labels.clone(),
        };
        // A marker of an earlier attempt never counts (it names another
        // veth's ifindex anyway).
        let _ = endpoint::remove_ready(&cfg.endpoint_dir, self.cid);
        undo.endpoint_file = true;
        endpoint::write(&cfg.endpoint_dir, &ep)?;
        if wait {
            self.wait_ready(host.index)?;
        }
        Ok(result::add_result(
            cfg.version,
            &Attachment {
                host_iface: ep.host_iface,
                host_mac,
                ifname: ep.ifname,
                mac,
                netns: ep.netns,
                ips,
                mtu,
                dns,
            },
        ))
    }
}

impl AddSteps<'_> {
    /// Waits until the agent marks the pod ready for the veth this ADD made
    /// (module docs of `endpoint_file`), or fails after the timeout.
    fn wait_ready(&self, host_ifindex: u32) -> Result<(), Error> {
        let dir = &self.cfg.endpoint_dir;
        let deadline = std::time::Instant::now() + self.cfg.ready_timeout;
        loop {
            if endpoint::read_ready(dir, self.cid) == Some(host_ifindex) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::AgentNotReady {
                    container_id: self.cid.to_owned(),
                    host_iface: self.host_name.to_owned(),
                    endpoint_dir: dir.display().to_string(),
                    timeout_s: self.cfg.ready_timeout.as_secs(),
                });
            }
            // A file written by another process: polled (the plugin is a
            // short-lived process; inotify would add a dependency for a
            // wait of a few hundred milliseconds).
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn del(cfg: &Config, env: &Env, stdin: &[u8]) -> Result<(), Error> {
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let allocator = Allocator::new(cfg, env)?;
    let dir = &cfg.endpoint_dir;
    // An unreadable endpoint file is removed like a good one.
    let ep = endpoint::read(dir, cid).unwrap_or_else(|e| {
        eprintln!("clustermesh-cni: DEL: {e}; removing it");
        None
    });
    // The endpoint file and the host veth belong to the container's one
    // attachment; a DEL for another interface name leaves them alone.
    let ours = ep.as_ref().is_none_or(|ep| ep.ifname == ifname);
    if ours {
        let nl = Netlink::connect()?;
        if let Some(link) = nl.link_by_name(&host_iface_name(cid))?
            && link.alias.as_deref() == Some(cid)
        {
            // Deleting one end deletes the pair, the pod side included.
            nl.delete_link(link.index)?;
        }
    }
    match allocator {
        Allocator::Delegated(d) => d.del(stdin)?,
        Allocator::Own(store, _) => {
            store.release(cid, ifname)?;
        }
    }
    if ours {
        endpoint::remove(dir, cid)?;
        endpoint::remove_ready(dir, cid).map_err(|source| {
            Error::Endpoint(endpoint::EndpointError::Io {
                op: "removing",
                path: endpoint::ready_path(dir, cid),
                source,
            })
        })?;
    }
    Ok(())
}

/// How CHECK found an attachment different from what ADD set up.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the container's attachment is on {existing}, not {ifname}")]
    OtherInterface { ifname: String, existing: String },
    #[error("the endpoint file says netns {recorded}, CNI_NETNS is {given}")]
    NetnsChanged { recorded: String, given: String },
    #[error("prevResult has no IP {want}")]
    PrevResultIp { want: String },
    #[error("prevResult has no interface {ifname} in sandbox {netns}")]
    PrevResultInterface { ifname: String, netns: String },
    #[error("the address leases are {lease}, the endpoint has {ips}")]
    Lease { ips: PodIps, lease: PodIps },
    #[error("host veth {name} is missing")]
    HostLinkMissing { name: String },
    #[error("host veth {name} belongs to {alias:?}")]
    HostLinkForeign { name: String, alias: Option<String> },
    #[error("host veth {name} is {what}")]
    HostLinkChanged { name: String, what: String },
    #[error("interface {ifname} is missing in the pod namespace")]
    PodLinkMissing { ifname: String },
    #[error("pod interface {ifname} is {what}")]
    PodLinkChanged { ifname: String, what: String },
    #[error("pod interface {ifname} lacks address {address}")]
    PodAddressMissing { ifname: String, address: String },
    #[error("the pod has no permanent neighbour {gateway} -> {mac} on {ifname}")]
    NeighbourMissing {
        ifname: String,
        gateway: IpAddr,
        mac: MacAddr,
    },
    #[error("the pod has no default route via {gateway} dev {ifname}")]
    DefaultRouteMissing { ifname: String, gateway: IpAddr },
}

fn check(cfg: &Config, env: &Env, stdin: &[u8]) -> Result<(), Error> {
    if !cfg.version.has_check() {
        return Err(Error::CommandVersion {
            command: Command::Check,
            version: cfg.version,
        });
    }
    let cid = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let allocator = Allocator::new(cfg, env)?;
    let dir = &cfg.endpoint_dir;
    let ep = endpoint::read(dir, cid)?.ok_or_else(|| Error::ContainerUnknown {
        container_id: cid.to_owned(),
        path: endpoint::path_for(dir, cid).display().to_string(),
    })?;
    if ep.ifname != ifname {
        return Err(CheckError::OtherInterface {
            ifname: ifname.to_owned(),
            existing: ep.ifname,
        }
        .into());
    }
    if ep.netns != netns_path {
        return Err(CheckError::NetnsChanged {
            recorded: ep.netns,
            given: netns_path.to_owned(),
        }
        .into());
    }
    let ips = PodIps {
        v4: ep.ip,
        v6: ep.ipv6,
    };
    if let Some(prev) = &cfg.prev_result {
        check_prev_result(prev, ips, ifname, netns_path)?;
    }
    match &allocator {
        Allocator::Delegated(d) => d.check(stdin)?,
        Allocator::Own(store, _) => {
            let lease = store.lookup(cid, ifname)?;
            if lease != ips {
                return Err(CheckError::Lease { ips, lease }.into());
            }
        }
    }
    let netns = open_netns(netns_path)?;
    check_host(cfg, cid, &ep)?;
    let pod = in_netns(&netns, || Netlink::connect()?.pod_state(ifname))?;
    let pod = pod.ok_or_else(|| CheckError::PodLinkMissing {
        ifname: ifname.to_owned(),
    })?;
    check_pod(cfg, &ep, ips, &pod)
}

/// `prevResult` lists each of the pod's addresses and its interface.
fn check_prev_result(
    prev: &config::PrevResult,
    ips: PodIps,
    ifname: &str,
    netns_path: &str,
) -> Result<(), Error> {
    for ip in ips.iter() {
        let want = format!("{ip}/{}", prefix_len(ip));
        if !prev.ips.iter().any(|i| i.address == want) {
            return Err(CheckError::PrevResultIp { want }.into());
        }
    }
    let has_iface = prev
        .interfaces
        .iter()
        .any(|i| i.name == ifname && i.sandbox.as_deref().is_none_or(|s| s == netns_path));
    if !has_iface {
        return Err(CheckError::PrevResultInterface {
            ifname: ifname.to_owned(),
            netns: netns_path.to_owned(),
        }
        .into());
    }
    Ok(())
}

/// The pod's prefix length for `ip`'s family.
fn prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv6() { 128 } else { 32 }
}

/// The pod interface as ADD left it: up, MAC, MTU, and per family of `ips`
/// the address, the gateway's permanent neighbour and the default route.
fn check_pod(
    cfg: &Config,
    ep: &EndpointFile,
    ips: PodIps,
    pod: &link::PodState,
) -> Result<(), Error> {
    let ifname = ep.ifname.as_str();
    let changed = |what: String| CheckError::PodLinkChanged {
        ifname: ifname.to_owned(),
        what,
    };
    if !pod.link.up {
        return Err(changed("down".into()).into());
    }
    if pod.link.mac != Some(ep.mac) {
        return Err(changed(format!("{:?}, not MAC {}", pod.link.mac, ep.mac)).into());
    }
    if pod.link.mtu != Some(cfg.mtu) {
        return Err(changed(format!("MTU {:?}, not {}", pod.link.mtu, cfg.mtu)).into());
    }
    for ip in ips.iter() {
        let prefix = prefix_len(ip);
        if !pod.addrs.contains(&(ip, prefix)) {
            return Err(CheckError::PodAddressMissing {
                ifname: ifname.to_owned(),
                address: format!("{ip}/{prefix}"),
            }
            .into());
        }
    }
    for ip in ips.iter() {
        let v6 = ip.is_ipv6();
        let gateway = if v6 {
            IpAddr::V6(link::GATEWAY6)
        } else {
            IpAddr::V4(link::GATEWAY)
        };
        if pod.neighbour(v6) != Some(ep.host_mac) {
            return Err(CheckError::NeighbourMissing {
                ifname: ifname.to_owned(),
                gateway,
                mac: ep.host_mac,
            }
            .into());
        }
        if !pod.has_default_route(v6) {
            return Err(CheckError::DefaultRouteMissing {
                ifname: ifname.to_owned(),
                gateway,
            }
            .into());
        }
    }
    Ok(())
}

fn check_host(cfg: &Config, cid: &str, ep: &EndpointFile) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let name = &ep.host_iface;
    let host = nl
        .link_by_name(name)?
        .ok_or_else(|| CheckError::HostLinkMissing { name: name.clone() })?;
    if host.alias.as_deref() != Some(cid) {
        return Err(CheckError::HostLinkForeign {
            name: name.clone(),
            alias: host.alias,
        }
        .into());
    }
    let changed = |what: String| CheckError::HostLinkChanged {
        name: name.clone(),
        what,
    };
    if host.index != ep.host_ifindex {
        return Err(changed(format!("index {}, not {}", host.index, ep.host_ifindex)).into());
    }
    if host.mac != Some(ep.host_mac) {
        return Err(changed(format!("MAC {:?}, not {}", host.mac, ep.host_mac)).into());
    }
    if !host.up {
        return Err(changed("down".into()).into());
    }
    if host.mtu != Some(cfg.mtu) {
        return Err(changed(format!("MTU {:?}, not {}", host.mtu, cfg.mtu)).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::error::code;

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (Outcome, Value) {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let out = run(|k| vars.get(k).cloned(), &mut stdin.as_bytes());
        let json = out
            .stdout
            .as_deref()
            .map(|s| serde_json::from_str(s).expect("stdout is JSON"))
            .unwrap_or(Value::Null);
        (out, json)
    }

    fn config(version: &str, dir: &std::path::Path) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"mesh","type":"clustermesh-cni","podCIDR":"10.44.0.0/24","endpointDir":"{}"}}"#,
            dir.display()
        )
    }

    fn assert_error(out: &Outcome, json: &Value, want: u32, needle: &str) {
        assert_eq!(out.exit_code, 1, "{json}");
        assert_eq!(json["code"], want, "{json}");
        let msg = json["msg"].as_str().expect("msg");
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }

    #[test]
    fn version_ignores_stdin() {
        let (out, json) = invoke(&[("CNI_COMMAND", "VERSION")], "not even json");
        assert_eq!(out.exit_code, 0);
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(json["supportedVersions"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn env_errors_use_the_config_version() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, json) = invoke(&[], &config("0.4.0", dir.path()));
        assert_error(&out, &json, code::INVALID_ENV, "CNI_COMMAND");
        assert_eq!(json["cniVersion"], "0.4.0");
        let (out, json) = invoke(&[("CNI_COMMAND", "ADD")], &config("1.0.0", dir.path()));
        assert_error(&out, &json, code::INVALID_ENV, "CNI_CONTAINERID");
        let (out, json) = invoke(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ],
            &config("1.0.0", dir.path()),
        );
        assert_error(&out, &json, code::INVALID_ENV, "CNI_NETNS");
    }

    #[test]
    fn config_errors() {
        let (out, json) = invoke(&[("CNI_COMMAND", "ADD")], "{\"cniVersion\": ");
        assert_error(&out, &json, code::DECODE, "decode");
        assert_eq!(json["cniVersion"], "1.1.0");
        let dir = tempfile::tempdir().expect("dir");
        let (out, json) = invoke(&[("CNI_COMMAND", "ADD")], &config("0.2.0", dir.path()));
        assert_error(&out, &json, code::INCOMPATIBLE_VERSION, "0.2.0");
    }

    #[test]
    fn commands_newer_than_the_config_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, json) = invoke(
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/x"),
            ],
            &config("0.3.1", dir.path()),
        );
        assert_error(&out, &json, code::INCOMPATIBLE_VERSION, "CHECK");
        let (out, json) = invoke(&[("CNI_COMMAND", "STATUS")], &config("1.0.0", dir.path()));
        assert_error(&out, &json, code::INCOMPATIBLE_VERSION, "STATUS");
        for cmd in ["STATUS", "GC"] {
            let (out, _) = invoke(&[("CNI_COMMAND", cmd)], &config("1.1.0", dir.path()));
            assert_eq!(
                out,
                Outcome {
                    stdout: None,
                    exit_code: 0
                },
                "{cmd}"
            );
        }
    }

    #[test]
    fn add_refuses_bad_namespaces_before_touching_anything() {
        let dir = tempfile::tempdir().expect("dir");
        let eps = dir.path().join("eps");
        let add = |netns: &str| {
            invoke(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c1"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", netns),
                ],
                &config("1.1.0", &eps),
            )
        };
        let (out, json) = add("/var/run/netns/clustermesh-cni-no-such-ns");
        assert_error(&out, &json, code::CONTAINER_UNKNOWN, "does not exist");
        let (out, json) = add("/etc/hostname");
        assert_error(&out, &json, code::INVALID_ENV, "not a network namespace");
        let (out, json) = add("/proc/self/ns/net");
        assert_error(&out, &json, code::INVALID_ENV, "own network namespace");
        assert!(!eps.exists(), "nothing was allocated or written");
    }

    #[test]
    fn del_of_unknown_container_succeeds_silently() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, _) = invoke(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "never-added"),
                ("CNI_IFNAME", "eth0"),
            ],
            &config("1.1.0", &dir.path().join("eps")),
        );
        assert_eq!(
            out,
            Outcome {
                stdout: None,
                exit_code: 0
            }
        );
    }

    #[test]
    fn check_of_unknown_container_is_code_3() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, json) = invoke(
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "never-added"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/x"),
            ],
            &config("1.0.0", dir.path()),
        );
        assert_error(&out, &json, code::CONTAINER_UNKNOWN, "never-added");
    }
}
