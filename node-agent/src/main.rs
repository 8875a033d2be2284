//! `node-agent`: parse the flags, validate them (exit 64 naming the flag),
//! build the stages ([`node_agent::node::start`]) under one root
//! cancellation token and task tracker, and shut down gracefully on SIGTERM
//! or SIGINT: cancel, then wait for every task (with a grace period). The
//! datapath (pinned maps and links) and the WireGuard device outlive the
//! agent, so traffic keeps flowing while it is stopped or restarted.

use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use node_agent::config::AgentConfig;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long tasks get to finish after the root token is cancelled.
const GRACE: Duration = Duration::from_secs(3);

/// Exit status of a configuration error (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

/// Cancels `cancel` on SIGTERM or SIGINT.
async fn shutdown_on_signal(cancel: CancellationToken) {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "no signal handlers: stop the agent with SIGKILL");
            return;
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    cancel.cancel();
}

/// SIGUSR1 asks for a key rotation; without WireGuard there is none, and
/// the signal must not kill the agent (its default action).
async fn ignore_usr1_without_rotation(cancel: CancellationToken) {
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = usr1.recv() => tracing::info!("SIGUSR1: no WireGuard key to rotate on this node"),
        }
    }
}

async fn run(cfg: AgentConfig, v: node_agent::config::Validated) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(shutdown_on_signal(cancel.clone()));
    if cfg.wireguard_iface.is_none() {
        tracker.spawn(ignore_usr1_without_rotation(cancel.clone()));
    }
    let _running = match node_agent::node::start(cfg, v, &cancel, &tracker).await {
        Ok(r) => r,
        Err(e) => {
            cancel.cancel();
            tracker.close();
            let _ = tokio::time::timeout(GRACE, tracker.wait()).await;
            return Err(e.into());
        }
    };
    tracker.close();
    cancel.cancelled().await;
    if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within {GRACE:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = AgentConfig::parse();
    let v = match cfg.validate() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("node-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, v)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
