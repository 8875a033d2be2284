//! A Linux TUN device (layer 3, no packet-information header), opened in
//! the calling thread's network namespace, brought up with its MTU, with a
//! virtio-net header on every packet and TCP segmentation offload for IPv4
//! and IPv6 (the kernel hands over 64 KiB TCP super-packets; see
//! `offload`).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _},
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

/// An open TUN device; closing the file removes the interface.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

const ZERO_HDR: [u8; super::offload::VNET_HDR_LEN] = [0; super::offload::VNET_HDR_LEN];

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1-15 characters)"),
        ));
    }
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

impl Tun {
    /// Creates (or attaches to) TUN device `name`, sets `mtu` and brings it
    /// up.
    pub fn open(name: &str, mtu: u32) -> io::Result<Self> {
        let mut req = ifreq(name)?;
        // SAFETY: a path literal; the returned fd is owned below.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: valid fd and ifreq for TUNSETIFF.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Checksum and TSO offload (TCP over IPv4 and IPv6): reads may be
        // super-packets.
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: valid fd; the argument is a flags value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tun = Self {
            file,
            name: name.to_owned(),
        };
        tun.configure(mtu)?;
        Ok(tun)
    }

    fn configure(&self, mtu: u32) -> io::Result<()> {
        // SAFETY: a plain datagram socket used for interface ioctls, closed
        // by the File.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: owned fd.
        let sock = unsafe { File::from_raw_fd(sock) };
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        // SAFETY: valid socket and ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req = ifreq(&self.name)?;
        // SAFETY: valid socket and ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: valid socket and ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one virtio-net header and the (super-)packet after it.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read as _;
        (&self.file).read(buf)
    }

    /// Writes a virtio-net header and the (super-)packet after it.
    pub fn send_with_header(&self, buf: &[u8]) -> io::Result<usize> {
        use std::io::Write as _;
        (&self.file).write(buf)
    }

    /// Writes one IP packet (behind an empty virtio-net header).
    pub fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        use std::io::Write as _;
        (&self.file).write_vectored(&[io::IoSlice::new(&ZERO_HDR), io::IoSlice::new(pkt)])
    }
}
