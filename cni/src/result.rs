//! What the plugin prints: ADD results, the VERSION answer and errors, each
//! in the shape of the requested `cniVersion`.
//!
//! ADD's result lists two interfaces, the host veth (index 0) and the pod's
//! (index 1, with `sandbox`), one IP per family the pod has (IPv4 first:
//! `IP/32` with gateway [`GATEWAY`], `IP/128` with gateway [`GATEWAY6`],
//! interface 1) and a default route per family via its gateway
//! (`0.0.0.0/0`, `::/0`). Before 1.0.0 every IP also carries `"version"`
//! (`"4"` or `"6"`); from 1.1.0 interfaces carry `mtu`.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;

use crate::{
    config::{CniVersion, SUPPORTED_VERSIONS},
    endpoint::MacAddr,
    ipam::PodIps,
    link::{GATEWAY, GATEWAY6},
};

/// What ADD set up, independent of the output version.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub host_iface: String,
    pub host_mac: MacAddr,
    pub ifname: String,
    pub mac: MacAddr,
    pub netns: String,
    /// At least one.
    pub ips: PodIps,
    pub mtu: u32,
    /// `dns` from a delegated IPAM plugin.
    pub dns: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AddResult<'a> {
    cni_version: &'static str,
    interfaces: [Interface<'a>; 2],
    ips: Vec<IpConfig>,
    routes: Vec<Route>,
    dns: Value,
}

#[derive(Serialize)]
struct Interface<'a> {
    name: &'a str,
    mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<&'a str>,
}

#[derive(Serialize)]
struct IpConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: String,
    gateway: IpAddr,
    interface: usize,
}

#[derive(Serialize)]
struct Route {
    dst: &'static str,
    gw: IpAddr,
}

/// The ADD result for `version`.
pub fn add_result(version: CniVersion, a: &Attachment) -> Value {
    let mtu = (version >= CniVersion::V1_1_0).then_some(a.mtu);
    let r = AddResult {
        cni_version: version.as_str(),
        interfaces: [
            Interface {
                name: &a.host_iface,
                mac: a.host_mac.to_string(),
                mtu,
                sandbox: None,
            },
            Interface {
                name: &a.ifname,
                mac: a.mac.to_string(),
                mtu,
                sandbox: Some(&a.netns),
            },
        ],
        ips: a
            .ips
            .iter()
            .map(|ip| {
                let (family, prefix, gateway) = family_of(ip);
                IpConfig {
                    version: version.ips_have_version().then_some(family),
                    address: format!("{ip}/{prefix}"),
                    gateway,
                    interface: 1,
                }
            })
            .collect(),
        routes: a
            .ips
            .iter()
            .map(|ip| {
                let (_, _, gw) = family_of(ip);
                let dst = if ip.is_ipv6() { "::/0" } else { "0.0.0.0/0" };
                Route { dst, gw }
            })
            .collect(),
        dns: a
            .dns
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default())),
    };
    serde_json::to_value(r).unwrap_or(Value::Null)
}

/// The result's `version`, the pod's prefix length and the gateway for
/// `ip`'s family.
fn family_of(ip: IpAddr) -> (&'static str, u8, IpAddr) {
    match ip {
        IpAddr::V4(_) => ("4", 32, IpAddr::V4(GATEWAY)),
        IpAddr::V6(_) => ("6", 128, IpAddr::V6(GATEWAY6)),
    }
}

/// The VERSION answer.
pub fn version_result() -> Value {
    serde_json::json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// A CNI error object.
pub fn error_result(version: CniVersion, code: u32, msg: &str, details: &str) -> Value {
    let mut v = serde_json::json!({
        "cniVersion": version.as_str(),
        "code": code,
        "msg": msg,
    });
    if !details.is_empty() {
        v["details"] = Value::from(details);
    }
    v
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            host_iface: "lxc12345678".into(),
            host_mac: MacAddr([0xaa, 0, 0, 0, 0, 1]),
            ifname: "eth0".into(),
            mac: MacAddr([0xbb, 0, 0, 0, 0, 2]),
            netns: "/var/run/netns/pod".into(),
            ips: PodIps {
                v4: Some(std::net::Ipv4Addr::new(10, 0, 0, 3)),
                v6: None,
            },
            mtu: 1450,
            dns: None,
        }
    }

    #[test]
    fn v1_1_shape() {
        let v = add_result(CniVersion::V1_1_0, &attachment());
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "lxc12345678", "mac": "aa:00:00:00:00:01", "mtu": 1450},
                    {"name": "eth0", "mac": "bb:00:00:00:00:02", "mtu": 1450, "sandbox": "/var/run/netns/pod"}
                ],
                "ips": [{"address": "10.0.0.3/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn v1_0_has_no_mtu_and_no_ip_version() {
        let v = add_result(CniVersion::V1_0_0, &attachment());
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["interfaces"][0].get("mtu").is_none());
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/pod");
    }

    #[test]
    fn pre_1_0_ips_carry_version() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let v = add_result(version, &attachment());
            assert_eq!(v["cniVersion"], version.as_str());
            assert_eq!(
                v["ips"][0],
                json!({"version": "4", "address": "10.0.0.3/32", "gateway": "169.254.1.1", "interface": 1})
            );
            assert!(v["interfaces"][1].get("mtu").is_none());
        }
    }

    #[test]
    fn dual_stack_and_ipv6_only_shapes() {
        let mut a = attachment();
        a.ips.v6 = Some("fd00:1::5".parse().expect("v6"));
        let v = add_result(CniVersion::V1_1_0, &a);
        assert_eq!(
            v["ips"],
            json!([
                {"address": "10.0.0.3/32", "gateway": "169.254.1.1", "interface": 1},
                {"address": "fd00:1::5/128", "gateway": "fe80::1", "interface": 1}
            ])
        );
        assert_eq!(
            v["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
        );
        let v = add_result(CniVersion::V0_4_0, &a);
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        a.ips.v4 = None;
        let v = add_result(CniVersion::V0_3_1, &a);
        assert_eq!(
            v["ips"],
            json!([{"version": "6", "address": "fd00:1::5/128", "gateway": "fe80::1", "interface": 1}])
        );
        assert_eq!(v["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    }

    #[test]
    fn delegated_dns_is_passed_on() {
        let mut a = attachment();
        a.dns = Some(json!({"nameservers": ["10.0.0.53"]}));
        let v = add_result(CniVersion::V1_0_0, &a);
        assert_eq!(v["dns"]["nameservers"][0], "10.0.0.53");
    }

    #[test]
    fn version_and_error_shapes() {
        assert_eq!(
            version_result(),
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        assert_eq!(
            error_result(CniVersion::V0_4_0, 7, "bad", "why"),
            json!({"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "why"})
        );
        assert!(
            error_result(CniVersion::V1_0_0, 4, "m", "")
                .get("details")
                .is_none()
        );
    }
}
