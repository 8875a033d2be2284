//! `clustermesh-apiserver`: one per cluster. Exits 64 on a bad configuration
//! (the message names the field), 1 on a runtime failure.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use clustermesh_api::{ClusterId, ClusterName, EncryptionMode, EncryptionPolicy, EncryptionScope};
use clustermesh_apiserver::{Config, StartError, config::GrpcTls};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Exports a cluster's state into its etcd"
)]
struct Args {
    /// This cluster's name (1-32 of a-z, 0-9, '-').
    #[arg(long)]
    cluster_name: String,
    /// This cluster's id (1..=255), unique in the mesh.
    #[arg(long)]
    cluster_id: u64,
    /// etcd endpoints, comma separated (http:// or https://).
    #[arg(long, value_delimiter = ',', required = true)]
    etcd_endpoints: Vec<String>,
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// etcd endpoints remote clusters should use (default: --etcd-endpoints).
    #[arg(long, value_delimiter = ',')]
    advertise_etcd_endpoints: Vec<String>,
    /// gRPC API listen address.
    #[arg(long, default_value = "127.0.0.1:9950")]
    listen: SocketAddr,
    /// The gRPC API's server certificate (PEM; `pki/<cluster>/apiserver-server.pem`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The CA of the callers' certificates (the cluster CA): every caller
    /// needs one; its CN is its identity (root: admin, node:NAME: a node).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Serve the gRPC API in plaintext, without authentication (anyone who
    /// reaches the port may change the cluster's posture). Tests and
    /// throwaway set-ups only.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Audit trail (JSON lines): posture changes and refused calls, with
    /// the caller's certificate identity.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Prometheus metrics listen address (GET /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// YAML file of services (standalone).
    #[arg(long)]
    services_file: Option<PathBuf>,
    /// none | wireguard
    #[arg(long, default_value = "none")]
    encryption: String,
    /// all | inter-cluster
    #[arg(long, default_value = "all")]
    encryption_scope: String,
    #[arg(long)]
    encryption_strict: bool,
    #[arg(long)]
    encryption_strict_ingress: bool,
    #[arg(long)]
    encryption_node_to_node: bool,
    /// Lease TTL in seconds of the exported keys.
    #[arg(long, default_value_t = 15)]
    lease_ttl: u64,
    /// Seconds between heartbeat writes.
    #[arg(long, default_value_t = 5)]
    heartbeat_interval: u64,
    /// Seconds without a node heartbeat before the node is removed.
    #[arg(long, default_value_t = 30)]
    node_ttl: u64,
    /// Seconds an identity no endpoint uses is kept before it is deleted
    /// (0: never).
    #[arg(long, default_value_t = 300)]
    identity_gc_grace: u64,
    /// Kubernetes mode: also watch Nodes, Services, EndpointSlices,
    /// Namespaces and the network policies (CiliumNetworkPolicy,
    /// CiliumClusterwideNetworkPolicy, NetworkPolicy) (in-cluster config or
    /// KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
}

fn config(a: Args) -> Result<Config, String> {
    let name: ClusterName = a
        .cluster_name
        .parse()
        .map_err(|e| format!("--cluster-name: {e}"))?;
    let id = ClusterId::new(a.cluster_id).map_err(|e| format!("--cluster-id: {e}"))?;
    let mut cfg = Config::new(name, id, a.etcd_endpoints);
    cfg.etcd.ca_file = a.etcd_ca;
    cfg.etcd.cert_file = a.etcd_cert;
    cfg.etcd.key_file = a.etcd_key;
    cfg.advertise_etcd_endpoints = a.advertise_etcd_endpoints;
    cfg.grpc_listen = a.listen;
    cfg.grpc_tls = match (a.tls_cert, a.tls_key, a.tls_client_ca) {
        (Some(cert_file), Some(key_file), Some(client_ca_file)) => Some(GrpcTls {
            cert_file,
            key_file,
            client_ca_file,
        }),
        (None, None, None) => None,
        _ => {
            return Err(
                "--tls-cert, --tls-key and --tls-client-ca go together (mutual TLS: the server's certificate and the callers' CA)".into(),
            );
        }
    };
    cfg.insecure_plaintext = a.insecure_plaintext;
    cfg.audit_log = a.audit_log;
    cfg.metrics_listen = a.metrics_listen;
    cfg.services_file = a.services_file;
    cfg.encryption = EncryptionPolicy {
        mode: match a.encryption.as_str() {
            "none" => EncryptionMode::None,
            "wireguard" => EncryptionMode::Wireguard,
            o => {
                return Err(format!(
                    "--encryption: unknown mode {o:?} (none or wireguard)"
                ));
            }
        },
        scope: match a.encryption_scope.as_str() {
            "all" => EncryptionScope::All,
            "inter-cluster" => EncryptionScope::InterCluster,
            o => {
                return Err(format!(
                    "--encryption-scope: unknown scope {o:?} (all or inter-cluster)"
                ));
            }
        },
        strict: a.encryption_strict,
        strict_ingress: a.encryption_strict_ingress,
        node_to_node: a.encryption_node_to_node,
    };
    cfg.lease_ttl = Duration::from_secs(a.lease_ttl);
    cfg.heartbeat_interval = Duration::from_secs(a.heartbeat_interval);
    cfg.node_ttl = Duration::from_secs(a.node_ttl);
    cfg.identity_gc_grace = Duration::from_secs(a.identity_gc_grace);
    Ok(cfg)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let kubernetes = args.kubernetes;
    let mut cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clustermesh-apiserver: invalid configuration: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    if kubernetes {
        match kube::Client::try_default().await {
            Ok(c) => cfg.kubernetes = Some(c),
            Err(e) => {
                eprintln!(
                    "clustermesh-apiserver: --kubernetes: no usable Kubernetes configuration: {e}"
                );
                return std::process::ExitCode::from(64);
            }
        }
    }
    let running = match clustermesh_apiserver::start(cfg).await {
        Ok(r) => r,
        Err(e @ StartError::Config(_)) => {
            eprintln!("clustermesh-apiserver: {e}");
            return std::process::ExitCode::from(64);
        }
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    tracing::info!(grpc = %running.grpc_addr, metrics = ?running.metrics_addr, "serving");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clustermesh-apiserver: installing SIGTERM handler: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = running.stopped() => {}
    }
    tracing::info!("shutting down (exported state is kept until its lease expires)");
    running.shutdown(Duration::from_secs(5)).await;
    std::process::ExitCode::SUCCESS
}
