//! The `CNI_*` environment variables, read once and validated.
//!
//! Which variables are required depends on the command (the spec's table:
//! ADD and CHECK need a container id, a netns and an interface name; DEL
//! needs no netns, because the namespace may already be gone). So [`Env`]
//! keeps each as an `Option` and the command asks through the accessors,
//! which fail with [`EnvError::Missing`] naming the variable. Values that
//! are present are validated here, once: the container id ends up in a file
//! name and the interface name in a netlink request.

use std::{collections::BTreeMap, fmt, path::PathBuf};

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A missing or malformed environment variable (CNI code 4).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("required environment variable {var} is missing or empty")]
    Missing { var: &'static str },
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// `CNI_ARGS`: `K=V;K=V` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(BTreeMap<String, String>);

impl CniArgs {
    /// Parses `K=V;K=V`. Empty segments (a trailing `;`) are skipped; a
    /// segment without `=` or with an empty key is an error. The value is
    /// everything after the first `=`.
    pub fn parse(s: &str) -> Result<Self, EnvError> {
        let mut map = BTreeMap::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let invalid = |reason| EnvError::Invalid {
                var: "CNI_ARGS",
                value: s.to_owned(),
                reason,
            };
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| invalid("every ;-separated part must be KEY=VALUE"))?;
            if k.is_empty() {
                return Err(invalid("a key is empty"));
            }
            map.insert(k.to_owned(), v.to_owned());
        }
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `K8S_POD_NAMESPACE`, if given, as a Kubernetes name ([`k8s_name`]).
    pub fn pod_namespace(&self) -> Option<String> {
        self.get("K8S_POD_NAMESPACE").and_then(k8s_name)
    }

    /// `K8S_POD_NAME`, if given, as a Kubernetes name ([`k8s_name`]).
    pub fn pod_name(&self) -> Option<String> {
        self.get("K8S_POD_NAME").and_then(k8s_name)
    }
}

/// `v` as a DNS label, the form the apiserver takes pod and namespace names
/// in: other runtimes than the kubelet pass their own names (podman passes
/// its container name, such as `elastic_wilson` or `Web_1`, as both), which
/// the apiserver would refuse. Lowercased, every other character than
/// `a-z`, `0-9` and `-` made `-`, at most 63 characters, no `-` at either
/// end; None when nothing is left.
pub fn k8s_name(v: &str) -> Option<String> {
    let mapped: String = v
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let mut out: String = mapped.trim_matches('-').chars().take(63).collect();
    out.truncate(out.trim_end_matches('-').len());
    (!out.is_empty()).then_some(out)
}

/// The plugin's environment, validated.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    pub args: CniArgs,
    path: Option<Vec<PathBuf>>,
}

impl Env {
    /// Reads the variables through `lookup` (`std::env::var` in the binary,
    /// a map in tests). An empty value counts as absent.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        let command = get("CNI_COMMAND").ok_or(EnvError::Missing { var: "CNI_COMMAND" })?;
        let command = Command::parse(&command).ok_or(EnvError::Invalid {
            var: "CNI_COMMAND",
            value: command,
            reason: "not one of ADD, DEL, CHECK, VERSION, STATUS, GC",
        })?;
        if command == Command::Version {
            // VERSION takes CNI_COMMAND only (the spec); runtimes set the
            // others anyway (libcni: CNI_NETNS=dummy), so they are ignored.
            return Ok(Self {
                command,
                container_id: None,
                netns: None,
                ifname: None,
                args: CniArgs::default(),
                path: None,
            });
        }
        let container_id = get("CNI_CONTAINERID");
        if let Some(id) = &container_id {
            validate_container_id(id)?;
        }
        let ifname = get("CNI_IFNAME");
        if let Some(name) = &ifname {
            validate_ifname(name)?;
        }
        let netns = get("CNI_NETNS");
        if let Some(ns) = &netns
            && !ns.starts_with('/')
        {
            return Err(EnvError::Invalid {
                var: "CNI_NETNS",
                value: ns.clone(),
                reason: "must be an absolute path",
            });
        }
        let args = match get("CNI_ARGS") {
            Some(a) => CniArgs::parse(&a)?,
            None => CniArgs::default(),
        };
        let path = get("CNI_PATH").map(|p| {
            p.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        });
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    pub fn container_id(&self) -> Result<&str, EnvError> {
        self.container_id.as_deref().ok_or(EnvError::Missing {
            var: "CNI_CONTAINERID",
        })
    }

    pub fn netns(&self) -> Result<&str, EnvError> {
        self.netns
            .as_deref()
            .ok_or(EnvError::Missing { var: "CNI_NETNS" })
    }

    /// `CNI_NETNS` where it is optional (DEL).
    pub fn netns_opt(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn ifname(&self) -> Result<&str, EnvError> {
        self.ifname
            .as_deref()
            .ok_or(EnvError::Missing { var: "CNI_IFNAME" })
    }

    /// `CNI_PATH` split on `:`; needed only to find a delegated IPAM plugin.
    pub fn path(&self) -> Result<&[PathBuf], EnvError> {
        self.path
            .as_deref()
            .ok_or(EnvError::Missing { var: "CNI_PATH" })
    }
}

/// The spec: starts with an alphanumeric character, then alphanumerics,
/// `_`, `.` or `-`. It becomes a file name, so this also keeps `/` and
/// `..` out.
fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            var: "CNI_CONTAINERID",
            value: id.to_owned(),
            reason: "must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        })
    }
}

/// Linux interface names: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
fn validate_ifname(name: &str) -> Result<(), EnvError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            var: "CNI_IFNAME",
            value: name.to_owned(),
            reason: "must be a Linux interface name (1-15 bytes, no '/', ':' or whitespace)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, EnvError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn cni_args_pairs() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;")
            .expect("valid");
        assert_eq!(a.pod_namespace().as_deref(), Some("default"));
        assert_eq!(a.pod_name().as_deref(), Some("web-0"));
        assert_eq!(a.get("IgnoreUnknown"), Some("1"));
        assert_eq!(CniArgs::parse("").expect("empty"), CniArgs::default());
        // The value keeps later '='.
        assert_eq!(
            CniArgs::parse("A=b=c").expect("valid").get("A"),
            Some("b=c")
        );
        // Empty values are kept but do not count as a pod name.
        let a = CniArgs::parse("K8S_POD_NAME=").expect("valid");
        assert_eq!(a.get("K8S_POD_NAME"), Some(""));
        assert_eq!(a.pod_name(), None);
    }

    #[test]
    fn runtime_names_become_kubernetes_names() {
        let cases = [
            ("web-0", Some("web-0")),
            ("elastic_wilson", Some("elastic-wilson")),
            ("Web_1.Example", Some("web-1-example")),
            ("__x__", Some("x")),
            ("___", None),
            ("é", None),
        ];
        for (given, want) in cases {
            assert_eq!(k8s_name(given).as_deref(), want, "{given}");
        }
        let long = format!("{}_{}", "a".repeat(62), "b".repeat(10));
        assert_eq!(k8s_name(&long).as_deref(), Some("a".repeat(62).as_str()));
        let a = CniArgs::parse("K8S_POD_NAMESPACE=elastic_wilson;K8S_POD_NAME=elastic_wilson")
            .expect("valid");
        assert_eq!(a.pod_name().as_deref(), Some("elastic-wilson"));
        assert_eq!(a.pod_namespace().as_deref(), Some("elastic-wilson"));
    }

    #[test]
    fn cni_args_errors_name_the_variable() {
        for bad in ["novalue", "A=1;junk", "=1"] {
            let e = CniArgs::parse(bad).expect_err(bad);
            assert!(
                matches!(
                    e,
                    EnvError::Invalid {
                        var: "CNI_ARGS",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("CNI_ARGS"), "{e}");
        }
    }

    #[test]
    fn command_is_required_and_known() {
        assert_eq!(
            env(&[]).expect_err("missing"),
            EnvError::Missing { var: "CNI_COMMAND" }
        );
        assert!(matches!(
            env(&[("CNI_COMMAND", "add")]).expect_err("lowercase"),
            EnvError::Invalid {
                var: "CNI_COMMAND",
                ..
            }
        ));
        let e = env(&[("CNI_COMMAND", "DEL")]).expect("DEL alone parses");
        assert_eq!(e.command, Command::Del);
        assert_eq!(
            e.container_id().expect_err("missing"),
            EnvError::Missing {
                var: "CNI_CONTAINERID"
            }
        );
        assert_eq!(
            e.ifname().expect_err("missing"),
            EnvError::Missing { var: "CNI_IFNAME" }
        );
        assert_eq!(e.netns_opt(), None);
    }

    #[test]
    fn version_reads_only_cni_command() {
        // libcni (podman's CNI backend) asks VERSION with CNI_NETNS=dummy
        // and the other variables of an ADD: the spec gives VERSION only
        // CNI_COMMAND, so the rest is not read, let alone refused.
        let e = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_CONTAINERID", "../x"),
            ("CNI_ARGS", "not=a;;valid"),
        ])
        .expect("VERSION parses whatever else is set");
        assert_eq!(e.command, Command::Version);
        assert_eq!(e.netns_opt(), None);
    }

    #[test]
    fn values_are_validated() {
        let cases = [
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "averyveryverylongname"),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", "relative/path"),
        ];
        for (var, value) in cases {
            let e = env(&[("CNI_COMMAND", "ADD"), (var, value)]).expect_err(value);
            assert!(
                matches!(&e, EnvError::Invalid { var: v, .. } if *v == var),
                "{var}={value}: {e:?}"
            );
        }
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "a1_b.c-d"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
        ])
        .expect("valid");
        assert_eq!(ok.container_id(), Ok("a1_b.c-d"));
        assert_eq!(ok.netns(), Ok("/var/run/netns/x"));
        assert_eq!(
            ok.path().expect("path"),
            [PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }
}
