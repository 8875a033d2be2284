//! A real container runtime on a node of the mesh: Debian's podman (CNI
//! backend) calling `clustermesh-cni` as it calls any CNI plugin, for
//! containers run from a local root filesystem (busybox-static; no image
//! registry). scripts/setup.sh installs podman, runc and busybox-static.
//!
//! Set-up per node, under `<state>/podman-<node ns>`: a CNI network
//! `clustermesh` (`net/clustermesh.conflist`: the plugin with the node's
//! pod CIDR, endpoint directory and MTU), a `containers.conf` (backend
//! `cni`, plugin directory the product's binaries, runtime `runc` with
//! `cgroupfs`), podman's own storage, and the rootfs. podman runs in the
//! node's network namespace through `nsenter --net` (not `ip netns exec`,
//! whose private /sys hides the cgroup mounts the runtime needs), so the
//! plugin creates the host side of each container's veth in the node, as
//! the kubelet's runtime would.
//!
//! Why runc and these ulimits: this machine mounts cgroups in hybrid mode,
//! which crun refuses, and its hard `nofile` limit is below podman's
//! default.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::mesh::{Topology, run};

pub struct Podman {
    dir: PathBuf,
    node_netns: String,
    pub rootfs: PathBuf,
    pub endpoint_dir: PathBuf,
}

/// The busybox applets the tests use, linked in the rootfs.
const APPLETS: [&str; 6] = ["sh", "ping", "nc", "ip", "sleep", "echo"];

impl Podman {
    /// Podman for node `node` (index in `t.nodes`); `bin_dir` holds
    /// `clustermesh-cni`.
    pub fn on_node(t: &Topology, node: usize, bin_dir: &Path, mtu: u32) -> anyhow::Result<Self> {
        let n = t.nodes.get(node).context("no such node")?;
        let dir = t.state_dir.join(format!("podman-{}", n.netns));
        let net = dir.join("net");
        std::fs::create_dir_all(&net)?;
        let mut plugin = serde_json::json!({
            "type": "clustermesh-cni",
            "mtu": mtu,
            "endpointDir": n.agent.endpoint_dir,
        });
        if let Some(c) = &n.pod_cidr {
            plugin["podCIDR"] = c.as_str().into();
        }
        if let Some(c) = &n.pod_cidr6 {
            plugin[crate::mesh::CNI_POD_CIDR6] = c.as_str().into();
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0", "name": "clustermesh", "plugins": [plugin],
        });
        std::fs::write(net.join("clustermesh.conflist"), conflist.to_string())?;
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
            bin_dir.display(),
            net.display()
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("/bin/busybox (Debian package busybox-static; scripts/setup.sh)")?;
        for a in APPLETS {
            let link = rootfs.join("bin").join(a);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link)?;
            }
        }
        Ok(Self {
            dir,
            node_netns: n.netns.clone(),
            rootfs,
            endpoint_dir: n.agent.endpoint_dir.clone(),
        })
    }

    /// `podman <args>` in the node's network namespace, with this set-up.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    /// `podman run -d --name NAME --network clustermesh --rootfs ...`
    /// running `sleep`; returns the container id.
    pub fn run_detached(&self, name: &str) -> anyhow::Result<String> {
        let rootfs = self.rootfs.display().to_string();
        let out = run(&mut self.cmd(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "clustermesh",
            "--ulimit",
            "nofile=1024:4096",
            "--ulimit",
            "nproc=1024:1024",
            "--rootfs",
            &rootfs,
            "/bin/sleep",
            "600",
        ]))?;
        let id = out.lines().last().unwrap_or_default().trim().to_owned();
        if id.len() < 12 {
            bail!("podman run printed no container id: {out}");
        }
        Ok(id)
    }

    /// `podman exec NAME <argv>`: its output, or the error with it.
    pub fn exec(&self, name: &str, argv: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(argv);
        run(&mut self.cmd(&args))
    }

    /// `podman rm -f NAME`.
    pub fn rm(&self, name: &str) -> anyhow::Result<()> {
        run(&mut self.cmd(&["rm", "-f", name])).map(|_| ())
    }

    /// The addresses the plugin's IPAM has leased to `container_id`.
    pub fn leases_of(&self, container_id: &str) -> anyhow::Result<Vec<String>> {
        let p = self.endpoint_dir.join(".ipam").join("leases.json");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(v["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["container_id"] == container_id)
            .filter_map(|l| l["ip"].as_str().map(str::to_owned))
            .collect())
    }
}
