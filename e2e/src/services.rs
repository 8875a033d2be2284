//! Global-service fixtures: a backend that answers with its name (TCP and
//! UDP) inside a pod, clients that ask a frontend from inside a pod, and the
//! service declaration sent to a cluster's apiserver.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use clustermesh_api::proto;
use clustermesh_testkit::netns::NetNs;

/// Backend port of the test service (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;
/// Frontend port of the test service (TCP and UDP).
pub const FRONTEND_PORT: u16 = 80;

/// Answers every TCP connection and UDP datagram on `port` with its name,
/// inside a pod's namespace. Stopped (sockets shut down, threads joined) on
/// drop.
pub struct Responder {
    tcp: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Responder {
    pub fn start(pod: &NetNs, name: &str, port: u16) -> Self {
        Self::start_on(pod, name, Ipv4Addr::UNSPECIFIED.into(), port)
    }

    /// [`Responder::start`] on address `any` (e.g. `::` for IPv6 clients).
    pub fn start_on(pod: &NetNs, name: &str, any: std::net::IpAddr, port: u16) -> Self {
        // Sockets belong to the namespace they are created in.
        let (tcp, udp) = std::thread::scope(|s| {
            s.spawn(|| {
                let _in = pod.enter().unwrap();
                let any = SocketAddr::from((any, port));
                (
                    TcpListener::bind(any).unwrap(),
                    UdpSocket::bind(any).unwrap(),
                )
            })
            .join()
            .unwrap()
        });
        let (tcp, udp) = (Arc::new(tcp), Arc::new(udp));
        let stop_flag = Arc::new(AtomicBool::new(false));
        let stop = stop_flag.clone();
        let (t, n) = (tcp.clone(), name.as_bytes().to_vec());
        let tcp_thread = std::thread::spawn(move || {
            // Ends when the listener is shut down (accept fails).
            while let Ok((mut c, _)) = t.accept() {
                let _ = c.write_all(&n);
            }
        });
        let (u, n, stop) = (udp.clone(), name.as_bytes().to_vec(), stop.clone());
        // A shut-down UDP socket wakes recv_from without a peer address,
        // which std refuses; so the UDP side looks at `stop` between reads.
        u.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&n, from);
                }
            }
        });
        Responder {
            tcp,
            stop: stop_flag,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: a valid descriptor owned by the Arc; shutdown wakes the
        // blocked accept.
        unsafe {
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request: connect, read the answer to the end.
pub fn ask_tcp(to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    ask_tcp_from(to, timeout).map(|(_, answer)| answer)
}

/// [`ask_tcp`] from a given client port (SO_REUSEADDR), to replay a flow
/// the datapath has seen before.
pub fn ask_tcp_bound(to: SocketAddr, port: u16, timeout: Duration) -> std::io::Result<String> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(dst) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket calls on a descriptor owned here; on success it
    // moves into the TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let local = sin(Ipv4Addr::UNSPECIFIED, port);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = s;
        s.set_read_timeout(Some(timeout))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}

/// [`ask_tcp`], also returning the client's port.
pub fn ask_tcp_from(to: SocketAddr, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    let port = s.local_addr()?.port();
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok((port, out))
}

/// One UDP request from a fresh socket; the answer must come from `to`
/// (the frontend, not the backend: the reply was translated back).
pub fn ask_udp(to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let s = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"who", to)?;
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf)?;
    if from != to {
        return Err(std::io::Error::other(format!(
            "answer came from {from}, not {to}"
        )));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The outcome of one request, with when it started.
#[derive(Debug, Clone)]
pub struct Answer {
    pub at: Instant,
    /// The client's port (0 when the connection failed).
    pub port: u16,
    pub result: Result<String, String>,
}

impl Answer {
    /// One TCP request to `to`, timed.
    pub fn ask(to: SocketAddr) -> Self {
        let at = Instant::now();
        match ask_tcp_from(to, Duration::from_secs(1)) {
            Ok((port, name)) => Answer {
                at,
                port,
                result: Ok(name),
            },
            Err(e) => Answer {
                at,
                port: 0,
                result: Err(e.to_string()),
            },
        }
    }
}

/// Runs `f` on a thread inside `pod`'s namespace.
pub fn in_pod<T: Send>(pod: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _in = pod.enter().unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// `n` TCP requests to `to` from inside `pod`, one after the other.
pub fn ask_many(pod: &NetNs, to: SocketAddr, n: usize) -> Vec<Answer> {
    in_pod(pod, || (0..n).map(|_| Answer::ask(to)).collect())
}

/// Counts answers per responder name (errors under `"error: ..."`).
pub fn tally(answers: &[Answer]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for a in answers {
        let k = match &a.result {
            Ok(name) => name.clone(),
            Err(e) => format!("error: {e}"),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// The test service `default/web`: frontend `frontend` on TCP and UDP
/// port 80 to 8080, backends ready.
pub fn web_service(
    frontend: Ipv4Addr,
    backends: &[Ipv4Addr],
    global: bool,
    shared: bool,
    affinity: &str,
) -> proto::Service {
    let port = |protocol: &str| proto::ServicePort {
        name: protocol.to_lowercase(),
        protocol: protocol.into(),
        port: FRONTEND_PORT.into(),
        target_port: BACKEND_PORT.into(),
    };
    proto::Service {
        namespace: "default".into(),
        name: "web".into(),
        frontends: vec![frontend.to_string()],
        ports: vec![port("TCP"), port("UDP")],
        backends: backends
            .iter()
            .map(|ip| proto::Backend {
                ip: ip.to_string(),
                state: "ready".into(),
                node: String::new(),
            })
            .collect(),
        global,
        shared,
        affinity: affinity.into(),
        cluster: String::new(),
    }
}

/// The service fixture of the test and the benchmark: a [`Mesh`] whose
/// pods (one per cluster) answer their cluster's name ("c1", "c2") on
/// [`BACKEND_PORT`], extra client pods on node A (c1), both agents running
/// (Geneve) and synced. Fields drop in order: agents, responders, clients,
/// then the mesh.
pub struct ServiceRig {
    pub agents: Vec<crate::product::Killed>,
    pub responders: Vec<Responder>,
    pub clients: Vec<NetNs>,
    pub m: crate::product::Mesh,
}

impl ServiceRig {
    /// `clients`: names of the client pods; `a_args`: extra arguments of
    /// node A's agent.
    pub fn start(clients: &[&str], a_args: &[&str]) -> Self {
        use crate::product::{Killed, Mesh, until};
        let m = Mesh::new(clustermesh_api::EncryptionPolicy::default());
        let clients: Vec<NetNs> = clients
            .iter()
            .map(|name| {
                let ns = NetNs::new(name).unwrap();
                m.a.add_pod(&ns, name, 1450);
                ns
            })
            .collect();
        let responders = vec![
            Responder::start(&m.a.pod, "c1", BACKEND_PORT),
            Responder::start(&m.b.pod, "c2", BACKEND_PORT),
        ];
        let (ea, aa) = m.cluster_of(&m.a);
        let (eb, ab) = m.cluster_of(&m.b);
        // A attaches its pod, the clients, the overlay and the underlay.
        let a_attach = 3 + clients.len();
        let agents = vec![
            Killed(m.a.start_agent_with(&ea, &aa, "geneve", a_args, a_attach).0),
            Killed(m.b.start_agent(&eb, &ab).0),
        ];
        until("both agents synced", Duration::from_secs(30), || {
            Mesh::synced(&m.a) && Mesh::synced(&m.b)
        });
        ServiceRig {
            agents,
            responders,
            clients,
            m,
        }
    }
}
