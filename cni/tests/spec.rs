//! Privileged: the real `clustermesh-cni` binary driven as a container
//! runtime drives a CNI plugin. Each test makes its own "node" network
//! namespace and runs the plugin inside it (`ip netns exec`, under
//! `timeout` so a hang fails the test), with pod namespaces next to it,
//! then looks at the result with `ip -j` and at the endpoint files and
//! leases through the library.
//!
//! Without root the tests print SKIPPED and pass, unless
//! CLUSTERMESH_REQUIRE_PRIVILEGED is set, in which case they fail.

use std::{
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Stdio},
};

use clustermesh_cni::{
    EndpointFile,
    ipam::{Lease, Store},
    read_endpoint_dir,
};
use clustermesh_testkit::netns::{NetNs, sweep_stale};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-cni");
/// Seconds a single plugin run may take before it counts as hung.
const PLUGIN_TIMEOUT: &str = "60";
const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

use clustermesh_testkit::require_root;

/// One plugin run's outcome.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    #[expect(dead_code, reason = "shown in failure messages through Debug")]
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Exit 0; returns the parsed stdout (Null when empty).
    fn ok(&self) -> Value {
        assert_eq!(self.code, Some(0), "plugin failed: {self:?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Exit 0 with no output (DEL, CHECK).
    fn ok_silent(&self) {
        assert_eq!(self.code, Some(0), "plugin failed: {self:?}");
        assert!(self.stdout.trim().is_empty(), "unexpected output: {self:?}");
    }

    /// Exit 1 with a spec error object of `code`; returns it.
    fn err(&self, code: u32) -> Value {
        assert_eq!(self.code, Some(1), "expected an error: {self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {v}"
        );
        v
    }
}

/// The plugin, run inside `node` with `env` and `stdin`.
fn plugin(node: &NetNs, env: &[(&str, &str)], stdin: &str) -> Run {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "-s",
        "KILL",
        PLUGIN_TIMEOUT,
        "ip",
        "netns",
        "exec",
        node.name(),
        BIN,
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    if let Some(mut input) = child.stdin.take() {
        // VERSION does not read stdin; a closed pipe is fine then.
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait for plugin");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_ne!(run.code, Some(137), "plugin hung and was killed: {run:?}");
    run
}

fn netns_path(ns: &NetNs) -> String {
    format!("/var/run/netns/{}", ns.name())
}

/// A runtime call for one container.
fn call(
    node: &NetNs,
    command: &str,
    container: &str,
    pod: Option<&NetNs>,
    extra: &[(&str, &str)],
    config: &Value,
) -> Run {
    let netns = pod.map(netns_path);
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    if let Some(n) = &netns {
        env.push(("CNI_NETNS", n));
    }
    env.extend_from_slice(extra);
    plugin(node, &env, &config.to_string())
}

fn ip_json(ns: &NetNs, args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = ns.exec("ip", &full).expect("ip -j");
    if out.trim().is_empty() {
        return json!([]);
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
}

/// Puts an unrelated `eth0` into the pod (a veth pair inside it).
fn occupy_eth0(pod: &NetNs) {
    pod.exec(
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
        ],
    )
    .expect("occupying eth0");
}

fn link_exists(ns: &NetNs, name: &str) -> bool {
    ns.exec("ip", &["link", "show", name]).is_ok()
}

fn own_config(version: &str, cidr: &str, dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "mesh",
        "type": "clustermesh-cni",
        "podCIDR": cidr,
        "endpointDir": dir,
        "mtu": 1400,
        // No agent runs in these tests: the plugin sets the veth up itself
        // (the fail-closed wait is `add_waits_for_the_agent_and_fails_closed`).
        "readyTimeoutSeconds": 0,
        "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}}
    })
}

/// [`own_config`] with an IPv6 pod range (`podCIDR` removed if `cidr` is
/// `None`: IPv6 only).
fn own_config6(version: &str, cidr: Option<&str>, cidr6: &str, dir: &Path) -> Value {
    let mut cfg = own_config(version, cidr.unwrap_or("0.0.0.0/0"), dir);
    cfg["podCIDRv6"] = json!(cidr6);
    if cidr.is_none() {
        cfg.as_object_mut().expect("object").remove("podCIDR");
    }
    cfg
}

/// Asserts what ADD must have set up in the pod for IPv6: `ip`/128 (and
/// no other global address), not tentative, the route to fe80::1, the
/// default route via it, the permanent neighbour fe80::1 -> host veth MAC,
/// and that the kernel routes out through it from `ip`.
fn assert_attached6(pod: &NetNs, result: &Value, ip: &str) {
    let host_mac = result["interfaces"][0]["mac"].as_str().expect("host mac");
    let addr = ip_json(
        pod,
        &["-6", "addr", "show", "dev", "eth0", "scope", "global"],
    );
    // `ip` leaves `{}` for the addresses its scope filter drops.
    let infos: Vec<&Value> = addr[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a.get("local").is_some())
        .collect();
    let addrs: Vec<(String, u64)> = infos
        .iter()
        .map(|a| {
            (
                a["local"].as_str().expect("local").to_owned(),
                a["prefixlen"].as_u64().expect("prefixlen"),
            )
        })
        .collect();
    assert_eq!(addrs, [(ip.to_owned(), 128)], "{addr}");
    assert_eq!(infos[0]["nodad"], true, "{addr}");
    assert!(infos[0].get("tentative").is_none(), "tentative: {addr}");
    let disabled = pod
        .exec("cat", &["/proc/sys/net/ipv6/conf/eth0/disable_ipv6"])
        .expect("sysctl");
    assert_eq!(disabled.trim(), "0");

    let routes = ip_json(pod, &["-6", "route", "show"]);
    let routes = routes.as_array().expect("routes");
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "fe80::1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "fe80::1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    let neigh = ip_json(pod, &["-6", "neigh", "show", "fe80::1", "dev", "eth0"]);
    assert_eq!(neigh[0]["lladdr"], host_mac, "{neigh}");
    assert!(
        neigh[0]["state"]
            .as_array()
            .expect("state")
            .contains(&json!("PERMANENT")),
        "{neigh}"
    );
    // Anywhere goes via fe80::1 on eth0, from the pod's address.
    let get = ip_json(pod, &["-6", "route", "get", "2001:db8::77"]);
    assert_eq!(get[0]["gateway"], "fe80::1", "{get}");
    assert_eq!(get[0]["dev"], "eth0", "{get}");
    assert_eq!(get[0]["prefsrc"], ip, "{get}");
}

/// The pod has no IPv4 address and no IPv4 default route.
fn assert_no_ipv4(pod: &NetNs) {
    let addr = ip_json(pod, &["-4", "addr", "show", "dev", "eth0"]);
    assert!(
        addr.as_array()
            .expect("addrs")
            .iter()
            .all(|l| l["addr_info"].as_array().is_none_or(Vec::is_empty)),
        "IPv4 address on an IPv6-only pod: {addr}"
    );
    let routes = ip_json(pod, &["-4", "route", "show"]);
    assert_eq!(routes, json!([]), "IPv4 routes on an IPv6-only pod");
}

fn leases(dir: &Path) -> Vec<Lease> {
    Store::new(dir).leases().expect("leases")
}

fn endpoints(dir: &Path) -> Vec<EndpointFile> {
    let (eps, errors) = read_endpoint_dir(dir);
    assert!(errors.is_empty(), "{errors:?}");
    eps
}

/// Asserts what ADD must have set up in the pod and on the node.
fn assert_attached(node: &NetNs, pod: &NetNs, result: &Value, ip: &str, mtu: u64) {
    let host = result["interfaces"][0]["name"]
        .as_str()
        .expect("host iface");
    let host_mac = result["interfaces"][0]["mac"].as_str().expect("host mac");
    let pod_mac = result["interfaces"][1]["mac"].as_str().expect("pod mac");

    // Pod: eth0 up with the MTU and exactly IP/32.
    let link = ip_json(pod, &["link", "show", "dev", "eth0"]);
    assert_eq!(link[0]["mtu"], mtu, "{link}");
    assert_eq!(link[0]["address"], pod_mac, "{link}");
    assert!(
        link[0]["flags"]
            .as_array()
            .expect("flags")
            .contains(&json!("UP")),
        "{link}"
    );
    let addr = ip_json(pod, &["-4", "addr", "show", "dev", "eth0"]);
    let addrs: Vec<(String, u64)> = addr[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| {
            (
                a["local"].as_str().expect("local").to_owned(),
                a["prefixlen"].as_u64().expect("prefixlen"),
            )
        })
        .collect();
    assert_eq!(addrs, [(ip.to_owned(), 32)], "{addr}");
    // lo is up.
    let lo = ip_json(pod, &["link", "show", "lo"]);
    assert!(
        lo[0]["flags"]
            .as_array()
            .expect("flags")
            .contains(&json!("UP")),
        "{lo}"
    );

    // Pod routes: 169.254.1.1 scope link, default via it.
    let routes = ip_json(pod, &["-4", "route", "show"]);
    let routes = routes.as_array().expect("routes");
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "169.254.1.1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "169.254.1.1" && r["dev"] == "eth0" && r["scope"] == "link"),
        "{routes:?}"
    );

    // Pod neighbour: permanent, the host veth's MAC.
    let neigh = ip_json(pod, &["neigh", "show", "169.254.1.1", "dev", "eth0"]);
    assert_eq!(neigh[0]["lladdr"], host_mac, "{neigh}");
    assert!(
        neigh[0]["state"]
            .as_array()
            .expect("state")
            .contains(&json!("PERMANENT")),
        "{neigh}"
    );

    // Node: host veth up, same MTU, no IPv4 address.
    let h = ip_json(node, &["link", "show", "dev", host]);
    assert_eq!(h[0]["mtu"], mtu, "{h}");
    assert_eq!(h[0]["address"], host_mac, "{h}");
    assert!(
        h[0]["flags"]
            .as_array()
            .expect("flags")
            .contains(&json!("UP")),
        "{h}"
    );
    let a = ip_json(node, &["-4", "addr", "show", "dev", host]);
    assert!(
        a.as_array()
            .expect("addrs")
            .iter()
            .all(|l| l["addr_info"].as_array().is_none_or(Vec::is_empty)),
        "host veth has an IPv4 address: {a}"
    );
}

#[test]
fn version() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cniver").expect("node");
    let v = plugin(
        &node,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.1.0"}"#,
    )
    .ok();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn add_check_del_lifecycle() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cninode").expect("node");
    let pod1 = NetNs::new("cnipod1").expect("pod1");
    let pod2 = NetNs::new("cnipod2").expect("pod2");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config("1.1.0", "10.200.0.0/24", dir.path());
    let k8s = [(
        "CNI_ARGS",
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;IgnoreUnknown=1",
    )];

    // ADD: the spec result, the pod set up, the endpoint file written.
    let r1 = call(&node, "ADD", "c1", Some(&pod1), &k8s, &cfg).ok();
    assert_eq!(r1["cniVersion"], "1.1.0");
    assert_eq!(
        r1["ips"],
        json!([{"address": "10.200.0.1/32", "gateway": "169.254.1.1", "interface": 1}])
    );
    assert_eq!(
        r1["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
    );
    let host1 = r1["interfaces"][0]["name"]
        .as_str()
        .expect("host")
        .to_owned();
    assert!(host1.starts_with("lxc") && host1.len() == 11, "{host1}");
    assert_eq!(r1["interfaces"][1]["name"], "eth0");
    assert_eq!(r1["interfaces"][1]["sandbox"], netns_path(&pod1));
    assert_eq!(r1["interfaces"][1]["mtu"], 1400);
    assert_attached(&node, &pod1, &r1, "10.200.0.1", 1400);

    let eps = endpoints(dir.path());
    assert_eq!(eps.len(), 1);
    let ep = &eps[0];
    assert_eq!(ep.container_id, "c1");
    assert_eq!(ep.ifname, "eth0");
    assert_eq!(ep.netns, netns_path(&pod1));
    assert_eq!(ep.ip, Some(Ipv4Addr::new(10, 200, 0, 1)));
    assert_eq!(ep.host_iface, host1);
    assert_eq!(
        ep.host_mac.to_string(),
        r1["interfaces"][0]["mac"].as_str().expect("mac")
    );
    assert_eq!(
        ep.mac.to_string(),
        r1["interfaces"][1]["mac"].as_str().expect("mac")
    );
    assert_eq!(ep.namespace.as_deref(), Some("shop"));
    assert_eq!(ep.name.as_deref(), Some("web-0"));
    assert_eq!(ep.labels.get("app").map(String::as_str), Some("web"));
    let ifindex = ip_json(&node, &["link", "show", &host1])[0]["ifindex"].clone();
    assert_eq!(ifindex, ep.host_ifindex);

    // A second container gets the next address.
    let r2 = call(&node, "ADD", "c2", Some(&pod2), &[], &cfg).ok();
    assert_eq!(r2["ips"][0]["address"], "10.200.0.2/32");
    assert_attached(&node, &pod2, &r2, "10.200.0.2", 1400);
    assert_ne!(r2["interfaces"][0]["name"], r1["interfaces"][0]["name"]);

    // ADD again for c1 (a runtime retry): same address, set up afresh.
    let again = call(&node, "ADD", "c1", Some(&pod1), &k8s, &cfg).ok();
    assert_eq!(again["ips"][0]["address"], "10.200.0.1/32");
    assert_attached(&node, &pod1, &again, "10.200.0.1", 1400);
    assert_eq!(leases(dir.path()).len(), 2);

    // CHECK with the previous result: fine.
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = again.clone();
    call(&node, "CHECK", "c1", Some(&pod1), &[], &with_prev).ok_silent();
    // CHECK with a previous result that does not match: a CHECK error.
    let mut wrong = with_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.200.0.99/32");
    let e = call(&node, "CHECK", "c1", Some(&pod1), &[], &wrong).err(103);
    assert!(
        e["msg"].as_str().expect("msg").contains("10.200.0.1/32"),
        "{e}"
    );
    // The pod loses its permanent neighbour: CHECK says so.
    pod2.exec("ip", &["neigh", "del", "169.254.1.1", "dev", "eth0"])
        .expect("neigh del");
    let e = call(&node, "CHECK", "c2", Some(&pod2), &[], &cfg).err(103);
    assert!(e["msg"].as_str().expect("msg").contains("neighbour"), "{e}");
    // The pod interface is deleted (and with it the pair): CHECK fails.
    pod1.exec("ip", &["link", "del", "eth0"]).expect("del eth0");
    let e = call(&node, "CHECK", "c1", Some(&pod1), &[], &with_prev).err(103);
    assert!(e["msg"].as_str().expect("msg").contains(&host1), "{e}");
    // CHECK of a container never added: code 3.
    call(&node, "CHECK", "nope", Some(&pod1), &[], &cfg).err(3);

    // DEL: veth, endpoint file and lease gone; silent success.
    let host2 = r2["interfaces"][0]["name"]
        .as_str()
        .expect("host")
        .to_owned();
    assert!(link_exists(&node, &host2));
    call(&node, "DEL", "c2", Some(&pod2), &[], &cfg).ok_silent();
    assert!(!link_exists(&node, &host2), "host veth survived DEL");
    assert!(!link_exists(&pod2, "eth0"), "pod side survived DEL");
    assert_eq!(
        endpoints(dir.path())
            .iter()
            .map(|e| e.container_id.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );
    assert!(leases(dir.path()).iter().all(|l| l.container_id != "c2"));
    // Again, and for a container never seen: still success, no output.
    call(&node, "DEL", "c2", Some(&pod2), &[], &cfg).ok_silent();
    call(&node, "DEL", "never-seen", Some(&pod2), &[], &cfg).ok_silent();

    // DEL after the pod namespace is gone (and without CNI_NETNS).
    drop(pod1);
    call(&node, "DEL", "c1", None, &[], &cfg).ok_silent();
    assert!(endpoints(dir.path()).is_empty());
    assert!(leases(dir.path()).is_empty());

    // Freed addresses are handed out again, lowest first.
    let r3 = call(&node, "ADD", "c3", Some(&pod2), &[], &cfg).ok();
    assert_eq!(r3["ips"][0]["address"], "10.200.0.1/32");
    call(&node, "DEL", "c3", Some(&pod2), &[], &cfg).ok_silent();
}

#[test]
fn older_versions_get_their_result_shape() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cniold").expect("node");
    let pod = NetNs::new("cnioldpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        let cfg = own_config(version, "10.202.0.0/24", dir.path());
        let r = call(&node, "ADD", "old", Some(&pod), &[], &cfg).ok();
        assert_eq!(r["cniVersion"], version);
        let has_version = version.starts_with("0.");
        assert_eq!(r["ips"][0].get("version").is_some(), has_version, "{r}");
        assert!(r["interfaces"][1].get("mtu").is_none(), "{r}");
        assert_attached(&node, &pod, &r, "10.202.0.1", 1400);
        if version == "0.3.0" || version == "0.3.1" {
            // CHECK came with 0.4.0.
            call(&node, "CHECK", "old", Some(&pod), &[], &cfg).err(1);
        } else {
            call(&node, "CHECK", "old", Some(&pod), &[], &cfg).ok_silent();
        }
        call(&node, "DEL", "old", Some(&pod), &[], &cfg).ok_silent();
        assert!(endpoints(dir.path()).is_empty());
    }
}

#[test]
fn errors_are_spec_shaped() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cnierr").expect("node");
    let pod = NetNs::new("cnierrpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config("1.0.0", "10.203.0.0/24", dir.path());
    let ns = netns_path(&pod);
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "e1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", ns.as_str()),
    ];

    // Malformed JSON: code 6 with a message.
    let e = plugin(&node, &base, r#"{"cniVersion":"1.0.0","name":"mesh","#).err(6);
    assert!(e["msg"].as_str().expect("msg").contains("decode"), "{e}");
    // A wrongly typed field: code 6 naming the path.
    let mut bad = cfg.clone();
    bad["mtu"] = json!("large");
    let e = plugin(&node, &base, &bad.to_string()).err(6);
    assert!(e["msg"].as_str().expect("msg").contains("mtu"), "{e}");
    assert_eq!(e["cniVersion"], "1.0.0");
    // Unsupported version: code 1.
    let mut old = cfg.clone();
    old["cniVersion"] = json!("0.2.0");
    let e = plugin(&node, &base, &old.to_string()).err(1);
    assert!(e["msg"].as_str().expect("msg").contains("0.2.0"), "{e}");
    // Bad values: code 7 naming the field.
    let mut cidr = cfg.clone();
    cidr["podCIDR"] = json!("10.203.0.1/24");
    let e = plugin(&node, &base, &cidr.to_string()).err(7);
    assert!(e["msg"].as_str().expect("msg").contains("podCIDR"), "{e}");
    let mut no_cidr = cfg.clone();
    no_cidr.as_object_mut().expect("object").remove("podCIDR");
    let e = plugin(&node, &base, &no_cidr.to_string()).err(7);
    assert!(e["msg"].as_str().expect("msg").contains("podCIDR"), "{e}");
    // Missing environment: code 4 naming the variable.
    let e = plugin(&node, &base[1..], &cfg.to_string()).err(4);
    assert!(
        e["msg"].as_str().expect("msg").contains("CNI_COMMAND"),
        "{e}"
    );
    let e = plugin(&node, &base[..3], &cfg.to_string()).err(4);
    assert!(e["msg"].as_str().expect("msg").contains("CNI_NETNS"), "{e}");
    let e = plugin(
        &node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &ns),
        ],
        &cfg.to_string(),
    )
    .err(4);
    assert!(
        e["msg"].as_str().expect("msg").contains("CNI_CONTAINERID"),
        "{e}"
    );
    // A namespace that does not exist: code 3.
    let gone = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "e1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/clustermesh-cni-test-gone"),
    ];
    plugin(&node, &gone, &cfg.to_string()).err(3);
    // Nothing of the above left anything behind.
    assert!(endpoints(dir.path()).is_empty());
    assert!(leases(dir.path()).is_empty());
    let links = ip_json(&node, &["link", "show"]);
    assert_eq!(links.as_array().map(Vec::len), Some(1), "only lo: {links}");
}

#[test]
fn failed_add_leaves_nothing_behind() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cnifail").expect("node");
    let pod = NetNs::new("cnifailpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config("1.1.0", "10.204.0.0/24", dir.path());
    // The pod already has an eth0: creating the pair fails after the
    // address was leased.
    occupy_eth0(&pod);
    let e = call(&node, "ADD", "f1", Some(&pod), &[], &cfg).err(104);
    assert!(e["msg"].as_str().expect("msg").contains("eth0"), "{e}");
    assert!(leases(dir.path()).is_empty(), "lease kept after failed ADD");
    assert!(endpoints(dir.path()).is_empty());
    let links = ip_json(&node, &["link", "show"]);
    assert_eq!(links.as_array().map(Vec::len), Some(1), "only lo: {links}");
    // Once the name is free, ADD works and gets the first address.
    pod.exec("ip", &["link", "del", "eth0"]).expect("del eth0");
    let r = call(&node, "ADD", "f1", Some(&pod), &[], &cfg).ok();
    assert_attached(&node, &pod, &r, "10.204.0.1", 1400);
    call(&node, "DEL", "f1", Some(&pod), &[], &cfg).ok_silent();
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cniconc").expect("node");
    let pods: Vec<NetNs> = (0..6)
        .map(|i| NetNs::new(&format!("cniconc{i}")).expect("pod"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config("1.1.0", "10.205.0.0/24", dir.path());
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, cfg) = (&node, &cfg);
                s.spawn(move || call(node, "ADD", &format!("k{i}"), Some(pod), &[], cfg).ok())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().expect("ip").to_owned())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 6, "{ips:?}");
    assert_eq!(endpoints(dir.path()).len(), 6);
    assert_eq!(leases(dir.path()).len(), 6);
    for (i, pod) in pods.iter().enumerate() {
        call(&node, "DEL", &format!("k{i}"), Some(pod), &[], &cfg).ok_silent();
    }
    assert!(leases(dir.path()).is_empty());
    assert!(endpoints(dir.path()).is_empty());
}

#[test]
fn delegates_to_host_local() {
    require_root!();
    if !Path::new(HOST_LOCAL).exists() {
        eprintln!("SKIPPED: {HOST_LOCAL} missing (apt-get install containernetworking-plugins)");
        if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
            panic!("CLUSTERMESH_REQUIRE_PRIVILEGED is set but {HOST_LOCAL} is missing");
        }
        return;
    }
    sweep_stale();
    let node = NetNs::new("cnihl").expect("node");
    let pod = NetNs::new("cnihlpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("host-local data");
    // Debian's host-local (1.1.x) speaks up to 1.0.0.
    let cfg = json!({
        "cniVersion": "1.0.0",
        "name": "meshhl",
        "type": "clustermesh-cni",
        "endpointDir": dir.path(),
        "readyTimeoutSeconds": 0,
        "ipam": {"type": "host-local", "subnet": "10.206.0.0/24", "dataDir": data.path()}
    });
    let leased = |ip: &str| data.path().join("meshhl").join(ip).exists();

    let r = call(&node, "ADD", "h1", Some(&pod), &[], &cfg).ok();
    // host-local keeps .1 for its gateway and hands out .2.
    assert_eq!(r["ips"][0]["address"], "10.206.0.2/32");
    assert!(leased("10.206.0.2"), "host-local has no lease file");
    assert_attached(&node, &pod, &r, "10.206.0.2", 1450);
    assert!(leases(dir.path()).is_empty(), "own IPAM must not be used");
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = r.clone();
    call(&node, "CHECK", "h1", Some(&pod), &[], &with_prev).ok_silent();

    call(&node, "DEL", "h1", Some(&pod), &[], &cfg).ok_silent();
    assert!(!leased("10.206.0.2"), "host-local lease kept after DEL");
    assert!(endpoints(dir.path()).is_empty());
    call(&node, "DEL", "h1", Some(&pod), &[], &cfg).ok_silent();

    // The delegate's own error comes through with its code (host-local
    // does not speak 1.1.0), and nothing is left behind.
    let mut newer = cfg.clone();
    newer["cniVersion"] = json!("1.1.0");
    let e = call(&node, "ADD", "h2", Some(&pod), &[], &newer).err(1);
    assert!(
        e["msg"].as_str().expect("msg").contains("host-local"),
        "{e}"
    );
    assert!(endpoints(dir.path()).is_empty());
    assert_eq!(
        ip_json(&node, &["link", "show"]).as_array().map(Vec::len),
        Some(1)
    );

    // Delegation needs CNI_PATH.
    let ns = netns_path(&pod);
    let e = plugin(
        &node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "h3"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &ns),
        ],
        &cfg.to_string(),
    )
    .err(4);
    assert!(e["msg"].as_str().expect("msg").contains("CNI_PATH"), "{e}");

    // A failure after the delegated ADD releases the delegated address.
    occupy_eth0(&pod);
    call(&node, "ADD", "h4", Some(&pod), &[], &cfg).err(104);
    let files: Vec<_> = std::fs::read_dir(data.path().join("meshhl"))
        .expect("host-local dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(files.is_empty(), "host-local leases left: {files:?}");
}

/// Fail closed from the first packet: without `readyTimeoutSeconds: 0`, ADD
/// leaves the host veth down and returns only once the node agent marks
/// the pod ready. With no agent it fails (code 11, "try again later")
/// after the timeout and leaves nothing behind; with an agent's part
/// played here (the test sets the veth up and writes the marker, as
/// node-agent's `CniEndpoints::mark_ready` does; the real agent is the
/// mesh harness's), ADD returns after the marker, and until then the veth
/// was down.
#[test]
fn add_waits_for_the_agent_and_fails_closed() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cniwait").expect("node");
    let pod = NetNs::new("cniwaitpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = own_config("1.1.0", "10.209.0.0/24", dir.path());
    cfg["readyTimeoutSeconds"] = json!(1);

    // No agent: refused after the timeout, everything undone.
    let e = call(&node, "ADD", "w1", Some(&pod), &[], &cfg).err(11);
    let msg = e["msg"].as_str().expect("msg");
    assert!(
        msg.contains("did not attach") && msg.contains("--endpoint-dir"),
        "{e}"
    );
    assert!(leases(dir.path()).is_empty(), "lease kept");
    assert!(endpoints(dir.path()).is_empty(), "endpoint file kept");
    let links = ip_json(&node, &["link", "show"]);
    assert_eq!(links.as_array().map(Vec::len), Some(1), "only lo: {links}");

    // An agent that answers: the veth stays down until it is marked.
    cfg["readyTimeoutSeconds"] = json!(20);
    let seen_down = std::thread::scope(|s| {
        let agent = s.spawn(|| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                assert!(std::time::Instant::now() < deadline, "no endpoint file");
                if let Some(ep) = endpoints(dir.path()).pop() {
                    let link = ip_json(&node, &["link", "show", "dev", &ep.host_iface]);
                    let up = link[0]["flags"]
                        .as_array()
                        .expect("flags")
                        .contains(&json!("UP"));
                    node.exec("ip", &["link", "set", &ep.host_iface, "up"])
                        .expect("veth up");
                    clustermesh_cni::endpoint::write_ready(
                        dir.path(),
                        &ep.container_id,
                        ep.host_ifindex,
                    )
                    .expect("marker");
                    return !up;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        let r = call(&node, "ADD", "w1", Some(&pod), &[], &cfg).ok();
        assert_attached(&node, &pod, &r, "10.209.0.1", 1400);
        agent.join().expect("agent")
    });
    assert!(
        seen_down,
        "the host veth was up before the agent marked the pod ready"
    );
    // DEL removes the marker with the endpoint file.
    call(&node, "DEL", "w1", Some(&pod), &[], &cfg).ok_silent();
    assert_eq!(
        clustermesh_cni::endpoint::read_ready(dir.path(), "w1"),
        None
    );
}

#[test]
fn dual_stack_own_ipam() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cnids").expect("node");
    let pod1 = NetNs::new("cnidspod1").expect("pod1");
    let pod2 = NetNs::new("cnidspod2").expect("pod2");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config6("1.1.0", Some("10.210.0.0/24"), "fd00:210::/64", dir.path());

    let r1 = call(&node, "ADD", "d1", Some(&pod1), &[], &cfg).ok();
    assert_eq!(
        r1["ips"],
        json!([
            {"address": "10.210.0.1/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00:210::1/128", "gateway": "fe80::1", "interface": 1}
        ])
    );
    assert_eq!(
        r1["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
    );
    assert_attached(&node, &pod1, &r1, "10.210.0.1", 1400);
    assert_attached6(&pod1, &r1, "fd00:210::1");
    let eps = endpoints(dir.path());
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].ip, Some(Ipv4Addr::new(10, 210, 0, 1)));
    assert_eq!(
        eps[0].ipv6,
        Some("fd00:210::1".parse::<Ipv6Addr>().expect("v6"))
    );

    // The next container gets the next address of each family; a repeated
    // ADD keeps both.
    let r2 = call(&node, "ADD", "d2", Some(&pod2), &[], &cfg).ok();
    assert_eq!(r2["ips"][0]["address"], "10.210.0.2/32");
    assert_eq!(r2["ips"][1]["address"], "fd00:210::2/128");
    assert_attached6(&pod2, &r2, "fd00:210::2");
    let again = call(&node, "ADD", "d1", Some(&pod1), &[], &cfg).ok();
    assert_eq!(again["ips"], r1["ips"]);
    assert_attached6(&pod1, &again, "fd00:210::1");
    assert_eq!(leases(dir.path()).len(), 4);

    // CHECK: fine with the previous result; a previous result without the
    // IPv6 address is a difference.
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = again.clone();
    call(&node, "CHECK", "d1", Some(&pod1), &[], &with_prev).ok_silent();
    let mut v4_only_prev = with_prev.clone();
    v4_only_prev["prevResult"]["ips"]
        .as_array_mut()
        .expect("ips")
        .truncate(1);
    let e = call(&node, "CHECK", "d1", Some(&pod1), &[], &v4_only_prev).err(103);
    assert!(
        e["msg"].as_str().expect("msg").contains("fd00:210::1/128"),
        "{e}"
    );
    // The pod loses its IPv6 address: CHECK names it.
    pod1.exec(
        "ip",
        &["-6", "addr", "del", "fd00:210::1/128", "dev", "eth0"],
    )
    .expect("addr del");
    let e = call(&node, "CHECK", "d1", Some(&pod1), &[], &with_prev).err(103);
    assert!(
        e["msg"].as_str().expect("msg").contains("fd00:210::1/128"),
        "{e}"
    );
    // The IPv6 gateway neighbour goes: CHECK names fe80::1.
    call(&node, "CHECK", "d2", Some(&pod2), &[], &cfg).ok_silent();
    pod2.exec("ip", &["-6", "neigh", "del", "fe80::1", "dev", "eth0"])
        .expect("neigh del");
    let e = call(&node, "CHECK", "d2", Some(&pod2), &[], &cfg).err(103);
    let msg = e["msg"].as_str().expect("msg");
    assert!(msg.contains("neighbour") && msg.contains("fe80::1"), "{e}");
    // The IPv6 default route goes: CHECK says so.
    call(&node, "ADD", "d2", Some(&pod2), &[], &cfg).ok();
    call(&node, "CHECK", "d2", Some(&pod2), &[], &cfg).ok_silent();
    pod2.exec(
        "ip",
        &[
            "-6", "route", "del", "default", "via", "fe80::1", "dev", "eth0",
        ],
    )
    .expect("route del");
    let e = call(&node, "CHECK", "d2", Some(&pod2), &[], &cfg).err(103);
    let msg = e["msg"].as_str().expect("msg");
    assert!(
        msg.contains("default route") && msg.contains("fe80::1"),
        "{e}"
    );

    // DEL releases both of the container's leases, and only those.
    call(&node, "DEL", "d2", Some(&pod2), &[], &cfg).ok_silent();
    let left: Vec<String> = leases(dir.path())
        .iter()
        .map(|l| l.ip.to_string())
        .collect();
    assert_eq!(left, ["10.210.0.1", "fd00:210::1"]);
    assert!(!link_exists(&pod2, "eth0"), "pod side survived DEL");
    call(&node, "DEL", "d2", Some(&pod2), &[], &cfg).ok_silent();
    call(&node, "DEL", "d1", Some(&pod1), &[], &cfg).ok_silent();
    assert!(leases(dir.path()).is_empty(), "{:?}", leases(dir.path()));
    assert!(endpoints(dir.path()).is_empty());
}

#[test]
fn ipv6_only_own_ipam() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cniv6").expect("node");
    let pod = NetNs::new("cniv6pod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = own_config6("1.1.0", None, "fd00:211::/120", dir.path());
    // New interfaces in this pod start with IPv6 off: the plugin turns it
    // on for its interface.
    pod.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        .expect("sysctl");
    let r = call(&node, "ADD", "s1", Some(&pod), &[], &cfg).ok();
    assert_eq!(
        r["ips"],
        json!([{"address": "fd00:211::1/128", "gateway": "fe80::1", "interface": 1}])
    );
    assert_eq!(r["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    assert_attached6(&pod, &r, "fd00:211::1");
    assert_no_ipv4(&pod);
    let eps = endpoints(dir.path());
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].ip, None);
    assert_eq!(
        eps[0].ipv6,
        Some("fd00:211::1".parse::<Ipv6Addr>().expect("v6"))
    );
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = r.clone();
    call(&node, "CHECK", "s1", Some(&pod), &[], &with_prev).ok_silent();
    call(&node, "DEL", "s1", Some(&pod), &[], &cfg).ok_silent();
    assert!(leases(dir.path()).is_empty());
    assert!(endpoints(dir.path()).is_empty());

    // An older version: `"version": "6"` in the IP.
    let old = own_config6("0.4.0", None, "fd00:211::/120", dir.path());
    let r = call(&node, "ADD", "s2", Some(&pod), &[], &old).ok();
    assert_eq!(r["ips"][0]["version"], "6", "{r}");
    assert_eq!(r["ips"][0]["address"], "fd00:211::1/128", "{r}");
    call(&node, "CHECK", "s2", Some(&pod), &[], &old).ok_silent();
    call(&node, "DEL", "s2", Some(&pod), &[], &old).ok_silent();

    // A bad IPv6 range: code 7 naming podCIDRv6, nothing made.
    let mut bad = cfg.clone();
    bad["podCIDRv6"] = json!("fd00:211::/48");
    let e = call(&node, "ADD", "s3", Some(&pod), &[], &bad).err(7);
    assert!(e["msg"].as_str().expect("msg").contains("podCIDRv6"), "{e}");
    assert!(leases(dir.path()).is_empty());
}

/// Fail closed with IPv6: the pod's IPv6 set-up works while the host veth
/// is still down (no carrier), and the pod has it once the agent marks it.
#[test]
fn dual_stack_add_waits_for_the_agent() {
    require_root!();
    sweep_stale();
    let node = NetNs::new("cnidsw").expect("node");
    let pod = NetNs::new("cnidswpod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = own_config6("1.1.0", Some("10.212.0.0/24"), "fd00:212::/64", dir.path());
    cfg["readyTimeoutSeconds"] = json!(20);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let ep = loop {
                assert!(std::time::Instant::now() < deadline, "no endpoint file");
                if let Some(ep) = endpoints(dir.path()).pop() {
                    break ep;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            node.exec("ip", &["link", "set", &ep.host_iface, "up"])
                .expect("veth up");
            clustermesh_cni::endpoint::write_ready(dir.path(), &ep.container_id, ep.host_ifindex)
                .expect("marker");
        });
        call(&node, "ADD", "w6", Some(&pod), &[], &cfg).ok()
    });
    assert_attached(&node, &pod, &r, "10.212.0.1", 1400);
    assert_attached6(&pod, &r, "fd00:212::1");
    call(&node, "DEL", "w6", Some(&pod), &[], &cfg).ok_silent();
    assert!(leases(dir.path()).is_empty());
}

#[test]
fn dual_stack_delegated_to_host_local() {
    require_root!();
    if !Path::new(HOST_LOCAL).exists() {
        eprintln!("SKIPPED: {HOST_LOCAL} missing (apt-get install containernetworking-plugins)");
        if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
            panic!("CLUSTERMESH_REQUIRE_PRIVILEGED is set but {HOST_LOCAL} is missing");
        }
        return;
    }
    sweep_stale();
    let node = NetNs::new("cnihl6").expect("node");
    let pod = NetNs::new("cnihl6pod").expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("host-local data");
    let cfg = json!({
        "cniVersion": "1.0.0",
        "name": "meshhl6",
        "type": "clustermesh-cni",
        "endpointDir": dir.path(),
        "readyTimeoutSeconds": 0,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.207.0.0/24"}], [{"subnet": "fd00:207::/64"}]],
            "dataDir": data.path()
        }
    });
    let leased = |ip: &str| data.path().join("meshhl6").join(ip).exists();
    let r = call(&node, "ADD", "h6", Some(&pod), &[], &cfg).ok();
    // host-local keeps the first address of each range for a gateway.
    assert_eq!(
        r["ips"],
        json!([
            {"address": "10.207.0.2/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00:207::2/128", "gateway": "fe80::1", "interface": 1}
        ])
    );
    assert!(
        leased("10.207.0.2") && leased("fd00:207::2"),
        "host-local leases"
    );
    assert_attached(&node, &pod, &r, "10.207.0.2", 1450);
    assert_attached6(&pod, &r, "fd00:207::2");
    let eps = endpoints(dir.path());
    assert_eq!(
        eps[0].ipv6,
        Some("fd00:207::2".parse::<Ipv6Addr>().expect("v6"))
    );
    assert!(leases(dir.path()).is_empty(), "own IPAM must not be used");
    let mut with_prev = cfg.clone();
    with_prev["prevResult"] = r.clone();
    call(&node, "CHECK", "h6", Some(&pod), &[], &with_prev).ok_silent();
    call(&node, "DEL", "h6", Some(&pod), &[], &cfg).ok_silent();
    assert!(
        !leased("10.207.0.2") && !leased("fd00:207::2"),
        "host-local leases kept"
    );
    assert!(endpoints(dir.path()).is_empty());

    // IPv6 only through host-local.
    let mut v6 = cfg.clone();
    v6["ipam"]["ranges"] = json!([[{"subnet": "fd00:207::/64"}]]);
    let r = call(&node, "ADD", "h7", Some(&pod), &[], &v6).ok();
    assert_eq!(
        r["ips"],
        json!([{"address": "fd00:207::2/128", "gateway": "fe80::1", "interface": 1}])
    );
    assert_attached6(&pod, &r, "fd00:207::2");
    assert_no_ipv4(&pod);
    call(&node, "CHECK", "h7", Some(&pod), &[], &v6).ok_silent();
    call(&node, "DEL", "h7", Some(&pod), &[], &v6).ok_silent();
    assert!(!leased("fd00:207::2"));
}
