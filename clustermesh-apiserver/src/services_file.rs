//! Services declared in a YAML file (standalone source):
//!
//! ```yaml
//! services:
//!   - namespace: default
//!     name: web
//!     frontends: [10.96.0.10]
//!     ports:
//!       - {name: http, protocol: TCP, port: 80, targetPort: 8080}
//!     backends:
//!       - {ip: 10.1.0.5}                 # state defaults to ready
//!       - {ip: 10.1.0.6, state: terminating}
//!     global: true                       # service.cilium.io/global
//!     shared: true                       # service.cilium.io/shared (default true)
//!     affinity: local                    # service.cilium.io/affinity: local|remote|none
//! ```
//!
//! Each entry is validated like a service declared through the API; an
//! error names the file, the entry and the field.

use std::path::Path;

use clustermesh_api::{ClusterName, ServiceRecord, convert, proto};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("services file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("services file {path}: services[{index}]: {reason}")]
    Invalid {
        path: String,
        index: usize,
        reason: String,
    },
    #[error("services file {path}: services[{index}]: {namespace}/{name} is declared twice")]
    Duplicate {
        path: String,
        index: usize,
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileService {
    namespace: String,
    name: String,
    #[serde(default)]
    frontends: Vec<String>,
    ports: Vec<FilePort>,
    #[serde(default)]
    backends: Vec<FileBackend>,
    #[serde(default)]
    global: bool,
    #[serde(default = "yes")]
    shared: bool,
    #[serde(default)]
    affinity: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePort {
    #[serde(default)]
    name: String,
    #[serde(default)]
    protocol: String,
    port: u32,
    #[serde(default)]
    target_port: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    ip: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    node: String,
}

pub fn parse(path: &Path, text: &str, cluster: &ClusterName) -> Result<Vec<ServiceRecord>, Error> {
    let p = || path.display().to_string();
    let file: File = serde_norway::from_str(text).map_err(|e| Error::Read {
        path: p(),
        reason: e.to_string(),
    })?;
    let mut out: Vec<ServiceRecord> = Vec::with_capacity(file.services.len());
    for (index, s) in file.services.into_iter().enumerate() {
        let msg = proto::Service {
            namespace: s.namespace,
            name: s.name,
            frontends: s.frontends,
            ports: s
                .ports
                .into_iter()
                .map(|p| proto::ServicePort {
                    name: p.name,
                    protocol: p.protocol,
                    port: p.port,
                    target_port: p.target_port,
                })
                .collect(),
            backends: s
                .backends
                .into_iter()
                .map(|b| proto::Backend {
                    ip: b.ip,
                    state: b.state,
                    node: b.node,
                })
                .collect(),
            global: s.global,
            shared: s.shared,
            affinity: s.affinity,
            cluster: String::new(),
        };
        let rec = convert::service_from_proto(&msg, cluster).map_err(|e| Error::Invalid {
            path: p(),
            index,
            reason: e.to_string(),
        })?;
        if out
            .iter()
            .any(|o| o.namespace == rec.namespace && o.name == rec.name)
        {
            return Err(Error::Duplicate {
                path: p(),
                index,
                namespace: rec.namespace.to_string(),
                name: rec.name.to_string(),
            });
        }
        out.push(rec);
    }
    Ok(out)
}

pub fn load(path: &Path, cluster: &ClusterName) -> Result<Vec<ServiceRecord>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(path, &text, cluster)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_refuses_with_position() {
        let c: ClusterName = "c1".parse().unwrap();
        let ok = "services:\n  - namespace: default\n    name: web\n    ports: [{port: 80}]\n    backends: [{ip: 10.1.0.5}]\n    global: true\n    affinity: local\n";
        let v = parse(Path::new("s.yaml"), ok, &c).unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].global && v[0].shared);
        assert_eq!(v[0].affinity, clustermesh_api::Affinity::Local);
        let bad = ok.replace("affinity: local", "affinity: nearest");
        let e = parse(Path::new("s.yaml"), &bad, &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("services[0]") && e.contains("service.affinity"),
            "{e}"
        );
        let unknown = ok.replace("global: true", "globl: true");
        assert!(
            parse(Path::new("s.yaml"), &unknown, &c)
                .unwrap_err()
                .to_string()
                .contains("globl")
        );
        let dup = format!("{ok}{}", ok.trim_start_matches("services:\n"));
        assert!(matches!(
            parse(Path::new("s.yaml"), &dup, &c),
            Err(Error::Duplicate { index: 1, .. })
        ));
    }
}
