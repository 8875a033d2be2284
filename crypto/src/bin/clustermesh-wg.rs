//! `clustermesh-wg`: a userspace WireGuard device (boringtun over TUN) for
//! kernels without the WireGuard module. It runs as its own long-lived
//! process, so restarting the node agent never interrupts encrypted
//! traffic; it is configured over the standard control socket
//! (`/var/run/wireguard/<iface>.sock`), by the agent or by `wg set`, and
//! shown by `wg show`.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use clustermesh_crypto::{
    keys::KeyFile,
    wg::{Device, uapi},
};

#[derive(Debug, Parser)]
#[command(name = "clustermesh-wg", version, about = "userspace WireGuard device")]
struct Args {
    /// Interface name of the TUN device to create (1-15 characters).
    iface: String,
    /// UDP port to listen on (clustermesh's default: 51871).
    #[arg(long, default_value_t = 51871)]
    port: u16,
    /// MTU of the device (1500 underlay - 80 bytes of WireGuard over IPv4/6).
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Directory of the control socket.
    #[arg(long, default_value = "/var/run/wireguard")]
    uapi_dir: PathBuf,
    /// Private key file, created (mode 0600) if missing; without it the key
    /// is set over the control socket.
    #[arg(long)]
    private_key_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let dev = Device::new(&args.iface, args.mtu, args.port)
        .with_context(|| format!("creating WireGuard device {}", args.iface))?;
    if let Some(path) = &args.private_key_file {
        let (key, created) = KeyFile::new(path)
            .load_or_create()
            .context("the private key")?;
        tracing::info!(
            public_key = %key.public_key()?,
            created,
            "private key loaded"
        );
        dev.set_private_key(key);
    }
    let _threads = dev.start();
    let sock = uapi::serve(dev.clone(), &args.uapi_dir).context("control socket")?;
    tracing::info!(iface = %args.iface, port = dev.listen_port(), control = %sock.display(), "WireGuard device up");
    // Serve until killed; closing the TUN (process exit) removes the device.
    loop {
        std::thread::park();
    }
}
