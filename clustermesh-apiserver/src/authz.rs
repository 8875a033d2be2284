//! Who is calling, and what they may do.
//!
//! The gRPC API runs with mutual TLS: every caller presents a certificate
//! of the cluster CA (`clustermesh enable` issues them), and its common
//! name is its identity:
//!
//! | CN | caller | may |
//! | --- | --- | --- |
//! | `root` | the admin (the CLI) | everything |
//! | `node:<name>` | node `<name>`'s agent | read; register, heartbeat, deregister (with its boot id) only node `<name>`; add endpoints only for node `<name>` (inside its pod CIDRs, checked by the state), remove only node `<name>`'s |
//! | anything else of the CA | e.g. `remote-<cluster>`, the etcd readers | read only |
//!
//! Posture (the encryption policy), services, network policies and
//! removing another node need the admin. With `--insecure-plaintext` there is no certificate: the
//! caller is [`Caller::Insecure`] and allowed everything (the apiserver
//! warns at start, and says so in its status and metrics).
//!
//! [`authorize`] is pure and table-tested; [`Caller::of`] reads the
//! certificate tonic's TLS layer has already verified against the CA.

use std::fmt;

use clustermesh_api::NodeName;
use tonic::{Request, Status};

/// The CN of the admin certificate (also the etcd root user).
pub const ADMIN_CN: &str = "root";
/// The CN prefix of node certificates: `node:<node name>`.
pub const NODE_CN_PREFIX: &str = "node:";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Node(NodeName),
    /// Another certificate of the cluster CA (its CN).
    Other(String),
    /// No TLS (`--insecure-plaintext`).
    Insecure,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Admin => f.write_str(ADMIN_CN),
            Caller::Node(n) => write!(f, "{NODE_CN_PREFIX}{n}"),
            Caller::Other(cn) => f.write_str(cn),
            Caller::Insecure => f.write_str("insecure-plaintext"),
        }
    }
}

impl Caller {
    /// The identity a certificate's common name gives.
    pub fn from_cn(cn: &str) -> Caller {
        if cn == ADMIN_CN {
            return Caller::Admin;
        }
        if let Some(name) = cn.strip_prefix(NODE_CN_PREFIX)
            && let Ok(n) = name.parse::<NodeName>()
        {
            return Caller::Node(n);
        }
        Caller::Other(cn.to_owned())
    }

    /// The caller of a request: the verified client certificate's CN, or
    /// [`Caller::Insecure`] when the API runs without TLS.
    pub fn of<T>(req: &Request<T>, insecure: bool) -> Result<Caller, Status> {
        if insecure {
            return Ok(Caller::Insecure);
        }
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("no client certificate: this API needs one of the cluster CA")
        })?;
        let der = certs.first().ok_or_else(|| {
            Status::unauthenticated("no client certificate: this API needs one of the cluster CA")
        })?;
        let cn = common_name(der.as_ref()).ok_or_else(|| {
            Status::unauthenticated("the client certificate has no readable common name")
        })?;
        Ok(Caller::from_cn(&cn))
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// What a call does, for [`authorize`].
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Cluster info, status, the service list.
    Read,
    /// Register, heartbeat, deregister (with its boot id), add or remove
    /// endpoints of this node.
    ActAsNode(&'a NodeName),
    /// Deregister a node without its boot id.
    ForceRemoveNode(&'a NodeName),
    /// Change the encryption policy.
    Posture,
    /// Create, change or delete a service.
    Services,
    /// Apply or delete a network policy.
    Policy,
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Read => f.write_str("read the cluster's state"),
            Action::ActAsNode(n) => write!(f, "act for node {n}"),
            Action::ForceRemoveNode(n) => write!(f, "remove node {n} without its boot id"),
            Action::Posture => f.write_str("change the encryption policy"),
            Action::Services => f.write_str("change services"),
            Action::Policy => f.write_str("change network policies"),
        }
    }
}

/// Whether `caller` may do `action`; a refusal names both.
pub fn authorize(caller: &Caller, action: Action<'_>) -> Result<(), Status> {
    let ok = match (caller, action) {
        (Caller::Admin | Caller::Insecure, _) => true,
        (_, Action::Read) => true,
        (Caller::Node(me), Action::ActAsNode(n)) => me == n,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let need = match action {
            Action::ActAsNode(n) => {
                format!("the certificate of node {n} ({NODE_CN_PREFIX}{n}) or the admin's")
            }
            _ => format!("the admin certificate (CN {ADMIN_CN})"),
        };
        Err(Status::permission_denied(format!(
            "{caller} may not {action}: that needs {need}"
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn certificate_names() {
        assert_eq!(Caller::from_cn("root"), Caller::Admin);
        assert_eq!(
            Caller::from_cn("node:node-1"),
            Caller::Node("node-1".parse().unwrap())
        );
        // Not a node name: an ordinary identity, never a node.
        assert_eq!(
            Caller::from_cn("node:Bad_Name"),
            Caller::Other("node:Bad_Name".into())
        );
        assert_eq!(
            Caller::from_cn("remote-c1"),
            Caller::Other("remote-c1".into())
        );
        assert_eq!(Caller::from_cn("Root"), Caller::Other("Root".into()));
    }

    #[test]
    fn who_may_do_what() {
        let n1: NodeName = "node-1".parse().unwrap();
        let n2: NodeName = "node-2".parse().unwrap();
        let node1 = Caller::Node(n1.clone());
        let other = Caller::Other("remote-c1".into());
        use Action::*;
        #[rustfmt::skip]
        let table: &[(&Caller, Action<'_>, bool)] = &[
            (&Caller::Admin, Posture, true),
            (&Caller::Admin, Services, true),
            (&Caller::Admin, Policy, true),
            (&Caller::Insecure, Policy, true),
            (&Caller::Admin, ForceRemoveNode(&n2), true),
            (&Caller::Admin, ActAsNode(&n2), true),
            (&Caller::Insecure, Posture, true),
            (&node1, Read, true),
            (&node1, ActAsNode(&n1), true),
            (&node1, ActAsNode(&n2), false),
            (&node1, ForceRemoveNode(&n1), false),
            (&node1, Posture, false),
            (&node1, Services, false),
            (&node1, Policy, false),
            (&other, Read, true),
            (&other, ActAsNode(&n1), false),
            (&other, Posture, false),
            (&other, Services, false),
            (&other, Policy, false),
        ];
        for (caller, action, want) in table {
            let got = authorize(caller, *action);
            assert_eq!(got.is_ok(), *want, "{caller} {action}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code(), tonic::Code::PermissionDenied);
                assert!(
                    e.message().starts_with(&caller.to_string()),
                    "{}",
                    e.message()
                );
            }
        }
    }
}
