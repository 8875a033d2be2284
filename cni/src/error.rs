//! The plugin's error type and its CNI error codes.
//!
//! Every failure leaves the plugin as a spec-shaped error object on stdout
//! (`{"cniVersion","code","msg","details"}`) and exit status 1. Each module
//! has its own error enum; [`Error`] gathers them and [`Error::code`] maps
//! each case to one CNI code: the spec's well-known codes where one fits,
//! 100 and up (listed in [`code`]) for this plugin's own cases. `msg` is the
//! error's `Display`, `details` the chain of its sources.

use std::{error::Error as _, io};

use crate::{
    cmd::CheckError,
    config::{CniVersion, ConfigError},
    delegate::DelegateError,
    endpoint::EndpointError,
    env::{Command, EnvError},
    ipam::IpamError,
    link::LinkError,
};

/// CNI error codes. 1-11 are the spec's; 100+ are this plugin's.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist (the runtime need not clean up).
    pub const CONTAINER_UNKNOWN: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a transient condition: the node agent did not
    /// attach the pod's datapath in time).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// A netlink request was refused by the kernel.
    pub const NETLINK: u32 = 100;
    /// The pod CIDR has no free address.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// The delegated IPAM plugin is missing, failed without a CNI error, or
    /// returned no IPv4 address.
    pub const IPAM_DELEGATE: u32 = 102;
    /// CHECK found the attachment different from what ADD set up.
    pub const CHECK_FAILED: u32 = 103;
    /// Another attachment already owns a name this one needs.
    pub const CONFLICT: u32 = 104;
    /// A state file (address leases, endpoint file) cannot be decoded.
    pub const STATE_CORRUPT: u32 = 105;
}

/// Everything ADD, DEL, CHECK, VERSION, STATUS and GC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Delegate(#[from] DelegateError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("reading the network configuration from stdin")]
    Stdin(#[source] io::Error),
    #[error("CNI version {version} does not support the {command} command")]
    CommandVersion {
        command: Command,
        version: CniVersion,
    },
    #[error("CNI_NETNS {path}: the network namespace does not exist")]
    NetnsMissing {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("CNI_NETNS {path}: cannot open the network namespace")]
    NetnsOpen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("CNI_NETNS {path} is not a network namespace")]
    NetnsNotNamespace { path: String },
    #[error("CNI_NETNS {path} is the plugin's own network namespace, not a pod's")]
    NetnsIsOwn { path: String },
    #[error("container {container_id} is unknown: no endpoint file {path}")]
    ContainerUnknown { container_id: String, path: String },
    #[error("CHECK failed: {0}")]
    Check(#[from] CheckError),
    #[error(
        "container {container_id} already has an attachment on {existing}; this plugin gives a container one interface"
    )]
    AttachmentExists {
        container_id: String,
        existing: String,
    },
    #[error(
        "the node agent did not attach the datapath of container {container_id} (host veth {host_iface}) within {timeout_s}s; the pod stays unconnected (fail closed): check that node-agent runs with --endpoint-dir {endpoint_dir}"
    )]
    AgentNotReady {
        container_id: String,
        host_iface: String,
        endpoint_dir: String,
        timeout_s: u64,
    },
    #[error(
        "host interface {name} exists and belongs to {owner:?}, not container {container_id} (name hash collision)"
    )]
    HostNameTaken {
        name: String,
        owner: Option<String>,
        container_id: String,
    },
}

impl Error {
    /// The CNI error code reported for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::Env(_) => code::INVALID_ENV,
            Self::Config(e) => e.code(),
            Self::Ipam(e) => e.code(),
            Self::Delegate(e) => e.code(),
            Self::Link(e) => e.code(),
            Self::Endpoint(e) if e.is_corrupt() => code::STATE_CORRUPT,
            Self::Endpoint(_) => code::IO,
            Self::Stdin(_) => code::IO,
            Self::CommandVersion { .. } => code::INCOMPATIBLE_VERSION,
            Self::NetnsMissing { .. } | Self::ContainerUnknown { .. } => code::CONTAINER_UNKNOWN,
            Self::NetnsOpen { .. } => code::IO,
            Self::NetnsIsOwn { .. } | Self::NetnsNotNamespace { .. } => code::INVALID_ENV,
            Self::Check { .. } => code::CHECK_FAILED,
            Self::AttachmentExists { .. } | Self::HostNameTaken { .. } => code::CONFLICT,
            Self::AgentNotReady { .. } => code::TRY_AGAIN_LATER,
        }
    }

    /// The `details` field: the error's sources, outermost first, or the
    /// delegated plugin's own details when it reported a CNI error.
    pub fn details(&self) -> String {
        if let Self::Delegate(DelegateError::Plugin { details, .. }) = self {
            return details.clone();
        }
        let mut parts = Vec::new();
        let mut next = self.source();
        while let Some(e) = next {
            parts.push(e.to_string());
            next = e.source();
        }
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_walk_the_source_chain() {
        let e = Error::NetnsOpen {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(e.code(), code::IO);
        assert!(e.to_string().contains("/x"), "{e}");
        assert!(e.details().contains("denied"), "{}", e.details());
    }
}
