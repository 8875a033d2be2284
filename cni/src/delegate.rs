//! Delegated IPAM: running a standard IPAM plugin (`host-local`, ...).
//!
//! As the spec prescribes, the IPAM plugin named by `ipam.type` is looked up
//! in the `CNI_PATH` directories and executed with this plugin's own
//! environment and the same network configuration on stdin; only
//! `CNI_COMMAND` is set explicitly (an ADD that fails later releases the
//! address with a DEL). Its stderr passes through. A CNI error it prints is
//! passed on with its own code, so the runtime sees, for example, the
//! plugin's "incompatible CNI version". From an ADD result the first IPv4
//! address and the first IPv6 address are taken (as /32 and /128: the pod's
//! prefix lengths are always those here; `host-local` with
//! `"ranges": [[{"subnet": v4}], [{"subnet": v6}]]` returns one of each),
//! together with any `dns`. A result with neither is refused.

use std::{
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde::Deserialize;

use crate::{env::Command, error::code, ipam::PodIps};

/// Failures of the delegated IPAM plugin.
#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error("IPAM plugin {plugin:?} not found in CNI_PATH {path:?}")]
    NotFound { plugin: String, path: Vec<PathBuf> },
    #[error("running IPAM plugin {binary}")]
    Exec {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("IPAM plugin {plugin:?} {command} failed: {msg}")]
    Plugin {
        plugin: String,
        command: Command,
        code: u32,
        msg: String,
        details: String,
    },
    #[error("IPAM plugin {plugin:?} {command} failed with {status} and no CNI error: {output:?}")]
    Unexplained {
        plugin: String,
        command: Command,
        status: String,
        output: String,
    },
    #[error("IPAM plugin {plugin:?} ADD result cannot be decoded")]
    BadResult {
        plugin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("IPAM plugin {plugin:?} ADD result has no IPv4 or IPv6 address")]
    NoAddress { plugin: String },
}

impl DelegateError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Plugin { code, .. } => *code,
            _ => code::IPAM_DELEGATE,
        }
    }
}

/// What an IPAM ADD gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// The first address of each family in the result.
    pub ips: PodIps,
    /// The plugin's `dns` object, passed on in this plugin's result.
    pub dns: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IpamResult {
    #[serde(default)]
    ips: Vec<IpamIp>,
    #[serde(default)]
    dns: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IpamIp {
    address: String,
}

#[derive(Deserialize)]
struct CniErrorOut {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// A delegated IPAM plugin, located.
#[derive(Debug, Clone)]
pub struct Delegate {
    plugin: String,
    binary: PathBuf,
}

impl Delegate {
    /// Finds `plugin` in the `CNI_PATH` directories (first match wins).
    pub fn find(plugin: &str, cni_path: &[PathBuf]) -> Result<Self, DelegateError> {
        cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .map(|binary| Self {
                plugin: plugin.to_owned(),
                binary,
            })
            .ok_or_else(|| DelegateError::NotFound {
                plugin: plugin.to_owned(),
                path: cni_path.to_vec(),
            })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// IPAM ADD: the address to give the pod.
    pub fn add(&self, stdin: &[u8]) -> Result<Allocation, DelegateError> {
        let out = self.exec(Command::Add, stdin)?;
        let result: IpamResult =
            serde_json::from_slice(&out).map_err(|source| DelegateError::BadResult {
                plugin: self.plugin.clone(),
                source,
            })?;
        let mut ips = PodIps::default();
        for i in &result.ips {
            let addr = i
                .address
                .split_once('/')
                .map_or(i.address.as_str(), |(a, _)| a);
            if let Ok(ip) = addr.parse::<IpAddr>() {
                ips.add_first(ip);
            }
        }
        if ips.is_empty() {
            return Err(DelegateError::NoAddress {
                plugin: self.plugin.clone(),
            });
        }
        let dns = result
            .dns
            .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()));
        Ok(Allocation { ips, dns })
    }

    /// IPAM DEL: releases the container's address.
    pub fn del(&self, stdin: &[u8]) -> Result<(), DelegateError> {
        self.exec(Command::Del, stdin).map(drop)
    }

    /// IPAM CHECK.
    pub fn check(&self, stdin: &[u8]) -> Result<(), DelegateError> {
        self.exec(Command::Check, stdin).map(drop)
    }

    /// Runs the plugin with `CNI_COMMAND=command` and `stdin`, returning its
    /// stdout on success.
    fn exec(&self, command: Command, stdin: &[u8]) -> Result<Vec<u8>, DelegateError> {
        let exec_err = |source| DelegateError::Exec {
            binary: self.binary.clone(),
            source,
        };
        let spawn = || {
            Process::new(&self.binary)
                .env("CNI_COMMAND", command.as_str())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
        };
        // ETXTBSY: the binary is open for writing somewhere (being
        // replaced on upgrade, or a concurrent fork still holding the
        // writer's descriptor until its exec); it clears within moments.
        let mut tries = 0;
        let mut child = loop {
            match spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r.map_err(exec_err)?,
            }
        };
        let input = child.stdin.take();
        // Feed stdin on another thread while this one collects stdout, so a
        // plugin that writes before reading everything cannot deadlock.
        // A plugin that exits without reading all of it is not an error here.
        let feed = move || {
            if let Some(mut i) = input {
                let _ = i.write_all(stdin);
            }
        };
        let output = std::thread::scope(|s| {
            let feeder = std::thread::Builder::new().spawn_scoped(s, feed);
            if let Err(e) = feeder {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            child.wait_with_output()
        })
        .map_err(exec_err)?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        match serde_json::from_slice::<CniErrorOut>(&output.stdout) {
            Ok(e) if e.code != 0 => Err(DelegateError::Plugin {
                plugin: self.plugin.clone(),
                command,
                code: e.code,
                msg: e.msg,
                details: e.details,
            }),
            _ => Err(DelegateError::Unexplained {
                plugin: self.plugin.clone(),
                command,
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stdout)
                    .chars()
                    .take(500)
                    .collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A fake IPAM plugin: a shell script printing `out` and exiting `rc`.
    fn fake(dir: &Path, name: &str, out: &str, rc: i32) {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND\" >> \"$0.log\"\ncat <<'EOF'\n{out}\nEOF\nexit {rc}\n"),
        )
        .expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn finds_in_path_order() {
        let a = tempfile::tempdir().expect("a");
        let b = tempfile::tempdir().expect("b");
        fake(b.path(), "ipam", "{}", 0);
        let path = [a.path().to_owned(), b.path().to_owned()];
        let d = Delegate::find("ipam", &path).expect("found");
        assert_eq!(d.binary(), b.path().join("ipam"));
        let e = Delegate::find("other", &path).expect_err("missing");
        assert_eq!(e.code(), code::IPAM_DELEGATE);
        assert!(e.to_string().contains("other"), "{e}");
    }

    #[test]
    fn add_takes_first_of_each_family_and_dns() {
        let dir = tempfile::tempdir().expect("dir");
        fake(
            dir.path(),
            "ipam",
            r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::5/64"},{"address":"10.9.0.7/24","gateway":"10.9.0.1"},{"address":"10.9.0.8/24"},{"address":"fd00::6/64"}],"dns":{"nameservers":["10.9.0.53"]}}"#,
            0,
        );
        let d = Delegate::find("ipam", &[dir.path().to_owned()]).expect("found");
        let a = d.add(b"{}").expect("add");
        assert_eq!(a.ips.v4, Some("10.9.0.7".parse().expect("v4")));
        assert_eq!(a.ips.v6, Some("fd00::5".parse().expect("v6")));
        assert_eq!(a.dns.expect("dns")["nameservers"][0], "10.9.0.53");
        d.del(b"{}").expect("del");
        let log = std::fs::read_to_string(dir.path().join("ipam.log")).expect("log");
        assert_eq!(log, "ADD\nDEL\n");
    }

    #[test]
    fn plugin_errors_keep_their_code() {
        let dir = tempfile::tempdir().expect("dir");
        fake(
            dir.path(),
            "ipam",
            r#"{"code":11,"msg":"busy","details":"try later"}"#,
            1,
        );
        let d = Delegate::find("ipam", &[dir.path().to_owned()]).expect("found");
        let e = d.add(b"{}").expect_err("fails");
        assert_eq!(e.code(), 11);
        assert!(e.to_string().contains("busy"), "{e}");

        fake(dir.path(), "garbage", "segfault", 139);
        let d = Delegate::find("garbage", &[dir.path().to_owned()]).expect("found");
        let e = d.del(b"{}").expect_err("fails");
        assert_eq!(e.code(), code::IPAM_DELEGATE);
        assert!(e.to_string().contains("segfault"), "{e}");

        fake(
            dir.path(),
            "v6only",
            r#"{"ips":[{"address":"fd00::5/64"}]}"#,
            0,
        );
        let d = Delegate::find("v6only", &[dir.path().to_owned()]).expect("found");
        let a = d.add(b"{}").expect("IPv6 only");
        assert_eq!(
            (a.ips.v4, a.ips.v6),
            (None, Some("fd00::5".parse().expect("v6")))
        );

        fake(
            dir.path(),
            "noaddr",
            r#"{"ips":[{"address":"bogus/24"}]}"#,
            0,
        );
        let d = Delegate::find("noaddr", &[dir.path().to_owned()]).expect("found");
        let e = d.add(b"{}").expect_err("no address");
        assert!(matches!(e, DelegateError::NoAddress { .. }), "{e}");
        assert_eq!(e.code(), code::IPAM_DELEGATE);
    }
}
