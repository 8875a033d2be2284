//! Endpoint files: the CNI plugin's record of each pod, read by the node
//! agent. The format lives here, in the shared model, so the agent reads what
//! the plugin writes without linking the plugin.
//!
//! One file per container, `<endpointDir>/<container id>.json`, holding an
//! [`EndpointFile`]. It is written atomically (hidden temporary file, sync,
//! rename) after the pod's interface is fully set up, and removed by DEL, so
//! a reader sees complete files of attachments that exist. Names starting
//! with `.` are never endpoint files (temporary files, the `.ipam` lease
//! directory); [`read_endpoint_dir`] skips them and reports, rather than
//! fails on, files it cannot decode.
//!
//! Readiness (fail-closed start): the plugin creates the pod's host veth
//! down, writes the endpoint file and waits; the agent attaches
//! `from_endpoint`, writes the pod's endpoint-map entry, sets the veth up
//! and then writes `<endpointDir>/.ready/<container id>` holding the host
//! veth's ifindex ([`write_ready`]); the plugin returns once it reads that
//! marker for the veth it made ([`read_ready`]). So no packet of the pod
//! crosses a veth without the datapath program, and ADD returns when the
//! pod is reachable. DEL removes the marker with the file.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// From netlink's link-layer address bytes; `None` unless 6 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(Self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string that is not six `:`-separated hex bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct BadMac(String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(|| BadMac(s.into()))?;
            if p.len() != 2 {
                return Err(BadMac(s.into()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.into()));
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One pod attachment, as the node agent needs it to program the datapath
/// (`CM_ENDPOINTS`: address -> host ifindex, pod MAC, host MAC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointFile {
    pub container_id: String,
    /// The pod-side interface name (`CNI_IFNAME`).
    pub ifname: String,
    /// The pod's network namespace path (`CNI_NETNS`).
    pub netns: String,
    /// The pod's IPv4 address (none: an IPv6-only pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address (none: an IPv4-only pod). A dual-stack pod
    /// has both; a file with neither is refused ([`EndpointError::NoAddress`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// The host-side veth (`lxc` + 8 hex digits).
    pub host_iface: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    /// The pod-side interface's MAC.
    pub mac: MacAddr,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub name: Option<String>,
    /// From the network config's `args.cni.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Failures reading or writing endpoint files.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint file {path} cannot be decoded")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("endpoint file {path} holds container {container_id:?}, not the one its name says")]
    NameMismatch { path: PathBuf, container_id: String },
    #[error("endpoint file {path} has neither an `ip` nor an `ipv6` address")]
    NoAddress { path: PathBuf },
}

impl EndpointFile {
    /// The pod's addresses: IPv4 first, then IPv6.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

impl EndpointError {
    /// Whether the file's content (not the file system) is at fault.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            Self::Decode { .. } | Self::NameMismatch { .. } | Self::NoAddress { .. }
        )
    }
}

/// Writes `bytes` to `path` atomically: a hidden temporary file beside it,
/// synced, then renamed over it (a reader sees the old or the new file,
/// never a part).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fn write_and_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut f = fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    }
    let result = write_and_rename(&tmp, path, bytes);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `<dir>/<container_id>.json`.
pub fn path_for(dir: &Path, container_id: &str) -> PathBuf {
    dir.join(format!("{container_id}.json"))
}

/// Writes `ep` to its file atomically, creating `dir` if needed.
pub fn write(dir: &Path, ep: &EndpointFile) -> Result<(), EndpointError> {
    let path = path_for(dir, &ep.container_id);
    fs::create_dir_all(dir).map_err(|source| EndpointError::Io {
        op: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let bytes = serde_json::to_vec_pretty(ep).map_err(|source| EndpointError::Decode {
        path: path.clone(),
        source,
    })?;
    write_atomic(&path, &bytes).map_err(|source| EndpointError::Io {
        op: "writing",
        path,
        source,
    })
}

/// The endpoint file of `container_id`, `None` if there is none.
pub fn read(dir: &Path, container_id: &str) -> Result<Option<EndpointFile>, EndpointError> {
    let path = path_for(dir, container_id);
    match read_file(&path) {
        Ok(ep) => Ok(Some(ep)),
        Err(EndpointError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Removes the endpoint file of `container_id`; `false` if there was none.
pub fn remove(dir: &Path, container_id: &str) -> Result<bool, EndpointError> {
    let path = path_for(dir, container_id);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(EndpointError::Io {
            op: "removing",
            path,
            source,
        }),
    }
}

fn read_file(path: &Path) -> Result<EndpointFile, EndpointError> {
    let bytes = fs::read(path).map_err(|source| EndpointError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    let ep: EndpointFile =
        serde_json::from_slice(&bytes).map_err(|source| EndpointError::Decode {
            path: path.to_owned(),
            source,
        })?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem != ep.container_id {
        return Err(EndpointError::NameMismatch {
            path: path.to_owned(),
            container_id: ep.container_id,
        });
    }
    if ep.ip.is_none() && ep.ipv6.is_none() {
        return Err(EndpointError::NoAddress {
            path: path.to_owned(),
        });
    }
    Ok(ep)
}

/// `<dir>/.ready/<container_id>`: the agent's readiness marker.
pub fn ready_path(dir: &Path, container_id: &str) -> PathBuf {
    dir.join(".ready").join(container_id)
}

/// Marks `container_id`'s pod ready: its datapath is attached on the host
/// veth `host_ifindex`, which is up.
pub fn write_ready(dir: &Path, container_id: &str, host_ifindex: u32) -> io::Result<()> {
    let path = ready_path(dir, container_id);
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    write_atomic(&path, host_ifindex.to_string().as_bytes())
}

/// The host ifindex the agent marked `container_id` ready for, if any (a
/// marker that does not parse counts as none).
pub fn read_ready(dir: &Path, container_id: &str) -> Option<u32> {
    fs::read_to_string(ready_path(dir, container_id))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Removes `container_id`'s readiness marker (none is fine).
pub fn remove_ready(dir: &Path, container_id: &str) -> io::Result<()> {
    match fs::remove_file(ready_path(dir, container_id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every endpoint file in `dir`, sorted by container id, and the files that
/// could not be read with why. Hidden names (temporary files, `.ipam`) and
/// names not ending in `.json` are skipped; a missing directory has no
/// endpoints.
pub fn read_endpoint_dir(dir: &Path) -> (Vec<EndpointFile>, Vec<(PathBuf, EndpointError)>) {
    let mut eps = Vec::new();
    let mut errors = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (eps, errors),
        Err(source) => {
            errors.push((
                dir.to_owned(),
                EndpointError::Io {
                    op: "listing",
                    path: dir.to_owned(),
                    source,
                },
            ));
            return (eps, errors);
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(source) => {
                errors.push((
                    dir.to_owned(),
                    EndpointError::Io {
                        op: "listing",
                        path: dir.to_owned(),
                        source,
                    },
                ));
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        // Directories and other non-files named *.json are not endpoints.
        if entry.file_type().map(|t| !t.is_file()).unwrap_or(true) {
            continue;
        }
        match read_file(&path) {
            Ok(ep) => eps.push(ep),
            Err(e) => errors.push((path, e)),
        }
    }
    eps.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    errors.sort_by(|a, b| a.0.cmp(&b.0));
    (eps, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_markers_round_trip_and_stay_out_of_the_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_ready(dir.path(), "c1"), None);
        write_ready(dir.path(), "c1", 42).expect("write");
        assert_eq!(read_ready(dir.path(), "c1"), Some(42));
        std::fs::write(ready_path(dir.path(), "c2"), "garbage").expect("write");
        assert_eq!(read_ready(dir.path(), "c2"), None);
        let (files, errors) = read_endpoint_dir(dir.path());
        assert!(files.is_empty() && errors.is_empty(), "{errors:?}");
        remove_ready(dir.path(), "c1").expect("remove");
        remove_ready(dir.path(), "c1").expect("removing none is fine");
        assert_eq!(read_ready(dir.path(), "c1"), None);
    }

    fn sample(id: &str) -> EndpointFile {
        EndpointFile {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/p".into(),
            ip: Some(Ipv4Addr::new(10, 0, 0, 5)),
            ipv6: None,
            host_iface: "lxc0123abcd".into(),
            host_ifindex: 42,
            host_mac: MacAddr([0xaa, 0xbb, 0xcc, 0, 1, 2]),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            namespace: Some("default".into()),
            name: None,
            labels: BTreeMap::from([("app".into(), "web".into())]),
        }
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "aa:bb:cc:00:01:ff".parse().expect("mac");
        assert_eq!(m, MacAddr([0xaa, 0xbb, 0xcc, 0, 1, 0xff]));
        assert_eq!(m.to_string(), "aa:bb:cc:00:01:ff");
        for bad in [
            "",
            "aa:bb",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:fg",
            "a:bb:cc:dd:ee:ff0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(MacAddr::from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn file_shape_is_stable() {
        let v = serde_json::to_value(sample("c1")).expect("json");
        assert_eq!(v["container_id"], "c1");
        assert_eq!(v["ip"], "10.0.0.5");
        assert_eq!(v["host_mac"], "aa:bb:cc:00:01:02");
        assert_eq!(v["host_ifindex"], 42);
        assert_eq!(v["namespace"], "default");
        assert_eq!(v["name"], serde_json::Value::Null);
        assert_eq!(v["labels"]["app"], "web");
    }

    #[test]
    fn a_file_with_no_address_is_refused_and_dual_stack_lists_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut none = sample("n");
        none.ip = None;
        write(dir.path(), &none).expect("write");
        let err = read(dir.path(), "n").expect_err("no address");
        assert!(matches!(err, EndpointError::NoAddress { .. }), "{err}");
        assert!(err.is_corrupt());
        let mut dual = sample("d");
        dual.ipv6 = Some("fd00:10:1::5".parse().expect("v6"));
        write(dir.path(), &dual).expect("write");
        let back = read(dir.path(), "d").expect("read").expect("some");
        let ips: Vec<String> = back.ips().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00:10:1::5"]);
        let v = serde_json::to_value(&back).expect("json");
        assert_eq!(v["ipv6"], "fd00:10:1::5");
        // An IPv4-only file has no `ipv6` key at all (older readers).
        let v4 = serde_json::to_value(sample("x")).expect("json");
        assert!(v4.get("ipv6").is_none());
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("eps");
        assert_eq!(read(&d, "c1").expect("read missing"), None);
        write(&d, &sample("c1")).expect("write");
        assert_eq!(read(&d, "c1").expect("read"), Some(sample("c1")));
        // No temporary file is left next to it.
        let names: Vec<_> = fs::read_dir(&d)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["c1.json"]);
        assert!(remove(&d, "c1").expect("remove"));
        assert!(!remove(&d, "c1").expect("remove again"));
    }

    #[test]
    fn read_dir_skips_hidden_and_reports_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(d, &sample("b")).expect("write");
        write(d, &sample("a")).expect("write");
        fs::write(d.join(".c.json.123.tmp"), b"partial").expect("tmp");
        fs::write(d.join(".hidden.json"), b"{").expect("hidden");
        fs::create_dir_all(d.join(".ipam")).expect("ipam dir");
        fs::write(d.join(".ipam/lock"), b"").expect("lock");
        fs::write(d.join("README"), b"not an endpoint").expect("other");
        fs::write(d.join("broken.json"), b"{\"container_id\": 5").expect("broken");
        fs::write(d.join("short.json"), b"{\"container_id\": \"short\"}").expect("short");
        let mut other = sample("x");
        other.container_id = "someone-else".into();
        fs::write(d.join("x.json"), serde_json::to_vec(&other).expect("json")).expect("mismatch");
        fs::create_dir_all(d.join("dir.json")).expect("dir");

        let (eps, errors) = read_endpoint_dir(d);
        let ids: Vec<_> = eps.iter().map(|e| e.container_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let bad: Vec<_> = errors
            .iter()
            .map(|(p, e)| {
                (
                    p.file_name().expect("name").to_string_lossy().into_owned(),
                    e,
                )
            })
            .collect();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert_eq!(bad[0].0, "broken.json");
        assert!(matches!(bad[0].1, EndpointError::Decode { .. }));
        assert_eq!(bad[1].0, "short.json");
        assert!(matches!(bad[1].1, EndpointError::Decode { .. }));
        assert_eq!(bad[2].0, "x.json");
        assert!(matches!(bad[2].1, EndpointError::NameMismatch { .. }));

        let (eps, errors) = read_endpoint_dir(&d.join("missing"));
        assert!(eps.is_empty() && errors.is_empty());
    }
}
