//! Offloads that take the per-packet cost out of the device:
//!
//! - **TUN TSO** (`IFF_VNET_HDR` + `TUNSETOFFLOAD`): the kernel hands the
//!   device whole TCP super-packets (up to 64 KiB) with a virtio-net header
//!   instead of one read per segment; [`segments`] cuts them into MTU-sized
//!   TCP/IPv4 or TCP/IPv6 segments in user space (sequence numbers, IPv4
//!   ids, IP lengths, flags and checksums fixed up), which are then
//!   encrypted one by one.
//! - **UDP GSO** (`UDP_SEGMENT`): the encrypted segments of one super-packet
//!   leave in one `sendmsg`; the kernel splits them into datagrams.
//! - **UDP GRO** (`UDP_GRO`): one `recvmsg` returns a run of datagrams from
//!   one sender, split again by their size.
//! - **TCP coalescing** toward the TUN ([`TcpCoalescer`]): decrypted
//!   consecutive segments of one TCP/IPv4 or TCP/IPv6 flow go to the TUN as
//!   one super-packet.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
};

/// Size of the virtio-net header the TUN device prefixes.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// The parts of a virtio-net header we use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
        })
    }
}

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let (pairs, rest) = data.as_chunks::<2>();
    for c in pairs {
        acc += u64::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Completes a partial checksum (`NEEDS_CSUM`): the field holds the
/// pseudo-header sum; the sum from `start` to the end goes in.
fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return None;
    }
    let c = !fold(sum16(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Some(())
}

fn ipv4_csum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = !fold(sum16(h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

fn tcp4_csum(ip: &[u8], tcp: &mut [u8]) {
    tcp[16] = 0;
    tcp[17] = 0;
    let mut acc = sum16(&ip[12..20], 0);
    acc += 6 + tcp.len() as u64;
    let c = !fold(sum16(tcp, acc));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// TCP over IPv6 (pseudo-header: addresses, upper-layer length, next
/// header).
fn tcp6_csum(ip: &[u8], tcp: &mut [u8]) {
    tcp[16] = 0;
    tcp[17] = 0;
    let mut acc = sum16(&ip[8..40], 0);
    acc += 6 + tcp.len() as u64;
    let c = !fold(sum16(tcp, acc));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Length of the IP header of a TCP super-packet the device can cut:
/// IPv4 (options allowed) under a TCPV4 header, or IPv6 without extension
/// headers (next header TCP) and with a payload length that matches under
/// a TCPV6 header. Returns the length and whether it is IPv6.
fn tso_ip_len(gso_type: u8, pkt: &[u8]) -> Option<(usize, bool)> {
    match (gso_type & 0x7f, pkt.first()? >> 4) {
        (VIRTIO_NET_HDR_GSO_TCPV4, 4) => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            (ihl >= 20).then_some((ihl, false))
        }
        (VIRTIO_NET_HDR_GSO_TCPV6, 6) => {
            let h = pkt.get(..40)?;
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            (h[6] == 6 && plen == pkt.len() - 40).then_some((40, true))
        }
        _ => None,
    }
}

/// Calls `f` with each IP packet of what the TUN device returned (header
/// included in `buf`): the packet itself with its checksum completed, or
/// the segments of a TCP/IPv4 or TCP/IPv6 super-packet. Returns false (and
/// calls nothing) for a header it cannot handle.
pub fn segments(buf: &mut [u8], scratch: &mut Vec<u8>, mut f: impl FnMut(&[u8])) -> bool {
    let Some(h) = VnetHdr::parse(buf) else {
        return false;
    };
    let pkt = &mut buf[VNET_HDR_LEN..];
    if h.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
            && complete_csum(pkt, h.csum_start.into(), h.csum_offset.into()).is_none()
        {
            return false;
        }
        f(pkt);
        return true;
    }
    let Some((ihl, v6)) = tso_ip_len(h.gso_type, pkt) else {
        return false;
    };
    let Some(doff) = pkt.get(ihl + 12).map(|b| usize::from(b >> 4) * 4) else {
        return false;
    };
    let hdrs = ihl + doff;
    let mss = usize::from(h.gso_size);
    if doff < 20 || hdrs > pkt.len() || mss == 0 {
        return false;
    }
    let id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let flags = pkt[ihl + 13];
    let payload_len = pkt.len() - hdrs;
    let n = payload_len.div_ceil(mss).max(1);
    for i in 0..n {
        let start = hdrs + i * mss;
        let end = (start + mss).min(pkt.len());
        scratch.clear();
        scratch.extend_from_slice(&pkt[..hdrs]);
        scratch.extend_from_slice(&pkt[start..end]);
        if v6 {
            let plen = (scratch.len() - 40) as u16;
            scratch[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let total = scratch.len() as u16;
            scratch[2..4].copy_from_slice(&total.to_be_bytes());
            scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            ipv4_csum(&mut scratch[..ihl]);
        }
        let s = seq.wrapping_add((i * mss) as u32);
        scratch[ihl + 4..ihl + 8].copy_from_slice(&s.to_be_bytes());
        let mut fl = flags;
        if i + 1 < n {
            fl &= !(0x01 | 0x08); // FIN, PSH only on the last
        }
        if i > 0 {
            fl &= !0x80; // CWR only on the first
        }
        scratch[ihl + 13] = fl;
        let (ip, tcp) = scratch.split_at_mut(ihl);
        if v6 {
            tcp6_csum(ip, tcp);
        } else {
            tcp4_csum(ip, tcp);
        }
        f(scratch);
    }
    true
}

/// Sends `buf` (datagrams of `seg` bytes, the last maybe shorter) to `to`
/// in one `sendmsg` with `UDP_SEGMENT`.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
    if buf.len() <= seg {
        return sock.send_to(buf, to).map(drop);
    }
    // The destination as the kernel takes it: sockaddr_in or sockaddr_in6
    // (an IPv4 one on the dual-stack socket goes out over IPv4).
    // SAFETY: plain data structures filled below.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let namelen = match to {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough.
            let a = unsafe {
                &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = v4.port().to_be();
            a.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let a = unsafe {
                &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = v6.port().to_be();
            a.sin6_addr.s6_addr = v6.ip().octets();
            a.sin6_flowinfo = v6.flowinfo().to_be();
            a.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 4]; // aligned room for one cmsg with a u16
    // SAFETY: zeroed msghdr, then pointers to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = namelen as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: msg_control points at cbuf, large enough for one cmsg.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
    // SAFETY: a valid socket and message.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns UDP GRO on: `recv_gro` may then return several datagrams.
pub fn enable_gro(sock: &UdpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and option value.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the socket's buffers (as root beyond the sysctl limits).
pub fn set_buffers(sock: &UdpSocket, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: a valid socket and option value.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
    }
}

/// Receives into `buf`; returns (bytes, sender, datagram size) where the
/// datagram size is what GRO coalesced by (the whole length otherwise).
pub fn recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: plain data structures filled by the kernel.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: zeroed msghdr, then pointers to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: a valid socket and message.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut seg = n;
    // SAFETY: iterating the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                if v > 0 {
                    seg = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
            SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
            // An IPv4 sender on the dual-stack socket is v4-mapped: give
            // it back as IPv4 (endpoints, roaming, `wg show`).
            SocketAddr::from((
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).to_canonical(),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => return Err(io::Error::other("unknown sender address family")),
    };
    Ok((n, from, seg))
}

/// User-space TCP GRO for what the device decrypted: consecutive
/// segments of one TCP flow, over IPv4 or IPv6 (same addresses, ports,
/// header bytes apart from lengths, IPv4 id, sequence number, PSH and
/// checksums, full-size payloads, no FIN, SYN, RST, URG, CWR, ECE) are
/// merged into one super-packet written to the TUN device in one call with
/// a TCPV4 or TCPV6 GSO virtio-net header; anything else (IPv4 options or
/// fragments, IPv6 extension headers, lengths that do not match the
/// packet) is written as it is.
#[derive(Debug, Default)]
pub struct TcpCoalescer {
    /// virtio-net header room + the packet being built.
    buf: Vec<u8>,
    segments: usize,
    mss: usize,
    /// IP header length: 20 (IPv4) or 40 (IPv6).
    ip_len: usize,
    hdr_len: usize,
    next_seq: u32,
}

/// Largest coalesced IP packet.
const MAX_COALESCED: usize = 65_000;

impl TcpCoalescer {
    fn mergeable(&self, pkt: &[u8]) -> bool {
        let (ip, h) = (self.ip_len, self.hdr_len);
        if self.segments == 0 || pkt.len() < ip + 20 {
            return false;
        }
        let cur = &self.buf[VNET_HDR_LEN..];
        if pkt.len() <= h || pkt.len() - h > self.mss || cur.len() + pkt.len() - h > MAX_COALESCED {
            return false;
        }
        // The last merged segment was full-size and had no PSH.
        if cur[ip + 13] & 0x08 != 0 || !(cur.len() - h).is_multiple_of(self.mss) {
            return false;
        }
        let t = ip;
        let seq = u32::from_be_bytes([pkt[t + 4], pkt[t + 5], pkt[t + 6], pkt[t + 7]]);
        // Same IP header apart from length, id, checksum (IPv4: version
        // and header length, TOS, fragment field, TTL, protocol,
        // addresses; IPv6: version, traffic class, flow label, next
        // header, hop limit, addresses, and a payload length that matches).
        let same_ip = if ip == 40 {
            let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            plen == pkt.len() - 40 && pkt[0..4] == cur[0..4] && pkt[6..40] == cur[6..40]
        } else {
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            total == pkt.len()
                && pkt[0..2] == cur[0..2]
                && pkt[6..10] == cur[6..10]
                && pkt[12..20] == cur[12..20]
        };
        // Same TCP header apart from sequence number, PSH and checksum.
        seq == self.next_seq
            && same_ip
            && pkt[t..t + 4] == cur[t..t + 4]
            && pkt[t + 8..t + 13] == cur[t + 8..t + 13]
            && (pkt[t + 13] & !0x08) == (cur[t + 13] & !0x08)
            && pkt[t + 14..t + 16] == cur[t + 14..t + 16]
            && pkt[t + 18..h] == cur[t + 18..h]
    }

    /// A packet that may start a run: TCP/IPv4 without options in IP, no
    /// fragments, or TCP/IPv6 without extension headers, whose length
    /// field matches; only ACK (and PSH). Returns (IP header length,
    /// IP and TCP header length).
    fn candidate(pkt: &[u8]) -> Option<(usize, usize)> {
        let ip = match *pkt.first()? {
            0x45 if pkt.len() >= 40
                && pkt[9] == 6
                && pkt[6] & 0x3f == 0
                && pkt[7] == 0
                && usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) == pkt.len() =>
            {
                20
            }
            v if v >> 4 == 6
                && pkt.len() >= 60
                && pkt[6] == 6
                && usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) == pkt.len() - 40 =>
            {
                40
            }
            _ => return None,
        };
        let doff = usize::from(pkt[ip + 12] >> 4) * 4;
        let h = ip + doff;
        let flags = pkt[ip + 13];
        (doff >= 20 && pkt.len() > h && flags & !(0x10 | 0x08) == 0 && flags & 0x10 != 0)
            .then_some((ip, h))
    }

    /// Adds one decrypted IP packet; writes out (with `write`) whatever can
    /// no longer grow.
    pub fn push(&mut self, pkt: &[u8], mut write: impl FnMut(&[u8])) {
        if self.mergeable(pkt) {
            let h = self.hdr_len;
            self.buf.extend_from_slice(&pkt[h..]);
            // PSH travels with the last segment.
            let fl = VNET_HDR_LEN + self.ip_len + 13;
            self.buf[fl] |= pkt[self.ip_len + 13] & 0x08;
            self.segments += 1;
            self.next_seq = self.next_seq.wrapping_add((pkt.len() - h) as u32);
            return;
        }
        self.flush(&mut write);
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(pkt);
        match Self::candidate(pkt) {
            Some((ip, h)) => {
                self.segments = 1;
                self.ip_len = ip;
                self.hdr_len = h;
                self.mss = pkt.len() - h;
                let t = ip;
                let seq = u32::from_be_bytes([pkt[t + 4], pkt[t + 5], pkt[t + 6], pkt[t + 7]]);
                self.next_seq = seq.wrapping_add(self.mss as u32);
            }
            None => {
                // Not mergeable: out at once.
                write(&self.buf);
                self.buf.clear();
                self.segments = 0;
            }
        }
    }

    /// Writes out the packet being built, if any.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8])) {
        if self.segments == 0 {
            return;
        }
        if self.segments > 1 {
            let (ip, h) = (self.ip_len, self.hdr_len);
            let total = self.buf.len() - VNET_HDR_LEN;
            let pkt = &mut self.buf[VNET_HDR_LEN..];
            // Partial checksum: the folded pseudo-header sum.
            let (gso, acc) = if ip == 40 {
                pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
                (VIRTIO_NET_HDR_GSO_TCPV6, sum16(&pkt[8..40], 0))
            } else {
                pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ipv4_csum(&mut pkt[..20]);
                (VIRTIO_NET_HDR_GSO_TCPV4, sum16(&pkt[12..20], 0))
            };
            let acc = acc + 6 + (total - ip) as u64;
            pkt[ip + 16..ip + 18].copy_from_slice(&fold(acc).to_be_bytes());
            let vh = &mut self.buf[..VNET_HDR_LEN];
            vh[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            vh[1] = gso;
            vh[2..4].copy_from_slice(&(h as u16).to_le_bytes());
            vh[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
            vh[6..8].copy_from_slice(&(ip as u16).to_le_bytes());
            vh[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        write(&self.buf);
        self.buf.clear();
        self.segments = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A TCP/IPv4 super-packet: 20 + 20 header bytes and `payload` bytes.
    fn super_packet(payload: usize, mss: u16) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        v[4..6].copy_from_slice(&mss.to_le_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 1, 10, 2, 0, 1,
        ];
        let total = (40 + payload) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18 | 0x80; // PSH ACK CWR
        v.extend(ip);
        v.extend(tcp);
        v.extend((0..payload).map(|i| i as u8));
        v
    }

    #[test]
    fn tso_segments_have_right_headers_and_checksums() {
        let mut pkt = super_packet(3000, 1400);
        let mut scratch = Vec::new();
        let mut out: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut scratch, |s| out.push(s.to_vec())));
        assert_eq!(out.len(), 3);
        assert_eq!(
            out.iter().map(|s| s.len() - 40).collect::<Vec<_>>(),
            [1400, 1400, 200]
        );
        let mut payload = Vec::new();
        for (i, s) in out.iter().enumerate() {
            // Both checksums verify (sum including the field folds to 0xffff).
            assert_eq!(fold(sum16(&s[..20], 0)), 0xffff, "IP checksum of {i}");
            let pseudo = sum16(&s[12..20], 6 + (s.len() as u64 - 20));
            assert_eq!(fold(sum16(&s[20..], pseudo)), 0xffff, "TCP checksum of {i}");
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let psh = s[33] & 0x08 != 0;
            let cwr = s[33] & 0x80 != 0;
            assert_eq!((psh, cwr), (i == 2, i == 0), "flags of {i}");
            payload.extend_from_slice(&s[40..]);
        }
        assert_eq!(payload, (0..3000).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn coalescing_undoes_segmentation() {
        let mut pkt = super_packet(5000, 1400);
        pkt[VNET_HDR_LEN + 33] = 0x18; // PSH ACK (a CWR segment is not merged)
        let mut scratch = Vec::new();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut scratch, |s| segs.push(s.to_vec())));
        assert_eq!(segs.len(), 4);
        let mut c = TcpCoalescer::default();
        let mut written: Vec<Vec<u8>> = Vec::new();
        for s in &segs {
            c.push(s, |w| written.push(w.to_vec()));
        }
        // A packet of another flow ends the run.
        let mut other = segs[0].clone();
        other[20] ^= 1;
        c.push(&other, |w| written.push(w.to_vec()));
        c.flush(|w| written.push(w.to_vec()));
        assert_eq!(written.len(), 2, "one super-packet, then the other flow");
        let big = &written[0];
        let h = VnetHdr::parse(big).unwrap();
        assert_eq!((h.gso_type, h.gso_size, h.flags), (1, 1400, 1));
        let ip = &big[VNET_HDR_LEN..];
        assert_eq!(ip.len(), 40 + 5000);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, ip.len());
        assert_eq!(fold(sum16(&ip[..20], 0)), 0xffff);
        assert_eq!(
            &ip[40..],
            &(0..5000).map(|i| i as u8).collect::<Vec<_>>()[..]
        );
        assert_eq!(ip[33] & 0x08, 0x08, "PSH of the last segment kept");
        // Completing the partial checksum gives a valid TCP checksum.
        let mut done = big.clone();
        assert!(segments(&mut done.clone(), &mut scratch, |_| {}));
        let ipd = &mut done[VNET_HDR_LEN..];
        complete_csum(ipd, 20, 16).unwrap();
        let pseudo = sum16(&ipd[12..20], 6 + (ipd.len() as u64 - 20));
        assert_eq!(fold(sum16(&ipd[20..], pseudo)), 0xffff);
        // The other flow's packet went out unchanged behind an empty header.
        assert_eq!(&written[1][VNET_HDR_LEN..], &other[..]);
        assert_eq!(&written[1][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    }

    #[test]
    fn bad_headers_are_refused_not_panicking() {
        let mut scratch = Vec::new();
        for mut p in [
            vec![0u8; 3],
            {
                let mut p = super_packet(100, 0);
                p[1] = VIRTIO_NET_HDR_GSO_TCPV4;
                p
            },
            {
                let mut p = super_packet(100, 1400);
                p[VNET_HDR_LEN] = 0x4f; // ihl 60 > packet headers
                p.truncate(VNET_HDR_LEN + 30);
                p
            },
            {
                let mut p = vec![0u8; VNET_HDR_LEN + 20];
                p[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                p[6..8].copy_from_slice(&500u16.to_le_bytes());
                p
            },
        ] {
            assert!(!segments(&mut p, &mut scratch, |_| panic!(
                "no segment expected"
            )));
        }
    }

    const SRC6: [u8; 16] = [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A TCP/IPv6 super-packet as the kernel hands it over: 40 + 20 header
    /// bytes and `payload` bytes, TCPV6 GSO, partial checksum.
    fn super_packet6(payload: usize, mss: u16, flags: u8) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        v[1] = VIRTIO_NET_HDR_GSO_TCPV6;
        v[2..4].copy_from_slice(&60u16.to_le_bytes());
        v[4..6].copy_from_slice(&mss.to_le_bytes());
        v[6..8].copy_from_slice(&40u16.to_le_bytes());
        v[8..10].copy_from_slice(&16u16.to_le_bytes());
        // Version 6, traffic class 0x0a, flow label 0xbcdef.
        let mut ip = vec![0x60, 0xab, 0xcd, 0xef, 0, 0, 6, 64];
        ip[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        ip.extend_from_slice(&SRC6);
        ip.extend_from_slice(&DST6);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // wraps
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        v.extend(ip);
        v.extend(tcp);
        v.extend((0..payload).map(|i| (i * 7) as u8));
        v
    }

    /// The TCP/IPv6 checksum verifies: the one's complement sum over the
    /// pseudo-header (addresses, 32-bit length, next header) and the
    /// segment is 0xffff. Built by hand, not with `tcp6_csum`.
    fn tcp6_ok(s: &[u8]) -> bool {
        let mut pseudo = s[8..40].to_vec();
        pseudo.extend_from_slice(&((s.len() - 40) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        let mut acc: u32 = 0;
        for b in [&pseudo[..], &s[40..]] {
            for c in b.chunks(2) {
                acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc == 0xffff
    }

    fn seq_of(s: &[u8], ip: usize) -> u32 {
        u32::from_be_bytes(s[ip + 4..ip + 8].try_into().unwrap())
    }

    #[test]
    fn tso6_segments_have_right_headers_and_checksums() {
        // FIN PSH ACK CWR on the super-packet.
        let mut pkt = super_packet6(3000, 1400, 0x19 | 0x80);
        let orig = pkt[VNET_HDR_LEN..].to_vec();
        let mut scratch = Vec::new();
        let mut out: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut scratch, |s| out.push(s.to_vec())));
        assert_eq!(
            out.iter().map(|s| s.len() - 60).collect::<Vec<_>>(),
            [1400, 1400, 200]
        );
        let mut payload = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert_eq!(
                usize::from(u16::from_be_bytes([s[4], s[5]])),
                s.len() - 40,
                "payload length of {i}"
            );
            assert!(tcp6_ok(s), "TCP checksum of {i}");
            // Version, class, flow label, next header, hop limit,
            // addresses, ports, ack, window unchanged.
            assert_eq!(s[0..4], orig[0..4]);
            assert_eq!(s[6..44], orig[6..44]);
            assert_eq!(s[48..53], orig[48..53]);
            assert_eq!(s[54..56], orig[54..56]);
            assert_eq!(
                seq_of(s, 40),
                0xffff_f000u32.wrapping_add(1400 * i as u32),
                "seq of {i}"
            );
            let fl = s[53];
            let last = i == 2;
            assert_eq!(fl & 0x10, 0x10, "ACK on every segment");
            assert_eq!(
                (fl & 0x08 != 0, fl & 0x01 != 0, fl & 0x80 != 0),
                (last, last, i == 0),
                "PSH, FIN, CWR of {i}"
            );
            payload.extend_from_slice(&s[60..]);
        }
        assert_eq!(payload, orig[60..]);
    }

    #[test]
    fn ipv6_needs_csum_is_completed() {
        // One TCP/IPv6 packet, no GSO, the checksum field holding the
        // pseudo-header sum as the kernel leaves it.
        let mut pkt = super_packet6(300, 1400, 0x18);
        pkt[1] = VIRTIO_NET_HDR_GSO_NONE;
        let len = pkt.len() - VNET_HDR_LEN;
        let partial = fold(sum16(
            &pkt[VNET_HDR_LEN + 8..VNET_HDR_LEN + 40],
            6 + len as u64 - 40,
        ));
        pkt[VNET_HDR_LEN + 56..VNET_HDR_LEN + 58].copy_from_slice(&partial.to_be_bytes());
        assert!(!tcp6_ok(&pkt[VNET_HDR_LEN..]));
        let mut out: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut Vec::new(), |s| out.push(s.to_vec())));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), len);
        assert!(tcp6_ok(&out[0]), "completed TCP/IPv6 checksum");
    }

    /// Cuts a TCP/IPv6 super-packet into its segments.
    fn segs6(payload: usize, mss: u16) -> Vec<Vec<u8>> {
        let mut pkt = super_packet6(payload, mss, 0x18); // PSH ACK
        let mut segs = Vec::new();
        assert!(segments(&mut pkt, &mut Vec::new(), |s| segs.push(s.to_vec())));
        segs
    }

    fn coalesce(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = TcpCoalescer::default();
        let mut written: Vec<Vec<u8>> = Vec::new();
        for p in pkts {
            c.push(p, |w| written.push(w.to_vec()));
        }
        c.flush(|w| written.push(w.to_vec()));
        written
    }

    #[test]
    fn coalescing_undoes_segmentation_ipv6() {
        let segs = segs6(5000, 1400);
        assert_eq!(segs.len(), 4);
        let mut pkts = segs.clone();
        // Another flow (source port), then an IPv4 segment, end the run.
        let mut other = segs[0].clone();
        other[40] ^= 1;
        pkts.push(other.clone());
        let mut v4 = super_packet(1400, 1400);
        v4[VNET_HDR_LEN + 33] = 0x10;
        let v4 = v4[VNET_HDR_LEN..].to_vec();
        pkts.push(v4.clone());
        let written = coalesce(&pkts);
        assert_eq!(written.len(), 3, "one super-packet, the other flow, IPv4");
        let big = &written[0];
        let h = VnetHdr::parse(big).unwrap();
        assert_eq!(
            (h.flags, h.gso_type, h.gso_size, h.csum_start, h.csum_offset),
            (
                VIRTIO_NET_HDR_F_NEEDS_CSUM,
                VIRTIO_NET_HDR_GSO_TCPV6,
                1400,
                40,
                16
            )
        );
        assert_eq!(u16::from_le_bytes([big[2], big[3]]), 60, "header length");
        let ip = &big[VNET_HDR_LEN..];
        assert_eq!(ip.len(), 60 + 5000);
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), 20 + 5000);
        assert_eq!(ip[53] & 0x08, 0x08, "PSH of the last segment kept");
        let want: Vec<u8> = segs.iter().flat_map(|s| s[60..].to_vec()).collect();
        assert_eq!(&ip[60..], &want[..]);
        // Completing the partial checksum gives a valid TCP checksum.
        let mut done = ip.to_vec();
        complete_csum(&mut done, 40, 16).unwrap();
        assert!(tcp6_ok(&done), "completed checksum of the super-packet");
        // Segmenting it again gives back exactly the segments.
        let mut again = Vec::new();
        assert!(segments(&mut big.clone(), &mut Vec::new(), |s| again
            .push(s.to_vec())));
        assert_eq!(again, segs);
        for (w, p) in written[1..].iter().zip([&other, &v4]) {
            assert_eq!(&w[VNET_HDR_LEN..], &p[..]);
            assert_eq!(&w[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        }
    }

    /// `s` with an 8-byte hop-by-hop options header (PadN) before TCP.
    fn with_hop_by_hop(s: &[u8]) -> Vec<u8> {
        let mut p = s[..40].to_vec();
        p[6] = 0; // next header: hop-by-hop
        let plen = u16::from_be_bytes([p[4], p[5]]) + 8;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&s[40..]);
        p
    }

    #[test]
    fn bad_ipv6_packets_pass_the_coalescer_unchanged() {
        let segs = segs6(5600, 1400);
        assert_eq!(segs.len(), 4);
        assert_eq!(coalesce(&segs).len(), 1, "the good ones do merge");
        let ext: Vec<Vec<u8>> = segs.iter().map(|s| with_hop_by_hop(s)).collect();
        let longer: Vec<Vec<u8>> = segs
            .iter()
            .map(|s| {
                let mut p = s.clone();
                p[5] += 1; // payload length one more than the packet
                p
            })
            .collect();
        let mut shorter = longer.clone();
        for p in &mut shorter {
            p[5] -= 2;
        }
        let truncated: Vec<Vec<u8>> = vec![segs[0][..50].to_vec(), segs[1][..59].to_vec()];
        for (what, bad) in [
            ("extension header", ext),
            ("payload length too long", longer),
            ("payload length too short", shorter),
            ("truncated", truncated),
        ] {
            let written = coalesce(&bad);
            assert_eq!(written.len(), bad.len(), "{what}: not merged");
            for (w, p) in written.iter().zip(&bad) {
                assert_eq!(&w[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "{what}");
                assert_eq!(&w[VNET_HDR_LEN..], &p[..], "{what}: unchanged");
            }
        }
        // An extension header whose bytes, read as TCP at offset 40, look
        // like a plain ACK (data offset 5, flags ACK) is still refused.
        let mut odd = segs[0][..40].to_vec();
        odd[6] = 0;
        let plen = u16::from_be_bytes([odd[4], odd[5]]) + 16;
        odd[4..6].copy_from_slice(&plen.to_be_bytes());
        // Next header TCP, length 1 (16 bytes), option 0x1e (skip if
        // unknown) with 12 data bytes.
        odd.extend_from_slice(&[6, 1, 0x1e, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x10, 0, 0]);
        odd.extend_from_slice(&segs[0][40..]);
        assert_eq!(TcpCoalescer::candidate(&segs[0]), Some((40, 60)));
        assert_eq!(TcpCoalescer::candidate(&odd), None);
        // A wrong payload length within a run is not merged.
        let mut run = segs.clone();
        run[1][5] += 1;
        let written = coalesce(&run);
        assert_eq!(written.len(), 3, "seg 0, seg 1 as it is, segs 2 and 3");
        assert_eq!(&written[1][VNET_HDR_LEN..], &run[1][..]);
        // A bad one within a run ends it and goes out as it is.
        let mut mixed = segs.clone();
        mixed[1] = with_hop_by_hop(&segs[1]);
        mixed[2].truncate(50);
        let written = coalesce(&mixed);
        assert_eq!(
            written.len(),
            4,
            "{:?}",
            written.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(&written[1][VNET_HDR_LEN..], &mixed[1][..]);
        assert_eq!(&written[2][VNET_HDR_LEN..], &mixed[2][..]);
    }

    #[test]
    fn bad_ipv6_super_packets_are_refused_not_panicking() {
        let good = super_packet6(3000, 1400, 0x18);
        assert!(segments(&mut good.clone(), &mut Vec::new(), |_| {}));
        let hbh = {
            let mut p = good[..VNET_HDR_LEN].to_vec();
            p.extend(with_hop_by_hop(&good[VNET_HDR_LEN..]));
            p
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no IPv6 header", good[..VNET_HDR_LEN + 30].to_vec()),
            ("truncated TCP header", good[..VNET_HDR_LEN + 50].to_vec()),
            ("truncated payload", good[..VNET_HDR_LEN + 2000].to_vec()),
            ("payload length too long", {
                let mut p = good.clone();
                p[VNET_HDR_LEN + 5] += 1;
                p
            }),
            ("payload length zero", {
                let mut p = good.clone();
                p[VNET_HDR_LEN + 4..VNET_HDR_LEN + 6].fill(0);
                p
            }),
            ("extension header", hbh),
            ("IPv4 under TCPV6", {
                let mut p = super_packet(3000, 1400);
                p[1] = VIRTIO_NET_HDR_GSO_TCPV6;
                p
            }),
            ("IPv6 under TCPV4", {
                let mut p = good.clone();
                p[1] = VIRTIO_NET_HDR_GSO_TCPV4;
                p
            }),
            ("mss 0", {
                let mut p = good.clone();
                p[4..6].fill(0);
                p
            }),
            ("data offset 60 past the packet", {
                let mut p = good[..VNET_HDR_LEN + 70].to_vec();
                p[VNET_HDR_LEN + 4..VNET_HDR_LEN + 6].copy_from_slice(&30u16.to_be_bytes());
                p[VNET_HDR_LEN + 52] = 15 << 4;
                p
            }),
        ];
        for (what, mut p) in cases {
            assert!(
                !segments(&mut p, &mut Vec::new(), |_| panic!(
                    "{what}: no segment expected"
                )),
                "{what}: refused"
            );
        }
    }
}
